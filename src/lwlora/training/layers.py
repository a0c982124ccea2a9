"""Which blocks a training run adapts (``lwlora train --layers``), as a ``LayerSelection``.

- ``cka``: measured, by ``lwlora.select`` on the task's own training inputs (the paper's method;
  ``--scorer`` picks the similarity); any scorer name directly: ``cka-debiased``, ``bi``,
  ``angular``, and the gradient scores ``fim`` / ``gradnorm`` (on the task's labelled inputs);
- ``all``: every block (all-layer LoRA, the paper's main baseline);
- ``random``: k blocks drawn with ``--seed``; ``first`` / ``last``: the k lowest / highest blocks;
- ``0,3,5``: exactly those blocks; ``--selection FILE``: a saved ``selection.json``.

k is floor(ratio × L) with ``--ratio`` (default 0.5) or ``--num-layers``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from torch import nn

from lwlora.blocks import BlockStack
from lwlora.data import TextSamples
from lwlora.errors import ConfigError
from lwlora.gradient_scores import GRADIENT_SCORERS
from lwlora.policy import RULES, SelectionPolicy, rule_blocks, select_blocks
from lwlora.selection import LayerRecord, LayerSelection


def unscored_selection(config: Any, stack: BlockStack, model_kind: str, selected: list[int], rule: str) -> LayerSelection:
    """A ``LayerSelection`` made by a rule rather than by scores (every importance ``None``)."""
    from lwlora.budget import selection_cost
    from lwlora.select import adapter_targets, library_versions

    suffixes, exact = adapter_targets(stack, config.target_modules)
    return LayerSelection(
        model=config.model,
        gguf_file=config.gguf_file,
        model_kind=model_kind,
        layers_path=stack.path,
        tower=stack.tower,
        num_layers=stack.num_layers,
        block_linear_modules=stack.block_linear_modules(),
        scorer=rule,
        similarity_name="none",
        pooling="none",
        layers=[LayerRecord(index=i, cka=None, similarity=None, importance=None, degenerate=False) for i in range(stack.num_layers)],
        selected=selected,
        policy={"rule": rule, "ratio": config.ratio, "num_layers": config.num_layers, "seed": config.seed},
        cost=selection_cost(stack, selected, suffixes, config.r, exact=exact, seq_len=config.max_length).to_json(),
        versions=library_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _similarity_selection(config: Any, model: nn.Module, tokenizer: Any, model_kind: str, samples: TextSamples, *, scorer: str) -> LayerSelection:
    """``lwlora select`` with the run's selection options, on the task's own training inputs."""
    from lwlora.select import SelectConfig, select_layers

    select_config = SelectConfig(
        model=config.model,
        data=config.data or config.task,
        num_samples=config.num_samples,
        ratio=config.ratio,
        num_layers=config.num_layers,
        scorer=scorer,
        pooling=config.pooling,
        feature_norm=config.feature_norm,
        degenerate_fallback=config.degenerate_fallback,
        statistics=config.statistics,
        granularity=config.granularity,
        param_budget=config.param_budget,
        auto=config.auto,
        prefer_shallow=config.prefer_shallow,
        r=config.r,
        target_modules=config.target_modules,
        batch_size=config.select_batch_size,
        max_length=config.max_length,
        gguf_file=config.gguf_file,
        layers_path=config.layers_path,
        tower=config.tower,
        preset=config.preset,
        seed=config.seed,
        progress=config.progress,
    )
    return select_layers(select_config, model=model, tokenizer=tokenizer, model_kind=model_kind, samples=samples)


def choose_layers(
    config: Any,
    model: nn.Module,
    tokenizer: Any,
    stack: BlockStack,
    model_kind: str,
    task: Any,
) -> LayerSelection:
    """Resolve ``config.selection`` / ``config.layers`` (see the module docstring) on ``stack``."""
    samples = task.selection_texts
    num_layers = stack.num_layers
    if config.selection is not None:
        try:
            selection = LayerSelection.load(config.selection)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError("--selection", f"cannot read {config.selection}: {exc}") from None
        if selection.num_layers != num_layers:
            raise ConfigError("--selection", f"{config.selection} is for {selection.num_layers} blocks; this model has {num_layers}")
        return selection
    if config.layers == "cka":
        return _similarity_selection(config, model, tokenizer, model_kind, samples, scorer=config.scorer)
    if config.layer_indices is not None:
        selected, _ = select_blocks([None] * num_layers, SelectionPolicy(layers=config.layer_indices))
        return unscored_selection(config, stack, model_kind, selected, "explicit")
    policy = SelectionPolicy(ratio=config.ratio, num_layers=config.num_layers)
    if config.layers in RULES:
        return unscored_selection(config, stack, model_kind, rule_blocks(config.layers, num_layers, policy, seed=config.seed), config.layers)
    if config.layers in GRADIENT_SCORERS:
        from lwlora.training.gradient_selection import gradient_selection

        return gradient_selection(config, model, task, stack, model_kind, policy)
    return _similarity_selection(config, model, tokenizer, model_kind, samples, scorer=config.layers)
