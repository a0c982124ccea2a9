"""What a selection costs: adapter parameter counts and a training-cost estimate.

Pure Python / torch; nothing here loads a model.

**Adapter size.** A LoRA adapter of rank ``r`` on a linear map ``in → out`` adds ``A ∈ R^{r×in}``
and ``B ∈ R^{out×r}``, i.e. ``r·(in + out)`` trainable parameters (no LoRA bias, no DoRA magnitude
vector). A block's count is the sum over its targeted linear modules (:func:`lora_params_per_block`).
GPT-2's ``Conv1D`` stores its weight as ``(in, out)``; its ``nx`` / ``nf`` give in / out.

**Cost** (:func:`selection_cost`). Backward depth, parameter counts, AdamW state bytes and a rough
activation-memory estimate; see :class:`SelectionCost`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lwlora.blocks import BlockStack, is_linear

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




def adapter_targets(stack: BlockStack, target_modules: str) -> tuple[list[str], bool]:
    """(module names, exact?) the adapters target: every linear layer of the blocks for ``auto``,
    else the comma-separated names, matched as PEFT matches them (name or name ending)."""
    if target_modules == "auto":
        return stack.block_linear_modules(), True
    return [t.strip() for t in target_modules.split(",") if t.strip()], False
