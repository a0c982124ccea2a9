"""Smoke versions of the benchmark scripts (seconds, CPU), so that they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_selection_benchmark_smoke(tmp_path):
    bench = load_script("selection")
    assert bench.main(["--case", "tiny", "--repeats", "1", "--out", str(tmp_path / "sel")]) == 0
    data = json.loads((tmp_path / "sel.json").read_text())
    result = data["results"][0]
    assert set(result["median_s"]) == {"reference", "lwlora", "lwlora_length_sorted", "bare_forward"}
    # lwlora's hooked CKA equals the reference's output_hidden_states CKA except at the last block
    assert result["max_abs_cka_difference_except_last"] < 1e-4
    assert "| tiny |" in (tmp_path / "sel.md").read_text()


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
    assert set(by_name) == {"all", "cka50", "last50", "first50", "full"}
    assert by_name["cka50"]["trainable_params"] * 2 == by_name["all"]["trainable_params"]
    assert by_name["last50"]["lowest_adapted_block"] == 4 and by_name["full"]["trainable_params"] > by_name["all"]["trainable_params"]
