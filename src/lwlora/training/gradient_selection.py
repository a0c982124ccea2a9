"""Gradient-based layer selection (``--layers fim`` / ``--layers gradnorm``, ``select --scorer fim``):
the paper's Fisher-information baseline and a gradient-norm probe, on the task's labelled inputs.

The probe uses ``num_samples`` training examples drawn with ``seed``, the model with its task
head as loaded for training (for classification the head is freshly initialised, as it is when
training starts), and :func:`lwlora.gradient_scores.block_gradient_scores`. ``fim`` ranks by the
per-parameter mean of the empirical Fisher diagonal, ``gradnorm`` by the gradient norm of the
probe loss; both raw Fisher values are kept in ``selection.diagnostics``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any

from torch import nn

from lwlora.blocks import BlockStack
from lwlora.data import few_samples_warning
from lwlora.gradient_scores import (
    GRADIENT_SCORERS,
    block_gradient_scores,
    scores_to_layer_scores,
)
from lwlora.policy import SelectionPolicy, select_blocks
from lwlora.selection import LayerRecord, LayerSelection

logger = logging.getLogger("lwlora")


def probe_batches(task: Any, *, num_samples: int, batch_size: int, seed: int) -> list[dict[str, Any]]:
    """``num_samples`` training examples (all if fewer), drawn with ``seed``, collated in batches."""
    total = len(task.train)
    indices = sorted(random.Random(seed).sample(range(total), min(num_samples, total)))
    rows = [task.train[i] for i in indices]
    return [task.data_collator(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]


def gradient_selection(config: Any, model: nn.Module, task: Any, stack: BlockStack, model_kind: str, policy: SelectionPolicy, *, scorer: str | None = None) -> LayerSelection:
    """Score every block of ``stack`` by ``scorer`` (default ``config.layers``) and select by ``policy``."""
    from lwlora.training.layers import unscored_selection

    scorer = scorer or config.layers
    from lwlora.capture import compute_placement

    started = time.perf_counter()
    device, dtype = compute_placement(model)
    batches = probe_batches(task, num_samples=config.num_samples, batch_size=config.select_batch_size, seed=config.seed)
    scores = block_gradient_scores(model, stack, batches, progress=config.progress)
    values = getattr(scores, GRADIENT_SCORERS[scorer])
    layer_scores = scores_to_layer_scores(values)
    records = [LayerRecord(index=i, cka=None, similarity=None, importance=s.importance, degenerate=s.degenerate, reason=s.reason) for i, s in enumerate(layer_scores)]
    selected, warnings = select_blocks([r.importance for r in records], policy)
    few = few_samples_warning(config.num_samples, scores.num_samples, f"the training data of {config.data or config.task}")
    if few:
        warnings.insert(0, few)
    for message in warnings:
        logger.warning(message)
    base = unscored_selection(config, stack, model_kind, selected, scorer)
    return dataclasses.replace(
        base,
        layers=records,
        scorer=scorer,
        similarity_name="none",
        pooling="none",
        num_samples=scores.num_samples,
        data=config.data or config.task,
        policy=policy.to_json(),
        warnings=warnings,
        diagnostics={"ranking": GRADIENT_SCORERS[scorer], "fisher": scores.fisher, "fisher_per_param": scores.fisher_per_param, "grad_norm": scores.grad_norm, "num_params": scores.num_params},
        device=device,
        dtype=dtype,
        timings={"score_s": round(time.perf_counter() - started, 4)},
    )


def select_by_gradients(select_config: Any) -> LayerSelection:
    """``lwlora select --scorer fim|gradnorm``: load the model with the task's head and the task's
    labelled inputs (``--task``; default ``classification`` for encoders, ``instruction`` for
    decoders, with ``--label-column`` or ``--instruction-field``/``--output-field``), then score."""
    from transformers import AutoConfig, set_seed

    from lwlora.blocks import resolve_block_stack
    from lwlora.models import infer_model_kind, resolve_device, resolve_model_source
    from lwlora.tasks import load_task
    from lwlora.training.config import TrainConfig
    from lwlora.training.trainer import load_tokenizer, load_training_model

    c = select_config
    source, gguf_file = resolve_model_source(c.model, c.gguf_file)
    task_name = c.task
    if task_name is None:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        kind = infer_model_kind(AutoConfig.from_pretrained(source, trust_remote_code=c.trust_remote_code, **kwargs))
        task_name = "classification" if kind == "encoder" else "instruction"
    config = TrainConfig(
        model=c.model, task=task_name, out="-", data=c.data, layers=c.scorer, ratio=c.ratio, num_layers=c.num_layers,
        num_samples=c.num_samples, select_batch_size=c.batch_size, max_length=c.max_length, gguf_file=c.gguf_file,
        dtype=c.dtype, device=c.device, trust_remote_code=c.trust_remote_code, text_column=c.text_column,
        text_pair_column=c.text_pair_column, label_column=c.label_column, instruction_field=c.instruction_field,
        output_field=c.output_field, seed=c.seed, progress=c.progress, layers_path=c.layers_path,
    )
    tokenizer, source, gguf_file = load_tokenizer(config)
    task = load_task(task_name, tokenizer, data=c.data, text_column=c.text_column, text_pair_column=c.text_pair_column, label_column=c.label_column, instruction_field=c.instruction_field, output_field=c.output_field, max_length=c.max_length, max_train_samples=None, max_eval_samples=1, selection_samples=1, seed=c.seed)
    set_seed(c.seed)  # a fresh classification head is drawn here: seed it, so scores are reproducible
    model = load_training_model(config, source, gguf_file, task, tokenizer)
    target, device_map = resolve_device(c.device)
    if target is not None:
        model.to(target)
    stack = resolve_block_stack(model, layers_path=c.layers_path, tower=c.tower)
    policy = c.policy_for(infer_model_kind(model.config))
    return gradient_selection(config, model, task, stack, infer_model_kind(model.config), policy, scorer=c.scorer)
