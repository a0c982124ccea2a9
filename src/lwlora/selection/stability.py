"""How sure is a layer selection, and were the n samples enough?

Two checks on captured :class:`~lwlora.selection.capture.BlockRepresentations`:

**Bootstrap** (``bootstrap_stability``). A replicate draws n sample rows *with replacement* — the
same row indices for the input and output of every block, since rows are samples — scores every
block with the chosen scorer and applies ``select_blocks(importances, policy)``. Over R replicates
each block gets

- ``frequency``: the fraction of replicates that selected it;
- a percentile confidence interval of its importance: the (1 − c)/2 and (1 + c)/2 quantiles
  (linear interpolation) of the replicate importances that are not degenerate, plus their mean.
  The interval is ``None`` when the block is degenerate in more than half of the replicates.

A block is **unstable** when ``0.2 < frequency < 0.8`` (strict): it is neither reliably in nor
reliably out of the selection. ``selection_agreement`` is the mean Jaccard index between each
replicate's selection and the full-sample selection (1.0 when both are empty).

**Half sample**. A seeded random half of the samples (floor(n/2), without replacement) is scored
and compared with the full n: Spearman and Kendall tau-b between the two importance vectors (over
blocks valid in both) and the Jaccard overlap of the two selections. Spearman below 0.9 means the
ranking still moves when the sample count doubles, i.e. more samples are needed.

Notes on resampling with replacement:

- Linear CKA (biased HSIC) is well defined on duplicated rows: it is CKA of a weighted empirical
  distribution. Duplicates reduce the effective sample count (about 0.63 n distinct rows), and the
  biased estimator of CKA between *unrelated* representations grows as the sample count shrinks,
  so replicate importances of such blocks are biased slightly low; the percentile interval does not
  correct for that bias. For high-dimensional, weakly related blocks the whole replicate
  distribution can lie below the full-sample importance (measured: unrelated Gaussian blocks, n =
  120, the 95% interval contains the full-sample value in 20/20 draws at d = 2, 2/20 at d = 6, 0/20
  at d = 16). The report then warns; ``importance_full`` is stored next to the interval.
- Debiased CKA (U-centred Gram matrices) is also computable with duplicated rows (it only needs
  n >= 4 rows), but a duplicated pair of rows enters its off-diagonal terms as if it were two
  distinct samples, so the "unbiased" estimate is no longer unbiased within a replicate; treat its
  interval as an approximate measure of spread, like the biased one.
- A replicate can make a block degenerate (e.g. very few distinct rows that happen to be equal);
  such replicate scores are dropped from that block's interval, and selection treats them the way
  ``select_blocks`` always does (ranked last).

Block indices in the report are positions in ``reps.inputs`` — the same indices ``select_blocks``
returns — which equal model block numbers when every block was captured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lwlora.selection.capture import BlockRepresentations
from lwlora.selection.policy import SelectionPolicy, select_blocks
from lwlora.selection.scoring import LayerScorer, get_scorer

#: frequency bounds (exclusive) of an unstable block
UNSTABLE_LOW = 0.2
UNSTABLE_HIGH = 0.8
#: half-sample Spearman below this triggers a "use more samples" warning
SPEARMAN_WARN = 0.9


@dataclass(frozen=True)
class LayerStability:
    """Bootstrap summary of one block."""

    index: int
    #: fraction of bootstrap replicates in which the block was selected, in [0, 1]
    frequency: float
    #: percentile CI of the importance over replicates; None if degenerate in > 50% of replicates
    importance_low: float | None
    importance_high: float | None
    importance_mean: float | None
    #: replicates in which the block's score was degenerate
    degenerate_replicates: int = 0
    #: importance on all n samples (None when degenerate)
    importance_full: float | None = None


@dataclass(frozen=True)
class StabilityReport:
    num_replicates: int
    confidence: float
    layers: list[LayerStability]
    #: blocks with UNSTABLE_LOW < frequency < UNSTABLE_HIGH (0.2 < f < 0.8)
    unstable_blocks: list[int]
    #: mean Jaccard between each replicate's selection and the full-sample selection
    selection_agreement: float
    #: rank agreement of importances from a random half of the samples and from all n
    half_sample_spearman: float | None
    half_sample_kendall: float | None
    #: Jaccard of the half-sample and full-sample selections
    half_sample_overlap: float | None
    warnings: list[str]
    num_samples: int = 0
    scorer: str = ""
    seed: int = 0
    full_selection: list[int] | None = None
    half_selection: list[int] | None = None

    def to_json(self) -> dict:
        return {
            "num_replicates": self.num_replicates,
            "confidence": self.confidence,
            "num_samples": self.num_samples,
            "scorer": self.scorer,
            "seed": self.seed,
            "ci_method": "percentile",
            "unstable_rule": f"{UNSTABLE_LOW} < frequency < {UNSTABLE_HIGH}",
            "layers": [asdict(layer) for layer in self.layers],
            "unstable_blocks": list(self.unstable_blocks),
            "selection_agreement": self.selection_agreement,
            "full_selection": list(self.full_selection) if self.full_selection is not None else None,
            "half_selection": list(self.half_selection) if self.half_selection is not None else None,
            "half_sample_spearman": self.half_sample_spearman,
            "half_sample_kendall": self.half_sample_kendall,
            "half_sample_overlap": self.half_sample_overlap,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: dict) -> "StabilityReport":
        """Inverse of :meth:`to_json` (the descriptive ``ci_method`` / ``unstable_rule`` are dropped)."""
        fields = {k: v for k, v in data.items() if k not in ("ci_method", "unstable_rule")}
        fields["layers"] = [LayerStability(**layer) for layer in fields["layers"]]
        return cls(**fields)


# --------------------------------------------------------------------------- rank correlations


def _is_valid(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _pairwise_valid(a: Sequence, b: Sequence) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"sequences of different lengths: {len(a)} and {len(b)}")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if _is_valid(x) and _is_valid(y)]
    if not pairs:
        return np.empty(0), np.empty(0)
    arr = np.asarray(pairs, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float | None], b: Sequence[float | None]) -> float:
    """Spearman's rho: Pearson correlation of average ranks (ties handled). Entries that are
    ``None`` or NaN in either sequence are dropped pairwise. NaN when fewer than two pairs remain
    or either side is constant."""
    x, y = _pairwise_valid(a, b)
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if denom == 0:
        return float("nan")
    return float((rx * ry).sum() / denom)


def kendall_tau(a: Sequence[float | None], b: Sequence[float | None]) -> float:
    """Kendall's tau-b: (C − D) / sqrt((n0 − n1)(n0 − n2)), with n0 = m(m−1)/2 pairs and n1, n2
    the pairs tied in ``a`` and in ``b``. ``None``/NaN entries are dropped pairwise. NaN when fewer
    than two pairs remain or either side is constant. O(m²), fine for block counts."""
    x, y = _pairwise_valid(a, b)
    m = len(x)
    if m < 2:
        return float("nan")
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(m, k=1)
    sx, sy = dx[upper], dy[upper]
    n0 = len(sx)
    concordant_minus_discordant = float((sx * sy).sum())
    ties_x = float((sx == 0).sum())
    ties_y = float((sy == 0).sum())
    denom = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    if denom == 0:
        return float("nan")
    return concordant_minus_discordant / denom


def _jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else v


# --------------------------------------------------------------------------- bootstrap


def _score_rows(reps: BlockRepresentations, scorer: LayerScorer, rows: Tensor | None) -> list[float | None]:
    importances = []
    for x, y in zip(reps.inputs, reps.outputs):
        if rows is not None:
            x = x[rows.to(x.device)]
            y = y[rows.to(y.device)]
        importances.append(scorer(x, y).importance)
    return importances


def _freq_pct(f: float) -> str:
    return f"{100 * f:.0f}%"


def bootstrap_stability(
    reps: BlockRepresentations,
    scorer_name: str,
    policy: SelectionPolicy,
    *,
    replicates: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
    full_selection: list[int] | None = None,
    feature_norm: str = "none",
) -> StabilityReport:
    """Bootstrap the selection over samples, and compare a random half of the samples with all n.

    Args:
        reps: captured (n, d) block inputs/outputs, rows = samples.
        scorer_name: a name for :func:`lwlora.selection.scoring.get_scorer` (``cka``, ``cka-debiased``, ...).
        policy: the selection policy applied to every replicate's importances.
        feature_norm: as for :func:`lwlora.selection.scoring.get_scorer` (``none`` or ``standardize``).
        replicates: number of bootstrap replicates R (>= 1).
        confidence: level c of the percentile interval, in (0, 1).
        seed: seeds a ``torch.Generator`` (CPU) that draws every replicate's rows and the half sample.
        full_selection: the selection to compare against; default ``select_blocks`` on all n samples.

    Returns:
        :class:`StabilityReport`.
    """
    if replicates < 1:
        raise ValueError(f"replicates must be at least 1, got {replicates}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not reps.inputs:
        raise ValueError("no block representations to resample")
    scorer = get_scorer(scorer_name, feature_norm=feature_norm)
    n = reps.num_samples
    if n < scorer.min_samples:
        raise ValueError(f"the {scorer_name} scorer needs at least {scorer.min_samples} samples, got {n}")
    num_blocks = len(reps.inputs)
    warnings: list[str] = []

    full_importances = _score_rows(reps, scorer, None)
    if full_selection is None:
        full_selection, _ = select_blocks(full_importances, policy)
    full_selection = sorted(full_selection)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    values = np.full((replicates, num_blocks), np.nan)
    counts = np.zeros(num_blocks, dtype=np.int64)
    agreements = []
    forced_degenerate = 0
    for r in range(replicates):
        rows = torch.randint(0, n, (n,), generator=gen)
        importances = _score_rows(reps, scorer, rows)
        for i, v in enumerate(importances):
            if v is not None:
                values[r, i] = v
        selected, select_warnings = select_blocks(importances, policy)
        if select_warnings:
            forced_degenerate += 1
        counts[selected] += 1
        agreements.append(_jaccard(selected, full_selection))

    low_q, high_q = (1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0
    layers = []
    for i in range(num_blocks):
        column = values[:, i]
        valid = column[~np.isnan(column)]
        degenerate = replicates - len(valid)
        if len(valid) == 0 or degenerate > replicates / 2:
            low = high = mean = None
        else:
            low, high = (float(q) for q in np.quantile(valid, [low_q, high_q]))
            mean = float(valid.mean())
        layers.append(
            LayerStability(
                index=i,
                frequency=float(counts[i]) / replicates,
                importance_low=low,
                importance_high=high,
                importance_mean=mean,
                degenerate_replicates=int(degenerate),
                importance_full=full_importances[i],
            )
        )
    unstable = [layer.index for layer in layers if UNSTABLE_LOW < layer.frequency < UNSTABLE_HIGH]
    if unstable:
        freqs = [layers[i].frequency for i in unstable]
        warnings.append(
            f"blocks {unstable} are selected in only {_freq_pct(min(freqs))}–{_freq_pct(max(freqs))} of "
            f"bootstrap replicates: the selection near the cut-off is not stable; use more samples"
        )
    shifted = [
        layer.index
        for layer in layers
        if layer.importance_full is not None
        and layer.importance_low is not None
        and not layer.importance_low <= layer.importance_full <= layer.importance_high
    ]
    if shifted:
        warnings.append(
            f"for blocks {shifted} the full-sample importance lies outside the bootstrap interval: the "
            "estimate is biased at this sample count (duplicated rows shrink the effective sample, and CKA "
            "between weakly related representations grows as samples shrink); read those intervals as spread, not coverage"
        )
    mostly_degenerate = [layer.index for layer in layers if layer.importance_mean is None]
    if mostly_degenerate:
        warnings.append(f"blocks {mostly_degenerate} are degenerate in more than half of the bootstrap replicates; they have no interval")
    if forced_degenerate:
        warnings.append(f"in {forced_degenerate} of {replicates} replicates a degenerate block had to be selected to reach the block count")

    half_spearman = half_kendall = half_overlap = None
    half_selection = None
    half = n // 2
    if half < max(scorer.min_samples, 2):
        warnings.append(f"only {n} samples: the half-sample check needs at least {2 * max(scorer.min_samples, 2)}; skipped")
    else:
        rows = torch.randperm(n, generator=gen)[:half]
        half_importances = _score_rows(reps, scorer, rows)
        half_spearman = _none_if_nan(spearman(half_importances, full_importances))
        half_kendall = _none_if_nan(kendall_tau(half_importances, full_importances))
        half_selection, _ = select_blocks(half_importances, policy)
        half_overlap = _jaccard(half_selection, full_selection)
        if half_spearman is not None and half_spearman < SPEARMAN_WARN:
            warnings.append(
                f"the ranking changes between n/2 = {half} and n = {n} samples (Spearman {half_spearman:.2f} < {SPEARMAN_WARN}): use more samples"
            )

    return StabilityReport(
        num_replicates=replicates,
        confidence=confidence,
        layers=layers,
        unstable_blocks=unstable,
        selection_agreement=float(np.mean(agreements)),
        half_sample_spearman=half_spearman,
        half_sample_kendall=half_kendall,
        half_sample_overlap=half_overlap,
        warnings=warnings,
        num_samples=n,
        scorer=scorer_name,
        seed=seed,
        full_selection=full_selection,
        half_selection=half_selection,
    )


# --------------------------------------------------------------------------- plot


def stability_figure(report: StabilityReport, importances: Sequence[float | None], selected: Sequence[int]) -> Any:
    """The ``stability.png`` figure (a matplotlib ``Figure``, no pyplot state): full-sample
    importance bars in the colours of ``importance.png`` (:mod:`lwlora.selection.colors`), the
    bootstrap percentile interval as whiskers, and each block's selection frequency on the right
    axis over the shaded unstable band (``UNSTABLE_LOW < f < UNSTABLE_HIGH``). A degenerate block
    (importance ``None``) is the red ✕ at 0."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    from lwlora.selection import colors

    num_blocks = len(importances)
    xs = np.arange(num_blocks)
    chosen = set(selected)
    heights = [v if v is not None else 0.0 for v in importances]
    fills = [colors.SELECTED if i in chosen else colors.FROZEN for i in range(num_blocks)]

    fig = Figure(figsize=(max(6.4, 0.35 * num_blocks + 2.5), 4.2), dpi=120)
    ax = fig.add_subplot()
    ax.bar(xs, heights, color=fills, edgecolor=colors.EDGE, linewidth=0.4, zorder=2)
    handles: list[Any] = colors.selected_handles(len(chosen), total=num_blocks)
    degenerate = [i for i in range(num_blocks) if importances[i] is None]
    if degenerate:
        ax.plot(degenerate, [0.0] * len(degenerate), clip_on=False, zorder=6, **colors.DEGENERATE_MARKER)
        handles.append(colors.degenerate_handle())

    by_index = {layer.index: layer for layer in report.layers}
    interval = [(i, by_index[i].importance_low, by_index[i].importance_high) for i in range(num_blocks) if i in by_index and by_index[i].importance_low is not None]
    if interval:
        ci_x, ci_low, ci_high = (np.asarray(v, dtype=float) for v in zip(*interval))
        ax.errorbar(ci_x, ci_low, yerr=[np.zeros_like(ci_low), ci_high - ci_low], fmt="none", ecolor=colors.INTERVAL, elinewidth=1.2, capsize=4, zorder=4)
        handles.append(Line2D([], [], color=colors.INTERVAL, linewidth=1.2, marker="_", markersize=8, label=f"{100 * report.confidence:.0f}% bootstrap interval"))
    ax.set_xlabel("block")
    ax.set_ylabel("importance (all n samples)")
    ax.set_ylim(bottom=0.0)
    if not any(heights) and not interval:
        ax.set_ylim(0.0, 1.0)
    ax.set_xlim(-0.6, num_blocks - 0.4)
    ax.set_xticks(xs if num_blocks <= 40 else xs[:: max(1, num_blocks // 20)])
    if num_blocks > 24:
        ax.tick_params(axis="x", labelsize=7)

    # the frequency axis spans -0.05..1.05: the unstable band in axes coordinates, behind the bars
    low, high = -0.05, 1.05
    band = ((UNSTABLE_LOW - low) / (high - low), (UNSTABLE_HIGH - low) / (high - low))
    ax.add_patch(Rectangle((0.0, band[0]), 1.0, band[1] - band[0], transform=ax.transAxes, facecolor=colors.FREQUENCY, alpha=0.10, edgecolor="none", zorder=0))
    handles.append(Patch(facecolor=colors.FREQUENCY, alpha=0.25, edgecolor="none", label=f"unstable: {100 * UNSTABLE_LOW:.0f}% < frequency < {100 * UNSTABLE_HIGH:.0f}%"))
    ax2 = ax.twinx()
    freq = [by_index[i].frequency if i in by_index else float("nan") for i in range(num_blocks)]
    ax2.plot(xs, freq, color=colors.FREQUENCY, marker="o", markersize=4, linestyle="--", linewidth=1.2, zorder=5)
    handles.append(Line2D([], [], color=colors.FREQUENCY, marker="o", markersize=4, linestyle="--", label="selection frequency (right axis)"))
    ax2.set_ylim(low, high)
    ax2.set_ylabel("selection frequency")
    ax2.yaxis.set_major_formatter(lambda value, _: f"{100 * value:.0f}%")
    for i in report.unstable_blocks:
        if 0 <= i < num_blocks:
            ax2.annotate(f"{100 * freq[i]:.0f}%", (i, freq[i]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color="#8a3b00", zorder=7,
                         bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})

    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=7, frameon=False)
    title = f"{report.scorer or 'importance'}: {report.num_replicates} bootstrap replicates, n = {report.num_samples}"
    ax.set_title(f"{title}\nagreement with the full-sample selection {report.selection_agreement:.2f} (mean Jaccard)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_stability(
    report: StabilityReport,
    importances: Sequence[float | None],
    selected: Sequence[int],
    path: str | Path,
) -> Path:
    """Write :func:`stability_figure` to ``path`` (atomically; format from the suffix, e.g.
    ``.png``) and return the path."""
    from lwlora.io import atomic_write

    fig = stability_figure(report, importances, selected)
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, bbox_inches="tight"))
    return path
