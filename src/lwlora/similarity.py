"""Representation-similarity maths used to score how much a transformer block changes its input.

Pure torch, no transformers import. Every function takes two representation matrices of the
same ``n`` samples, ``x`` of shape ``(n, d_x)`` and ``y`` of shape ``(n, d_y)`` (row ``i`` of both
belongs to sample ``i``), and returns a 0-d tensor in the requested ``dtype``.

Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019),
as used by Ogawa et al., "Layer-wise LoRA fine-tuning: a similarity metric approach" (arXiv
2602.05988), with the biased HSIC estimator on column-centred ``X``, ``Y``::

    CKA(X, Y) = ||Yᵀ X||²_F / (||Xᵀ X||_F · ||Yᵀ Y||_F)              (feature space, d × d)
              = <K, L>_F / (||K||_F · ||L||_F),  K = X Xᵀ, L = Y Yᵀ   (Gram space, n × n)

Both forms are the same number; the Gram form costs O(n² d) instead of O(n d²), so it is used
when ``n < d``.

Debiased CKA replaces the biased HSIC by the unbiased estimator of Song et al. (JMLR 2012), as in
Nguyen, Raghu & Kornblith, "Do Wide and Deep Networks Learn the Same Things?" (ICLR 2021). It
removes the positive bias linear CKA has when ``d ≫ n`` (two independent random matrices get a
clearly positive linear CKA, but a debiased CKA close to 0). It needs ``n >= 4``.

Two cheaper scores compare each sample's input and output vectors directly (same width needed):
cosine "block influence" BI = 1 − mean_i cos(x_i, y_i) (Men et al., "ShortGPT", 2024) and the
angular distance mean_i arccos(cos(x_i, y_i)) / π (Gromov et al., "The Unreasonable
Ineffectiveness of the Deeper Layers", 2024).

Degenerate input (non-finite values, or a representation that is constant across samples, which
makes CKA 0/0) is never turned into a number: ``degeneracy`` says why, and callers report it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Space = Literal["auto", "gram", "feature"]

#: Relative spread ``||X − mean(X)||_F / ||X||_F`` under which a representation counts as constant
#: across samples. A CLS vector at an encoder's embedding output is bit-identical for every sample
#: (spread 0); real representations of different texts sit many orders of magnitude above this.
DEFAULT_DEGENERACY_RTOL = 1e-4

#: Standard deviation at or below which ``standardize_features`` treats a feature as constant (it becomes 0).
STANDARDIZE_EPS = 1e-12


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"representations must be 2-D (n samples × d features), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"representations must hold the same samples, got {x.shape[0]} and {y.shape[0]} rows")


def _centre(x: Tensor, dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)
    return x - x.mean(dim=0, keepdim=True)


def degeneracy(x: Tensor, *, rtol: float = DEFAULT_DEGENERACY_RTOL) -> str | None:
    """Why ``x`` (n, d) cannot be compared by CKA, or ``None`` when it can.

    Degenerate means: non-finite values, fewer than two samples, all zeros, or a relative spread
    ``||X − 1 μᵀ||_F / ||X||_F <= rtol`` (the same vector, up to rounding, for every sample).
    """
    if x.ndim != 2:
        raise ValueError(f"representation must be 2-D (n × d), got shape {tuple(x.shape)}")
    n = x.shape[0]
    finite = bool(torch.isfinite(x).all())
    sum_sq = centred_sq = 0.0
    if n >= 2 and finite:
        x64 = x.to(torch.float64)
        sum_sq = float(x64.pow(2).sum())
        centred_sq = float((x64 - x64.mean(dim=0, keepdim=True)).pow(2).sum())
    return degeneracy_from_moments(n, finite=finite, sum_sq=sum_sq, centred_sq=centred_sq, rtol=rtol)


def degeneracy_from_moments(n: int, *, finite: bool, sum_sq: float, centred_sq: float, rtol: float = DEFAULT_DEGENERACY_RTOL) -> str | None:
    """``degeneracy`` from the moments of X (n, d) instead of its rows.

    Args:
        n: number of samples (rows).
        finite: whether every value is finite.
        sum_sq: ||X||²_F = Σ_i ||x_i||².
        centred_sq: ||X − 1 μᵀ||²_F = Σ_i ||x_i − μ||² (the trace of the centred second moment).
        rtol: largest relative spread sqrt(centred_sq / sum_sq) that still counts as constant.
    """
    if n < 2:
        return f"only {n} sample(s); at least 2 are needed"
    if not finite:
        return "non-finite values (NaN or inf)"
    if sum_sq == 0:
        return "all zeros"
    relative = math.sqrt(max(centred_sq, 0.0) / sum_sq)
    if relative <= rtol:
        return f"constant across samples (relative spread {relative:.1e} <= {rtol:g})"
    return None


def linear_cka(x: Tensor, y: Tensor, *, dtype: torch.dtype = torch.float64, space: Space = "auto") -> Tensor:
    """Linear CKA with the biased HSIC estimator; see the module docstring for the equation.

    Args:
        x: (n, d_x) representations, any float dtype and device.
        y: (n, d_y) representations of the same samples.
        dtype: accumulation dtype (float32 or float64); inputs are upcast before centring.
        space: ``"gram"`` (n × n kernels), ``"feature"`` (d × d cross-covariances) or ``"auto"``
            (Gram when n < max(d_x, d_y)). Both give the same value up to rounding.

    Returns:
        0-d tensor in [0, 1]; NaN when either input is constant (0/0) — check ``degeneracy`` first.
    """
    _check_pair(x, y)
    xc, yc = _centre(x, dtype), _centre(y, dtype)
    if space == "auto":
        space = "gram" if x.shape[0] < max(x.shape[1], y.shape[1]) else "feature"
    if space == "gram":
        k, l = xc @ xc.T, yc @ yc.T  # (n, n) each
        return (k * l).sum() / (torch.linalg.norm(k) * torch.linalg.norm(l))
    if space == "feature":
        cross = yc.T @ xc  # (d_y, d_x)
        return torch.linalg.norm(cross) ** 2 / (torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc))
    raise ValueError(f"space must be 'auto', 'gram' or 'feature', got {space!r}")


def _u_centre(gram: Tensor) -> Tensor:
    """U-centre an (n, n) Gram matrix (Székely & Rizzo 2014); ⟨Ũ(K), Ũ(L)⟩ / (n(n−3)) is HSIC_u."""
    n = gram.shape[0]
    gram = gram.clone()
    gram.fill_diagonal_(0)
    means = gram.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    gram = gram - means[:, None] - means[None, :]
    gram.fill_diagonal_(0)
    return gram


def debiased_linear_cka(x: Tensor, y: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021).

    CKA_u = HSIC_u(K, L) / sqrt(HSIC_u(K, K) · HSIC_u(L, L)), computed as the cosine between the
    U-centred Gram matrices of x (n, d_x) and y (n, d_y). Needs n >= 4. Can be slightly negative
    for unrelated representations (an unbiased estimate of 0).
    """
    _check_pair(x, y)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"debiased CKA needs at least 4 samples, got {n}")
    xc, yc = _centre(x, dtype), _centre(y, dtype)
    k, l = _u_centre(xc @ xc.T), _u_centre(yc @ yc.T)
    return (k * l).sum() / (torch.linalg.norm(k) * torch.linalg.norm(l))


def _rowwise_cosine(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"cosine scores need inputs and outputs of the same width, got {x.shape[1]} and {y.shape[1]}")
    x, y = x.to(dtype), y.to(dtype)
    return (x * y).sum(dim=1) / (torch.linalg.norm(x, dim=1) * torch.linalg.norm(y, dim=1))  # (n,)


def mean_cosine(x: Tensor, y: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """mean_i cos(x_i, y_i) over the n samples; BI = 1 − this value (ShortGPT)."""
    _check_pair(x, y)
    return _rowwise_cosine(x, y, dtype).mean()


def angular_distance(x: Tensor, y: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """mean_i arccos(cos(x_i, y_i)) / π, in [0, 1]."""
    _check_pair(x, y)
    cos = _rowwise_cosine(x, y, dtype).clamp(-1.0, 1.0)
    return torch.arccos(cos).mean() / math.pi


def standardize_features(x: Tensor, *, dtype: torch.dtype = torch.float64, eps: float = STANDARDIZE_EPS) -> Tensor:
    """Z-score every feature (column) of x (n, d) over the samples: (x − μ_j) / σ_j.

    Decoders carry a few "massive activation" dimensions whose variance dominates linear CKA, so
    that almost every block scores CKA ≈ 1 and their ranking is noise. Giving every feature unit
    variance before CKA lets all dimensions count. Columns with σ_j <= eps (constant) become 0.
    Check ``degeneracy`` on the raw representation first: standardizing a near-constant matrix
    would blow rounding noise up to unit variance.
    """
    x = x.to(dtype)
    centred = x - x.mean(dim=0, keepdim=True)
    std = centred.pow(2).mean(dim=0, keepdim=True).sqrt()
    return torch.where(std > eps, centred / std.clamp_min(eps), torch.zeros_like(centred))


def zero_rows(x: Tensor) -> int:
    """Number of all-zero rows of x (n, d): samples whose cosine is undefined."""
    return int((torch.linalg.norm(x.to(torch.float64), dim=1) == 0).sum())
