"""Streamed linear-CKA statistics (lwlora.streaming) and the capture that keeps memory bounded in n:
the numbers against float64 references, the degeneracy test, capture with ``statistics=`` on tiny
random models, and the configurations that must be refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lwlora import similarity
from lwlora.selection.capture import BlockRepresentations, BlockStatistics, capture_block_representations
from lwlora.data import TextSamples
from lwlora.errors import ConfigError
from lwlora.selection.scoring import get_scorer, score_pair
from lwlora.commands.select import SelectConfig
from lwlora.selection.pipeline import capture_samples, resolve_statistics, score_representations
from lwlora.streaming import CKAStatistics


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019, linear CKA from the definition, numpy float64: HSIC(K, L) = tr(K H L H)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def random_pair(n: int, dx: int, dy: int, seed: int, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    y = 0.5 * (x @ torch.randn(dx, dy, generator=g, dtype=torch.float64)) + torch.randn(n, dy, generator=g, dtype=torch.float64)
    return x + offset, y + offset


def streamed(x: torch.Tensor, y: torch.Tensor, cuts: list[int]) -> CKAStatistics:
    """Statistics absorbed batch by batch, the batches ending at ``cuts`` (sorted row indices)."""
    stats = CKAStatistics.empty(x.shape[1], y.shape[1])
    bounds = [0, *cuts, x.shape[0]]
    for start, stop in zip(bounds, bounds[1:]):
        stats.update(x[start:stop], y[start:stop])
    return stats


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@st.composite
def pairs_and_cuts(draw):
    n = draw(st.integers(4, 48))
    dx, dy, seed = draw(st.integers(1, 20)), draw(st.integers(1, 20)), draw(st.integers(0, 10_000))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=6))))
    return n, dx, dy, seed, cuts


# ------------------------------------------------------------------------------------------------
# numerics
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(pairs_and_cuts())
def test_streamed_cka_equals_float64_reference_and_row_cka(case):
    n, dx, dy, seed, cuts = case
    x, y = random_pair(n, dx, dy, seed)
    value = float(streamed(x, y, cuts).linear_cka())
    assert value == pytest.approx(reference_cka(x.numpy(), y.numpy()), rel=1e-10, abs=1e-12)
    assert value == pytest.approx(float(similarity.linear_cka(x, y)), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_common_offset_loses_no_digits(dtype):
    """Hidden states share a large mean: offset 1e3, spread 1, batches of 1 to 7 rows."""
    x, y = random_pair(500, 24, 16, seed=7, offset=1e3)
    x, y = x.to(dtype), y.to(dtype)
    cuts = [int(c) for c in np.cumsum([1 + i % 7 for i in range(200)]) if c < 500]
    stats = streamed(x, y, cuts)
    # the reference's uncentred Gram matrices would cancel ~7 digits here: centre the rows first (H X = X − 1 μᵀ)
    x64, y64 = x.double().numpy(), y.double().numpy()
    expected = reference_cka(x64 - x64.mean(0), y64 - y64.mean(0))
    assert float(stats.linear_cka()) == pytest.approx(expected, rel=1e-10)
    assert float(similarity.linear_cka(x, y)) == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(stats.mean_x, x.double().mean(0), rtol=1e-13, atol=0)
    centred = x.double() - x.double().mean(0)
    torch.testing.assert_close(stats.cxx, centred.T @ centred, rtol=1e-10, atol=1e-9)
    assert stats.degeneracy("x") is None and stats.count == 500


@settings(max_examples=30, deadline=None)
@given(pairs_and_cuts())
def test_streamed_cka_properties(case):
    n, dx, dy, seed, cuts = case
    x, y = random_pair(n, dx, dy, seed)
    value = float(streamed(x, y, cuts).linear_cka())
    assert 0.0 <= value <= 1.0 + 1e-12
    assert float(CKAStatistics.from_rows(x, x).linear_cka()) == pytest.approx(1.0, abs=1e-12)
    assert float(CKAStatistics.from_rows(y, x).linear_cka()) == pytest.approx(value, rel=1e-10)  # symmetric
    assert float(CKAStatistics.from_rows(37.5 * x, 0.01 * y).linear_cka()) == pytest.approx(value, rel=1e-9)
    rotated = CKAStatistics.from_rows(x @ random_orthogonal(dx, seed + 1), y @ random_orthogonal(dy, seed + 2))
    assert float(rotated.linear_cka()) == pytest.approx(value, rel=1e-9)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert float(streamed(x[order], y[order], [n // 2]).linear_cka()) == pytest.approx(value, rel=1e-10)


def test_anisotropic_scaling_changes_streamed_cka():
    """The invariances above are not a constant in disguise."""
    x, y = random_pair(32, 8, 8, 0)
    stretch = torch.diag(torch.tensor([50.0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64))
    assert abs(float(CKAStatistics.from_rows(x @ stretch, y).linear_cka()) - float(CKAStatistics.from_rows(x, y).linear_cka())) > 1e-3


def test_merge_equals_the_union_of_the_rows():
    x, y = random_pair(90, 12, 7, 3, offset=50.0)
    parts = [CKAStatistics.from_rows(x[a:b], y[a:b]) for a, b in ((0, 10), (10, 61), (61, 90))]
    merged = CKAStatistics.empty(12, 7)
    for part in parts:
        merged.merge(part)
    merged.merge(CKAStatistics.empty(12, 7))  # nothing to add
    whole = CKAStatistics.from_rows(x, y)
    assert merged.count == whole.count == 90
    for name in ("mean_x", "mean_y", "cxx", "cyy", "cyx"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(CKAStatistics.empty(7, 12))
    with pytest.raises(ValueError, match="do not match"):
        merged.update(x[:, :5], y)


def test_standardized_cka_from_statistics():
    x, y = random_pair(80, 10, 6, 4, offset=3.0)
    x[:, 2] *= 300.0  # a massive activation
    x[:, 5] = 1.25  # a constant feature: zeroed, as standardize_features does
    expected = float(similarity.linear_cka(similarity.standardize_features(x), similarity.standardize_features(y)))
    stats = streamed(x, y, [13, 40])
    assert float(stats.linear_cka(feature_norm="standardize")) == pytest.approx(expected, rel=1e-10)
    assert abs(float(stats.linear_cka()) - expected) > 1e-2  # the plain value differs
    with pytest.raises(ValueError, match="feature_norm"):
        stats.linear_cka(feature_norm="whiten")


def test_state_bytes_do_not_depend_on_n():
    small, large = (CKAStatistics.from_rows(*random_pair(n, 9, 5, 0)) for n in (4, 400))
    assert small.nbytes == large.nbytes == CKAStatistics.state_nbytes(9, 5) == (81 + 25 + 45 + 9 + 5) * 8


def _degeneracy_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 16, generator=g, dtype=torch.float64) * 10
    jitter = torch.randn(24, 16, generator=g, dtype=torch.float64)
    nan, inf = jitter.clone(), jitter.clone()
    nan[3, 2], inf[7, 0] = float("nan"), float("inf")
    return {
        "varied": jitter,
        "cls-at-embedding": base.expand(24, 16).float(),  # bit-identical rows
        "nearly-constant": base + 1e-7 * jitter,
        "just-varied": base + 1e-2 * jitter,
        "offset-varied": 1e3 + jitter,
        "zeros": torch.zeros(24, 16),
        "nan": nan,
        "inf": inf,
        "one-sample": jitter[:1],
    }


@pytest.mark.parametrize(("name", "rows"), list(_degeneracy_cases().items()))
def test_degeneracy_from_statistics_agrees_with_rows(name, rows):
    other = torch.randn(rows.shape[0], 3, dtype=torch.float64)
    expected = similarity.degeneracy(rows)
    assert (expected is None) == (name in ("varied", "just-varied", "offset-varied"))
    stats = streamed(rows, other, [1] if rows.shape[0] > 2 else [])
    assert stats.degeneracy("x") == expected
    assert streamed(other, rows, [1] if rows.shape[0] > 2 else []).degeneracy("y") == expected
    if name == "cls-at-embedding":
        assert "relative spread 0.0e+00" in stats.degeneracy("x")


# ------------------------------------------------------------------------------------------------
# scorers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_norm", ["none", "standardize"])
def test_cka_scorer_gives_the_same_score_from_statistics(feature_norm):
    scorer = get_scorer("cka", feature_norm=feature_norm)
    x, y = random_pair(40, 8, 8, 6, offset=20.0)
    from_rows, from_stats = scorer(x.float(), y.float()), score_pair(scorer, CKAStatistics.from_rows(x.float(), y.float()))
    assert from_stats.similarity == pytest.approx(from_rows.similarity, rel=1e-10)
    assert from_stats.importance == pytest.approx(from_rows.importance, rel=1e-9)
    constant = torch.ones(40, 8) * torch.randn(1, 8)
    assert score_pair(scorer, CKAStatistics.from_rows(x, constant)) == scorer(x, constant)  # same reason, word for word
    assert score_pair(scorer, CKAStatistics.from_rows(constant, x)).reason.startswith("block input: constant")


@pytest.mark.parametrize("name", ["cka-debiased", "bi", "angular"])
def test_scorers_that_need_rows_refuse_statistics(name):
    x, y = random_pair(16, 4, 4, 0)
    with pytest.raises(ValueError, match="needs the rows"):
        score_pair(get_scorer(name), CKAStatistics.from_rows(x, y))


# ------------------------------------------------------------------------------------------------
# capture on tiny random models
# ------------------------------------------------------------------------------------------------


def _load(directory):
    from transformers import AutoModel, AutoTokenizer

    from lwlora.models import prepare_tokenizer

    return AutoModel.from_pretrained(directory).eval(), prepare_tokenizer(AutoTokenizer.from_pretrained(directory))


@pytest.fixture(scope="module")
def samples(data_files):
    texts = list(data_files.texts[:20])
    return TextSamples(texts=texts, text_pairs=None, source="test", fingerprint="x")


def _scores(reps, scorer_name="cka", fallback="exclude"):
    return score_representations(reps, get_scorer(scorer_name), degenerate_fallback=fallback)


@pytest.mark.parametrize(("model_dir", "pooling"), [("tiny_bert_dir", "cls"), ("tiny_llama_dir", "last")])
def test_capture_statistics_give_the_scores_of_the_rows(model_dir, pooling, samples, request):
    """rows, covariance from the first batch, and auto folding after the second batch (fold_at=6,
    batches of 4): the same CKA per block and per pooling, the same degenerate blocks."""
    from lwlora.blocks import resolve_block_stack

    model, tokenizer = _load(request.getfixturevalue(model_dir))
    stack = resolve_block_stack(model)
    common = dict(pooling=pooling, batch_size=4, progress=False, extra_poolings=("mean",))
    rows = capture_samples(model, tokenizer, samples, stack, statistics="rows", **common)
    covariance = capture_samples(model, tokenizer, samples, stack, statistics="covariance", **common)
    folded = capture_samples(model, tokenizer, samples, stack, statistics="auto", fold_at=6, **common)
    assert isinstance(rows, BlockRepresentations)
    assert isinstance(covariance, BlockStatistics) and isinstance(folded, BlockStatistics)
    assert isinstance(folded.alternates["mean"], BlockStatistics) and folded.num_samples == covariance.num_samples == 20
    for fallback in ("exclude", "mean"):
        expected = _scores(rows, fallback=fallback)
        for reps in (covariance, folded):
            got = _scores(reps, fallback=fallback)
            assert [s.degenerate for s in got] == [s.degenerate for s in expected]
            assert [s.reason for s in got] == [s.reason for s in expected]
            assert [s.fallback for s in got] == [s.fallback for s in expected]
            for a, b in zip(got, expected):
                assert (a.similarity is None) == (b.similarity is None)
                if a.similarity is not None:
                    assert a.similarity == pytest.approx(b.similarity, rel=1e-9, abs=1e-12)
    if model_dir == "tiny_bert_dir":  # the CLS vector at the embedding output is the same for every sample
        block0 = _scores(covariance)[0]
        assert block0.degenerate and block0.reason.startswith("block input: constant across samples")


def test_auto_keeps_rows_until_the_statistics_are_smaller():
    """hidden 8, 2 blocks: the statistics take 8 (3·64 + 16) bytes per block, the rows 4 · 16 bytes
    per sample, so auto keeps rows up to 26 samples and folds after the batch that passes that."""
    from transformers import AutoModel, LlamaConfig

    from lwlora.blocks import resolve_block_stack

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = AutoModel.from_config(config).eval()
    stack = resolve_block_stack(model)
    ids = torch.randint(3, 64, (96, 6), generator=torch.Generator().manual_seed(1))

    def capture(n: int, statistics: str):
        batches = [{"input_ids": ids[i : min(i + 8, n)]} for i in range(0, n, 8)]
        return capture_block_representations(model, stack, batches, pooling="last", mask_key=None, progress=False, statistics=statistics)

    state = 2 * CKAStatistics.state_nbytes(8, 8)
    small = capture(24, "auto")
    assert isinstance(small, BlockRepresentations) and small.nbytes == 2 * 24 * 16 * 4 < state
    for n in (32, 96):
        auto, rows = capture(n, "auto"), capture(n, "rows")
        assert isinstance(auto, BlockStatistics) and auto.nbytes == state  # the same whatever n
        assert rows.nbytes == 2 * n * 16 * 4 > state
        assert [s.similarity for s in _scores(auto)] == pytest.approx([s.similarity for s in _scores(rows)], rel=1e-9)


def test_capture_rejects_an_unknown_statistics_choice(tiny_llama_dir):
    from lwlora.blocks import resolve_block_stack

    model, _ = _load(tiny_llama_dir)
    with pytest.raises(ValueError, match="statistics must be one of"):
        capture_block_representations(model, resolve_block_stack(model), [], pooling="last", statistics="sketch")


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statistics", "scorer", "bootstrap", "kept"),
    [
        ("auto", "cka", 0, "auto"),
        ("covariance", "cka", 0, "covariance"),
        ("rows", "cka", 5, "rows"),
        ("auto", "cka", 5, "rows"),  # the stability report resamples rows
        ("auto", "bi", 0, "rows"),
        ("auto", "cka-debiased", 0, "rows"),
    ],
)
def test_resolve_statistics(statistics, scorer, bootstrap, kept):
    assert resolve_statistics(statistics, scorer, bootstrap=bootstrap) == kept


@pytest.mark.parametrize(
    "overrides",
    [
        {"scorer": "cka-debiased"},
        {"scorer": "bi"},
        {"scorer": "angular"},
        {"scorer": "fim"},
        {"scorer": "random"},
        {"bootstrap": 10},
        {"feature_norm": "standardize", "bootstrap": 1},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_covariance_with_what_needs_rows_is_a_config_error(overrides):
    with pytest.raises(ConfigError) as info:
        SelectConfig(model="m", data="d", statistics="covariance", **overrides)
    assert info.value.flag == "--statistics"
    assert "--statistics auto or rows" in info.value.message and "\n" not in info.value.message


def test_covariance_with_plain_cka_is_accepted_and_unknown_choices_are_not():
    SelectConfig(model="m", data="d", statistics="covariance", feature_norm="standardize")
    with pytest.raises(ConfigError, match="--statistics: unknown choice 'sketch'"):
        SelectConfig(model="m", data="d", statistics="sketch")  # type: ignore[arg-type]


def test_score_layers_refuses_covariance_for_a_row_scorer(tiny_llama_dir, samples):
    from lwlora.blocks import resolve_block_stack
    from lwlora.selection.pipeline import score_layers

    model, tokenizer = _load(tiny_llama_dir)
    with pytest.raises(ConfigError, match="--statistics"):
        score_layers(model, tokenizer, samples, resolve_block_stack(model), scorer="bi", statistics="covariance", progress=False)


def test_train_config_checks_and_passes_statistics(monkeypatch):
    import lwlora.selection.pipeline as pipeline
    from lwlora.training.config import TrainConfig
    from lwlora.training.layers import choose_layers

    for overrides in ({"layers": "bi"}, {"scorer": "cka-debiased"}, {"statistics": "sketch"}):
        with pytest.raises(ConfigError) as info:
            TrainConfig(model="m", task="t", out="o", **{"statistics": "covariance", **overrides})
        assert info.value.flag == "--statistics"
    TrainConfig(model="m", task="t", out="o", layers="all", statistics="covariance")  # nothing is measured
    seen = []
    monkeypatch.setattr(pipeline, "select_on_model", lambda options, *args, **kwargs: seen.append(options))

    class Task:
        selection_texts = None

    class Stack:
        num_layers = 3

    choose_layers(TrainConfig(model="m", task="t", out="o", statistics="covariance"), None, None, Stack(), "encoder", Task())
    assert seen[0].statistics == "covariance"


def test_near_identity_diagnostics_from_statistics_match_the_rows():
    """The re-scoring under the other feature normalisation works from statistics too."""
    from lwlora.selection.policy import SelectionPolicy, select_blocks
    from lwlora.selection.pipeline import near_identity_diagnostics
    from lwlora.selection.artifact import LayerRecord

    g = torch.Generator().manual_seed(3)
    blocks = []
    for i in range(4):  # a massive shared dimension makes every block look like identity to plain CKA
        shared = torch.randn(64, 1, generator=g) * 1000
        x = torch.cat([shared, torch.randn(64, 15, generator=g)], dim=1)
        y = torch.cat([shared, x[:, 1:] * (1 - 0.25 * i) + torch.randn(64, 15, generator=g) * 0.3 * i], dim=1)
        blocks.append((x, y))
    rows = BlockRepresentations(blocks=[0, 1, 2, 3], inputs=[b[0] for b in blocks], outputs=[b[1] for b in blocks], pooling="last")
    stats = BlockStatistics(blocks=[0, 1, 2, 3], statistics=[streamed(x, y, [20, 41]) for x, y in blocks], pooling="last")
    policy, config = SelectionPolicy(num_layers=2), SelectConfig(model="m", data="d", num_samples=64)
    results = []
    for reps in (rows, stats):
        scores = _scores(reps)
        records = [LayerRecord(index=i, cka=s.similarity, similarity=s.similarity, importance=s.importance, degenerate=False) for i, s in enumerate(scores)]
        selected, _ = select_blocks([r.importance for r in records], policy)
        results.append(near_identity_diagnostics(reps, records, policy, config, selected))
    assert results[1] == results[0]
    assert results[1][0]["alternative"]["selected"] == [2, 3]
