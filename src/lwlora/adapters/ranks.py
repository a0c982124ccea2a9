"""Adapter rank plans: the equal-budget rank, importance-proportional ranks, PEFT patterns.

**Equal-budget rank** (:func:`equal_budget_rank`). Adapting all ``L`` homogeneous blocks at rank
``r'`` costs as much as ``k`` blocks at rank ``r`` when ``r'·L = r·k``; ``r' = max(1, ⌊r·k/L⌋)``.

**Importance-proportional ranks** (:func:`importance_rank_pattern`). ``t_i = clip(λ·w_i, r_min,
r_max)`` with ``λ`` solved exactly so that ``Σ t_i = R``, then largest-remainder rounding.

**PEFT patterns** (:func:`rank_pattern_for_peft`, :func:`alpha_pattern_for_peft`). PEFT looks a
module's rank up with ``re.match(rf"(.*\\.)?({key})$", module_name)`` (``peft.utils.other.
get_pattern_key``; the first matching key wins), so the key ``<escaped stack path>\\.<i>\\..*``
matches exactly the modules of block ``i`` (also under a wrapper prefix such as ``base_model.model.``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction


def equal_budget_rank(r: int, num_selected: int, num_layers: int) -> int:
    """Rank ``r'`` for adapting all ``L`` blocks with the adapter parameters of ``k`` blocks at ``r``.

    On homogeneous blocks the adapter size is linear in the rank, so ``r'·L = r·k`` balances the
    budgets; ``r' = max(1, ⌊r·k / L⌋)``. Rounding is down, so the all-layer baseline never exceeds
    the selective budget, except when that would give 0 (then 1; see :func:`params_ratio`).
    E.g. ``r=8``: 3 of 6 blocks → 4; 1 of 3 → 2.
    """
    if r < 1 or num_layers < 1 or not 1 <= num_selected <= num_layers:
        raise ValueError(f"need r ≥ 1 and 1 ≤ num_selected ≤ num_layers, got r={r}, {num_selected} of {num_layers}")
    return max(1, (r * num_selected) // num_layers)


def params_ratio(r: int, num_selected: int, num_layers: int) -> float:
    """Adapter parameters of the all-layer baseline at :func:`equal_budget_rank` over those of the
    selection: ``r'·L / (r·k)`` (≤ 1 unless the rank was raised to 1)."""
    return equal_budget_rank(r, num_selected, num_layers) * num_layers / (r * num_selected)


def importance_rank_pattern(
    importances: Sequence[float | None],
    blocks: Sequence[int],
    total_rank: int,
    *,
    r_min: int = 1,
    r_max: int | None = None,
) -> dict[int, int]:
    """Integer ranks for ``blocks`` growing with importance and summing exactly to ``total_rank``.

    Rule (exact rational arithmetic):

    1. Weights ``w_i = v_i − min(0, m)`` where ``m`` is the smallest valid importance among
       ``blocks`` (shift only when negative); a ``None`` block gets the smallest weight. If no block
       has a valid score, all weights are equal.
    2. Real ranks ``t_i = clip(λ·w_i, r_min, r_max)`` with ``λ ≥ 0`` solved so ``Σ t_i = R``
       (``Σ`` is piecewise linear and non-decreasing in ``λ``). Without bounds binding,
       ``t_i = R·w_i/Σw`` (``r_i ∝ importance``). If all weights are zero, ``t_i = R/n``; if the
       positive-weight blocks all saturate at ``r_max``, zero-weight blocks share the rest equally.
    3. Largest remainder: ``r_i = ⌊t_i⌋``, then the ``R − Σ⌊t_i⌋`` leftover units go one each to
       the largest fractional parts, ties to the lower block index.

    Result: ``Σ r_i = R``; ``r_min ≤ r_i ≤ r_max``; ``v_i > v_j ⇒ r_i ≥ r_j``.

    Raises:
        ValueError: ``R < r_min·n``, ``R > r_max·n``, ``r_min < 1``, ``r_max < r_min``, or bad indices.
    """
    blocks = list(dict.fromkeys(blocks))
    n = len(blocks)
    if n == 0:
        raise ValueError("no blocks to give ranks to")
    if any(not 0 <= b < len(importances) for b in blocks):
        raise ValueError(f"block indices {blocks} out of range for {len(importances)} importances")
    if r_min < 1:
        raise ValueError(f"r_min must be at least 1, got {r_min}")
    if r_max is not None and r_max < r_min:
        raise ValueError(f"r_max ({r_max}) is below r_min ({r_min})")
    if total_rank < r_min * n:
        raise ValueError(f"total_rank {total_rank} < r_min × {n} blocks = {r_min * n}")
    if r_max is not None and total_rank > r_max * n:
        raise ValueError(f"total_rank {total_rank} > r_max × {n} blocks = {r_max * n}")

    valid = [Fraction(float(importances[b])) for b in blocks if importances[b] is not None]  # type: ignore[arg-type]
    if valid:
        low = min(valid)
        shift = -low if low < 0 else Fraction(0)
        weights = [(Fraction(float(importances[b])) if importances[b] is not None else low) + shift for b in blocks]  # type: ignore[arg-type]
    else:
        weights = [Fraction(1)] * n
    targets = _clipped_proportional(weights, Fraction(total_rank), Fraction(r_min), None if r_max is None else Fraction(r_max))

    floors = [math.floor(t) for t in targets]
    left = total_rank - sum(floors)
    order = sorted(range(n), key=lambda j: (-(targets[j] - floors[j]), blocks[j]))
    ranks = list(floors)
    for j in order[:left]:
        ranks[j] += 1
    assert sum(ranks) == total_rank
    return {blocks[j]: ranks[j] for j in range(n)}


def _clipped_proportional(weights: list[Fraction], total: Fraction, lo: Fraction, hi: Fraction | None) -> list[Fraction]:
    """``t_i = clip(λ·w_i, lo, hi)`` with ``Σ t_i = total`` (see :func:`importance_rank_pattern`)."""
    n = len(weights)

    def targets(lam: Fraction) -> list[Fraction]:
        out = []
        for w in weights:
            t = max(lo, lam * w)
            out.append(t if hi is None else min(hi, t))
        return out

    positive = [w for w in weights if w > 0]
    if not positive:
        return [total / n] * n
    breaks = sorted({lo / w for w in positive} | ({hi / w for w in positive} if hi is not None else set()))
    previous, f_previous = Fraction(0), sum(targets(Fraction(0)))
    if f_previous >= total:  # total == n·lo
        return targets(Fraction(0))
    for lam in breaks:
        f = sum(targets(lam))
        if f >= total:
            lam_star = previous + (total - f_previous) * (lam - previous) / (f - f_previous)
            return targets(lam_star)
        previous, f_previous = lam, f
    if hi is None:
        # Beyond the last breakpoint the sum grows linearly with slope Σ_{w>0} w.
        lam_star = previous + (total - f_previous) / sum(positive)
        return targets(lam_star)
    # Every positive-weight block is at hi: zero-weight blocks share the rest equally.
    result = targets(previous)
    zeros = [j for j, w in enumerate(weights) if w == 0]
    share = (total - sum(result[j] for j in range(n) if weights[j] > 0)) / len(zeros)
    for j in zeros:
        result[j] = share
    return result


def _block_key(stack_path: str, index: int) -> str:
    return rf"{re.escape(stack_path)}\.{int(index)}\..*"


def rank_pattern_for_peft(stack_path: str, ranks: Mapping[int, int], default_r: int) -> dict[str, int]:
    """PEFT ``LoraConfig.rank_pattern`` giving block ``i`` of ``stack_path`` rank ``ranks[i]``.

    Keys are ``<re.escape(stack_path)>\\.<i>\\..*``; PEFT matches them with
    ``re.match(rf"(.*\\.)?({key})$", module_name)``, i.e. every module inside block ``i`` (under any
    prefix) and nothing in block ``i2 ≠ i`` (the index is delimited by dots). Blocks whose rank
    equals ``default_r`` (``LoraConfig.r``) need no key and get none.
    """
    if default_r < 1 or any(r < 1 for r in ranks.values()):
        raise ValueError("ranks must be positive integers")
    return {_block_key(stack_path, i): int(r) for i, r in sorted(ranks.items()) if r != default_r}


def alpha_pattern_for_peft(stack_path: str, ranks: Mapping[int, int], alpha_per_rank: float) -> dict[str, float]:
    """PEFT ``LoraConfig.alpha_pattern`` with ``α_i = alpha_per_rank · r_i`` (constant scaling
    ``α_i / r_i``; same keys as :func:`rank_pattern_for_peft`, one per block)."""
    return {_block_key(stack_path, i): alpha_per_rank * r for i, r in sorted(ranks.items())}
