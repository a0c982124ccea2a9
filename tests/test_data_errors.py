"""Data that real users have: Unicode line separators inside JSON strings, files that are not
UTF-8, a broken line in the middle of a JSON Lines file, empty and all-blank files, and fewer
records than ``--num-samples``. Each failure is one ``ConfigError("--data")`` naming the file and
the place in it, through the Python API (``lwlora.data``, ``lwlora.tasks``) and the CLI (``select``,
``train`` for classification and instruction data, ``eval``): exit status 2 and one stderr line."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SENTENCES, write_jsonl

from lwlora import cli
from lwlora.data import load_records, load_text_samples
from lwlora.errors import ConfigError
from lwlora.tasks import load_task

#: Valid JSON strings that ``str.splitlines`` splits on (line/paragraph separators, NEL, FF, GS).
SEPARATORS = "\u2028\u2029\u0085\x0c\x1d"


def _write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, gzip-compressed when the name ends in ``.gz``."""
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _error(call, *args, **kwargs) -> ConfigError:
    """The ``ConfigError`` that ``call`` raises; it must be for ``--data`` and one line."""
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    error = info.value
    assert error.flag == "--data", str(error)
    assert "\n" not in str(error), str(error)
    return error


def _records_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _latin1_records(n: int = 3, bad_line: int = 2) -> bytes:
    """``n`` JSON Lines records in Latin-1; line ``bad_line`` holds an ``é`` (byte 0xe9)."""
    rows = [{"text": "caf\u00e9 au lait" if i == bad_line - 1 else f"plain {i}", "label": i % 2} for i in range(n)]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("latin-1")


@pytest.fixture()
def lwlora_warnings():
    """Messages logged at WARNING or above on the ``lwlora`` logger. The handler sits on that logger
    itself: ``lwlora.cli.main`` turns its propagation to the root logger (where caplog listens) off."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log = logging.getLogger("lwlora")
    handler = Collect(level=logging.WARNING)
    previous = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    yield messages
    log.removeHandler(handler)
    log.setLevel(previous)


# ------------------------------------------------------------------------------------------------
# U+2028, U+0085, ... inside JSON strings are not line breaks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dialogue.jsonl.gz", "dialogue.jsonl"])
def test_unicode_line_separators_inside_json_strings(tmp_path, name):
    records = [{"text": f"turn one{sep}turn two", "label": i % 2} for i, sep in enumerate(SEPARATORS)]
    path = _write(tmp_path / name, _records_bytes(records))
    assert list(load_records(str(path))) == records
    assert load_text_samples(str(path), num_samples=len(records)).texts == [r["text"] for r in records]


@pytest.mark.parametrize("name", ["lines.txt", "lines.txt.gz"])
def test_txt_splits_on_newlines_only(tmp_path, name):
    lines = [f"sample {i}{sep}continued" for i, sep in enumerate(SEPARATORS)]
    path = _write(tmp_path / name, ("\r\n".join(lines) + "\n\n").encode("utf-8"))
    assert [r["text"] for r in load_records(str(path))] == lines


def test_crlf_and_byte_order_mark_in_jsonl_gz(tmp_path):
    path = _write(tmp_path / "windows.jsonl.gz", b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    assert list(load_records(str(path))) == [{"text": "a"}, {"text": "b"}]


# ------------------------------------------------------------------------------------------------
# not UTF-8
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["latin.jsonl", "latin.jsonl.gz", "latin.json", "latin.csv", "latin.txt", "latin.txt.gz"])
def test_non_utf8_names_file_position_and_remedy(tmp_path, name):
    if name.endswith(".json"):
        data = ("[\n" + json.dumps({"text": "plain"}) + ",\n" + json.dumps({"text": "caf\u00e9"}, ensure_ascii=False) + "\n]\n").encode("latin-1")
        line, offset = 3, len(b'[\n{"text": "plain"},\n{"text": "caf')
    elif name.endswith(".csv"):
        data = "text,label\nplain,0\ncaf\u00e9,1\n".encode("latin-1")
        line, offset = 3, len(b"text,label\nplain,0\ncaf")
    elif ".txt" in name:
        data = "plain\ncaf\u00e9\n".encode("latin-1")
        line, offset = 2, len(b"plain\ncaf")
    else:
        data = _latin1_records()
        line, offset = 2, data.index(b"\xe9")
    path = _write(tmp_path / name, data)
    # load_text_samples is what `lwlora select` runs: today a UnicodeDecodeError traceback.
    message = _error(load_text_samples, str(path), num_samples=2).message
    assert str(path) in message and "not UTF-8" in message and "0xe9" in message
    assert f"line {line}" in message and f"byte offset {offset}" in message
    assert "iconv -f latin1 -t utf-8" in message


def test_utf16_file_gets_the_utf16_remedy(tmp_path):
    path = _write(tmp_path / "excel.jsonl", '{"text": "a"}\n'.encode("utf-16"))
    message = _error(load_records, str(path)).message
    assert str(path) in message and "line 1, byte offset 0" in message and "iconv -f utf-16 -t utf-8" in message


# ------------------------------------------------------------------------------------------------
# a broken line in the middle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["broken.jsonl", "broken.jsonl.gz"])
def test_broken_jsonl_line_is_named(tmp_path, name):
    good = _records_bytes([{"text": s, "label": 0} for s in SENTENCES[:5]]).splitlines(keepends=True)
    lines = good[:3] + [b'{"text": "half a record", "label": \n'] + good[3:]
    path = _write(tmp_path / name, b"".join(lines))
    message = _error(load_records, str(path)).message
    assert str(path) in message and "line 4" in message and "column" in message and "not valid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "lists.jsonl", b'{"text": "a"}\n["text", "b"]\n')
    message = _error(load_records, str(path)).message
    assert str(path) in message and "line 2" in message and "array, not an object" in message


def test_broken_json_document_is_named(tmp_path):
    path = _write(tmp_path / "records.json", b'[\n  {"text": "a", "label": 0},\n  {"text": "b" "label": 1}\n]\n')
    message = _error(load_records, str(path)).message
    assert str(path) in message and "line 3, column 16" in message


def test_ragged_csv_names_file_and_line(tmp_path):
    path = _write(tmp_path / "rows.csv", b"text,label\na,0\nb,1,extra\nc,0\n")
    message = _error(load_records, str(path)).message
    assert str(path) in message and "line 3" in message and "DatasetGenerationError" not in message


@pytest.mark.parametrize("name, data", [("numbers.jsonl", b"1\n2\n"), ("rows.csv", b"text,label\na,0\nb,1,extra\n")])
def test_datasets_parser_error_is_not_logged_as_well(tmp_path, caplog, name, data):
    """The one-line ConfigError is the whole report: ``datasets`` must not also log its parser's
    error (at ERROR, to stderr), as it does for these two files."""
    path = _write(tmp_path / name, data)
    with caplog.at_level(logging.DEBUG):
        _error(load_records, str(path))
    assert [r.getMessage() for r in caplog.records if r.name.startswith("datasets") and r.levelno >= logging.ERROR] == []


# ------------------------------------------------------------------------------------------------
# empty and blank files
# ------------------------------------------------------------------------------------------------


_TEXT_NAMES = ["e.jsonl", "e.jsonl.gz", "e.json", "e.csv", "e.txt", "e.txt.gz"]


@pytest.mark.parametrize(
    "name, content, words",
    [(name, b"", "is empty") for name in [*_TEXT_NAMES, "e.parquet"]] + [(name, b"\n \n\t\n", "only blank lines") for name in _TEXT_NAMES],
)
def test_empty_and_blank_files(tmp_path, name, content, words):
    path = _write(tmp_path / name, content)
    message = _error(load_text_samples, str(path)).message
    assert str(path) in message and words in message


def test_empty_json_array(tmp_path):
    path = _write(tmp_path / "none.json", b"[]\n")
    message = _error(load_records, str(path)).message
    assert str(path) in message and "no records" in message


def test_empty_split_file_in_a_directory_is_named(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}])
    (tmp_path / "validation.jsonl").write_text("\n")
    message = _error(load_records, f"{tmp_path}:validation").message
    assert str(tmp_path / "validation.jsonl") in message and "only blank lines" in message


# ------------------------------------------------------------------------------------------------
# fewer records than --num-samples
# ------------------------------------------------------------------------------------------------


def test_fewer_records_than_num_samples_warns_and_is_recorded(tiny_bert_dir, data_files, lwlora_warnings):
    from lwlora.commands.select import SelectConfig, select_layers

    selection = select_layers(SelectConfig(model=str(tiny_bert_dir), data=str(data_files.jsonl), num_samples=128, device="cpu", progress=False))
    expected = f"--num-samples 128 asked, but {data_files.jsonl} has only 40 records: the scores rest on 40 samples"
    assert selection.num_samples == 40
    assert expected in lwlora_warnings and expected in selection.warnings


def test_enough_records_do_not_warn(tiny_bert_dir, data_files, lwlora_warnings):
    from lwlora.commands.select import SelectConfig, select_layers

    selection = select_layers(SelectConfig(model=str(tiny_bert_dir), data=str(data_files.jsonl), num_samples=40, device="cpu", progress=False))
    assert not [w for w in lwlora_warnings + selection.warnings if "--num-samples" in w]


def test_a_failing_run_prints_its_error_alone_not_the_few_samples_warning(tiny_bert_dir, tmp_path, capfd):
    """The warning belongs to a selection that runs; bad input is one line."""
    path = write_jsonl(tmp_path / "three.jsonl", [{"text": s} for s in SENTENCES[:3]])
    assert cli.main(_select(tiny_bert_dir, path, tmp_path / "out", "--scorer", "cka-debiased", "--num-samples", "16")) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "needs at least 4 samples" in err[0]


@pytest.fixture()
def bert_tok(tiny_bert_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture()
def llama_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _cls_dir(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", [{"text": SENTENCES[i], "label": i % 2} for i in range(n)])
    write_jsonl(root / "validation.jsonl", [{"text": SENTENCES[i], "label": i % 2} for i in range(4)])
    return root


def _instruction_dir(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", [{"instruction": f"is it {SENTENCES[i]}", "output": SENTENCES[i + 1]} for i in range(n)])
    return root


# ------------------------------------------------------------------------------------------------
# the training tasks read their split files through the same checks
# ------------------------------------------------------------------------------------------------


def test_task_broken_eval_split_names_file_and_line(bert_tok, tmp_path):
    data = _cls_dir(tmp_path / "cls")
    with (data / "validation.jsonl").open("a") as handle:
        handle.write('{"text": "oops", "label": 1\n{"text": "fine", "label": 0}\n')
    message = _error(load_task, "classification", bert_tok, data=str(data), max_length=32).message
    assert str(data / "validation.jsonl") in message and "line 5" in message


def test_task_non_utf8_training_file(llama_tok, tmp_path):
    data = tmp_path / "inst"
    data.mkdir()
    (data / "train.jsonl").write_bytes('{"instruction": "na\u00efve?", "output": "yes"}\n'.encode("latin-1"))
    message = _error(load_task, "instruction", llama_tok, data=str(data), max_length=64).message
    assert str(data / "train.jsonl") in message and "line 1" in message and "iconv" in message


def test_task_meta_json_errors_name_the_line(bert_tok, tmp_path):
    data = _cls_dir(tmp_path / "cls")
    (data / "meta.json").write_text('{"label_names": ["neg", "pos"],\n}\n')
    message = _error(load_task, "classification", bert_tok, data=str(data), max_length=32).message
    assert str(data / "meta.json") in message and "line 2" in message


# ------------------------------------------------------------------------------------------------
# through the CLI: exit status 2 and exactly one stderr line naming the file
# ------------------------------------------------------------------------------------------------


def _one_error_line(capfd, command: str, path: Path) -> str:
    """The only stderr line (fd level, so loggers with their own stream count too)."""
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lwlora {command}: error: --data: ") and str(path) in lines[0], lines[0]
    return lines[0]


def _select(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["select", str(model), "--data", str(data), "--out", str(out), "--batch-size", "4", "--device", "cpu", "--no-progress", *extra]


def _train(model: Path, task: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(model), "--task", task, "--data", str(data), "--out", str(out), "--layers", "last", "--num-layers", "1",
            "--max-steps", "1", "--batch-size", "4", "--max-length", "32", "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("dialogue.jsonl.gz", _latin1_records(), "line 2, byte offset"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": "b",\n{"text": "c"}\n', "line 2"),
        ("empty.jsonl", b"", "is empty"),
        ("blank.csv", b"\n\n", "only blank lines"),
    ],
    ids=["non-utf8", "broken-line", "empty", "blank"],
)
def test_select_bad_data_is_one_line_and_exit_2(tiny_bert_dir, tmp_path, capfd, name, data, words):
    path = _write(tmp_path / name, data)
    out = tmp_path / "out"
    assert cli.main(_select(tiny_bert_dir, path, out)) == 2
    assert words in _one_error_line(capfd, "select", path)
    assert not out.exists()


def test_select_with_few_records_warns(tiny_bert_dir, data_files, tmp_path, lwlora_warnings):
    assert cli.main(_select(tiny_bert_dir, data_files.jsonl, tmp_path / "out", "--num-samples", "128")) == 0
    assert f"--num-samples 128 asked, but {data_files.jsonl} has only 40 records: the scores rest on 40 samples" in lwlora_warnings


def test_train_classification_broken_validation_split(tiny_bert_dir, tmp_path, capfd):
    data = _cls_dir(tmp_path / "cls")
    with (data / "validation.jsonl").open("a") as handle:
        handle.write('{"text": "oops", "label": }\n')
    assert cli.main(_train(tiny_bert_dir, "classification", data, tmp_path / "run")) == 2
    assert "line 5" in _one_error_line(capfd, "train", data / "validation.jsonl")


def test_train_instruction_non_utf8(tiny_llama_dir, tmp_path, capfd):
    data = _instruction_dir(tmp_path / "inst")
    with (data / "train.jsonl").open("ab") as handle:
        handle.write('{"instruction": "na\u00efve?", "output": "yes"}\n'.encode("latin-1"))
    assert cli.main(_train(tiny_llama_dir, "instruction", data, tmp_path / "run")) == 2
    line = _one_error_line(capfd, "train", data / "train.jsonl")
    assert "line 13" in line and "iconv -f latin1 -t utf-8" in line


def test_train_cka_with_few_records_warns(tiny_bert_dir, tmp_path, lwlora_warnings):
    data = _cls_dir(tmp_path / "cls", n=12)
    args = _train(tiny_bert_dir, "classification", data, tmp_path / "run")
    args[args.index("last")] = "cka"
    assert cli.main([*args, "--num-samples", "32"]) == 0
    assert any(w.startswith("--num-samples 32 asked") and w.endswith("has only 12 records: the scores rest on 12 samples") for w in lwlora_warnings), lwlora_warnings


def test_eval_reports_a_broken_split_in_one_line(tiny_bert_dir, tmp_path, capfd):
    data = _cls_dir(tmp_path / "cls")
    run = tmp_path / "run"
    assert cli.main(_train(tiny_bert_dir, "classification", data, run)) == 0
    (data / "validation.jsonl").write_bytes(b'{"text": "a", "label": 0}\n{"text": "b" "label": 1}\n')
    capfd.readouterr()
    assert cli.main(["eval", str(run), "--no-progress"]) == 2
    assert "line 2" in _one_error_line(capfd, "eval", data / "validation.jsonl")


def test_select_in_a_subprocess_prints_exactly_one_line(tiny_bert_dir, tmp_path):
    """The real stderr (in-process capture misses handlers bound to the original stream): only
    lwlora's line, not also ``datasets``' logged parser error."""
    path = _write(tmp_path / "rows.csv", b"text,label\na,0\nb,1,extra\n")
    done = subprocess.run([sys.executable, "-m", "lwlora.cli", *_select(tiny_bert_dir, path, tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lwlora select: error: --data: ") and str(path) in lines[0] and "line 3" in lines[0], done.stderr
