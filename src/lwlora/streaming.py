"""Streaming statistics for exact linear CKA: memory bounded in the number of samples.

Linear CKA in feature space (see :mod:`lwlora.similarity`) needs the rows ``x`` (n, d_x) and
``y`` (n, d_y) only through their centred second moments::

    μx = (1/n) Σ_i x_i,   Cxx = Σ_i (x_i − μx)(x_i − μx)ᵀ = X_cᵀ X_c   (d_x × d_x)
    μy = (1/n) Σ_i y_i,   Cyy = Y_cᵀ Y_c                                (d_y × d_y)
                          Cyx = Y_cᵀ X_c                                (d_y × d_x)

    CKA(X, Y) = ||Cyx||²_F / (||Cxx||_F · ||Cyy||_F)

:class:`CKAStatistics` keeps ``n``, the means and the three matrices, O(d²) floats whatever ``n``,
and absorbs the rows batch by batch with the parallel update of Chan, Golub & LeVeque ("Updating
formulae and a pairwise algorithm for computing sample variances", 1979). Merging a (rows or
statistics) part b into a part a::

    n = n_a + n_b,   δx = μx_b − μx_a,   δy = μy_b − μy_a
    μx = μx_a + (n_b / n) δx                      (μy likewise)
    Cyx = Cyx_a + Cyx_b + (n_a n_b / n) δy δxᵀ     (Cxx, Cyy likewise)

where a batch's own moments are centred on the batch mean. Nothing is ever computed as
Σ x xᵀ − n μ μᵀ, which loses every digit when the rows share a large common mean (hidden states of
language models do). Sums are order-free, so the result does not depend on how the rows were
batched or ordered. Accumulation is float64 by default, on the rows' device.

The degeneracy test of :func:`lwlora.similarity.degeneracy` follows from the same statistics:
``||X − 1μᵀ||²_F = tr Cxx`` and ``||X||²_F = tr Cxx + n ||μx||²``. Per-feature standardisation
(``feature_norm="standardize"``, :func:`lwlora.similarity.standardize_features`) does too: the
standardised moments are the correlation-like ``S⁻¹ C S⁻¹`` with ``S = diag(σ)``, σ_j = sqrt(C_jj / n).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lwlora.similarity import (
    DEFAULT_DEGENERACY_RTOL,
    STANDARDIZE_EPS,
    degeneracy_from_moments,
)


def _check_rows(x: Tensor, y: Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"representations must be 2-D (n samples × d features), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"representations must hold the same samples, got {x.shape[0]} and {y.shape[0]} rows")


@dataclass
class CKAStatistics:
    """Sufficient statistics of a pair of representations x (n, d_x), y (n, d_y) of the same
    samples for linear CKA and its degeneracy test (see the module docstring for the equations).

    Build one with :meth:`empty` or :meth:`from_rows`, grow it in place with :meth:`update`
    (a batch of rows) or :meth:`merge` (another accumulator over other samples).
    """

    count: int
    mean_x: Tensor  # (d_x,)
    mean_y: Tensor  # (d_y,)
    cxx: Tensor  # (d_x, d_x)
    cyy: Tensor  # (d_y, d_y)
    cyx: Tensor  # (d_y, d_x)
    finite_x: bool = True
    finite_y: bool = True

    @classmethod
    def empty(cls, dim_x: int, dim_y: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> "CKAStatistics":
        """Statistics of zero samples of widths ``dim_x`` and ``dim_y``."""
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(count=0, mean_x=zeros(dim_x), mean_y=zeros(dim_y), cxx=zeros(dim_x, dim_x), cyy=zeros(dim_y, dim_y), cyx=zeros(dim_y, dim_x))

    @classmethod
    def from_rows(cls, x: Tensor, y: Tensor, *, dtype: torch.dtype = torch.float64) -> "CKAStatistics":
        """Statistics of the rows x (n, d_x) and y (n, d_y), accumulated in ``dtype`` on x's device."""
        _check_rows(x, y)
        stats = cls.empty(x.shape[1], y.shape[1], dtype=dtype, device=x.device)
        stats.update(x, y)
        return stats

    @staticmethod
    def state_nbytes(dim_x: int, dim_y: int, dtype: torch.dtype = torch.float64) -> int:
        """Bytes of the tensors an accumulator of widths ``dim_x``, ``dim_y`` holds:
        (d_x² + d_y² + d_y d_x + d_x + d_y) elements of ``dtype``."""
        elements = dim_x * dim_x + dim_y * dim_y + dim_y * dim_x + dim_x + dim_y
        return elements * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (numel × element size)."""
        return sum(t.numel() * t.element_size() for t in (self.mean_x, self.mean_y, self.cxx, self.cyy, self.cyx))

    @property
    def dtype(self) -> torch.dtype:
        return self.cxx.dtype

    @property
    def device(self) -> torch.device:
        return self.cxx.device

    def update(self, x: Tensor, y: Tensor) -> None:
        """Absorb a batch of rows x (b, d_x), y (b, d_y) (any float dtype, any device)."""
        _check_rows(x, y)
        if x.shape[1] != self.mean_x.shape[0] or y.shape[1] != self.mean_y.shape[0]:
            raise ValueError(f"rows of widths ({x.shape[1]}, {y.shape[1]}) do not match statistics of widths ({self.mean_x.shape[0]}, {self.mean_y.shape[0]})")
        if x.shape[0] == 0:
            return
        x = x.to(device=self.device, dtype=self.dtype)
        y = y.to(device=self.device, dtype=self.dtype)
        self.finite_x = self.finite_x and bool(torch.isfinite(x).all())
        self.finite_y = self.finite_y and bool(torch.isfinite(y).all())
        mean_x, mean_y = x.mean(dim=0), y.mean(dim=0)
        xc, yc = x - mean_x, y - mean_y  # centred on the batch mean
        self.cxx.addmm_(xc.T, xc)
        self.cyy.addmm_(yc.T, yc)
        self.cyx.addmm_(yc.T, xc)
        self._shift_means(x.shape[0], mean_x, mean_y)

    def merge(self, other: "CKAStatistics") -> None:
        """Absorb ``other``, statistics of other samples of the same two representations."""
        if other.cyx.shape != self.cyx.shape:
            raise ValueError(f"cannot merge statistics of widths {tuple(other.cyx.shape)} into {tuple(self.cyx.shape)} (d_y, d_x)")
        if other.count == 0:
            return
        self.finite_x = self.finite_x and other.finite_x
        self.finite_y = self.finite_y and other.finite_y
        to = dict(device=self.device, dtype=self.dtype)
        self.cxx.add_(other.cxx.to(**to))
        self.cyy.add_(other.cyy.to(**to))
        self.cyx.add_(other.cyx.to(**to))
        self._shift_means(other.count, other.mean_x.to(**to), other.mean_y.to(**to))

    def _shift_means(self, count: int, mean_x: Tensor, mean_y: Tensor) -> None:
        """Chan et al.'s mean-shift term: the second moments of part b are already added; add
        (n_a n_b / n) δ δᵀ and move the means and the count to the union's."""
        total = self.count + count
        weight = self.count * count / total
        delta_x, delta_y = mean_x - self.mean_x, mean_y - self.mean_y
        if weight:
            self.cxx.addr_(delta_x, delta_x, alpha=weight)
            self.cyy.addr_(delta_y, delta_y, alpha=weight)
            self.cyx.addr_(delta_y, delta_x, alpha=weight)
        self.mean_x.add_(delta_x, alpha=count / total)
        self.mean_y.add_(delta_y, alpha=count / total)
        self.count = total

    def degeneracy(self, side: Literal["x", "y"], *, rtol: float = DEFAULT_DEGENERACY_RTOL) -> str | None:
        """:func:`lwlora.similarity.degeneracy` of the x or y rows, from the statistics."""
        if side not in ("x", "y"):
            raise ValueError(f"side must be 'x' or 'y', got {side!r}")
        moments, mean, finite = (self.cxx, self.mean_x, self.finite_x) if side == "x" else (self.cyy, self.mean_y, self.finite_y)
        centred_sq = float(torch.trace(moments)) if finite else 0.0
        sum_sq = centred_sq + self.count * float(mean.pow(2).sum()) if finite else 0.0
        return degeneracy_from_moments(self.count, finite=finite, sum_sq=sum_sq, centred_sq=centred_sq, rtol=rtol)

    def linear_cka(self, *, feature_norm: Literal["none", "standardize"] = "none") -> Tensor:
        """Linear CKA = ||Cyx||²_F / (||Cxx||_F ||Cyy||_F), a 0-d tensor in the statistics' dtype;
        equal to :func:`lwlora.similarity.linear_cka` on the rows (NaN when a side is constant).

        ``feature_norm="standardize"`` gives CKA of the per-feature z-scored rows
        (:func:`lwlora.similarity.standardize_features`): every moment becomes S⁻¹ C S⁻¹ with
        σ_j = sqrt(C_jj / n), and features with σ_j <= ``STANDARDIZE_EPS`` are zeroed.
        """
        cxx, cyy, cyx = self.cxx, self.cyy, self.cyx
        if feature_norm == "standardize":
            scale_x, scale_y = self._inverse_std(cxx), self._inverse_std(cyy)
            cxx = scale_x[:, None] * cxx * scale_x[None, :]
            cyy = scale_y[:, None] * cyy * scale_y[None, :]
            cyx = scale_y[:, None] * cyx * scale_x[None, :]
        elif feature_norm != "none":
            raise ValueError(f"feature_norm must be 'none' or 'standardize', got {feature_norm!r}")
        return torch.linalg.norm(cyx) ** 2 / (torch.linalg.norm(cxx) * torch.linalg.norm(cyy))

    def _inverse_std(self, moments: Tensor) -> Tensor:
        """1 / σ_j per feature, σ_j = sqrt(C_jj / n), and 0 where σ_j <= STANDARDIZE_EPS."""
        std = (torch.diagonal(moments) / self.count).clamp_min(0).sqrt()
        return torch.where(std > STANDARDIZE_EPS, 1.0 / std.clamp_min(STANDARDIZE_EPS), torch.zeros_like(std))
