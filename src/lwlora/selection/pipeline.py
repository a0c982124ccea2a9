"""The selection pipeline: capture → score → choose → artifact, on a model already loaded.

:func:`select_on_model` takes a model, its tokenizer (or processor), the samples and the
:class:`~lwlora.selection.options.SelectOptions`, and returns a
:class:`~lwlora.selection.artifact.LayerSelection`; it loads nothing (``lwlora.commands.select``
loads models and data for ``lwlora select``; ``lwlora.training`` calls it on the model it trains).
:func:`score_layers` is the reusable middle: one :class:`~lwlora.selection.scoring.LayerScore`
per block.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from lwlora.batching import make_batches
from lwlora.blocks import BlockStack, resolve_block_stack
from lwlora.data import TextSamples, few_samples_warning
from lwlora.errors import ConfigError
from lwlora.models import fit_max_length, infer_model_kind, prepare_tokenizer
from lwlora.selection.artifact import LayerRecord, LayerSelection, library_versions, model_fields, rule_selection
from lwlora.selection.capture import (
    STATISTICS,
    BlockRepresentations,
    Captured,
    capture_block_representations,
    compute_placement,
)
from lwlora.selection.cost import adapter_targets, lora_params_per_block, selection_cost
from lwlora.selection.options import SelectOptions
from lwlora.selection.policy import (
    SelectionPolicy,
    auto_count,
    chord_elbow,
    prefer_shallow,
    rule_blocks,
    select_blocks,
    select_by_param_budget,
)
from lwlora.selection.scoring import (
    SCORERS,
    LayerScore,
    LayerScorer,
    get_scorer,
    score_pair,
    uses_statistics,
)

logger = logging.getLogger("lwlora")

#: SelectOptions' default --max-length: a model with fewer positions is fitted to them silently
DEFAULT_MAX_LENGTH: int = SelectOptions.__dataclass_fields__["max_length"].default


def resolve_statistics(statistics: str, scorer: str, *, bootstrap: int = 0) -> str:
    """What the capture keeps for ``--statistics`` with ``scorer`` (a ``--scorer`` name).

    ``rows`` and ``covariance`` are kept as asked; ``auto`` stays ``auto`` (rows, folded into
    statistics once those are smaller) when the scorer can use statistics and nothing resamples
    the rows, else it becomes ``rows``. ``covariance`` with a scorer that needs rows (every scorer
    but plain linear CKA) or with ``--bootstrap`` (which resamples rows) is a ConfigError.
    """
    if statistics not in STATISTICS:
        raise ConfigError("--statistics", f"unknown choice {statistics!r}; choose one of {', '.join(STATISTICS)}")
    streamable = scorer in SCORERS and uses_statistics(SCORERS[scorer])
    if statistics == "covariance" and not streamable:
        raise ConfigError("--statistics", f"covariance statistics serve only plain linear CKA (cka), not the {scorer} scorer; use cka, or --statistics auto or rows")
    if statistics == "covariance" and bootstrap:
        raise ConfigError("--statistics", "covariance keeps no rows, and --bootstrap resamples them; use --statistics auto or rows, or --bootstrap 0")
    if statistics == "auto" and (not streamable or bootstrap):
        return "rows"
    return statistics


def default_pooling(model_kind: str, tower: str) -> str:
    """The paper's pooling: first (CLS) token for encoders, last real token for decoders; vision
    towers have no meaningful per-sample first token at the embedding output, so ``mean``."""
    if tower == "vision":
        return "mean"
    return "cls" if model_kind == "encoder" else "last"


def capture_samples(
    model: nn.Module,
    tokenizer: Any,
    samples: TextSamples,
    stack: BlockStack,
    *,
    pooling: str = "last",
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = True,
    extra_poolings: tuple[str, ...] = (),
    statistics: str = "auto",
    fold_at: int | None = None,
    split_at: Sequence[nn.Module] | None = None,
) -> Captured:
    """Pooled block inputs/outputs on ``samples``, rows in the samples' order (batches run in
    length order to cut padding, then the rows are put back), or their streamed statistics
    (``statistics`` and ``fold_at`` as for :func:`~lwlora.selection.capture.capture_block_representations`;
    sums do not depend on the order).

    Image-text samples (:class:`lwlora.multimodal.ImageTextSamples`; ``tokenizer`` is then the
    model's processor) go through the processor and are not truncated. A vision tower's blocks see
    patch tokens, all real: they are pooled without the text attention mask."""
    if getattr(samples, "images", None) is not None:
        from lwlora.multimodal import image_text_batches

        batches, order = image_text_batches(tokenizer, samples, batch_size=batch_size, model=model)
    else:
        batches, order = make_batches(tokenizer, samples, batch_size=batch_size, max_length=max_length, model=model)
    mask_key = None if stack.tower == "vision" else "attention_mask"
    reps = capture_block_representations(model, stack, batches, pooling=pooling, progress=progress, total=len(batches), extra_poolings=extra_poolings, mask_key=mask_key, statistics=statistics, fold_at=fold_at, split_at=split_at)
    if reps.num_samples != len(order):
        raise ConfigError(
            "--tower",
            f"{stack.path} produced {reps.num_samples} rows for {len(order)} samples (e.g. a vision tower that tiles each "
            "image into several crops, as LLaVA-NeXT does); score the language tower instead",
        )
    if not isinstance(reps, BlockRepresentations):
        return reps
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))

    def restore(r: BlockRepresentations) -> BlockRepresentations:
        return BlockRepresentations(
            blocks=r.blocks,
            inputs=[x[inverse.to(x.device)] for x in r.inputs],
            outputs=[y[inverse.to(y.device)] for y in r.outputs],
            pooling=r.pooling,
        )

    result = restore(reps)
    result.alternates = {name: restore(alt) for name, alt in reps.alternates.items()}
    return result


def score_representations(reps: Captured, scorer: LayerScorer, *, degenerate_fallback: str = "exclude") -> list[LayerScore]:
    """One score per captured block (rows, or statistics for a scorer that uses them). A
    degenerate block is, by ``degenerate_fallback``:
    ``exclude`` — left without a score (ranked after every scored block; the default and the
    paper preset's rule), or ``mean`` — scored on its mean-pooled representations instead
    (needs ``reps.alternates["mean"]``), recorded as ``fallback="mean"``."""
    scores = []
    for i in range(len(reps.blocks)):
        score = score_pair(scorer, reps.pair(i))
        if score.degenerate:
            if degenerate_fallback == "mean" and "mean" in reps.alternates:
                retry = score_pair(scorer, reps.alternates["mean"].pair(i))
                if not retry.degenerate:
                    reason = f"{reps.pooling} pooling: {score.reason}; scored with mean pooling instead"
                    score = dataclasses.replace(retry, degenerate=True, reason=reason, fallback="mean")
            if score.fallback is None:
                score = dataclasses.replace(score, fallback="excluded")
        scores.append(score)
    return scores


def score_layers(
    model: nn.Module,
    tokenizer: Any,
    samples: TextSamples,
    stack: BlockStack,
    *,
    scorer: str = "cka",
    pooling: str = "last",
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = True,
    feature_norm: str = "none",
    degenerate_fallback: str = "exclude",
    statistics: str = "auto",
) -> list[LayerScore]:
    """One score per block of ``stack``, from pooled block inputs/outputs on ``samples`` (or
    their statistics; see :func:`resolve_statistics`)."""
    layer_scorer = get_scorer(scorer, feature_norm=feature_norm)
    kept = resolve_statistics(statistics, scorer)
    if len(samples) < layer_scorer.min_samples:
        raise ConfigError("--num-samples", f"the {scorer} scorer needs at least {layer_scorer.min_samples} samples, the data gave {len(samples)}")
    extra = ("mean",) if degenerate_fallback == "mean" and pooling != "mean" else ()
    reps = capture_samples(model, tokenizer, samples, stack, pooling=pooling, batch_size=batch_size, max_length=max_length, progress=progress, extra_poolings=extra, statistics=kept)
    return score_representations(reps, layer_scorer, degenerate_fallback=degenerate_fallback)


def select_with_budget(importances: list[float | None], policy: SelectionPolicy, stack: BlockStack, options: SelectOptions, suffixes: list[str], exact: bool) -> tuple[list[int], list[str], dict[str, Any]]:
    """Apply ``policy``, or the budget options that replace its count (``--param-budget``,
    ``--auto``), then ``--prefer-shallow``. Returns (selected, warnings, diagnostics)."""
    info: dict[str, Any] = {}
    allowed = [None if i in policy.exclude else v for i, v in enumerate(importances)]
    if options.param_budget is not None:
        block_params = lora_params_per_block(stack, suffixes, options.r, exact=exact)
        budget_params = [p if i not in policy.exclude else sum(block_params) + 1 for i, p in enumerate(block_params)]
        try:
            selected = select_by_param_budget(allowed, budget_params, options.param_budget, all_layer_params=sum(block_params))
        except ValueError as exc:
            raise ConfigError("--param-budget", str(exc)) from None
        info["param_budget"] = {"budget": options.param_budget, "block_params": block_params, "selected_params": sum(block_params[i] for i in selected), "all_layer_params": sum(block_params)}
        warnings: list[str] = []
    else:
        if options.auto:
            count = auto_count(allowed)
            policy = dataclasses.replace(policy, num_layers=count, ratio=None)
            info["auto"] = chord_elbow(allowed).to_json()
        selected, warnings = select_blocks(importances, policy)
    if options.prefer_shallow is not None:
        shallow = prefer_shallow(allowed, len(selected), max_importance_loss=options.prefer_shallow)
        info["prefer_shallow"] = {"max_importance_loss": options.prefer_shallow, "top_k": selected, "chosen": shallow}
        selected = shallow
    return sorted(selected), warnings, info


#: CKA at or above this is "the block barely changes its input" to within the noise of a few
#: hundred samples; a ranking among such blocks rests on ties (massive activations, see
#: similarity.standardize_features).
NEAR_IDENTITY_CKA = 0.9995


def near_identity_diagnostics(reps: Captured, records: list[LayerRecord], policy: SelectionPolicy, options: SelectOptions, selected: list[int]) -> tuple[dict[str, Any], list[str]]:
    """Report blocks whose CKA is within noise of 1 and, when the ranking rests on them, what the
    outlier-robust variant (per-feature standardisation) would select instead."""
    near = [r.index for r in records if r.cka is not None and r.cka >= NEAR_IDENTITY_CKA]
    diagnostics: dict[str, Any] = {"near_identity_blocks": near, "near_identity_threshold": NEAR_IDENTITY_CKA}
    warnings: list[str] = []
    if len(near) < 2:
        return diagnostics, warnings
    boundary = bool(set(near) & set(selected)) and bool(set(near) - set(selected))
    other = "standardize" if options.feature_norm == "none" else "none"
    alternative = score_representations(reps, get_scorer(options.scorer, feature_norm=other), degenerate_fallback=options.degenerate_fallback)
    alt_selected, _ = select_blocks([s.importance for s in alternative], policy)
    overlap = len(set(alt_selected) & set(selected)) / max(1, len(set(alt_selected) | set(selected)))
    diagnostics["alternative"] = {"feature_norm": other, "selected": alt_selected, "jaccard": round(overlap, 4)}
    message = f"{len(near)} blocks score CKA >= {NEAR_IDENTITY_CKA} ({near}): their order is within noise"
    if boundary:
        message += ", and the selection boundary runs through them"
    warnings.append(f"{message}; with --feature-norm {other} the selection would be {alt_selected} (Jaccard {overlap:.2f} with this one)")
    return diagnostics, warnings


def select_units(options: SelectOptions, model: nn.Module, tokenizer: Any, samples: Any, stack: BlockStack, *, model_kind: str, pooling: str, layer_scorer: LayerScorer,
                  max_length: int, warnings: list[str], timings: dict[str, float], start: float, gguf_file: str | None, model_label: str, data_label: str, progress: bool) -> LayerSelection:
    """``--granularity sublayer``: score every block's attention and MLP halves apart
    (lwlora.selection.units) and fill the parameter budget (``--param-budget``, else ``--ratio``, default
    0.5 of all-layer LoRA's parameters) with the most important units, greedily."""
    from lwlora.selection.units import PARTS, mlp_entries, unit_cost, unit_params

    tick = time.perf_counter()
    device, dtype = compute_placement(model)
    entries = mlp_entries(stack, model.config)
    extra = ("mean",) if options.degenerate_fallback == "mean" and pooling != "mean" else ()
    kept = resolve_statistics(options.statistics, options.scorer)
    reps = capture_samples(model, tokenizer, samples, stack, pooling=pooling, batch_size=options.batch_size, max_length=max_length, progress=progress, extra_poolings=extra, statistics=kept, split_at=entries)
    scores = score_representations(reps, layer_scorer, degenerate_fallback=options.degenerate_fallback)
    timings["score_s"] = time.perf_counter() - tick
    is_cka = layer_scorer.similarity_name == "cka"
    suffixes, exact = adapter_targets(stack, options.target_modules)
    names = suffixes if exact else [n for n in stack.block_linear_modules() if any(n == t or n.endswith("." + t) for t in suffixes)]
    params = unit_params(stack, names, options.r)
    budget = options.param_budget if options.param_budget is not None else (options.ratio if options.ratio is not None else 0.5)
    try:
        chosen = set(select_by_param_budget([s.importance for s in scores], params, budget, all_layer_params=sum(params)))
    except ValueError as exc:
        raise ConfigError("--param-budget" if options.param_budget is not None else "--ratio", str(exc)) from None
    units = [
        {"block": u // 2, "part": PARTS[u % 2], "cka": s.similarity if is_cka else None, "similarity": s.similarity, "importance": s.importance,
         "degenerate": s.degenerate, "reason": s.reason, "fallback": s.fallback, "params": params[u], "selected": u in chosen}
        for u, s in enumerate(scores)
    ]
    # block records: the block's own score (input to output) where the rows allow it
    blocks: list[LayerRecord] = []
    for i in range(stack.num_layers):
        if isinstance(reps, BlockRepresentations):
            whole = score_pair(layer_scorer, (reps.inputs[2 * i], reps.outputs[2 * i + 1]))
            blocks.append(LayerRecord(index=i, cka=whole.similarity if is_cka else None, similarity=whole.similarity, importance=whole.importance, degenerate=whole.degenerate, reason=whole.reason))
        else:
            blocks.append(LayerRecord(index=i, cka=None, similarity=None, importance=None, degenerate=False, reason="scored by sub-layer units (statistics keep no whole-block pair)"))
    selected = sorted({u // 2 for u in chosen})
    for unit in reversed(units):
        if unit["degenerate"]:
            warnings.append(f"block {unit['block']} {unit['part']}: {unit['reason']}")
    for message in warnings:
        logger.warning(message)
    cost = selection_cost(stack, selected, suffixes, options.r, exact=exact, hidden_size=getattr(model.config, "hidden_size", None), seq_len=max_length).to_json()
    timings["total_s"] = time.perf_counter() - start
    return LayerSelection(
        **model_fields(stack, model_label=model_label, gguf_file=gguf_file, model_kind=model_kind), scorer=options.scorer, similarity_name=layer_scorer.similarity_name, pooling=pooling,
        num_samples=len(samples), data=data_label, data_fingerprint=samples.fingerprint,
        policy={"granularity": "sublayer", "param_budget": budget, "selected_params": sum(params[u] for u in chosen), "all_layer_params": sum(params)},
        layers=blocks, selected=selected, units=units, warnings=warnings,
        diagnostics={"statistics": {"requested": options.statistics, "kept": reps.kept, "state_bytes": reps.nbytes}},
        cost=unit_cost(cost, params, sorted(chosen)), feature_norm=options.feature_norm, device=device, dtype=dtype,
        versions=library_versions(), timings={k: round(v, 4) for k, v in timings.items()}, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def select_on_model(
    options: SelectOptions,
    model: nn.Module,
    tokenizer: Any,
    samples: Any,
    *,
    model_label: str,
    data_label: str | None = None,
    model_kind: str | None = None,
    gguf_file: str | None = None,
    progress: bool = True,
    timings: dict[str, float] | None = None,
    start: float | None = None,
) -> LayerSelection:
    """Choose the blocks of ``model`` by ``options`` on ``samples`` (text or image-text), with a
    similarity scorer or a rule (gradient scorers need the task head: lwlora.selection.gradients).

    ``model_label`` / ``data_label``: what the artifact records as the model and the data (a Hub
    id or path the user gave); ``timings``: durations measured before (loading), completed here."""
    start = time.perf_counter() if start is None else start
    timings = {} if timings is None else dict(timings)
    data_label = data_label or samples.source
    if options.scorer not in SCORERS and options.measures:
        raise ConfigError("--scorer", f"{options.scorer} is a gradient scorer: it needs the model with its task head (lwlora.selection.gradients)")
    model_kind = model_kind or infer_model_kind(model.config)
    tokenizer = prepare_tokenizer(tokenizer)
    is_text = getattr(samples, "images", None) is None  # image-text prompts are never truncated
    max_length = fit_max_length(options.max_length, model.config, tokenizer, pair=samples.text_pairs is not None, asked=options.max_length != DEFAULT_MAX_LENGTH) if is_text else options.max_length

    stack = resolve_block_stack(model, layers_path=options.layers_path, tower=options.tower)
    policy = options.policy_for(model_kind)
    policy.target_count(stack.num_layers)  # fail on k > L before the expensive part
    pooling = options.pooling or default_pooling(model_kind, stack.tower)
    if not options.measures:
        return rule_selection(options, stack, model_kind, rule_blocks(options.rule, stack.num_layers, policy, seed=options.seed), options.rule, model_label=model_label, gguf_file=gguf_file)

    layer_scorer = get_scorer(options.scorer, feature_norm=options.feature_norm)
    if len(samples) < layer_scorer.min_samples:
        raise ConfigError("--num-samples", f"the {options.scorer} scorer needs at least {layer_scorer.min_samples} samples, the data gave {len(samples)}")
    few = few_samples_warning(options.num_samples, len(samples), data_label)
    if options.granularity == "sublayer":
        return select_units(options, model, tokenizer, samples, stack, model_kind=model_kind, pooling=pooling, layer_scorer=layer_scorer, max_length=max_length, warnings=[few] if few else [],
                            timings=timings, start=start, gguf_file=gguf_file, model_label=model_label, data_label=data_label, progress=progress)
    tick = time.perf_counter()
    device, dtype = compute_placement(model)
    extra = ("mean",) if options.degenerate_fallback == "mean" and pooling != "mean" else ()
    kept = resolve_statistics(options.statistics, options.scorer, bootstrap=options.bootstrap)
    reps = capture_samples(model, tokenizer, samples, stack, pooling=pooling, batch_size=options.batch_size, max_length=max_length, progress=progress, extra_poolings=extra, statistics=kept)
    scores = score_representations(reps, layer_scorer, degenerate_fallback=options.degenerate_fallback)
    timings["score_s"] = time.perf_counter() - tick

    is_cka = layer_scorer.similarity_name == "cka"
    records = [
        LayerRecord(index=i, cka=s.similarity if is_cka else None, similarity=s.similarity, importance=s.importance, degenerate=s.degenerate, reason=s.reason, fallback=s.fallback)
        for i, s in enumerate(scores)
    ]
    importances = [r.importance for r in records]
    suffixes, exact = adapter_targets(stack, options.target_modules)
    selected, warnings, budget_info = select_with_budget(importances, policy, stack, options, suffixes, exact)
    if few:
        warnings.insert(0, few)
    for record in reversed(records):
        if record.fallback == "mean":
            warnings.insert(0, f"block {record.index}: {record.reason}")
        elif record.degenerate:
            hint = " (try --pooling mean or --degenerate-fallback mean)" if pooling in ("cls", "last") else ""
            warnings.insert(0, f"block {record.index} is degenerate and gets no score: {record.reason}{hint}")
    diagnostics: dict[str, Any] = {}
    if is_cka:
        diagnostics, tie_warnings = near_identity_diagnostics(reps, records, policy, options, selected)
        warnings += tie_warnings
    diagnostics.update(budget_info)
    diagnostics["statistics"] = {"requested": options.statistics, "kept": reps.kept, "state_bytes": reps.nbytes}
    if options.bootstrap:
        from lwlora.selection.stability import bootstrap_stability

        tick = time.perf_counter()
        report = bootstrap_stability(reps, options.scorer, policy, replicates=options.bootstrap, seed=options.seed, full_selection=selected, feature_norm=options.feature_norm)
        diagnostics["stability"] = report.to_json()
        warnings += report.warnings
        timings["bootstrap_s"] = time.perf_counter() - tick
    for message in warnings:
        logger.warning(message)
    timings["total_s"] = time.perf_counter() - start
    return LayerSelection(
        **model_fields(stack, model_label=model_label, gguf_file=gguf_file, model_kind=model_kind),
        scorer=options.scorer,
        similarity_name=layer_scorer.similarity_name,
        pooling=pooling,
        num_samples=len(samples),
        data=data_label,
        data_fingerprint=samples.fingerprint,
        policy=policy.to_json(),
        layers=records,
        selected=selected,
        warnings=warnings,
        diagnostics=diagnostics,
        cost=selection_cost(stack, selected, suffixes, options.r, exact=exact, hidden_size=getattr(model.config, "hidden_size", None), seq_len=max_length).to_json(),
        feature_norm=options.feature_norm,
        device=device,
        dtype=dtype,
        versions=library_versions(),
        timings={k: round(v, 4) for k, v in timings.items()},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
