"""Training tasks: each ``load_task`` call turns a task name (and optional ``--data``) into a
``PreparedTask`` -- tokenized train/eval splits, generation eval examples for causal LMs, metric
names, the selection texts (what the model sees, for layer selection) and a batch collator.

Task names are listed in ``TASKS``; see :mod:`lwlora.tasks.classification` (GLUE presets and
generic classification), :mod:`lwlora.tasks.instruction` (instruction tuning, MetaMathQA,
Code-Feedback), :mod:`lwlora.tasks.gsm_symbolic` (the embedded offline math task) and
:mod:`lwlora.tasks.scienceqa` (images: needs a vision-language model; ``tokenizer`` is then the
model's processor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lwlora.errors import ConfigError
from lwlora.tasks.base import (
    CausalLMCollator,
    EvalExample,
    PreparedTask,
    check_caps,
    ensure_pad_token,
)
from lwlora.tasks.presets import IMAGE_TASKS, TASKS

__all__ = ["TASKS", "CausalLMCollator", "EvalExample", "PreparedTask", "load_task"]

_COLUMN_FLAGS = {"text_column": "--text-column", "text_pair_column": "--text-pair-column", "label_column": "--label-column"}
_FIELD_FLAGS = {"instruction_field": "--instruction-field", "output_field": "--output-field"}


def load_task(
    task: str,
    tokenizer: Any,
    *,
    data: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    instruction_field: str | None = None,
    output_field: str | None = None,
    max_length: int = 512,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    eval_splits: str | Sequence[str] | None = None,
    selection_samples: int = 128,
    seed: int = 0,
    packing: bool = False,
) -> PreparedTask:
    """Load and tokenize ``task`` (a key of ``TASKS``). ``tokenizer`` gets a pad token (its EOS)
    when it has none. Every user error is a ``ConfigError`` naming the CLI flag to change."""
    check_caps(max_length, max_train_samples, max_eval_samples, selection_samples)
    if task == "humaneval":
        raise ConfigError("--task", "humaneval has no training split; train with --task code-feedback, which evaluates on HumanEval")
    if task not in TASKS:
        raise ConfigError("--task", f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    splits = parse_eval_splits(eval_splits)
    if splits is not None and task not in ("classification", "instruction"):
        raise ConfigError("--eval-splits", f"applies to --task classification and instruction (local split directories), not {task}, whose evaluation sets are fixed")
    if task in IMAGE_TASKS:
        for flag, value in (("--text-column", text_column), ("--text-pair-column", text_pair_column), ("--label-column", label_column), ("--instruction-field", instruction_field), ("--output-field", output_field)):
            if value is not None:
                raise ConfigError(flag, f"does not apply to {task}, which reads fixed fields (image, question, choices, answer, hint)")
        from lwlora.tasks.scienceqa import load_scienceqa

        return load_scienceqa(tokenizer, data=data, max_length=max_length, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, selection_samples=selection_samples, seed=seed, packing=packing)
    ensure_pad_token(tokenizer)
    common = {"max_length": max_length, "max_train_samples": max_train_samples, "selection_samples": selection_samples, "seed": seed}
    columns = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    fields = {"instruction_field": instruction_field, "output_field": output_field}

    if task.startswith("glue/") or task == "classification":
        for key, value in fields.items():
            if value is not None:
                raise ConfigError(_FIELD_FLAGS[key], f"applies to instruction tasks, not {task}")
        if packing:
            raise ConfigError("--packing", f"applies to causal-LM tasks, not {task}")
        from lwlora.tasks.classification import load_classification, load_glue

        if task == "classification":
            return load_classification(tokenizer, data=data, max_eval_samples=max_eval_samples, eval_splits=splits, **columns, **common)
        return load_glue(task.split("/", 1)[1], tokenizer, data=data, max_eval_samples=max_eval_samples, **columns, **common)

    for key, value in columns.items():
        if value is not None:
            raise ConfigError(_COLUMN_FLAGS[key], f"applies to classification tasks, not {task} (use --instruction-field/--output-field)")
    from lwlora.tasks.gsm_symbolic import load_gsm_symbolic
    from lwlora.tasks.instruction import (
        load_code_feedback,
        load_instruction,
        load_metamath,
    )

    if task == "instruction":
        return load_instruction(tokenizer, data=data, max_eval_samples=max_eval_samples, eval_splits=splits, packing=packing, **fields, **common)
    loader = {"metamath": load_metamath, "code-feedback": load_code_feedback, "gsm-symbolic": load_gsm_symbolic}[task]
    return loader(tokenizer, data=data, max_eval_samples=max_eval_samples, packing=packing, **fields, **common)


def parse_eval_splits(eval_splits: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"validation,test"`` (or a sequence) -> ("validation", "test"); None stays None."""
    if eval_splits is None:
        return None
    parts = eval_splits.split(",") if isinstance(eval_splits, str) else list(eval_splits)
    names = tuple(dict.fromkeys(part.strip() for part in parts if part.strip()))
    if not names:
        raise ConfigError("--eval-splits", f"must name at least one split, e.g. validation,test; got {eval_splits!r}")
    if "train" in names:
        raise ConfigError("--eval-splits", "cannot evaluate on the train split")
    return names
