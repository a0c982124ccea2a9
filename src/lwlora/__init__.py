"""lwlora: layer-wise LoRA. Score every transformer block by how much it changes its input
(importance = 1 − CKA(input, output)), adapt only the top blocks, and hand PEFT the config.

Ogawa et al., "Layer-wise LoRA fine-tuning: a similarity metric approach", arXiv 2602.05988 (2026).

Heavy dependencies (transformers, peft, datasets, matplotlib) are imported on first use, so
``import lwlora`` is fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "linear_cka": "lwlora.similarity",
    "debiased_linear_cka": "lwlora.similarity",
    "mean_cosine": "lwlora.similarity",
    "angular_distance": "lwlora.similarity",
    "degeneracy": "lwlora.similarity",
    "CKAStatistics": "lwlora.streaming",
    "LayerScore": "lwlora.selection.scoring",
    "LayerScorer": "lwlora.selection.scoring",
    "get_scorer": "lwlora.selection.scoring",
    "BlockStack": "lwlora.blocks",
    "find_block_stacks": "lwlora.blocks",
    "resolve_block_stack": "lwlora.blocks",
    "capture_block_representations": "lwlora.selection.capture",
    "SelectionPolicy": "lwlora.selection.policy",
    "paper_policy": "lwlora.selection.policy",
    "LayerSelection": "lwlora.selection.artifact",
    "LayerRecord": "lwlora.selection.artifact",
    "build_peft_config": "lwlora.adapters.placement",
    "apply_selection": "lwlora.adapters.placement",
    "verify": "lwlora.adapters.placement",
    "AdapterPlacementError": "lwlora.adapters.placement",
    "SelectConfig": "lwlora.commands.select",
    "select_layers": "lwlora.commands.select",
    "score_layers": "lwlora.selection.pipeline",
    "ConfigError": "lwlora.errors",
    "TrainConfig": "lwlora.training.config",
    "train": "lwlora.training.trainer",
    "evaluate": "lwlora.training.evaluate",
    "load_task": "lwlora.tasks",
    "compare_selections": "lwlora.commands.compare",
    "bootstrap_stability": "lwlora.selection.stability",
    "block_gradient_scores": "lwlora.selection.gradients",
    "SelectOptions": "lwlora.selection.options",
    "select_on_model": "lwlora.selection.pipeline",
    "DynamicBlocks": "lwlora.training.dynamic",
    "WarmupPrune": "lwlora.training.prune",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lwlora' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
