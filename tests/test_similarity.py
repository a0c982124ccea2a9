"""Properties of the similarity maths, against independent float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lwlora import similarity
from lwlora.selection.scoring import get_scorer


def reference_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019 eq. for linear CKA, in numpy float64, straight from the definition
    HSIC(K, L) = tr(K H L H) / (n-1)^2 with H the centring matrix."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def reference_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012, eq. (5): the unbiased HSIC estimator."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    term1 = np.trace(k @ l)
    term2 = (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ k @ l @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def reference_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T
    return reference_unbiased_hsic(k, l) / math.sqrt(reference_unbiased_hsic(k, k) * reference_unbiased_hsic(l, l))


def random_pair(n: int, dx: int, dy: int, seed: int, mix: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    y = mix * (x @ torch.randn(dx, dy, generator=g, dtype=torch.float64)) + torch.randn(n, dy, generator=g, dtype=torch.float64)
    return x, y


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


shapes = st.tuples(st.integers(4, 24), st.integers(2, 40), st.integers(2, 40), st.integers(0, 10_000))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_linear_cka_matches_float64_reference(shape):
    n, dx, dy, seed = shape
    x, y = random_pair(n, dx, dy, seed)
    expected = reference_linear_cka(x.numpy(), y.numpy())
    for space in ("gram", "feature", "auto"):
        got = float(similarity.linear_cka(x, y, space=space))
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), space


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_gram_space_equals_feature_space(shape):
    n, dx, dy, seed = shape
    x, y = random_pair(n, dx, dy, seed)
    gram = similarity.linear_cka(x.float(), y.float(), space="gram", dtype=torch.float32)
    feature = similarity.linear_cka(x.float(), y.float(), space="feature", dtype=torch.float32)
    torch.testing.assert_close(gram, feature, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_cka_properties(shape):
    n, dx, dy, seed = shape
    x, y = random_pair(n, dx, dy, seed)
    cka = float(similarity.linear_cka(x, y))
    assert 0.0 <= cka <= 1.0 + 1e-12
    assert float(similarity.linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(similarity.linear_cka(y, x)) == pytest.approx(cka, rel=1e-10)
    # invariance: orthogonal transform of either side, isotropic scaling, translation
    assert float(similarity.linear_cka(x @ random_orthogonal(dx, seed + 1), y)) == pytest.approx(cka, rel=1e-9)
    assert float(similarity.linear_cka(x, y @ random_orthogonal(dy, seed + 2))) == pytest.approx(cka, rel=1e-9)
    assert float(similarity.linear_cka(37.5 * x, 0.01 * y)) == pytest.approx(cka, rel=1e-9)
    shift = torch.randn(1, dx, dtype=torch.float64) * 100
    assert float(similarity.linear_cka(x + shift, y - 3.0)) == pytest.approx(cka, rel=1e-7)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    """A test that the invariance tests above could fail: CKA does change under a
    non-isotropic linear map, so the code is not returning a constant."""
    x, y = random_pair(32, 8, 8, 0)
    stretch = torch.diag(torch.tensor([50.0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64))
    assert abs(float(similarity.linear_cka(x @ stretch, y)) - float(similarity.linear_cka(x, y))) > 1e-3


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_debiased_cka_matches_song_et_al_reference(shape):
    n, dx, dy, seed = shape
    x, y = random_pair(n, dx, dy, seed)
    xc = (x - x.mean(0)).numpy()
    yc = (y - y.mean(0)).numpy()
    expected = reference_debiased_cka(xc, yc)
    assert float(similarity.debiased_linear_cka(x, y)) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_debiased_cka_is_unbiased_for_independent_wide_data():
    """d ≫ n: biased linear CKA of independent data is clearly > 0, debiased CKA ≈ 0."""
    biased, debiased = [], []
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 2048, generator=g, dtype=torch.float64)
        y = torch.randn(32, 2048, generator=g, dtype=torch.float64)
        biased.append(float(similarity.linear_cka(x, y)))
        debiased.append(float(similarity.debiased_linear_cka(x, y)))
    assert min(biased) > 0.5
    assert abs(np.mean(debiased)) < 0.02
    assert float(similarity.debiased_linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)


def test_debiased_cka_needs_four_samples():
    x, y = random_pair(3, 5, 5, 0)
    with pytest.raises(ValueError, match="at least 4"):
        similarity.debiased_linear_cka(x, y)


def test_cosine_scores_against_numpy():
    x, y = random_pair(20, 16, 16, 3)
    xn, yn = x.numpy(), y.numpy()
    cos = (xn * yn).sum(1) / (np.linalg.norm(xn, axis=1) * np.linalg.norm(yn, axis=1))
    assert float(similarity.mean_cosine(x, y)) == pytest.approx(cos.mean(), rel=1e-12)
    assert float(similarity.angular_distance(x, y)) == pytest.approx(np.arccos(cos).mean() / np.pi, rel=1e-12)
    assert float(similarity.angular_distance(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(similarity.angular_distance(x, -x)) == pytest.approx(1.0, abs=1e-6)


def test_cosine_scores_need_same_width():
    x, y = random_pair(8, 4, 6, 0)
    with pytest.raises(ValueError, match="same width"):
        similarity.mean_cosine(x, y)


def test_mismatched_sample_counts_rejected():
    with pytest.raises(ValueError, match="same samples"):
        similarity.linear_cka(torch.randn(5, 3), torch.randn(6, 3))


def test_float32_inputs_upcast_to_float64():
    x, y = random_pair(16, 32, 32, 1)
    assert similarity.linear_cka(x.float(), y.float()).dtype == torch.float64
    assert similarity.linear_cka(x.bfloat16(), y.bfloat16(), dtype=torch.float32).dtype == torch.float32


# --- degeneracy ---------------------------------------------------------------------------------

def test_constant_representation_is_degenerate_not_a_number():
    constant = torch.ones(16, 8) * torch.randn(1, 8)
    other = torch.randn(16, 8)
    assert "constant" in similarity.degeneracy(constant)
    assert math.isnan(float(similarity.linear_cka(constant, other)))  # raw maths is 0/0 ...
    for name in ("cka", "cka-debiased"):
        score = get_scorer(name)(constant, other)  # ... but a scorer never returns a number for it
        assert score.degenerate and score.importance is None and "constant" in score.reason
        score = get_scorer(name)(other, constant)
        assert score.degenerate and "output" in score.reason


def test_nearly_constant_representation_is_degenerate():
    base = torch.randn(1, 64, dtype=torch.float64) * 10
    jitter = torch.randn(32, 64, dtype=torch.float64) * 1e-7
    assert similarity.degeneracy(base + jitter) is not None
    assert similarity.degeneracy(base + jitter * 1e5) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_degenerate(bad):
    x = torch.randn(10, 4)
    x[3, 1] = bad
    for name in ("cka", "cka-debiased", "bi", "angular"):
        score = get_scorer(name)(x, torch.randn(10, 4))
        assert score.degenerate and score.importance is None
        assert "non-finite" in score.reason


def test_zero_vector_is_degenerate_for_cosine_scores():
    x = torch.randn(10, 4)
    x[0] = 0
    for name in ("bi", "angular"):
        score = get_scorer(name)(x, torch.randn(10, 4))
        assert score.degenerate and "zero vector" in score.reason


def test_scorer_importance_definitions():
    x, y = random_pair(24, 16, 16, 7)
    cka = get_scorer("cka")(x, y)
    assert cka.importance == pytest.approx(1.0 - float(similarity.linear_cka(x, y)))
    assert cka.similarity == pytest.approx(float(similarity.linear_cka(x, y)))
    bi = get_scorer("bi")(x, y)
    assert bi.importance == pytest.approx(1.0 - float(similarity.mean_cosine(x, y)))
    angular = get_scorer("angular")(x, y)
    assert angular.importance == pytest.approx(float(similarity.angular_distance(x, y)))
    assert not (cka.degenerate or bi.degenerate or angular.degenerate)
