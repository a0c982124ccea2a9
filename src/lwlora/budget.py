"""Parameter budgets, automatic counts, rank allocation and cost estimates for layer-wise LoRA.

Pure Python / torch; nothing here loads a model. The rules, with their equations:

**Adapter size.** A LoRA adapter of rank ``r`` on a linear map ``in → out`` adds ``A ∈ R^{r×in}``
and ``B ∈ R^{out×r}``, i.e. ``r·(in + out)`` trainable parameters (no LoRA bias, no DoRA magnitude
vector). A block's count is the sum over its targeted linear modules (:func:`lora_params_per_block`).
GPT-2's ``Conv1D`` stores its weight as ``(in, out)``; its ``nx`` / ``nf`` give in / out.

**Budget selection** (:func:`select_by_param_budget`). Budget ``B ≤ 1`` is a fraction of the
all-layer adapter parameters, ``B > 1`` an absolute count. Blocks are visited by importance
(:func:`lwlora.policy.rank_blocks`: highest first, degenerate ``None`` last) and taken while the
running total stays ``≤ B``; a block that does not fit is skipped, a later smaller one may still fit.

**Automatic count** (:func:`auto_count`, :func:`knee_curve`). The Kneedle / elbow rule on the
descending importance curve, in normalised coordinates; see :func:`knee_curve` for the equations.

**Equal-budget rank** (:func:`equal_budget_rank`). Adapting all ``L`` homogeneous blocks at rank
``r'`` costs as much as ``k`` blocks at rank ``r`` when ``r'·L = r·k``; ``r' = max(1, ⌊r·k/L⌋)``.

**Importance-proportional ranks** (:func:`importance_rank_pattern`). ``t_i = clip(λ·w_i, r_min,
r_max)`` with ``λ`` solved exactly so that ``Σ t_i = R``, then largest-remainder rounding.

**PEFT patterns** (:func:`rank_pattern_for_peft`, :func:`alpha_pattern_for_peft`). PEFT looks a
module's rank up with ``re.match(rf"(.*\\.)?({key})$", module_name)`` (``peft.utils.other.
get_pattern_key``; the first matching key wins), so the key ``<escaped stack path>\\.<i>\\..*``
matches exactly the modules of block ``i`` (also under a wrapper prefix such as ``base_model.model.``).

**Cost** (:func:`selection_cost`). Backward depth, parameter counts, AdamW state bytes and a rough
activation-memory estimate; see :class:`SelectionCost`.

**Shallow preference** (:func:`prefer_shallow`). Trade a bounded loss of total importance for a
higher lowest adapted block (a shorter backward pass).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from torch import nn

from lwlora.blocks import BlockStack, is_linear
from lwlora.policy import TieBreak, rank_blocks

# ---------------------------------------------------------------------------------------------
# Adapter parameter counts
# ---------------------------------------------------------------------------------------------


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module (unwrapping a PEFT tuner layer).

    ``nn.Linear``: ``in_features`` / ``out_features``. GPT-2 ``Conv1D`` (weight ``(in, out)``):
    ``nx`` / ``nf``. Otherwise the weight shape ``(out, in)``.
    """
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if hasattr(module, "nx") and hasattr(module, "nf"):
        return int(module.nx), int(module.nf)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"cannot tell the in/out features of {type(module).__name__}")
    if type(module).__name__ == "Conv1D":
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def _block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Block-relative name -> adaptable linear module (PEFT-wrapped layers count once)."""
    wrapped: list[str] = []
    out: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        if hasattr(module, "get_base_layer") and type(module).__module__.startswith("peft."):
            wrapped.append(name)
            out[name] = module
        elif is_linear(module):
            out[name] = module
    return out


def _suffix_matches(name: str, suffixes: Sequence[str], exact: bool) -> bool:
    if exact:
        return name in suffixes
    return any(name == s or name.endswith("." + s) for s in suffixes)


def targeted_modules_per_block(stack: BlockStack, target_suffixes: Sequence[str], *, exact: bool = True) -> list[dict[str, tuple[int, int]]]:
    """Per block: ``{block-relative name: (in_features, out_features)}`` of the targeted linears."""
    out = []
    for block in stack.blocks:
        out.append(
            {name: linear_in_out(m) for name, m in sorted(_block_linears(block).items()) if _suffix_matches(name, target_suffixes, exact)}
        )
    return out


def lora_params_per_block(stack: BlockStack, target_suffixes: Sequence[str], r: int, *, exact: bool = True) -> list[int]:
    """Trainable LoRA parameters each block of ``stack`` would get at rank ``r``.

    ``P_b = Σ_{m ∈ targets(b)} r·(in_m + out_m)`` over the linear modules of block ``b`` that the
    targets name: with ``exact=True`` a module's block-relative name must equal a suffix (what
    ``target_modules="auto"`` resolves to); with ``exact=False`` it must be, or end with
    ``"." + suffix`` (how PEFT matches a list of names). Blocks without a targeted module get 0.
    """
    if r < 1:
        raise ValueError(f"r must be a positive integer, got {r}")
    return [r * sum(i + o for i, o in mods.values()) for mods in targeted_modules_per_block(stack, target_suffixes, exact=exact)]


# ---------------------------------------------------------------------------------------------
# Budget selection
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


# ---------------------------------------------------------------------------------------------
# Automatic count (knee of the importance curve)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KneeCurve:
    """The sorted importance curve and each point's distance from the chord (for plotting).

    ``ranks[j] = j + 1``; ``blocks[j]`` is the block at that rank; ``values`` descending;
    ``distances[j]`` is the normalised distance of point ``j`` from the chord; ``knee`` the count.
    """

    ranks: list[int]
    blocks: list[int]
    values: list[float]
    distances: list[float]
    knee: int

    def to_json(self) -> dict:
        return asdict(self)


def knee_curve(importances: Sequence[float | None]) -> KneeCurve:
    """The elbow of the descending importance curve.

    Let ``v_1 ≥ … ≥ v_n`` be the valid (non-``None``) importances sorted descending (ties by lower
    block index). In normalised coordinates ``x_k = (k−1)/(n−1)``, ``y_k = (v_k − v_n)/(v_1 − v_n)``
    the chord from the first to the last point is ``x + y = 1``, and point ``k``'s distance from it is
    ``d_k = |x_k + y_k − 1| / √2`` (Kneedle / elbow rule). The count is ``k* = argmax_k d_k``
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
        raise ValueError("no valid importance to find a knee in")
    ranks = list(range(1, n + 1))
    if n == 1 or values[0] == values[-1]:
        return KneeCurve(ranks, order, values, [0.0] * n, n)
    span = values[0] - values[-1]
    distances = [abs((k / (n - 1)) + (v - values[-1]) / span - 1.0) / math.sqrt(2.0) for k, v in enumerate(values)]
    best = 0
    for j in range(1, n):
        if distances[j] > distances[best] + 1e-12:
            best = j
    return KneeCurve(ranks, order, values, distances, best + 1)


def auto_count(importances: Sequence[float | None]) -> int:
    """Number of blocks to select: the knee of the importance curve (:func:`knee_curve`)."""
    return knee_curve(importances).knee


# ---------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Cost of a selection
# ---------------------------------------------------------------------------------------------

#: AdamW: two fp32 moments (8 bytes) + one fp32 gradient (4 bytes) per trainable parameter.
OPTIMIZER_BYTES_PER_PARAM = 12

#: Stored activations per block per token, in units of ``hidden`` values: Korthikanti et al. (2022)
#: give ``s·b·h·(34 + 5·a·s/h)`` bytes per transformer layer with 16-bit activations and no
#: recomputation; the ``34`` bytes are 17 values per ``s·b·h`` element (the attention-score term
#: ``5·a·s/h`` is left out). A rough estimate only: architectures and kernels differ.
ACTIVATION_VALUES_PER_HIDDEN = 17


@dataclass(frozen=True)
class SelectionCost:
    """What a selection costs to train (see :func:`selection_cost` for the equations)."""

    num_layers: int
    selected: list[int]
    lowest_adapted_block: int
    backward_depth_fraction: float
    adapter_params: int
    head_params: int
    trainable_params: int
    all_layer_adapter_params: int
    adapter_fraction: float
    trainable_fraction: float
    optimizer_state_bytes: int
    activation_bytes_estimate: int | None
    hidden_size: int | None
    seq_len: int
    batch_size: int
    bytes_per_param: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _infer_hidden_size(stack: BlockStack) -> int | None:
    """Most common ``in_features`` among the first block's linears (the residual width in the usual
    attention + MLP block); ``None`` without linears."""
    counts = Counter(linear_in_out(m)[0] for m in _block_linears(stack.blocks[0]).values())
    if not counts:
        return None
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


def selection_cost(
    stack: BlockStack,
    selected: Sequence[int],
    target_suffixes: Sequence[str],
    r: int,
    *,
    exact: bool = True,
    head_params: int = 0,
    hidden_size: int | None = None,
    seq_len: int = 512,
    batch_size: int = 1,
    bytes_per_param: int = 4,
    rank_pattern: Mapping[int, int] | None = None,
) -> SelectionCost:
    """Cost of adapting blocks ``selected`` of ``stack`` (``L`` blocks, lowest selected ``b``).

    - ``backward_depth_fraction = (L − b)/L``: the share of blocks backward must traverse.
    - ``adapter_params = Σ_{i ∈ S} P_i(r_i)`` with ``r_i = rank_pattern.get(i, r)``;
      ``all_layer_adapter_params = Σ_{all i} P_i(r)`` (:func:`lora_params_per_block`).
    - ``trainable_params = adapter_params + head_params``;
      ``adapter_fraction = adapter / all-layer adapter``;
      ``trainable_fraction = (adapter + head) / (all-layer adapter + head)``.
    - ``optimizer_state_bytes = 12 · trainable`` (AdamW's two fp32 moments, 8 bytes, plus the fp32
      gradient, 4 bytes).
    - ``activation_bytes_estimate = (L − b) · batch · seq · hidden · bytes_per_param · 17``:
      activations are kept for backward only from block ``b`` up (below it nothing needs a
      gradient); 17 values per hidden element per block (:data:`ACTIVATION_VALUES_PER_HIDDEN`).
      ``hidden_size`` defaults to the most common ``in_features`` of the block's linears; ``None``
      if it cannot be told.
    """
    num_layers = stack.num_layers
    chosen = sorted(set(selected))
    if not chosen:
        raise ValueError("selects no blocks")
    if any(not 0 <= i < num_layers for i in chosen):
        raise ValueError(f"blocks {chosen} out of range 0..{num_layers - 1}")
    per_rank = lora_params_per_block(stack, target_suffixes, 1, exact=exact)
    ranks = {i: (rank_pattern or {}).get(i, r) for i in chosen}
    adapter = sum(per_rank[i] * ranks[i] for i in chosen)
    all_layer = sum(per_rank) * r
    trainable = adapter + head_params
    lowest = chosen[0]
    depth = num_layers - lowest
    hidden = hidden_size if hidden_size is not None else _infer_hidden_size(stack)
    activations = None if hidden is None else depth * batch_size * seq_len * hidden * bytes_per_param * ACTIVATION_VALUES_PER_HIDDEN
    return SelectionCost(
        num_layers=num_layers,
        selected=chosen,
        lowest_adapted_block=lowest,
        backward_depth_fraction=depth / num_layers,
        adapter_params=adapter,
        head_params=head_params,
        trainable_params=trainable,
        all_layer_adapter_params=all_layer,
        adapter_fraction=adapter / all_layer if all_layer else 0.0,
        trainable_fraction=trainable / (all_layer + head_params) if all_layer + head_params else 0.0,
        optimizer_state_bytes=OPTIMIZER_BYTES_PER_PARAM * trainable,
        activation_bytes_estimate=activations,
        hidden_size=hidden,
        seq_len=seq_len,
        batch_size=batch_size,
        bytes_per_param=bytes_per_param,
    )


# ---------------------------------------------------------------------------------------------
# Shallow preference
# ---------------------------------------------------------------------------------------------


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
