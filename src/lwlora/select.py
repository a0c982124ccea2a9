"""The selection pipeline behind ``lwlora select``: load → sample → capture → score → select.

``select_layers(SelectConfig(...))`` returns a :class:`~lwlora.selection.LayerSelection`.
``score_layers`` is the reusable middle: given a loaded model, a tokenizer and texts, it returns
one :class:`~lwlora.scoring.LayerScore` per block.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import torch
from torch import nn

from lwlora.blocks import BlockStack, resolve_block_stack
from lwlora.budget import (
    auto_count,
    knee_curve,
    lora_params_per_block,
    prefer_shallow,
    select_by_param_budget,
    selection_cost,
)
from lwlora.capture import (
    STATISTICS,
    BlockRepresentations,
    Captured,
    capture_block_representations,
    compute_placement,
)
from lwlora.data import TextSamples, few_samples_warning, load_text_samples
from lwlora.errors import ConfigError
from lwlora.gradient_scores import GRADIENT_SCORERS
from lwlora.policy import (
    RULES,
    SelectionPolicy,
    paper_policy,
    rule_blocks,
    select_blocks,
)
from lwlora.scoring import (
    SCORERS,
    LayerScore,
    LayerScorer,
    get_scorer,
    score_pair,
    uses_statistics,
)
from lwlora.selection import LayerRecord, LayerSelection
from lwlora.tasks.presets import IMAGE_TASKS

logger = logging.getLogger("lwlora")



#: every ``--scorer`` name: similarity scorers, gradient scorers and selection rules
ALL_SCORERS: tuple[str, ...] = (*SCORERS, *GRADIENT_SCORERS, *RULES)


@dataclass(frozen=True)
class SelectConfig:
    """Everything ``lwlora select`` takes; each field is the CLI flag of the same name."""

    model: str
    data: str
    num_samples: int = 128
    ratio: float | None = None
    num_layers: int | None = None
    layers: tuple[int, ...] | None = None
    include: tuple[int, ...] = ()
    exclude: tuple[int, ...] = ()
    scorer: str = "cka"
    pooling: Literal["cls", "last", "mean"] | None = None  # None: cls for encoders, last for decoders
    feature_norm: Literal["none", "standardize"] = "none"
    degenerate_fallback: Literal["exclude", "mean"] = "exclude"
    bootstrap: int = 0  # replicates for the stability report (0: none)
    statistics: Literal["rows", "covariance", "auto"] = "auto"  # what the capture keeps; see resolve_statistics
    granularity: Literal["block", "sublayer"] = "block"  # sublayer: score attention and MLP halves apart (lwlora.units)
    # count by parameter budget / automatically / preferring a shallow backward (issue: budgets)
    param_budget: float | None = None  # <= 1: fraction of all-layer LoRA parameters; > 1: a count
    auto: bool = False  # stop where the sorted importance curve bends (lwlora.budget.auto_count)
    prefer_shallow: float | None = None  # allowed loss of total importance for a deeper lowest block
    # the adapter the budget and the cost report assume
    r: int = 8
    target_modules: str = "auto"
    # gradient scorers (fim, gradnorm) need labelled inputs: the task and its columns/fields
    task: str | None = None
    label_column: str | None = None
    instruction_field: str | None = None
    output_field: str | None = None
    batch_size: int = 8
    max_length: int = 512
    device: str = "auto"
    dtype: str = "auto"
    text_column: str | None = None
    text_pair_column: str | None = None
    template: str | None = None
    image_column: str | None = None  # image-text samples for a vision-language model (lwlora.multimodal)
    gguf_file: str | None = None
    layers_path: str | None = None
    tower: str = "language"
    preset: Literal["paper"] | None = None
    seed: int = 0
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse a bad value or combination before anything is loaded, with the checks
        ``TrainConfig`` shares (lwlora.options_checks), so both refuse the same values."""
        from lwlora.blocks import TOWERS
        from lwlora.options_checks import (
            ALL_SCORERS,
            DTYPES,
            check_at_least,
            check_budget_options,
            check_choice,
            check_device,
            check_granularity,
            check_measurement,
            check_one_count,
            check_target_modules,
            coerce_fields,
            unique_blocks,
        )

        coerce_fields(self)  # types first (pooling, feature_norm, ... are Literals): the checks below compare typed values
        check_choice("--scorer", self.scorer, ALL_SCORERS, what="scorer")
        check_measurement(self.scorer, feature_norm=self.feature_norm, num_samples=self.num_samples, statistics=self.statistics, bootstrap=self.bootstrap)
        if self.bootstrap < 0 or self.bootstrap == 1:  # one replicate gives an empty interval and no agreement
            raise ConfigError("--bootstrap", f"must be 0 (no stability report) or at least 2 replicates, got {self.bootstrap}")
        check_at_least("--batch-size", self.batch_size)
        check_at_least("--max-length", self.max_length)
        check_at_least("--r", self.r)
        if self.layers is not None:
            object.__setattr__(self, "layers", unique_blocks("--layers", self.layers))
        if self.preset == "paper" and (self.layers is not None or self.include or self.exclude):
            raise ConfigError("--preset", "paper fixes the exclusions itself; drop --layers/--include/--exclude")
        self.policy_for("decoder")  # validates ratio / num_layers / include / exclude early
        check_one_count([("--ratio", self.ratio is not None), ("--num-layers", self.num_layers is not None), ("--layers", self.layers is not None), ("--param-budget", self.param_budget is not None), ("--auto", self.auto)])
        check_budget_options(self.param_budget, self.prefer_shallow)
        check_granularity(self.granularity, self.scorer, given=[("--num-layers", self.num_layers is not None), ("--layers", self.layers is not None), ("--include", bool(self.include)), ("--exclude", bool(self.exclude)),
                                                                  ("--auto", self.auto), ("--prefer-shallow", self.prefer_shallow is not None), ("--bootstrap", bool(self.bootstrap)), ("--preset", self.preset is not None)])
        check_target_modules(self.target_modules)
        check_device(self.device)
        check_choice("--dtype", self.dtype, DTYPES, what="dtype")
        check_choice("--tower", self.tower, TOWERS, what="tower")
        if self.image_column is not None and self.scorer in GRADIENT_SCORERS:
            raise ConfigError("--image-column", f"the {self.scorer} scorer takes labelled inputs from --task (e.g. --task scienceqa), not --image-column")

    def policy_for(self, model_kind: str) -> SelectionPolicy:
        if self.preset == "paper":
            return paper_policy(model_kind, ratio=self.ratio, num_layers=self.num_layers)
        return SelectionPolicy(
            num_layers=self.num_layers,
            ratio=self.ratio,
            layers=self.layers,
            include=self.include,
            exclude=self.exclude,
        )


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


def _forward_keys(model: nn.Module) -> set[str] | None:
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def make_batches(tokenizer: Any, samples: TextSamples, *, batch_size: int, max_length: int, model: nn.Module | None = None) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Tokenized, padded batches in length order (less padding), and the sample order used.

    Returns:
        (batches, order) where row j of the concatenated batches is sample ``order[j]``.
    """
    lengths = [len(ids) for ids in tokenizer(samples.texts, samples.text_pairs, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(samples)), key=lambda i: (-lengths[i], i))
    accepted = _forward_keys(model) if model is not None else None
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        texts = [samples.texts[i] for i in chunk]
        pairs = [samples.text_pairs[i] for i in chunk] if samples.text_pairs is not None else None
        encoded = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {k: v for k, v in encoded.items() if accepted is None or k in accepted}
        batches.append(batch)
    return batches, order


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
    (``statistics`` and ``fold_at`` as for :func:`~lwlora.capture.capture_block_representations`;
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


def library_versions() -> dict[str, str]:
    import lwlora

    versions = {"lwlora": lwlora.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def adapter_targets(stack: BlockStack, target_modules: str) -> tuple[list[str], bool]:
    """(module names, exact?) the adapters target: every linear layer of the blocks for ``auto``,
    else the comma-separated names, matched as PEFT matches them (name or name ending)."""
    if target_modules == "auto":
        return stack.block_linear_modules(), True
    return [t.strip() for t in target_modules.split(",") if t.strip()], False


def select_with_budget(importances: list[float | None], policy: SelectionPolicy, stack: BlockStack, config: SelectConfig, suffixes: list[str], exact: bool) -> tuple[list[int], list[str], dict[str, Any]]:
    """Apply ``policy``, or the budget options that replace its count (``--param-budget``,
    ``--auto``), then ``--prefer-shallow``. Returns (selected, warnings, diagnostics)."""
    info: dict[str, Any] = {}
    allowed = [None if i in policy.exclude else v for i, v in enumerate(importances)]
    if config.param_budget is not None:
        block_params = lora_params_per_block(stack, suffixes, config.r, exact=exact)
        budget_params = [p if i not in policy.exclude else sum(block_params) + 1 for i, p in enumerate(block_params)]
        try:
            selected = select_by_param_budget(allowed, budget_params, config.param_budget, all_layer_params=sum(block_params))
        except ValueError as exc:
            raise ConfigError("--param-budget", str(exc)) from None
        info["param_budget"] = {"budget": config.param_budget, "block_params": block_params, "selected_params": sum(block_params[i] for i in selected), "all_layer_params": sum(block_params)}
        warnings: list[str] = []
    else:
        if config.auto:
            count = auto_count(allowed)
            policy = dataclasses.replace(policy, num_layers=count, ratio=None)
            info["auto"] = knee_curve(allowed).to_json()
        selected, warnings = select_blocks(importances, policy)
    if config.prefer_shallow is not None:
        shallow = prefer_shallow(allowed, len(selected), max_importance_loss=config.prefer_shallow)
        info["prefer_shallow"] = {"max_importance_loss": config.prefer_shallow, "top_k": selected, "chosen": shallow}
        selected = shallow
    return sorted(selected), warnings, info


#: CKA at or above this is "the block barely changes its input" to within the noise of a few
#: hundred samples; a ranking among such blocks rests on ties (massive activations, see
#: similarity.standardize_features).
NEAR_IDENTITY_CKA = 0.9995


def near_identity_diagnostics(reps: Captured, records: list[LayerRecord], policy: SelectionPolicy, config: SelectConfig, selected: list[int]) -> tuple[dict[str, Any], list[str]]:
    """Report blocks whose CKA is within noise of 1 and, when the ranking rests on them, what the
    outlier-robust variant (per-feature standardisation) would select instead."""
    near = [r.index for r in records if r.cka is not None and r.cka >= NEAR_IDENTITY_CKA]
    diagnostics: dict[str, Any] = {"near_identity_blocks": near, "near_identity_threshold": NEAR_IDENTITY_CKA}
    warnings: list[str] = []
    if len(near) < 2:
        return diagnostics, warnings
    boundary = bool(set(near) & set(selected)) and bool(set(near) - set(selected))
    other = "standardize" if config.feature_norm == "none" else "none"
    alternative = score_representations(reps, get_scorer(config.scorer, feature_norm=other), degenerate_fallback=config.degenerate_fallback)
    alt_selected, _ = select_blocks([s.importance for s in alternative], policy)
    overlap = len(set(alt_selected) & set(selected)) / max(1, len(set(alt_selected) | set(selected)))
    diagnostics["alternative"] = {"feature_norm": other, "selected": alt_selected, "jaccard": round(overlap, 4)}
    message = f"{len(near)} blocks score CKA >= {NEAR_IDENTITY_CKA} ({near}): their order is within noise"
    if boundary:
        message += ", and the selection boundary runs through them"
    warnings.append(f"{message}; with --feature-norm {other} the selection would be {alt_selected} (Jaccard {overlap:.2f} with this one)")
    return diagnostics, warnings


def _select_units(config: SelectConfig, model: nn.Module, tokenizer: Any, samples: Any, stack: BlockStack, *, model_kind: str, pooling: str, layer_scorer: LayerScorer,
                  max_length: int, warnings: list[str], timings: dict[str, float], start: float, gguf_file: str | None) -> LayerSelection:
    """``--granularity sublayer``: score every block's attention and MLP halves apart
    (lwlora.units) and fill the parameter budget (``--param-budget``, else ``--ratio``, default
    0.5 of all-layer LoRA's parameters) with the most important units, greedily."""
    from lwlora.units import PARTS, mlp_entries, unit_cost, unit_params

    tick = time.perf_counter()
    device, dtype = compute_placement(model)
    entries = mlp_entries(stack, model.config)
    extra = ("mean",) if config.degenerate_fallback == "mean" and pooling != "mean" else ()
    kept = resolve_statistics(config.statistics, config.scorer)
    reps = capture_samples(model, tokenizer, samples, stack, pooling=pooling, batch_size=config.batch_size, max_length=max_length, progress=config.progress, extra_poolings=extra, statistics=kept, split_at=entries)
    scores = score_representations(reps, layer_scorer, degenerate_fallback=config.degenerate_fallback)
    timings["score_s"] = time.perf_counter() - tick
    is_cka = layer_scorer.similarity_name == "cka"
    suffixes, exact = adapter_targets(stack, config.target_modules)
    names = suffixes if exact else [n for n in stack.block_linear_modules() if any(n == t or n.endswith("." + t) for t in suffixes)]
    params = unit_params(stack, names, config.r)
    budget = config.param_budget if config.param_budget is not None else (config.ratio if config.ratio is not None else 0.5)
    try:
        chosen = set(select_by_param_budget([s.importance for s in scores], params, budget, all_layer_params=sum(params)))
    except ValueError as exc:
        raise ConfigError("--param-budget" if config.param_budget is not None else "--ratio", str(exc)) from None
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
    cost = selection_cost(stack, selected, suffixes, config.r, exact=exact, hidden_size=getattr(model.config, "hidden_size", None), seq_len=max_length).to_json()
    timings["total_s"] = time.perf_counter() - start
    return LayerSelection(
        model=config.model, gguf_file=gguf_file, model_kind=model_kind, layers_path=stack.path, tower=stack.tower, num_layers=stack.num_layers,
        block_linear_modules=stack.block_linear_modules(), scorer=config.scorer, similarity_name=layer_scorer.similarity_name, pooling=pooling,
        num_samples=len(samples), data=config.data if config.data else samples.source, data_fingerprint=samples.fingerprint,
        policy={"granularity": "sublayer", "param_budget": budget, "selected_params": sum(params[u] for u in chosen), "all_layer_params": sum(params)},
        layers=blocks, selected=selected, units=units, warnings=warnings,
        diagnostics={"statistics": {"requested": config.statistics, "kept": reps.kept, "state_bytes": reps.nbytes}},
        cost=unit_cost(cost, params, sorted(chosen)), feature_norm=config.feature_norm, device=device, dtype=dtype,
        versions=library_versions(), timings={k: round(v, 4) for k, v in timings.items()}, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _image_text_samples(config: SelectConfig) -> Any:
    """Image-text selection samples: the ScienceQA preset's training inputs (``--task scienceqa``)
    or ``--data`` records with their image in ``--image-column``."""
    if config.task in IMAGE_TASKS:
        if config.image_column is not None or config.text_column is not None or config.template is not None:
            raise ConfigError("--task", f"{config.task} builds its own prompts from its own image column; drop --image-column/--text-column/--template")
        from lwlora.tasks.scienceqa import scienceqa_selection_samples

        return scienceqa_selection_samples(config.data or None, num_samples=config.num_samples, seed=config.seed)
    from lwlora.multimodal import load_image_text_samples

    if config.text_pair_column is not None:
        raise ConfigError("--text-pair-column", "applies to text pairs, not image-text samples")
    return load_image_text_samples(config.data, image_column=config.image_column, num_samples=config.num_samples, seed=config.seed, text_column=config.text_column, template=config.template)


def select_layers(
    config: SelectConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    model_kind: str | None = None,
    samples: TextSamples | None = None,
) -> LayerSelection:
    """Run the whole selection. Pass ``model``/``tokenizer`` to reuse an already loaded model
    (``config.model`` is then only the label recorded in the selection), and ``samples`` to use
    texts prepared elsewhere (e.g. a training task's inputs) instead of reading ``config.data``."""
    from lwlora.models import fit_max_length, infer_model_kind, load_model, prepare_tokenizer

    if config.scorer in GRADIENT_SCORERS:
        if model is not None:
            raise ValueError("gradient scorers need the model with its task head: use lwlora.training.gradient_selection.gradient_selection")
        from lwlora.training.gradient_selection import select_by_gradients

        return select_by_gradients(config)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if samples is None and (config.image_column is not None or config.task in IMAGE_TASKS) and config.scorer not in GRADIENT_SCORERS:
        samples = _image_text_samples(config)
    if samples is None:
        samples = load_text_samples(
            config.data,
            num_samples=config.num_samples,
            seed=config.seed,
            text_column=config.text_column,
            text_pair_column=config.text_pair_column,
            template=config.template,
        )
    timings["load_data_s"] = time.perf_counter() - start

    gguf_file = config.gguf_file
    if model is None:
        tick = time.perf_counter()
        loader = load_model
        if getattr(samples, "images", None) is not None:
            from lwlora.multimodal import load_vlm as loader
        loaded = loader(config.model, gguf_file=config.gguf_file, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code)
        model, tokenizer, model_kind, gguf_file = loaded.model, loaded.tokenizer, loaded.kind, loaded.gguf_file
        timings["load_model_s"] = time.perf_counter() - tick
    elif tokenizer is None:
        raise ValueError("select_layers(model=...) also needs tokenizer=")
    model_kind = model_kind or infer_model_kind(model.config)
    tokenizer = prepare_tokenizer(tokenizer)
    is_text = getattr(samples, "images", None) is None  # image-text prompts are never truncated
    asked = config.max_length != SelectConfig.__dataclass_fields__["max_length"].default
    max_length = fit_max_length(config.max_length, model.config, tokenizer, pair=samples.text_pairs is not None, asked=asked) if is_text else config.max_length

    stack = resolve_block_stack(model, layers_path=config.layers_path, tower=config.tower)
    policy = config.policy_for(model_kind)
    policy.target_count(stack.num_layers)  # fail on k > L before the expensive part
    pooling = config.pooling or default_pooling(model_kind, stack.tower)
    if config.scorer in RULES:
        from lwlora.training.layers import unscored_selection

        return unscored_selection(config, stack, model_kind, rule_blocks(config.scorer, stack.num_layers, policy, seed=config.seed), config.scorer)

    layer_scorer = get_scorer(config.scorer, feature_norm=config.feature_norm)
    if len(samples) < layer_scorer.min_samples:
        raise ConfigError("--num-samples", f"the {config.scorer} scorer needs at least {layer_scorer.min_samples} samples, the data gave {len(samples)}")
    few = few_samples_warning(config.num_samples, len(samples), config.data or samples.source)
    if config.granularity == "sublayer":
        return _select_units(config, model, tokenizer, samples, stack, model_kind=model_kind, pooling=pooling, layer_scorer=layer_scorer, max_length=max_length, warnings=[few] if few else [], timings=timings, start=start, gguf_file=gguf_file)
    tick = time.perf_counter()
    device, dtype = compute_placement(model)
    extra = ("mean",) if config.degenerate_fallback == "mean" and pooling != "mean" else ()
    kept = resolve_statistics(config.statistics, config.scorer, bootstrap=config.bootstrap)
    reps = capture_samples(model, tokenizer, samples, stack, pooling=pooling, batch_size=config.batch_size, max_length=max_length, progress=config.progress, extra_poolings=extra, statistics=kept)
    scores = score_representations(reps, layer_scorer, degenerate_fallback=config.degenerate_fallback)
    timings["score_s"] = time.perf_counter() - tick

    is_cka = layer_scorer.similarity_name == "cka"
    records = [
        LayerRecord(index=i, cka=s.similarity if is_cka else None, similarity=s.similarity, importance=s.importance, degenerate=s.degenerate, reason=s.reason, fallback=s.fallback)
        for i, s in enumerate(scores)
    ]
    importances = [r.importance for r in records]
    suffixes, exact = adapter_targets(stack, config.target_modules)
    selected, warnings, budget_info = select_with_budget(importances, policy, stack, config, suffixes, exact)
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
        diagnostics, tie_warnings = near_identity_diagnostics(reps, records, policy, config, selected)
        warnings += tie_warnings
    diagnostics.update(budget_info)
    diagnostics["statistics"] = {"requested": config.statistics, "kept": reps.kept, "state_bytes": reps.nbytes}
    if config.bootstrap:
        from lwlora.stability import bootstrap_stability

        tick = time.perf_counter()
        report = bootstrap_stability(reps, config.scorer, policy, replicates=config.bootstrap, seed=config.seed, full_selection=selected, feature_norm=config.feature_norm)
        diagnostics["stability"] = report.to_json()
        warnings += report.warnings
        timings["bootstrap_s"] = time.perf_counter() - tick
    for message in warnings:
        logger.warning(message)
    timings["total_s"] = time.perf_counter() - start
    return LayerSelection(
        model=config.model,
        gguf_file=gguf_file,
        model_kind=model_kind,
        layers_path=stack.path,
        tower=stack.tower,
        num_layers=stack.num_layers,
        block_linear_modules=stack.block_linear_modules(),
        scorer=config.scorer,
        similarity_name=layer_scorer.similarity_name,
        pooling=pooling,
        num_samples=len(samples),
        data=config.data if config.data else samples.source,
        data_fingerprint=samples.fingerprint,
        policy=policy.to_json(),
        layers=records,
        selected=selected,
        warnings=warnings,
        diagnostics=diagnostics,
        cost=selection_cost(stack, selected, suffixes, config.r, exact=exact, hidden_size=getattr(model.config, "hidden_size", None), seq_len=max_length).to_json(),
        feature_norm=config.feature_norm,
        device=device,
        dtype=dtype,
        versions=library_versions(),
        timings={k: round(v, 4) for k, v in timings.items()},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
