"""Bootstrap stability of a selection, the half-sample check, rank correlations and the plot."""

from __future__ import annotations

import math

import pytest
import torch

from lwlora.selection.capture import BlockRepresentations
from lwlora.selection.policy import SelectionPolicy, select_blocks
from lwlora.selection.scoring import get_scorer
from lwlora.selection.stability import LayerStability, StabilityReport, bootstrap_stability, kendall_tau, plot_stability, spearman

N = 120


def _reps(d: int = 2, seed: int = 0) -> BlockRepresentations:
    """Blocks 0, 1: output unrelated to input (importance ≈ 1); blocks 2, 3: an exact full-sample tie
    (block 3 is block 2 with its sample rows permuted, so its CKA on all n rows is identical, but a
    bootstrap replicate sees different rows for the two); blocks 4, 5: output = input + tiny noise
    (importance ≈ 0)."""
    g = torch.Generator().manual_seed(seed)

    def rnd() -> torch.Tensor:
        return torch.randn(N, d, generator=g)

    inputs, outputs = [], []
    for _ in range(2):
        inputs.append(rnd())
        outputs.append(rnd())
    x2 = rnd()
    y2 = x2 + rnd()
    perm = torch.randperm(N, generator=g)
    inputs += [x2, x2[perm]]
    outputs += [y2, y2[perm]]
    for _ in range(2):
        x = rnd()
        inputs.append(x)
        outputs.append(x + 1e-3 * rnd())
    return BlockRepresentations(blocks=list(range(6)), inputs=inputs, outputs=outputs)


def _full_importances(reps: BlockRepresentations, scorer: str = "cka") -> list[float | None]:
    s = get_scorer(scorer)
    return [s(x, y).importance for x, y in zip(reps.inputs, reps.outputs)]


@pytest.fixture(scope="module")
def reps() -> BlockRepresentations:
    return _reps()


@pytest.fixture(scope="module")
def clear_report(reps) -> StabilityReport:
    # k = 2: only the two unrelated blocks, far above everything else
    return bootstrap_stability(reps, "cka", SelectionPolicy(num_layers=2), replicates=60, seed=0)


@pytest.fixture(scope="module")
def tie_report(reps) -> StabilityReport:
    # k = 3: the two unrelated blocks plus one of the tied pair
    return bootstrap_stability(reps, "cka", SelectionPolicy(num_layers=3), replicates=60, seed=0)


def test_clear_blocks_have_frequency_one_or_zero(clear_report):
    freqs = {layer.index: layer.frequency for layer in clear_report.layers}
    assert freqs[0] == freqs[1] == 1.0
    assert freqs[2] == freqs[3] == freqs[4] == freqs[5] == 0.0
    assert clear_report.unstable_blocks == []
    assert clear_report.selection_agreement == 1.0
    assert clear_report.full_selection == [0, 1]
    assert clear_report.num_replicates == 60 and clear_report.confidence == 0.95
    assert all(isinstance(layer, LayerStability) for layer in clear_report.layers)


def test_frequencies_in_unit_interval(tie_report):
    for layer in tie_report.layers:
        assert 0.0 <= layer.frequency <= 1.0
    # each replicate selects exactly 3 blocks
    assert math.isclose(sum(layer.frequency for layer in tie_report.layers), 3.0)


def test_ci_contains_full_sample_importance_for_separated_blocks(reps, clear_report):
    full = _full_importances(reps)
    for layer in clear_report.layers:
        assert layer.importance_low is not None and layer.importance_high is not None
        assert layer.importance_low <= layer.importance_mean <= layer.importance_high
        assert layer.importance_full == pytest.approx(full[layer.index])
        if layer.index in (0, 1, 4, 5):
            assert layer.importance_low <= full[layer.index] <= layer.importance_high
    assert not any("outside the bootstrap interval" in w for w in clear_report.warnings)


def test_high_dimensional_unrelated_blocks_warn_about_bias():
    # d = 16, unrelated output: resampled rows (≈ 0.63 n distinct) inflate CKA, so every replicate's
    # importance is below the full-sample one; the report says so instead of claiming coverage.
    report = bootstrap_stability(_reps(d=16), "cka", SelectionPolicy(num_layers=2), replicates=30, seed=0)
    for index in (0, 1):
        layer = report.layers[index]
        assert layer.importance_high < layer.importance_full
        assert layer.frequency == 1.0
    assert any("outside the bootstrap interval" in w for w in report.warnings)


def test_near_tie_is_unstable_and_warned(tie_report):
    assert tie_report.unstable_blocks == [2, 3]
    freqs = {layer.index: layer.frequency for layer in tie_report.layers}
    assert freqs[0] == freqs[1] == 1.0 and freqs[4] == freqs[5] == 0.0
    assert 0.2 < freqs[2] < 0.8 and 0.2 < freqs[3] < 0.8
    assert math.isclose(freqs[2] + freqs[3], 1.0)
    assert 0.5 < tie_report.selection_agreement < 1.0
    warning = [w for w in tie_report.warnings if "bootstrap replicates" in w]
    assert len(warning) == 1 and "blocks [2, 3]" in warning[0]


def test_reproducible_with_seed_and_different_with_another(reps, tie_report):
    policy = SelectionPolicy(num_layers=3)
    again = bootstrap_stability(reps, "cka", policy, replicates=60, seed=0)
    assert again.to_json() == tie_report.to_json()
    other = bootstrap_stability(reps, "cka", policy, replicates=60, seed=1)
    assert [layer.frequency for layer in other.layers] != [layer.frequency for layer in tie_report.layers]


def test_half_sample_check_on_clear_data(clear_report):
    # blocks 2 and 3 are exactly tied on all n but not on the half: ranks of the other 4 blocks agree
    assert clear_report.half_sample_overlap == 1.0
    assert clear_report.half_sample_spearman is not None and clear_report.half_sample_spearman > 0.9
    assert clear_report.half_sample_kendall is not None and clear_report.half_sample_kendall > 0.8
    assert not any("use more samples" in w and "Spearman" in w for w in clear_report.warnings)


def test_half_sample_warns_when_ranking_is_noise():
    # every block has output unrelated to input: the ranking is pure sampling noise
    g = torch.Generator().manual_seed(3)
    n, d, blocks = 40, 4, 8
    inputs = [torch.randn(n, d, generator=g) for _ in range(blocks)]
    outputs = [torch.randn(n, d, generator=g) for _ in range(blocks)]
    reps = BlockRepresentations(blocks=list(range(blocks)), inputs=inputs, outputs=outputs)
    report = bootstrap_stability(reps, "cka", SelectionPolicy(num_layers=4), replicates=20, seed=0)
    assert report.half_sample_spearman is not None and report.half_sample_spearman < 0.9
    assert any("ranking changes between n/2" in w for w in report.warnings)
    assert report.unstable_blocks  # noise ranking is also unstable under resampling


def test_debiased_scorer_and_explicit_full_selection(reps):
    report = bootstrap_stability(reps, "cka-debiased", SelectionPolicy(num_layers=2), replicates=20, seed=5, full_selection=[0, 4])
    assert report.full_selection == [0, 4]
    assert report.selection_agreement == pytest.approx(1 / 3)  # {0,1} vs {0,4}
    assert [layer.frequency for layer in report.layers[:2]] == [1.0, 1.0]


def test_degenerate_block_has_no_interval():
    g = torch.Generator().manual_seed(0)
    n, d = 30, 3
    inputs = [torch.randn(n, d, generator=g) for _ in range(3)]
    outputs = [torch.randn(n, d, generator=g), torch.ones(n, d), inputs[2] + 0.01 * torch.randn(n, d, generator=g)]
    reps = BlockRepresentations(blocks=[0, 1, 2], inputs=inputs, outputs=outputs)
    report = bootstrap_stability(reps, "cka", SelectionPolicy(num_layers=1), replicates=10, seed=0)
    degenerate = report.layers[1]
    assert degenerate.importance_low is None and degenerate.importance_mean is None
    assert degenerate.degenerate_replicates == 10 and degenerate.frequency == 0.0
    assert report.layers[0].frequency == 1.0
    assert report.to_json()["layers"][1]["importance_low"] is None


def test_argument_checks(reps):
    with pytest.raises(ValueError):
        bootstrap_stability(reps, "cka", SelectionPolicy(num_layers=2), replicates=0)
    with pytest.raises(ValueError):
        bootstrap_stability(reps, "cka", SelectionPolicy(num_layers=2), confidence=1.0)
    with pytest.raises(ValueError):
        bootstrap_stability(reps, "nope", SelectionPolicy(num_layers=2))


def test_to_json_fields(tie_report):
    data = tie_report.to_json()
    for key in ("num_replicates", "confidence", "layers", "unstable_blocks", "selection_agreement",
                "half_sample_spearman", "half_sample_kendall", "half_sample_overlap", "warnings"):
        assert key in data
    assert data["unstable_rule"] == "0.2 < frequency < 0.8"
    assert data["layers"][0]["index"] == 0
    import json

    json.dumps(data)


# --------------------------------------------------------------------------- rank correlations


def test_spearman_hand_computed():
    assert spearman([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # 1 − 6·Σd² / (n(n²−1)) = 1 − 6·2/60
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] → 4.5 / sqrt(4.5 · 5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    # monotone transform does not matter
    assert spearman([0.1, 5.0, 7.0], [10, 20, 1000]) == pytest.approx(1.0)
    # None dropped pairwise
    assert spearman([1, None, 2, 3], [1, 5, 2, None]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, None], [None, 2]))


def test_kendall_hand_computed():
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # C = 5, D = 1 of 6 pairs
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    # tau-b with one tie in a: (5 − 0) / sqrt((6 − 1)(6 − 0))
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    # ties on both sides: a=[1,1,2,2], b=[1,2,2,3]: pairs (01: 0,+) (02: +,+) (03: +,+) (12: +,0)
    # (13: +,+) (23: 0,+) → C − D = 3, n1 = 2, n2 = 1 → 3 / sqrt(4 · 5)
    assert kendall_tau([1, 1, 2, 2], [1, 2, 2, 3]) == pytest.approx(3 / math.sqrt(20))
    assert kendall_tau([3, 2, None, 1], [1, 2, 3, 4]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau([2, 2], [1, 3]))


# --------------------------------------------------------------------------- plot


def test_plot_writes_png(tmp_path, reps, tie_report):
    importances = _full_importances(reps)
    selected, _ = select_blocks(importances, SelectionPolicy(num_layers=3))
    path = plot_stability(tie_report, importances, selected, tmp_path / "sub" / "stability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # degenerate entries are drawn, not a crash
    out = plot_stability(tie_report, [None] + importances[1:], selected, tmp_path / "deg.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_report_json_round_trip_and_select_bootstrap(tiny_bert_dir, data_files, tmp_path):
    """`lwlora select --bootstrap N`: the report lands in selection.json and stability.png."""
    import json

    from lwlora import cli
    from lwlora.selection.stability import StabilityReport

    out = tmp_path / "sel"
    code = cli.main(["select", str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(out), "--num-samples", "24", "--num-layers", "1", "--pooling", "mean", "--bootstrap", "20", "--device", "cpu", "--no-progress"])
    assert code == 0
    data = json.loads((out / "selection.json").read_text())
    stability = data["diagnostics"]["stability"]
    assert stability["num_replicates"] == 20 and len(stability["layers"]) == data["num_layers"]
    assert all(0.0 <= layer["frequency"] <= 1.0 for layer in stability["layers"])
    assert StabilityReport.from_json(stability).to_json() == stability
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(tmp_path / "bad"), "--bootstrap", "-1"]) == 2
