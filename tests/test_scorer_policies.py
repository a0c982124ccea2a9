"""Every scorer and rule through `lwlora select --scorer NAME` and `lwlora train --layers NAME`."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_jsonl

from lwlora import cli
from lwlora.training.config import TrainConfig
from lwlora.training.trainer import train


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    rows = [{"text": f"the cat number {i} was {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:6])
    return root


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    root = tmp_path_factory.mktemp("instr")
    rows = [{"instruction": f"the cat sat {i} times", "output": f"the dog ran {i}"} for i in range(12)]
    write_jsonl(root / "train.jsonl", rows)
    return root


def run_select(tmp_path, model, data, *extra):
    out = tmp_path / "sel"
    code = cli.main(["select", str(model), "--data", str(data), "--out", str(out), "--num-samples", "12", "--batch-size", "4", "--device", "cpu", "--no-progress", *extra])
    assert code == 0
    return json.loads((out / "selection.json").read_text())


@pytest.mark.parametrize("scorer", ["cka", "cka-debiased", "bi", "angular", "fim", "gradnorm"])
def test_every_scorer_gives_one_finite_score_per_block_and_is_deterministic(tiny_bert_dir, labelled, tmp_path, scorer):
    extra = ["--scorer", scorer, "--num-layers", "2", "--pooling", "mean"] if scorer not in ("fim", "gradnorm") else ["--scorer", scorer, "--num-layers", "2"]
    first = run_select(tmp_path / "a", tiny_bert_dir, labelled, *extra)
    second = run_select(tmp_path / "b", tiny_bert_dir, labelled, *extra)
    assert first["scorer"] == scorer and len(first["layers"]) == first["num_layers"] == 3
    importances = [layer["importance"] for layer in first["layers"]]
    assert all(v is not None and math.isfinite(v) for v in importances)
    assert importances == [layer["importance"] for layer in second["layers"]]
    assert len(first["selected"]) == 2 and first["selected"] == second["selected"]
    ranked = sorted(range(3), key=lambda i: -importances[i])[:2]
    assert sorted(ranked) == first["selected"]
    if scorer == "fim":
        assert first["diagnostics"]["ranking"] == "fisher_per_param" and len(first["diagnostics"]["fisher"]) == 3


def test_gradient_scorer_on_a_decoder_with_instruction_fields(tiny_llama_dir, instructions, tmp_path):
    data = run_select(tmp_path, tiny_llama_dir, instructions, "--scorer", "gradnorm", "--num-layers", "2")
    assert data["scorer"] == "gradnorm" and len(data["layers"]) == 4 and all(layer["importance"] >= 0 for layer in data["layers"])


@pytest.mark.parametrize("rule, expected", [("all", [0, 1, 2]), ("first", [0]), ("last", [2]), ("random", None)])
def test_rules_through_select(tiny_bert_dir, labelled, tmp_path, rule, expected):
    data = run_select(tmp_path, tiny_bert_dir, labelled, "--scorer", rule, "--num-layers", "1", "--seed", "3")
    assert data["scorer"] == rule and all(layer["importance"] is None for layer in data["layers"])
    if expected is not None:
        assert data["selected"] == expected
    else:
        assert len(data["selected"]) == 1 and data["selected"] == run_select(tmp_path / "again", tiny_bert_dir, labelled, "--scorer", rule, "--num-layers", "1", "--seed", "3")["selected"]


def test_fim_rejects_feature_norm(tiny_bert_dir, labelled, tmp_path, capsys):
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(labelled), "--out", str(tmp_path / "x"), "--scorer", "fim", "--feature-norm", "standardize"]) == 2
    assert "--feature-norm" in capsys.readouterr().err


@pytest.mark.parametrize("layers", ["fim", "gradnorm", "bi", "cka-debiased"])
def test_train_layers_accepts_every_scorer(tiny_bert_dir, labelled, tmp_path, layers):
    config = TrainConfig(model=str(tiny_bert_dir), task="classification", data=str(labelled), out=str(tmp_path / "run"), layers=layers, num_layers=1, max_steps=1, batch_size=4, max_length=24, device="cpu", progress=False, num_samples=12)
    result = train(config)
    saved = json.loads((result.run_dir / "selection.json").read_text())
    assert saved["scorer"] == layers and len(saved["selected"]) == 1
    adapted = {int(n.split("encoder.layer.")[1].split(".")[0]) for n, _ in result.model.named_parameters() if "lora_A" in n}
    assert adapted == set(saved["selected"])
