"""--max-length against the model: above its positions it is lowered with a warning (it used to be
a RuntimeError deep in the forward pass), below the tokenizer's special tokens it is an error."""

from __future__ import annotations

import json

import pytest
from conftest import SENTENCES, write_jsonl

from lwlora import cli
from lwlora.errors import ConfigError
from lwlora.models import fit_max_length, position_limit

LONG = " ".join(SENTENCES)  # about 300 tokens: more than the tiny BERT's 128 positions


@pytest.fixture()
def long_data(tmp_path):
    root = tmp_path / "long"
    root.mkdir()
    rows = [{"text": LONG if i % 3 == 0 else SENTENCES[i], "label": i % 2} for i in range(24)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:6])
    return root


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:") and "--max-length" in line]


def test_select_above_the_positions_is_lowered_with_a_warning(tiny_bert_dir, long_data, tmp_path, capsys):
    out = tmp_path / "sel"
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(long_data / "train.jsonl"), "--out", str(out), "--num-samples", "12", "--max-length", "1000", "--device", "cpu", "--no-progress"]) == 0
    (warning,) = _warnings(capsys.readouterr().err)
    assert "--max-length 1000 is above the 128 positions" in warning
    assert json.loads((out / "selection.json").read_text())["cost"]["seq_len"] == 128


def test_train_above_the_positions_is_lowered_with_a_warning_and_resumes(tiny_bert_dir, long_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", str(tiny_bert_dir), "--task", "classification", "--data", str(long_data), "--out", str(out), "--layers", "cka", "--num-layers", "1",
            "--max-steps", "2", "--batch-size", "8", "--max-length", "1000", "--device", "cpu", "--no-progress", "--num-samples", "12"]
    assert cli.main(argv) == 0
    assert len(_warnings(capsys.readouterr().err)) == 1  # once, though the selection and the task both use it
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["max_length"] == 128
    assert json.loads((out / "train_config.json").read_text())["max_length"] == 1000  # what was asked: --resume compares it
    assert cli.main([*argv, "--resume"]) == 0


@pytest.mark.parametrize("command", ["select", "train"])
def test_no_room_for_text_is_a_max_length_error(tiny_bert_dir, long_data, tmp_path, capsys, command):
    out = tmp_path / "out"
    if command == "select":
        argv = ["select", str(tiny_bert_dir), "--data", str(long_data / "train.jsonl"), "--out", str(out), "--max-length", "1", "--device", "cpu", "--no-progress"]
    else:
        argv = ["train", str(tiny_bert_dir), "--task", "classification", "--data", str(long_data), "--out", str(out), "--layers", "last", "--max-length", "2", "--device", "cpu", "--no-progress"]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--max-length" in err[0] and "leaves no room for text" in err[0] and "at least 3" in err[0]
    assert not out.exists()


def test_position_limits_of_the_families():
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # positions start after the padding index
    assert position_limit(GPT2Config(n_positions=1024)) == 1024
    assert position_limit(LlamaConfig(max_position_embeddings=4096)) == 4096

    class Bare:
        model_type = "custom"

    assert position_limit(Bare()) is None


def test_fit_max_length_keeps_lengths_that_fit(tiny_bert_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    assert fit_max_length(64, config, tokenizer) == 64
    assert fit_max_length(3, config, tokenizer) == 3
    with pytest.raises(ConfigError, match="to a text pair; use at least 4"):
        fit_max_length(3, config, tokenizer, pair=True)


def test_the_default_length_is_fitted_silently(tiny_bert_dir, long_data, tmp_path, capsys):
    """The default 512 on a 128-position model: lowered without a warning (nothing was asked)."""
    out = tmp_path / "sel"
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(long_data / "train.jsonl"), "--out", str(out), "--num-samples", "12", "--device", "cpu", "--no-progress"]) == 0
    assert _warnings(capsys.readouterr().err) == []
    assert json.loads((out / "selection.json").read_text())["cost"]["seq_len"] == 128
