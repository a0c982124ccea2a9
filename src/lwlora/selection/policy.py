"""Selection policies: which blocks get adapters, given one importance score per block.

Rules (``SelectionPolicy``):

- ``num_layers=k`` takes the k most important blocks; ``ratio=r`` takes floor(r × L) (the paper's
  rule, default r = 0.5); ``layers=[...]`` is an explicit list that ignores scores.
- ``include`` blocks are always selected (they count towards k); ``exclude`` blocks never are.
- Blocks with a valid score are ranked by importance, highest first; ties go to the lower index
  (``tie_break="lower-index"``) or, as the reference scripts do, to the higher one.
- Degenerate blocks (importance ``None``) rank after every scored block, so a 0/0 never ranks a
  block first; if one has to be taken to reach k, a warning says so.

The ``paper`` preset reproduces the reference scripts: encoders never select block 0 (their CLS at
the embedding output is constant, so the scripts drop the top-ranked block, which is block 0);
decoders exclude nothing; ties go to the higher index.

Budgets replace the count:

- **by parameters** (:func:`select_by_param_budget`): budget ``B ≤ 1`` is a fraction of the
  all-layer adapter parameters, ``B > 1`` an absolute count; blocks are visited by importance
  (:func:`rank_blocks`) and taken while the running total stays ``≤ B``; a block that does not fit
  is skipped, a later smaller one may still fit;
- **automatic count** (:func:`auto_count`, :func:`chord_elbow`): the point of the descending
  importance curve farthest from its chord, in normalised coordinates (a plain elbow rule, not
  Kneedle: no smoothing, no difference curve, no threshold);
- **shallow preference** (:func:`prefer_shallow`): trade a bounded loss of total importance for a
  higher lowest adapted block (a shorter backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from lwlora.errors import ConfigError

TieBreak = Literal["lower-index", "higher-index"]


@dataclass(frozen=True)
class SelectionPolicy:
    """How many and which blocks to select. Exactly one of ``num_layers``, ``ratio``, ``layers``
    decides the count; with none of them, ``ratio=0.5``."""

    num_layers: int | None = None
    ratio: float | None = None
    layers: tuple[int, ...] | None = None
    include: tuple[int, ...] = ()
    exclude: tuple[int, ...] = ()
    tie_break: TieBreak = "lower-index"
    preset: str | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        given = [name for name, value in (("--num-layers", self.num_layers), ("--ratio", self.ratio), ("--layers", self.layers)) if value is not None]
        if len(given) > 1:
            raise ConfigError(given[1], f"give only one of --num-layers, --ratio and --layers (got {' and '.join(given)})")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise ConfigError("--ratio", f"must be in (0, 1], got {self.ratio}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError("--num-layers", f"must be at least 1, got {self.num_layers}")
        if self.layers is not None and len(self.layers) == 0:
            raise ConfigError("--layers", "must name at least one block")
        if self.tie_break not in ("lower-index", "higher-index"):
            raise ConfigError("--tie-break", f"must be 'lower-index' or 'higher-index', got {self.tie_break!r}")
        overlap = sorted(set(self.include) & set(self.exclude))
        if overlap:
            raise ConfigError("--exclude", f"blocks {overlap} are also in --include")

    def target_count(self, num_layers: int) -> int:
        """Number of blocks to select out of ``num_layers``."""
        if self.layers is not None:
            return len(set(self.layers))
        if self.num_layers is not None:
            if self.num_layers > num_layers:
                raise ConfigError("--num-layers", f"{self.num_layers} exceeds the model's {num_layers} blocks")
            return self.num_layers
        ratio = 0.5 if self.ratio is None else self.ratio
        count = math.floor(ratio * num_layers)
        if count < 1:
            raise ConfigError("--ratio", f"{ratio} × {num_layers} blocks rounds down to 0 blocks; use a larger ratio or --num-layers")
        return count

    def to_json(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "ratio": self.ratio,
            "layers": list(self.layers) if self.layers is not None else None,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "tie_break": self.tie_break,
            "preset": self.preset,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: dict) -> "SelectionPolicy":
        return cls(
            num_layers=data.get("num_layers"),
            ratio=data.get("ratio"),
            layers=tuple(data["layers"]) if data.get("layers") is not None else None,
            include=tuple(data.get("include", ())),
            exclude=tuple(data.get("exclude", ())),
            tie_break=data.get("tie_break", "lower-index"),
            preset=data.get("preset"),
            notes=tuple(data.get("notes", ())),
        )


def paper_policy(model_kind: str, *, ratio: float | None = None, num_layers: int | None = None) -> SelectionPolicy:
    """The reference scripts' rule (see module docstring) for an ``encoder`` or ``decoder``."""
    if model_kind == "encoder":
        return SelectionPolicy(
            ratio=ratio if num_layers is None else None,
            num_layers=num_layers,
            exclude=(0,),
            tie_break="higher-index",
            preset="paper",
            notes=("encoder: block 0 is never selected (the reference drops the top-ranked block, block 0)",),
        )
    return SelectionPolicy(
        ratio=ratio if num_layers is None else None,
        num_layers=num_layers,
        tie_break="higher-index",
        preset="paper",
        notes=("decoder: no block excluded",),
    )


def _check_indices(flag: str, indices: Sequence[int], num_layers: int) -> None:
    bad = sorted(i for i in indices if not 0 <= i < num_layers)
    if bad:
        raise ConfigError(flag, f"blocks {bad} are out of range; the model has blocks 0..{num_layers - 1}")


def rank_blocks(importances: Sequence[float | None], tie_break: TieBreak = "lower-index") -> list[int]:
    """Block indices ordered from most to least important; ``None`` (degenerate) last, by index."""
    sign = 1 if tie_break == "lower-index" else -1
    scored = sorted((i for i, v in enumerate(importances) if v is not None), key=lambda i: (-importances[i], sign * i))
    degenerate = [i for i, v in enumerate(importances) if v is None]
    return scored + degenerate


def select_blocks(importances: Sequence[float | None], policy: SelectionPolicy) -> tuple[list[int], list[str]]:
    """Apply ``policy`` to per-block importances.

    Returns:
        (sorted selected block indices, warnings)
    """
    num_layers = len(importances)
    _check_indices("--include", policy.include, num_layers)
    _check_indices("--exclude", policy.exclude, num_layers)
    if policy.layers is not None:
        _check_indices("--layers", policy.layers, num_layers)
        return sorted(set(policy.layers)), []

    count = policy.target_count(num_layers)
    if len(policy.include) > count:
        raise ConfigError("--include", f"{len(policy.include)} included blocks exceed the {count} blocks to select")
    available = num_layers - len(set(policy.exclude))
    if count > available:
        count_flag = "--num-layers" if policy.num_layers is not None else "--ratio"
        if policy.preset is not None:
            raise ConfigError(
                count_flag,
                f"asks for {count} of {num_layers} blocks, but --preset {policy.preset} excludes blocks "
                f"{sorted(set(policy.exclude))}; at most {available} can be selected",
            )
        raise ConfigError(
            "--exclude" if policy.exclude else count_flag,
            f"cannot select {count} blocks when {len(set(policy.exclude))} of {num_layers} are excluded",
        )
    chosen = list(dict.fromkeys(policy.include))
    for index in rank_blocks(importances, policy.tie_break):
        if len(chosen) == count:
            break
        if index in policy.exclude or index in chosen:
            continue
        chosen.append(index)
    warnings = []
    forced = sorted(i for i in chosen if importances[i] is None and i not in policy.include)
    if forced:
        warnings.append(
            f"blocks {forced} have no valid score (degenerate) but were selected to reach {count} blocks; "
            "try --pooling mean or fewer layers"
        )
    return sorted(chosen), warnings


#: Selections made by a rule rather than by scores (``lwlora select --scorer NAME``,
#: ``lwlora train --layers NAME``): the paper's all-layer baseline and the obvious controls.
RULES = ("all", "first", "last", "random")


def rule_blocks(rule: str, num_layers: int, policy: SelectionPolicy, *, seed: int = 0) -> list[int]:
    """``all`` blocks; the k ``first`` / ``last`` blocks; k blocks drawn at ``random`` with
    ``random.Random(seed)`` — k from ``policy`` (floor(ratio × L) or num_layers)."""
    import random

    if rule == "all":
        return list(range(num_layers))
    count = policy.target_count(num_layers)
    if rule == "first":
        return list(range(count))
    if rule == "last":
        return list(range(num_layers - count, num_layers))
    if rule == "random":
        return sorted(random.Random(seed).sample(range(num_layers), count))
    raise ConfigError("--layers", f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")


# ---------------------------------------------------------------------------------------------
# Budgets: by parameters, by the elbow of the importance curve, preferring a shallow backward
# ---------------------------------------------------------------------------------------------


def budget_in_params(budget: float, block_params: Sequence[int], *, all_layer_params: int | None = None) -> float:
    """The budget in parameters: ``budget × A`` for ``budget ≤ 1`` (``A`` = ``all_layer_params``,
    default ``Σ block_params``), else ``budget`` itself."""
    if not budget > 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if budget <= 1.0:
        total = sum(block_params) if all_layer_params is None else all_layer_params
        return budget * total
    return float(budget)


def select_by_param_budget(
    importances: Sequence[float | None],
    block_params: Sequence[int],
    budget: float,
    *,
    all_layer_params: int | None = None,
    tie_break: TieBreak = "lower-index",
) -> list[int]:
    """Most important blocks whose adapter parameters fit in ``budget`` (sorted indices).

    ``budget ≤ 1``: fraction of ``all_layer_params`` (default ``Σ block_params``); ``> 1``: an
    absolute parameter count. Greedy in importance order (``rank_blocks``: highest first, ``None``
    last, ties by ``tie_break``): block ``i`` is taken iff ``total + P_i ≤ B``; the total never
    exceeds ``B``; skipped blocks do not stop the scan.

    Raises:
        ValueError: ``budget ≤ 0``, mismatched lengths, negative counts, or no block fits.
    """
    if len(importances) != len(block_params):
        raise ValueError(f"{len(importances)} importances for {len(block_params)} block parameter counts")
    if any(p < 0 for p in block_params):
        raise ValueError("block parameter counts must be non-negative")
    limit = budget_in_params(budget, block_params, all_layer_params=all_layer_params)
    chosen: list[int] = []
    total = 0
    for index in rank_blocks(importances, tie_break):
        if total + block_params[index] <= limit:
            chosen.append(index)
            total += block_params[index]
    if not chosen:
        smallest = min(block_params) if block_params else 0
        raise ValueError(f"no block fits in a budget of {limit:g} parameters (smallest block needs {smallest})")
    return sorted(chosen)


@dataclass(frozen=True)
class ChordElbow:
    """The sorted importance curve and each point's distance from the chord (for plotting).

    ``ranks[j] = j + 1``; ``blocks[j]`` is the block at that rank; ``values`` descending;
    ``distances[j]`` is the normalised distance of point ``j`` from the chord; ``count`` the
    number of blocks chosen (the farthest point's rank); ``rule`` names the rule in selection.json.
    """

    ranks: list[int]
    blocks: list[int]
    values: list[float]
    distances: list[float]
    count: int
    rule: str = "farthest-from-chord"

    def to_json(self) -> dict:
        return asdict(self)


def chord_elbow(importances: Sequence[float | None]) -> ChordElbow:
    """The elbow of the descending importance curve: its point farthest from the chord.

    Let ``v_1 ≥ … ≥ v_n`` be the valid (non-``None``) importances sorted descending (ties by lower
    block index). In normalised coordinates ``x_k = (k−1)/(n−1)``, ``y_k = (v_k − v_n)/(v_1 − v_n)``
    the chord from the first to the last point is ``x + y = 1``, and point ``k``'s distance from it is
    ``d_k = |x_k + y_k − 1| / √2``. This is the plain farthest-from-chord elbow rule, not
    Kneedle (Satopää et al. 2011 smooth the curve and threshold a difference curve; the ``kneed``
    package disagrees with this rule on many noisy curves). The count is ``k* = argmax_k d_k``
    (1-based, the elbow point itself included), ties to the smaller ``k``, ``k* ≥ 1``.
    Special cases: ``n = 1`` → 1; all values equal → ``n`` (every valid block);
    ``n = 2`` (both points on the chord) → 1.

    Raises:
        ValueError: no valid importance.
    """
    order = [i for i in rank_blocks(importances) if importances[i] is not None]
    values = [float(importances[i]) for i in order]  # type: ignore[arg-type]
    n = len(values)
    if n == 0:
        raise ValueError("no valid importance to find an elbow in")
    ranks = list(range(1, n + 1))
    if n == 1 or values[0] == values[-1]:
        return ChordElbow(ranks, order, values, [0.0] * n, n)
    span = values[0] - values[-1]
    distances = [abs((k / (n - 1)) + (v - values[-1]) / span - 1.0) / math.sqrt(2.0) for k, v in enumerate(values)]
    best = 0
    for j in range(1, n):
        if distances[j] > distances[best] + 1e-12:
            best = j
    return ChordElbow(ranks, order, values, distances, best + 1)


def auto_count(importances: Sequence[float | None]) -> int:
    """Number of blocks to select: the elbow of the importance curve (:func:`chord_elbow`)."""
    return chord_elbow(importances).count


def prefer_shallow(
    importances: Sequence[float | None],
    count: int,
    *,
    max_importance_loss: float = 0.05,
    tie_break: TieBreak = "lower-index",
) -> list[int]:
    """``count`` blocks whose lowest block is as deep as the importance bound allows (sorted).

    ``I(S) = Σ_{i∈S} v_i`` (``None`` counts 0). Let ``T`` be the plain top-``count`` (by
    ``rank_blocks``). For ``b = L − count, …, 0`` (deepest first): ``S_b`` = the top-``count``
    blocks among ``{b, …, L−1}``; the first ``S_b`` with ``I(S_b) ≥ I(T) − ε·|I(T)|``
    (``ε = max_importance_loss``; ``= (1 − ε)·I(T)`` for non-negative scores) wins. ``b = 0`` gives
    ``T`` itself, so a selection always exists. Greedy: it maximises the lowest block, then takes
    the most important blocks above it.
    """
    num_layers = len(importances)
    if not 1 <= count <= num_layers:
        raise ValueError(f"count must be in 1..{num_layers}, got {count}")
    if max_importance_loss < 0:
        raise ValueError(f"max_importance_loss must be non-negative, got {max_importance_loss}")
    order = rank_blocks(importances, tie_break)

    def total(blocks: Sequence[int]) -> float:
        return sum(float(importances[i]) for i in blocks if importances[i] is not None)  # type: ignore[arg-type]

    top = order[:count]
    bound = total(top) - max_importance_loss * abs(total(top))
    for lowest in range(num_layers - count, -1, -1):
        candidate = [i for i in order if i >= lowest][:count]
        if total(candidate) >= bound - 1e-12 * max(1.0, abs(bound)):
            return sorted(candidate)
    return sorted(top)
