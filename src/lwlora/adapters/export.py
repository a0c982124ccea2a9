"""``lwlora export``: a selection as what another trainer reads.

LLaMA-Factory can only freeze or adapt the first or last N layers, and PEFT's ``layers_to_transform``
guesses the layer index from module names; a selection names its modules exactly, so:

- ``peft``: PEFT's ``LoraConfig`` as JSON (``adapter_config.json``'s keys): ``target_modules`` is one
  regular expression anchored at the block stack and the selected indices, ``exclude_modules``
  everything outside them (:func:`lwlora.adapters.placement.build_peft_config`);
- ``llamafactory``: ``lora_target``, the comma-separated names of exactly the modules to adapt
  (PEFT matches a name as a suffix, so ``layers.3.self_attn.q_proj`` finds
  ``model.layers.3.self_attn.q_proj``), with ``lora_rank`` and ``lora_alpha``;
- ``axolotl``: ``lora_target_modules`` (the block-relative module names) and
  ``peft_layers_to_transform`` (the selected indices) with ``peft_layers_pattern`` (the stack's
  name), ``lora_r``, ``lora_alpha``;
- ``unsloth``: the keyword arguments of ``FastLanguageModel.get_peft_model``: ``target_modules``,
  ``layers_to_transform``, ``layers_pattern``, ``r``, ``lora_alpha``.

The last two give the same modules in every selected block, so they cannot carry a selection of
sub-layer units (``--granularity sublayer``): that is a ``--format`` error naming the two that can.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Literal

from lwlora.errors import ConfigError
from lwlora.fields import check_at_least, coerce_fields, option
from lwlora.selection.artifact import LayerSelection

Format = Literal["peft", "llamafactory", "axolotl", "unsloth"]


@dataclass(frozen=True)
class ExportConfig:
    """What ``lwlora export`` takes (each field a flag of the same name)."""

    selection: str = option(help="a selection.json, or a directory holding one (a run directory too)")
    format: Format = option("peft", "what to write: peft (LoraConfig JSON), llamafactory (lora_target), axolotl (lora_target_modules + peft_layers_to_transform), unsloth (get_peft_model kwargs)")
    r: int = option(8, "adapter rank")
    alpha: float | None = option(None, "LoRA alpha (default 2 r)")
    dropout: float = option(0.05, "LoRA dropout")
    target_modules: str = option("auto", "auto (every linear layer inside the selected blocks) or comma-separated module names")
    out: str | None = option(None, "write here (default: print); a directory gets adapter_config.json (peft) or lwlora_<format>.json")

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_at_least("--r", self.r)
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError("--alpha", f"must be positive (omit it for the default 2 r), got {self.alpha}")


def _module_names(selection: LayerSelection, target_modules: str) -> tuple[list[str], dict[int, list[str]]]:
    """(block-relative module names, block -> those it adapts) for ``target_modules``; exact
    names from the selection's record of the blocks' linear layers."""
    recorded = list(selection.block_linear_modules)
    if target_modules == "auto":
        names = recorded
    else:
        wanted = [t.strip() for t in target_modules.split(",") if t.strip()]
        names = [n for n in recorded if any(n == t or n.endswith("." + t) for t in wanted)] if recorded else wanted
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ConfigError("--target-modules", f"{missing} match no linear layer of the selection's blocks; available: {', '.join(recorded)}")
    if not names:
        raise ConfigError("--selection", f"{selection.model}'s selection records no linear layers of its blocks (block_linear_modules); give --target-modules")
    units = selection.selected_units
    if units is None:
        return names, {i: names for i in selection.selected}
    from lwlora.selection.units import part_of

    return names, {i: [n for n in names if part_of(n) in units.get(i, [])] for i in selection.selected}


def export(selection: LayerSelection, fmt: str, *, r: int = 8, alpha: float | None = None, dropout: float = 0.05, target_modules: str = "auto") -> dict[str, Any]:
    """The ``fmt`` export of ``selection`` (see the module docstring), as a JSON-able dict."""
    alpha = 2 * r if alpha is None else alpha
    names, per_block = _module_names(selection, target_modules)
    stack = selection.layers_path
    if fmt == "peft":
        from lwlora.adapters.placement import build_peft_config

        config = build_peft_config(selection, method="lora", r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)
        data = config.to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}
    if fmt == "llamafactory":
        exact = [f"{stack}.{i}.{name}" for i, modules in per_block.items() for name in modules]
        return {"finetuning_type": "lora", "lora_target": ",".join(exact), "lora_rank": r, "lora_alpha": alpha, "lora_dropout": dropout}
    if selection.units is not None:
        raise ConfigError("--format", f"{fmt} adapts the same modules in every listed block; this selection adapts sub-layer units: use --format peft or llamafactory")
    pattern = stack.rsplit(".", 1)[-1]
    if fmt == "axolotl":
        return {"adapter": "lora", "lora_r": r, "lora_alpha": alpha, "lora_dropout": dropout, "lora_target_modules": names, "peft_layers_to_transform": list(selection.selected), "peft_layers_pattern": pattern}
    if fmt == "unsloth":
        return {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": names, "layers_to_transform": list(selection.selected), "layers_pattern": pattern}
    raise ConfigError("--format", f"unknown format {fmt!r}; choose one of peft, llamafactory, axolotl, unsloth")


def run(config: ExportConfig) -> int:
    """``lwlora export``: read the selection, write (or print) its export."""
    from pathlib import Path

    from lwlora.io import atomic_write_json, check_output_file

    try:
        selection = LayerSelection.load(config.selection)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("SELECTION", f"cannot read {config.selection}: {exc}") from None
    target = None
    if config.out is not None:
        target = Path(config.out)
        if target.is_dir():
            target = target / ("adapter_config.json" if config.format == "peft" else f"lwlora_{config.format}.json")
        check_output_file(target, "--out")
    data = export(selection, config.format, r=config.r, alpha=config.alpha, dropout=config.dropout, target_modules=config.target_modules)
    if target is None:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        atomic_write_json(target, data)
        print(f"wrote {target}")
    return 0
