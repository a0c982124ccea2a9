"""Which blocks a training run adapts (``lwlora train --layers``), as a ``LayerSelection``.

- ``cka``: measured by the selection pipeline on the task's own training inputs (the paper's
  method; ``--scorer`` picks the similarity); any scorer name directly: ``cka-debiased``, ``bi``,
  ``angular``, and the gradient scores ``fim`` / ``gradnorm`` (on the task's labelled inputs);
- ``all``: every block (all-layer LoRA, the paper's main baseline);
- ``random``: k blocks drawn with ``--seed``; ``first`` / ``last``: the k lowest / highest blocks;
- ``0,3,5``: exactly those blocks; ``--selection FILE``: a saved ``selection.json``.

k is floor(ratio × L) with ``--ratio`` (default 0.5) or ``--num-layers``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lwlora.blocks import BlockStack
from lwlora.errors import ConfigError
from lwlora.selection.artifact import LayerSelection, rule_selection
from lwlora.selection.options import GRADIENT_SCORERS, SelectOptions
from lwlora.selection.policy import SelectionPolicy, rule_blocks, select_blocks


def measure(config: Any, model: nn.Module, tokenizer: Any, model_kind: str, samples: Any, *, options: SelectOptions | None = None) -> LayerSelection:
    """The selection pipeline with the run's options (or ``options``), on the task's samples."""
    from lwlora.selection.pipeline import select_on_model

    return select_on_model(options or config.options, model, tokenizer, samples, model_label=config.model, data_label=config.data or config.task, model_kind=model_kind, gguf_file=config.gguf_file, progress=config.progress)


def measure_every_block(config: Any, model: nn.Module, tokenizer: Any, model_kind: str, samples: Any, num_layers: int) -> LayerSelection:
    """Every block scored by the run's similarity ``--scorer`` (the importances of
    ``--rank-allocation importance`` and ``--dynamic-blocks``), whatever the run's rule."""
    options = dataclasses.replace(config.options, rule="top", layers=None, ratio=None, num_layers=num_layers, param_budget=None, auto=False, prefer_shallow=None, granularity="block", preset=None)
    return measure(config, model, tokenizer, model_kind, samples, options=options)


def choose_layers(config: Any, model: nn.Module, tokenizer: Any, stack: BlockStack, model_kind: str, task: Any) -> LayerSelection:
    """Resolve ``config.selection`` / ``--layers`` (see the module docstring) on ``stack``."""
    options = config.options
    num_layers = stack.num_layers
    if config.selection is not None:
        try:
            selection = LayerSelection.load(config.selection)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError("--selection", f"cannot read {config.selection}: {exc}") from None
        if selection.num_layers != num_layers:
            raise ConfigError("--selection", f"{config.selection} is for {selection.num_layers} blocks; this model has {num_layers}")
        return selection
    if options.layers is not None:  # exactly these blocks: nothing to measure
        selected, _ = select_blocks([None] * num_layers, SelectionPolicy(layers=options.layers))
        return rule_selection(options, stack, model_kind, selected, "explicit", model_label=config.model, gguf_file=config.gguf_file)
    if not options.measures:
        policy = SelectionPolicy(ratio=options.ratio, num_layers=options.num_layers)
        return rule_selection(options, stack, model_kind, rule_blocks(options.rule, num_layers, policy, seed=options.seed), options.rule, model_label=config.model, gguf_file=config.gguf_file)
    if options.scorer in GRADIENT_SCORERS:
        from lwlora.selection.gradients import gradient_selection
        from lwlora.tasks.base import probe_batches

        batches = probe_batches(task, num_samples=options.num_samples, batch_size=options.batch_size, seed=options.seed)
        return gradient_selection(options, model, stack, batches, model_kind=model_kind, model_label=config.model, data_label=config.data or config.task, gguf_file=config.gguf_file, progress=config.progress)
    return measure(config, model, tokenizer, model_kind, task.selection_texts)
