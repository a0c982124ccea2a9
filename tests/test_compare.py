"""``lwlora compare``: several selection methods on one tiny checkpoint, their Jaccard overlap,
the written artifacts, training each selection over seeds, and bad inputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import SENTENCES, write_jsonl

from lwlora.commands.compare import compare_selections, format_comparison, jaccard, parse_methods, parse_seeds, summarise_runs, train_comparison, write_comparison
from lwlora.errors import ConfigError

FAST = {"num_samples": 16, "batch_size": 4, "max_length": 32, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare-data")
    write_jsonl(root / "train.jsonl", [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES[:24])])
    write_jsonl(root / "validation.jsonl", [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES[24:32])])
    return root


@pytest.fixture(scope="module")
def comparison(tiny_bert_dir, labelled_dir):
    return compare_selections(str(tiny_bert_dir), str(labelled_dir), ["cka", "bi", "random", "last", "first"], num_layers=1, **FAST)


def parser() -> argparse.ArgumentParser:
    from lwlora.cli import build_parser

    return build_parser()


def run(args: argparse.Namespace) -> int:
    from lwlora.cli import run_command

    return run_command(args)


def test_jaccard_definition():
    assert jaccard([], []) == 1.0
    assert jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3)
    assert jaccard([0], [1]) == 0.0


def test_selections_and_jaccard(comparison):
    methods = ["cka", "bi", "random", "last", "first"]
    assert list(comparison.selections) == methods
    assert comparison.num_layers == 3
    for m in methods:
        assert len(comparison.selections[m].selected) == 1
        assert comparison.selections[m].scorer == m
        assert comparison.jaccard[m][m] == 1.0
        for n in methods:
            assert comparison.jaccard[m][n] == comparison.jaccard[n][m]
            assert 0.0 <= comparison.jaccard[m][n] <= 1.0
    assert comparison.selections["last"].selected == [2]
    assert comparison.selections["first"].selected == [0]
    assert comparison.jaccard["last"]["first"] == 0.0
    assert comparison.costs["last"] == {"lowest_block": 2, "num_selected": 1, "num_layers": 3, "backward_depth": 1}
    assert comparison.costs["first"]["backward_depth"] == 3


def test_artifacts(comparison, tmp_path):
    paths = write_comparison(comparison, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["methods"] == comparison.methods
    assert data["selections"]["last"]["one_hot"] == "001"
    assert data["jaccard"]["cka"]["cka"] == 1.0
    assert data["training"] is None
    md = paths["markdown"].read_text()
    assert "| method | selected blocks | one-hot | lowest block |" in md
    assert "| last | 2 | `001` | 2 |" in md
    assert "Jaccard" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for m in comparison.methods:
        assert json.loads((tmp_path / "out" / "selections" / f"{m}.json").read_text())["scorer"] == m


def test_gradient_scorer_included(tiny_bert_dir, labelled_dir):
    result = compare_selections(str(tiny_bert_dir), str(labelled_dir), ["fim", "cka", "last"], num_layers=2, **FAST)
    assert len(result.selections["fim"].selected) == 2
    assert result.selections["fim"].scorer == "fim"
    assert result.selections["last"].selected == [1, 2]
    assert result.jaccard["fim"]["last"] == result.jaccard["last"]["fim"]


def test_train_mean_std(comparison, tmp_path):
    out = tmp_path / "trained"
    training = train_comparison(comparison, out, seeds=[0, 1], max_steps=2, r=2, train_batch_size=8, max_length=32, device="cpu", progress=False)
    assert [(r["method"], r["seed"]) for r in training["runs"]][:2] == [("cka", 0), ("cka", 1)]
    assert len(training["runs"]) == 2 * len(comparison.methods)
    for m in comparison.methods:
        stats = training["summary"][m]
        assert stats["num_seeds"] == 2 and stats["seeds"] == [0, 1]
        assert stats["final"]["validation"]["accuracy"]["n"] == 2
        assert stats["trainable_params"]["std"] == 0.0
        assert (out / "runs" / f"{m}-seed1" / "metrics.json").is_file()
        assert json.loads((out / "runs" / f"{m}-seed0" / "selection.json").read_text())["selected"] == comparison.selections[m].selected
    md = format_comparison(comparison)
    assert "mean ± std over seeds 0, 1" in md
    assert "validation accuracy" in md
    comparison.training = None  # the module-scoped fixture is shared


def test_summary_single_seed_has_zero_std():
    runs = [{"method": "cka", "seed": 0, "final": {"validation": {"accuracy": 0.5}}, "params": {"trainable": 10}, "runtime_s": 1.0}]
    stats = summarise_runs(runs)["cka"]
    assert stats["final"]["validation"]["accuracy"] == {"mean": 0.5, "std": 0.0, "n": 1}
    runs.append({"method": "cka", "seed": 1, "final": {"validation": {"accuracy": 1.0}}, "params": {"trainable": 10}, "runtime_s": 3.0})
    stats = summarise_runs(runs)["cka"]
    assert stats["final"]["validation"]["accuracy"]["std"] == pytest.approx(0.25)  # population std
    assert stats["train_runtime_s"]["mean"] == 2.0


def test_cli_handler_with_training(tiny_bert_dir, labelled_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = parser().parse_args([
        "compare", str(tiny_bert_dir), "--data", str(labelled_dir), "--out", str(out), "--methods", "cka,last",
        "--num-layers", "1", "--num-samples", "16", "--batch-size", "4", "--max-length", "32", "--device", "cpu", "--no-progress",
        "--train", "--seeds", "0,1", "--max-steps", "2", "--r", "2", "--train-batch-size", "8",
    ])
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "| cka |" in printed and "| last | 2 | `001` | 2 |" in printed
    data = json.loads((out / "comparison.json").read_text())
    summary = data["training"]["summary"]
    assert set(summary) == {"cka", "last"}
    assert all(s["num_seeds"] == 2 for s in summary.values())
    md = (out / "comparison.md").read_text()
    training_rows = [line for line in md.split("## Training")[1].splitlines() if line.startswith(("| cka |", "| last |"))]
    assert len(training_rows) == 2 and all(line.count("±") >= 4 for line in training_rows)
    assert "validation accuracy" in md and "num_input_tokens_seen" not in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "methods, words",
    [("cka,nope", ["nope", "cka-debiased", "gradnorm"]), ("", ["empty"]), (",", ["empty"]), ("cka,bi,cka", ["more than once", "cka"])],
)
def test_bad_methods(methods, words):
    with pytest.raises(ConfigError) as info:
        parse_methods(methods)
    assert info.value.flag == "--methods"
    for word in words:
        assert word in info.value.message


def test_bad_seeds():
    for text in ("0,x", "1.5", "", "0,0"):
        with pytest.raises(ConfigError) as info:
            parse_seeds(text)
        assert info.value.flag == "--seeds"
    assert parse_seeds("0, 1,2") == [0, 1, 2]


def test_cli_bad_inputs_fail_before_writing(tiny_bert_dir, labelled_dir, tmp_path):
    base = ["compare", str(tiny_bert_dir), "--data", str(labelled_dir), "--no-progress", "--device", "cpu"]
    cases = [
        (["--methods", "cka,wat"], "--methods"),
        (["--methods", ""], "--methods"),
        (["--methods", "bi,bi"], "--methods"),
        (["--methods", "cka", "--train", "--seeds", "a,b"], "--seeds"),
        (["--methods", "cka", "--num-layers", "0"], "--num-layers"),
        (["--methods", "cka", "--train", "--lr", "0"], "--lr"),
    ]
    for i, (extra, flag) in enumerate(cases):
        out = tmp_path / f"out{i}"
        args = parser().parse_args([*base, "--out", str(out), *extra])
        with pytest.raises(ConfigError) as info:
            run(args)
        assert info.value.flag == flag, (extra, info.value)
        assert not out.exists()
    with pytest.raises(ConfigError) as info:
        compare_selections(str(tiny_bert_dir), str(labelled_dir), ["cka", "gone"], **FAST)
    assert info.value.flag == "--methods"


def test_compare_through_the_lwlora_entry_point(tiny_bert_dir, labelled_dir, tmp_path, capsys):
    from lwlora import cli

    out = tmp_path / "cmp"
    assert cli.main(["compare", str(tiny_bert_dir), "--data", str(labelled_dir), "--out", str(out), "--methods", "cka,last", "--num-layers", "1", "--num-samples", "12", "--device", "cpu", "--no-progress"]) == 0
    assert (out / "comparison.json").is_file()
    assert cli.main(["compare", str(tiny_bert_dir), "--data", str(labelled_dir), "--out", str(tmp_path / "bad"), "--methods", "cka,nope"]) == 2
    err = capsys.readouterr().err
    assert "lwlora compare: error: --methods" in err and not (tmp_path / "bad").exists()
