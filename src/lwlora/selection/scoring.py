"""Layer scorers: turn one block's (input, output) representations into an importance score.

A scorer follows the :class:`LayerScorer` protocol; ``get_scorer(name)`` returns one of the
registered scorers. Importance is "how much the block changes its input": 1 − CKA for the CKA
scorers (the paper's rule), 1 − mean cosine for ``bi``, the angular distance for ``angular``.
A degenerate pair gives ``importance=None`` with a reason, never a number.

The plain linear CKA scorer (``cka``, with either feature normalisation) can also score a block
from streamed :class:`~lwlora.streaming.CKAStatistics` instead of its rows (``score_pair``); every
other scorer needs the rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from lwlora import similarity
from lwlora.errors import ConfigError
from lwlora.streaming import CKAStatistics


@dataclass(frozen=True)
class LayerScore:
    """One block's score. ``similarity`` is the raw metric (CKA or mean cosine), ``importance``
    what selection ranks by; both are ``None`` when ``degenerate``, and ``reason`` says why."""

    similarity: float | None
    importance: float | None
    degenerate: bool = False
    reason: str | None = None
    #: what was done instead of the configured comparison (e.g. "mean" pooling), if anything
    fallback: str | None = None


class LayerScorer(Protocol):
    """Scores one block from its pooled input ``x`` (n, d) and output ``y`` (n, d')."""

    name: str
    #: what ``LayerScore.similarity`` holds, e.g. "cka" or "cosine"
    similarity_name: str
    min_samples: int

    def __call__(self, x: Tensor, y: Tensor) -> LayerScore: ...


def _degenerate(reason: str) -> LayerScore:
    return LayerScore(similarity=None, importance=None, degenerate=True, reason=reason)


@dataclass(frozen=True)
class CKAScorer:
    """importance = 1 − CKA(input, output); constant or non-finite representations are degenerate."""

    name: str
    cka: Callable[..., Tensor]
    min_samples: int
    similarity_name: str = "cka"
    dtype: torch.dtype = torch.float64
    degeneracy_rtol: float = similarity.DEFAULT_DEGENERACY_RTOL
    #: "none" or "standardize" (z-score each feature before CKA; see similarity.standardize_features)
    feature_norm: str = "none"
    #: whether the score is a function of the streamed statistics (plain linear CKA)
    uses_statistics: bool = False

    def __call__(self, x: Tensor, y: Tensor) -> LayerScore:
        y = y.to(x.device)
        for side, rep in (("input", x), ("output", y)):
            reason = similarity.degeneracy(rep, rtol=self.degeneracy_rtol)
            if reason is not None:
                return _degenerate(f"block {side}: {reason}")
        if self.feature_norm == "standardize":
            x, y = similarity.standardize_features(x, dtype=self.dtype), similarity.standardize_features(y, dtype=self.dtype)
        return _cka_score(float(self.cka(x, y, dtype=self.dtype)))

    def score_statistics(self, stats: CKAStatistics) -> LayerScore:
        """The same score as ``self(x, y)``, from the statistics of the rows x and y."""
        if not self.uses_statistics:
            raise ValueError(f"the {self.name} scorer needs the rows, not their statistics")
        for side, rows in (("input", "x"), ("output", "y")):
            reason = stats.degeneracy(rows, rtol=self.degeneracy_rtol)
            if reason is not None:
                return _degenerate(f"block {side}: {reason}")
        return _cka_score(float(stats.linear_cka(feature_norm=self.feature_norm)))


def _cka_score(value: float) -> LayerScore:
    if not math.isfinite(value):
        return _degenerate("CKA is not finite")
    return LayerScore(similarity=value, importance=1.0 - value)


@dataclass(frozen=True)
class CosineScorer:
    """Scores built on the per-sample cosine between input and output vectors."""

    name: str
    angular: bool
    min_samples: int = 1
    similarity_name: str = "cosine"
    dtype: torch.dtype = torch.float64

    def __call__(self, x: Tensor, y: Tensor) -> LayerScore:
        y = y.to(x.device)
        for side, rep in (("input", x), ("output", y)):
            if not bool(torch.isfinite(rep).all()):
                return _degenerate(f"block {side}: non-finite values (NaN or inf)")
            zeros = similarity.zero_rows(rep)
            if zeros:
                return _degenerate(f"block {side}: the zero vector for {zeros} sample(s)")
        cos = float(similarity.mean_cosine(x, y, dtype=self.dtype))
        if self.angular:
            importance = float(similarity.angular_distance(x, y, dtype=self.dtype))
        else:
            importance = 1.0 - cos
        return LayerScore(similarity=cos, importance=importance)


SCORERS: dict[str, LayerScorer] = {
    "cka": CKAScorer(name="cka", cka=similarity.linear_cka, min_samples=2, uses_statistics=True),
    "cka-debiased": CKAScorer(name="cka-debiased", cka=similarity.debiased_linear_cka, min_samples=4),
    "bi": CosineScorer(name="bi", angular=False),
    "angular": CosineScorer(name="angular", angular=True),
}


FEATURE_NORMS = ("none", "standardize")


def get_scorer(name: str, *, feature_norm: str = "none") -> LayerScorer:
    """The registered scorer ``name``; ``feature_norm="standardize"`` (CKA scorers only) z-scores
    every feature before comparing (the outlier-robust variant)."""
    try:
        scorer = SCORERS[name]
    except KeyError:
        raise ConfigError("--scorer", f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}") from None
    if feature_norm not in FEATURE_NORMS:
        raise ConfigError("--feature-norm", f"unknown feature normalisation {feature_norm!r}; choose one of {', '.join(FEATURE_NORMS)}")
    if feature_norm != "none":
        if not isinstance(scorer, CKAScorer):
            raise ConfigError("--feature-norm", f"applies to the CKA scorers, not {name!r}")
        scorer = dataclasses.replace(scorer, feature_norm=feature_norm)
    return scorer


def uses_statistics(scorer: LayerScorer) -> bool:
    """Whether ``scorer`` can score a block from :class:`~lwlora.streaming.CKAStatistics`."""
    return isinstance(scorer, CKAScorer) and scorer.uses_statistics


def score_pair(scorer: LayerScorer, pair: tuple[Tensor, Tensor] | CKAStatistics) -> LayerScore:
    """Score one block from its pooled (input (n, d), output (n, d')) rows or their statistics."""
    if not isinstance(pair, CKAStatistics):
        return scorer(*pair)
    if not isinstance(scorer, CKAScorer):
        raise ValueError(f"the {scorer.name} scorer needs the rows, not their statistics")
    return scorer.score_statistics(pair)
