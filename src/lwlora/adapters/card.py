"""A saved adapter that travels: its base model named as the user named it, and a model card.

PEFT writes ``adapter_config.json`` with ``base_model_name_or_path`` set to wherever the weights
were read from (a site-packages path for a built-in model, a cache directory) and an empty model
card. :func:`finish_adapter` rewrites the first to the Hub id or path the user gave
(:func:`lwlora.models.model_reference`) and writes ``README.md``: the selected blocks (or units),
how they were chosen, the parameter counts and the final metrics, and how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lwlora.io import atomic_write_json, atomic_write_text

#: where in the adapter folder lwlora records what PEFT's config has no field for
PROVENANCE_FILE = "lwlora.json"


def set_base_model(adapter_dir: Path, reference: str) -> None:
    """``adapter_config.json``'s ``base_model_name_or_path`` := ``reference``."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = reference
    atomic_write_json(path, config)


#: the metrics a card shows (others stay in metrics.json)
REPORTED_METRICS = ("accuracy", "exact_match", "pass@1", "f1", "matthews_correlation", "pearson", "spearmanr", "loss", "n")


def _value(key: str, value: Any) -> str:
    """A share as a percentage (accuracy 0.953 → 95.3%); a loss, a count or a correlation as is."""
    if isinstance(value, float) and key in ("accuracy", "exact_match", "pass@1", "f1"):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(*, reference: str, gguf_file: str | None, selection: Any, metrics: dict[str, Any], task: str, method: str) -> str:
    """The adapter's ``README.md`` (a Hugging Face model card, with its YAML header)."""
    params = metrics.get("params", {})
    cost = metrics.get("cost", {})
    units = selection.selected_units
    chosen = ", ".join(f"{i} ({'+'.join(parts)})" for i, parts in sorted(units.items())) if units else ", ".join(map(str, selection.selected))
    lines = [
        "---",
        f"base_model: {reference}",
        "library_name: peft",
        "tags: [lwlora, lora, layer-wise-lora]",
        "---",
        "",
        f"# {method} adapter on {len(selection.selected)} of {selection.num_layers} blocks of {reference}",
        "",
        f"Trained with [lwlora](https://arxiv.org/abs/2602.05988) (layer-wise LoRA) on the task `{task}`.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{reference}`" + (f" (GGUF file `{gguf_file}`, dequantized)" if gguf_file else "") + " |",
        f"| adapted blocks | {chosen} (of `{selection.layers_path}`, {selection.num_layers} blocks) |",
        f"| chosen by | {selection.scorer}" + (f", {selection.pooling} pooling, {selection.num_samples} samples" if selection.scorer not in ("all", "first", "last", "random", "explicit") else "") + " |",
        f"| adapter parameters | {params.get('adapter', 0):,}" + (f" ({cost['adapter_fraction']:.2f} x all-layer LoRA)" if isinstance(cost.get("adapter_fraction"), (int, float)) else "") + " |",
        f"| fully trained modules | {params.get('head', 0):,} parameters |",
        f"| train loss | {metrics.get('train', {}).get('train_loss', float('nan')):.4f} over {metrics.get('train', {}).get('global_step')} steps |",
    ]
    for split, values in (metrics.get("final") or {}).items():
        if isinstance(values, dict):
            shown = ", ".join(f"{key} {_value(key, value)}" for key, value in values.items() if key in REPORTED_METRICS)
            lines.append(f"| {split} | {shown} |")
    lines += [
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModel  # or the Auto class of your task",
        "",
        f"base = AutoModel.from_pretrained({reference!r}" + (f", gguf_file={gguf_file!r}" if gguf_file else "") + ")",
        "model = PeftModel.from_pretrained(base, 'path/to/this/folder')",
        "```",
        "",
        "`selection.json` in the run directory has every block's score; `lwlora export` writes the selection for other trainers.",
    ]
    return "\n".join(lines) + "\n"


def finish_adapter(adapter_dir: Path, *, model: str, gguf_file: str | None, selection: Any, metrics: dict[str, Any], task: str, method: str) -> None:
    """Make ``adapter_dir`` travel: the base model as the user named it, the model card, and
    ``lwlora.json`` (the GGUF file and the selected blocks, which PEFT's config cannot hold)."""
    from lwlora.models import model_reference

    reference = model_reference(model)
    if (adapter_dir / "adapter_config.json").is_file():
        set_base_model(adapter_dir, reference)
    atomic_write_text(adapter_dir / "README.md", model_card(reference=reference, gguf_file=gguf_file, selection=selection, metrics=metrics, task=task, method=method))
    atomic_write_json(adapter_dir / PROVENANCE_FILE, {"base_model": reference, "model_as_given": model, "gguf_file": gguf_file, "selected": selection.selected,
                                                       "units": selection.selected_units, "layers_path": selection.layers_path, "scorer": selection.scorer})
