"""Budgets through `lwlora select` and `lwlora train`: parameter budget, elbow (--auto), shallow preference,
the equal-budget baseline and importance-weighted ranks."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from lwlora import cli
from lwlora.errors import ConfigError
from lwlora.training.config import TrainConfig
from lwlora.training.trainer import train


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-data")
    rows = [{"text": f"the cat number {i} was {'good' if i % 2 else 'bad'} today", "label": i % 2} for i in range(24)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:6])
    return root


def select(tmp_path, model, data, *extra):
    out = tmp_path / "sel"
    assert cli.main(["select", str(model), "--data", str(data), "--out", str(out), "--num-samples", "16", "--pooling", "mean", "--device", "cpu", "--no-progress", *extra]) == 0
    return json.loads((out / "selection.json").read_text())


def test_param_budget_never_exceeds_and_cost_is_reported(tiny_bert_dir, labelled, tmp_path):
    data = select(tmp_path, tiny_bert_dir, labelled, "--param-budget", "0.5", "--r", "4", "--target-modules", "query,value")
    info = data["diagnostics"]["param_budget"]
    assert info["selected_params"] <= 0.5 * info["all_layer_params"] and len(data["selected"]) == 1  # 3 equal blocks: 1 fits in half
    cost = data["cost"]
    assert cost["adapter_params"] == info["selected_params"] and cost["lowest_adapted_block"] == min(data["selected"])
    assert cost["all_layer_adapter_params"] == info["all_layer_params"]


def test_auto_and_prefer_shallow(tiny_bert_dir, labelled, tmp_path):
    auto = select(tmp_path / "auto", tiny_bert_dir, labelled, "--auto")
    elbow = auto["diagnostics"]["auto"]
    assert elbow["rule"] == "farthest-from-chord" and len(auto["selected"]) == elbow["count"]
    assert 1 <= elbow["count"] <= 3 and elbow["distances"][elbow["count"] - 1] == max(elbow["distances"])
    top = select(tmp_path / "top", tiny_bert_dir, labelled, "--num-layers", "2")
    shallow = select(tmp_path / "shallow", tiny_bert_dir, labelled, "--num-layers", "2", "--prefer-shallow", "0.99")
    assert len(shallow["selected"]) == 2 and min(shallow["selected"]) >= min(top["selected"])
    assert shallow["diagnostics"]["prefer_shallow"]["top_k"] == top["selected"]


@pytest.mark.parametrize("extra, flag", [(["--param-budget", "0"], "--param-budget"), (["--prefer-shallow", "1.5"], "--prefer-shallow")])
def test_budget_bad_input(tiny_bert_dir, labelled, tmp_path, capsys, extra, flag):
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(labelled), "--out", str(tmp_path / "x"), *extra]) == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_budget_count_options_exclude_each_other(tiny_bert_dir, labelled, tmp_path, capsys):
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(labelled), "--out", str(tmp_path / "x"), "--auto", "--num-layers", "2"]) == 2
    assert "give only one of --num-layers, --auto" in capsys.readouterr().err and not (tmp_path / "x").exists()
    from lwlora.commands.select import SelectConfig

    with pytest.raises(ConfigError, match="--auto"):
        SelectConfig(model="m", data="d", auto=True, num_layers=2)


def base_config(model, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(model), task="classification", data=str(data), out=str(out), r=8, max_steps=1, batch_size=4, max_length=24, device="cpu", progress=False, num_samples=12)
    values.update(overrides)
    return TrainConfig(**values)


def lora_ranks(model) -> dict[int, int]:
    ranks = {}
    for name, param in model.named_parameters():
        if "lora_A" in name and "encoder.layer." in name:
            ranks[int(name.split("encoder.layer.")[1].split(".")[0])] = param.shape[0]
    return ranks


def test_equal_budget_baseline_scales_the_rank(tiny_bert_dir, labelled, tmp_path):
    result = train(base_config(tiny_bert_dir, labelled, tmp_path / "run", layers="all", budget_from_ratio=0.5))
    assert lora_ranks(result.model) == {0: 2, 1: 2, 2: 2}  # floor(8 x floor(0.5 x 3) / 3) = 2
    assert result.metrics["adapter_rank"]["r"] == 2
    with pytest.raises(ConfigError, match="--budget-from-ratio"):
        base_config(tiny_bert_dir, labelled, tmp_path / "x", layers="cka", budget_from_ratio=0.5)


def test_the_recommended_preset_is_the_equal_budget_run(tiny_bert_dir, labelled, tmp_path):
    """``--preset recommended`` is expanded into ``--layers all --budget-from-ratio 0.5`` before
    anything runs: the same config (so train_config.json records what ran) and the same ranks."""
    preset = base_config(tiny_bert_dir, labelled, tmp_path / "run", preset="recommended")
    spelled = base_config(tiny_bert_dir, labelled, tmp_path / "run", layers="all", budget_from_ratio=0.5)
    assert preset.to_json() == spelled.to_json() and preset.preset is None
    result = train(preset)
    assert lora_ranks(result.model) == {0: 2, 1: 2, 2: 2}
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["budget_from_ratio"] == 0.5
    # --ratio sets the share of the blocks' parameters it spends
    smaller = base_config(tiny_bert_dir, labelled, tmp_path / "x", preset="recommended", ratio=0.34)
    assert (smaller.layers, smaller.budget_from_ratio, smaller.ratio) == ("all", 0.34, None)


def test_importance_weighted_ranks_keep_the_total(tiny_bert_dir, labelled, tmp_path):
    result = train(base_config(tiny_bert_dir, labelled, tmp_path / "run", layers="all", rank_allocation="importance", pooling="mean"))
    ranks = lora_ranks(result.model)
    assert sum(ranks.values()) == 8 * 3 and all(r >= 1 for r in ranks.values())
    importances = result.selection.diagnostics["rank_allocation_scores"]["importances"]
    order = sorted(ranks, key=lambda i: importances[i])
    assert [ranks[i] for i in order] == sorted(ranks.values())  # rank grows with importance
    assert {int(k): v for k, v in result.metrics["adapter_rank"]["per_block"].items()} == ranks
    assert result.metrics["cost"]["adapter_params"] == result.metrics["params"]["adapter"]


def test_train_with_a_parameter_budget(tiny_bert_dir, labelled, tmp_path):
    result = train(base_config(tiny_bert_dir, labelled, tmp_path / "run", layers="cka", param_budget=0.7, pooling="mean", target_modules="query,value"))
    info = result.selection.diagnostics["param_budget"]
    assert info["selected_params"] <= 0.7 * info["all_layer_params"] and len(result.selection.selected) == 2
    assert result.metrics["params"]["adapter"] == info["selected_params"]
