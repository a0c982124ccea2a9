"""Shared types and helpers of the task loaders: ``EvalExample``, ``PreparedTask``, the causal-LM
collator, seeded subsetting, selection-text sampling and data-source access that fails with a
``ConfigError`` naming the flag to fix."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lwlora.data import LOCAL_FORMATS, TextSamples, fingerprint, load_records, read_json_file
from lwlora.errors import ConfigError


@dataclass
class EvalExample:
    """One generation-evaluated example (causal-LM tasks)."""

    prompt: str  # the full prompt fed to generate() (template applied, no answer)
    reference: str  # gold answer: number string (math), letter (choice), test code (code)
    kind: Literal["math", "choice", "code"]
    choices: list[str] | None = None  # option texts for multiple choice (letters A.. in order)
    entry_point: str | None = None  # code: function name; its tests are in ``reference``
    code_prompt: str | None = None  # code: the HumanEval prompt the completion continues
    image: Any = None  # image tasks: the example's image (path, PIL image or {"bytes", "path"})


@dataclass
class PreparedTask:
    name: str
    kind: Literal["classification", "regression", "causal_lm"]
    train: Any  # datasets.Dataset: input_ids, attention_mask, labels (+ token_type_ids)
    eval: dict[str, Any]  # split name -> tokenized datasets.Dataset (same columns)
    eval_examples: dict[str, list[EvalExample]]  # causal_lm generation eval sets; {} otherwise
    num_labels: int | None
    label_names: list[str] | None
    metric_names: list[str]
    selection_texts: TextSamples
    data_collator: Callable
    #: Free-form provenance (sources, sizes) for reports; not part of the training contract.
    info: dict[str, Any] = field(default_factory=dict)
    #: Image tasks: the model's multimodal processor (the task needs a vision-language model).
    processor: Any = None


class CausalLMCollator:
    """Right-pads ``input_ids`` with the pad id, ``attention_mask`` with 0 and ``labels`` with -100."""

    def __init__(self, pad_token_id: int, label_pad_id: int = -100):
        if pad_token_id is None:
            raise ValueError("CausalLMCollator needs a pad token id")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_id = label_pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        def as_list(value: Any) -> list[int]:
            return value.tolist() if hasattr(value, "tolist") else list(value)

        ids = [as_list(f["input_ids"]) for f in features]
        width = max(len(x) for x in ids)
        masks = [as_list(f["attention_mask"]) if "attention_mask" in f else [1] * len(x) for f, x in zip(features, ids)]
        labels = [as_list(f["labels"]) if "labels" in f else list(x) for f, x in zip(features, ids)]
        return {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids], dtype=torch.long),
            "attention_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long),
            "labels": torch.tensor([y + [self.label_pad_id] * (width - len(y)) for y in labels], dtype=torch.long),
        }


def ensure_pad_token(tokenizer: Any) -> None:
    """Decoder tokenizers (Llama, ...) often have no pad token: use EOS (mutates ``tokenizer``, or
    the text tokenizer of a multimodal processor)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("--model", "the tokenizer has neither a pad nor an EOS token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def subset_indices(n: int, cap: int | None, seed: int | None) -> list[int]:
    """All of ``range(n)`` when ``cap`` is None or >= n; else ``cap`` indices: the first ones when
    ``seed`` is None, a sorted seeded random sample otherwise."""
    if cap is None or cap >= n:
        return list(range(n))
    if seed is None:
        return list(range(cap))
    return sorted(random.Random(seed).sample(range(n), cap))


def check_caps(max_length: int, max_train_samples: int | None, max_eval_samples: int | None, selection_samples: int) -> None:
    if max_length < 2:
        raise ConfigError("--max-length", f"must be at least 2, got {max_length}")
    if max_train_samples is not None and max_train_samples < 1:
        raise ConfigError("--max-train-samples", f"must be at least 1, got {max_train_samples}")
    if max_eval_samples is not None and max_eval_samples < 1:
        raise ConfigError("--max-eval-samples", f"must be at least 1, got {max_eval_samples}")
    if selection_samples < 1:
        raise ConfigError("--num-samples", f"must be at least 1, got {selection_samples}")


def to_dataset(records: Any) -> Any:
    """A ``datasets.Dataset`` from a Dataset or a list of dicts."""
    import datasets

    if isinstance(records, datasets.Dataset):
        return records
    return datasets.Dataset.from_list(list(records))


def take(records: Any, indices: list[int]) -> Any:
    records = to_dataset(records)
    if len(indices) == len(records):
        return records
    return records.select(indices)


def columns_of(records: Any) -> list[str]:
    if hasattr(records, "column_names"):
        return list(records.column_names)
    return list(records[0].keys()) if len(records) else []


def sample_selection(texts: list[str], pairs: list[str] | None, n: int, seed: int, source: str) -> TextSamples:
    """Up to ``n`` of the given training inputs, drawn with ``random.Random(seed)`` in data order."""
    indices = subset_indices(len(texts), n, seed)
    chosen = [texts[i] for i in indices]
    chosen_pairs = [pairs[i] for i in indices] if pairs is not None else None
    return TextSamples(texts=chosen, text_pairs=chosen_pairs, source=source, fingerprint=fingerprint(chosen, chosen_pairs))


# ---------------------------------------------------------------------------------------------
# Data sources


def local_splits(directory: Path) -> set[str]:
    """Split names (``train``, ``validation``, ...) of a directory of ``SPLIT.EXT`` files."""
    return {p.name.split(".")[0] for p in directory.iterdir() if p.is_file() and "".join(p.suffixes[:1]).lower() in LOCAL_FORMATS}


def read_meta(data: str | None) -> dict[str, Any]:
    """The ``meta.json`` in a data directory (or beside a data file), or {}."""
    if not data:
        return {}
    path = Path(data)
    if not path.exists() and ":" in data and Path(data.rsplit(":", 1)[0]).is_dir():
        path = Path(data.rsplit(":", 1)[0])
    meta = (path if path.is_dir() else path.parent) / "meta.json"
    if not path.exists() or not meta.is_file():
        return {}
    value = read_json_file(meta)  # names the line of a syntax error, or the bytes that are not UTF-8
    if not isinstance(value, dict):
        raise ConfigError("--data", f"{meta} must hold a JSON object such as {{\"label_names\": [...]}}")
    return value


def load_eval_source(data: str, eval_splits: tuple[str, ...] | None) -> tuple[Any, dict[str, Any]]:
    """``load_source`` for the local tasks: the default (first present of validation, test), or
    exactly the ``--eval-splits`` asked for, each of which must exist in the ``--data`` directory."""
    if eval_splits is None:
        return load_source(data, ("validation", "test"))
    path = Path(data)
    if not path.is_dir():
        raise ConfigError("--eval-splits", f"needs --data to be a directory of split files, got {data!r}")
    present = local_splits(path)
    missing = [split for split in eval_splits if split not in present]
    if missing:
        raise ConfigError("--eval-splits", f"{path} has no split(s) {', '.join(missing)}; splits found: {', '.join(sorted(present)) or 'none'}")
    return load_source(data, eval_splits, first_only=False)


def load_source(data: str, eval_splits: tuple[str, ...] = ("validation", "test"), *, first_only: bool = True) -> tuple[Any, dict[str, Any]]:
    """(train records, {eval split: records}) of a ``--data`` spec.

    A directory gives its ``train`` split and the first present of ``eval_splits`` (all present
    ones when ``first_only`` is False); ``DIR:split``, a file or a ``name:config:split`` Hub spec
    gives only training records; a Hub name without a split gives ``train`` plus the first
    loadable of ``eval_splits``."""
    path = Path(data)
    if path.is_dir():
        present = local_splits(path)
        if "train" not in present:
            raise ConfigError("--data", f"{path} has no train split; splits found: {', '.join(sorted(present)) or 'none'}")
        train = load_records(str(path))
        evals: dict[str, Any] = {}
        for split in eval_splits:
            if split in present:
                evals[split] = load_records(f"{path}:{split}")
                if first_only:
                    break
        return train, evals
    train = load_records(data)
    looks_local = path.exists() or (":" in data and Path(data.rsplit(":", 1)[0]).is_dir())
    if looks_local or data.startswith("builtin:") or len(data.split(":")) >= 3:
        return train, {}
    evals = {}
    for split in eval_splits:  # a Hub name: train loaded, so try the usual eval splits
        name_config = data if ":" in data else data + ":"
        try:
            evals[split] = load_records(f"{name_config}:{split}")
        except ConfigError:
            continue
        if first_only:
            break
    return train, evals


def load_hub_dataset(path: str, *, flag: str = "--data", what: str = "", **kwargs: Any) -> Any:
    """``datasets.load_dataset(name, **kwargs)``; any failure (offline, unknown name) becomes a
    one-line ``ConfigError(flag)``."""
    try:
        from datasets import load_dataset

        return load_dataset(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - offline, missing, malformed: all the user's to fix
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        hint = f" {what}" if what else ""
        raise ConfigError(flag, f"could not load Hub dataset {path!r} ({args}){hint}: {first_line(exc)}") from None


def probe_batches(task: Any, *, num_samples: int, batch_size: int, seed: int) -> list[dict[str, Any]]:
    """``num_samples`` training examples of ``task`` (all if fewer), drawn with ``seed``, collated
    in batches: the labelled inputs of the gradient scorers, EVA's initialisation and the
    warm-up pruning score."""
    total = len(task.train)
    indices = sorted(random.Random(seed).sample(range(total), min(num_samples, total)))
    rows = [task.train[i] for i in indices]
    return [task.data_collator(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]
