"""Sub-layer units: the attention and the MLP half of every block, scored and selected separately.

A block updates the residual stream twice: ``h_mid = h_in + Attention(h_in)`` and
``h_out = h_mid + MLP(h_mid)`` (pre-norm decoders; post-norm encoders normalise after each sum,
``h_mid = LN(h_in + Attention(h_in))``). Scoring the two halves apart gives each unit

    importance(i, attention) = 1 − CKA(h_in_i, h_mid_i),  importance(i, mlp) = 1 − CKA(h_mid_i, h_out_i),

with the same scorers as whole blocks. ``h_mid`` is read by a forward pre-hook on the first module
of the block's MLP half (:data:`MLP_ENTRY_NAMES`: the pre-MLP norm of pre-norm blocks, whose input
is the residual stream; BERT's ``intermediate`` of post-norm blocks). The parameter budget
(a fraction of all-layer LoRA's parameters) is then filled with the most important units,
greedily, each unit costing the LoRA parameters of its own linear layers.

Units are unit ids ``2 i`` (block i's attention) and ``2 i + 1`` (its MLP) inside a capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lwlora.blocks import BlockStack
from lwlora.errors import ConfigError

PARTS: tuple[str, ...] = ("attention", "mlp")

#: Direct children of a block whose *input* is the residual stream between its attention and its
#: MLP, in order of preference: Gemma 2/3's ``pre_feedforward_layernorm`` comes before
#: ``post_attention_layernorm`` (which in Gemma normalises the attention output, not the stream).
MLP_ENTRY_NAMES: tuple[str, ...] = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "final_layer_norm", "intermediate", "ffn")

#: Path components that put a linear layer in a block's attention half (everything else is MLP).
_ATTENTION_WORDS = ("attention", "attn", "self_attn", "self_attention", "crossattention")


@dataclass(frozen=True)
class Unit:
    """One half of one block."""

    block: int
    part: str  # "attention" | "mlp"

    @property
    def id(self) -> int:
        return 2 * self.block + PARTS.index(self.part)

    @classmethod
    def from_id(cls, unit_id: int) -> "Unit":
        return cls(block=unit_id // 2, part=PARTS[unit_id % 2])


def part_of(module_name: str) -> str:
    """``attention`` when a component of the block-relative ``module_name`` names attention
    (``self_attn.q_proj``, ``attention.output.dense``, ``attn.c_attn``), else ``mlp``
    (``mlp.down_proj``, ``intermediate.dense``, ``output.dense``, ``fc1``, ``ffn.lin1``)."""
    components = module_name.lower().split(".")
    return "attention" if any(c in _ATTENTION_WORDS or c.startswith("attn") or "attention" in c for c in components) else "mlp"


def mlp_entries(stack: BlockStack, model_config: object | None = None) -> list[nn.Module]:
    """Each block's module whose input is ``h_mid`` (see :data:`MLP_ENTRY_NAMES`).

    Raises a ``--granularity`` ConfigError for blocks without one, and for parallel-residual
    blocks (GPT-NeoX's ``use_parallel_residual``: attention and MLP both read ``h_in``, so no
    ``h_mid`` exists)."""
    if model_config is not None and getattr(getattr(model_config, "text_config", None) or model_config, "use_parallel_residual", False):
        raise ConfigError("--granularity", "this model's blocks add attention and MLP in parallel (use_parallel_residual): there is no residual stream between them to score; use --granularity block")
    entries = []
    for block in stack.blocks:
        children = dict(block.named_children())
        entry = next((children[name] for name in MLP_ENTRY_NAMES if name in children), None)
        if entry is None:
            raise ConfigError("--granularity", f"{type(block).__name__} has none of {', '.join(MLP_ENTRY_NAMES)} to read the residual stream between attention and MLP from; use --granularity block")
        entries.append(entry)
    return entries


def unit_modules(names: Sequence[str]) -> dict[str, list[str]]:
    """Block-relative linear layer names split by part: {"attention": [...], "mlp": [...]}."""
    split: dict[str, list[str]] = {part: [] for part in PARTS}
    for name in sorted(names):
        split[part_of(name)].append(name)
    return split


def unit_params(stack: BlockStack, names: Sequence[str], r: int) -> list[int]:
    """LoRA parameters of every unit (by unit id) at rank ``r``: ``Σ r (in + out)`` over the
    unit's linear layers among ``names`` (block-relative, exact)."""
    from lwlora.selection.cost import lora_params_per_block

    split = unit_modules(names)
    per_part = {part: lora_params_per_block(stack, split[part], r, exact=True) if split[part] else [0] * stack.num_layers for part in PARTS}
    return [per_part[PARTS[u % 2]][u // 2] for u in range(2 * stack.num_layers)]


def unit_cost(block_cost: dict, params: Sequence[int], chosen: Sequence[int], head_params: int = 0) -> dict:
    """A block-level :class:`lwlora.selection.cost.SelectionCost` (as JSON, of the blocks holding a chosen
    unit) with its parameter figures recounted over the chosen units only:
    ``adapter_params = Σ_{u ∈ chosen} P_u``, fractions and optimizer state to match."""
    adapter = sum(params[u] for u in chosen)
    everything = sum(params)
    trainable = adapter + head_params
    return {
        **block_cost,
        "adapter_params": adapter,
        "trainable_params": trainable,
        "all_layer_adapter_params": everything,
        "adapter_fraction": adapter / everything if everything else 0.0,
        "trainable_fraction": trainable / (everything + head_params) if everything + head_params else 0.0,
        "optimizer_state_bytes": 12 * trainable,
        "units": [f"{u // 2}.{PARTS[u % 2]}" for u in chosen],
    }
