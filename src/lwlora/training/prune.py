"""Warm-up, then prune: choose the blocks to adapt by what their adapters do during training.

Train LoRA on every block for a short warm-up, score each block by the size of the update its
adapters add to their layers' outputs on a few selection batches, remove the adapters of the
lower-scoring blocks and keep training the rest (LoRA-drop, Zhou et al., COLING 2025, reports
parity with all-layer LoRA at about half the adapter parameters). See ``docs/prune.md``.

For a LoRA module m of block i with input x ∈ R^{d_in}, PEFT adds to the base layer's output

    Δ_m(x) = s_m · B_m A_m x,      A_m ∈ R^{r×d_in}, B_m ∈ R^{d_out×r}, s_m = α/r (or α/√r),

and the block's score is the mean over the selection batches' real tokens t (attention_mask = 1)
of the summed squared update of its modules::

    score_i = (1/N) Σ_t Σ_{m ∈ block i} ‖Δ_m(x_{m,t})‖²,     N = number of real tokens

(squared norms, not their square root). ``score="weight"`` is the data-free alternative
``Σ_m ‖s_m B_m A_m‖_F²``, the same quantity for inputs that are white (E[x xᵀ] = I).

- :func:`adapter_effect_scores`: the scores (forward hooks on PEFT's ``LoraLayer`` modules).
- :func:`prune_blocks`: remove the adapters of the blocks not kept, from the model, from the
  optimizer and from the PEFT config (so ``save_pretrained`` / ``PeftModel.from_pretrained``
  round-trips exactly the kept blocks).
- :class:`WarmupPrune`: a ``TrainerCallback`` doing both at a given optimizer step.
- :func:`prune_to_saved`: before resuming a checkpoint saved after the prune step, prune a fresh
  all-block model the same way (the Trainer loads adapter and optimizer state before any callback
  could react).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from lwlora.blocks import get_module
from lwlora.adapters.placement import AdapterPlacementError, outside_blocks_regex, target_regex

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger("lwlora")

ADAPTER = "default"
SCORES: tuple[str, ...] = ("effect", "weight", "relative")

#: ``init_lora_weights`` values that leave the base weights as they were. PiSSA, OLoRA, CorDA,
#: LoftQ, ... subtract their initial adapter from the base weight, so removing such an adapter
#: would leave a damaged base layer (and a saved adapter that no longer matches the base model).
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva")

#: keys of a selection batch that only feed the loss: the scoring forward does not need them
_LOSS_ONLY_KEYS = ("labels", "label", "num_items_in_batch")


# ---------------------------------------------------------------------------------------------
# Locating the adapters
# ---------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """``model`` without DDP / DataParallel wrappers (``.module``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a (possibly DDP-wrapped) ``PeftModel``."""
    model = _unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _stack_path(base: nn.Module, stack_path: str, num_layers: int | None = None) -> str:
    """``stack_path`` relative to the base model (a path given from the ``PeftModel``, with its
    ``base_model.model.`` prefix, is accepted too), checked to be a ModuleList of ``num_layers``."""
    for candidate in (stack_path, stack_path.removeprefix("base_model.model.")):
        try:
            stack = get_module(base, candidate)
        except AttributeError:
            continue
        if not isinstance(stack, nn.ModuleList):
            raise TypeError(f"{candidate!r} is a {type(stack).__name__}, not the ModuleList of blocks")
        if num_layers is not None and len(stack) != num_layers:
            raise ValueError(f"{candidate!r} has {len(stack)} blocks, not num_layers={num_layers}")
        return candidate
    raise ValueError(f"{stack_path!r} is not a module of {type(base).__name__}")


def lora_layers_by_block(model: nn.Module, stack_path: str, num_layers: int | None = None) -> dict[int, dict[str, nn.Module]]:
    """The PEFT ``LoraLayer`` modules inside each block: ``{block index: {name in the base model:
    layer}}`` (blocks without adapters absent). LoRA layers outside the stack are not listed."""
    from peft.tuners.lora import LoraLayer

    base = _base_model(model)
    path = _stack_path(base, stack_path, num_layers)
    prefix = path + "."
    found: dict[int, dict[str, nn.Module]] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and name.startswith(prefix):
            index = int(name[len(prefix):].partition(".")[0])
            found.setdefault(index, {})[name] = module
    return dict(sorted(found.items()))


def _check_scoreable(name: str, layer: nn.Module, adapter: str) -> None:
    """Refuse layers whose update is not ``scaling · B(A(x))`` of two linear maps."""
    if adapter not in getattr(layer, "lora_A", {}):
        kind = "an embedding" if adapter in getattr(layer, "lora_embedding_A", {}) else "no"
        raise ValueError(f"{name} has {kind} LoRA adapter {adapter!r} with linear lora_A/lora_B; only linear LoRA layers can be scored")
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None:  # DoRA and friends rescale or reshape the update
        raise ValueError(
            f"{name} uses the LoRA variant {type(variant).__name__} (e.g. DoRA), whose update is not scaling·B·A·x; "
            "adapter_effect_scores scores plain LoRA (lora, rslora) only"
        )
    if not isinstance(layer.lora_A[adapter], nn.Linear) or not isinstance(layer.lora_B[adapter], nn.Linear):
        raise TypeError(f"{name} is a {type(layer).__name__} with {type(layer.lora_A[adapter]).__name__} lora_A; only linear LoRA layers can be scored")


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (LoRA dropout off) inside, every module's own training flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _token_count(batch: Mapping[str, Tensor]) -> int:
    """N of one batch: its real tokens (attention_mask = 1), else all of input_ids' positions."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    if batch.get("input_ids") is not None:
        return batch["input_ids"].numel()
    raise ValueError("a selection batch needs attention_mask or input_ids to count its tokens")


def _masked_square_sum(y: Tensor, mask: Tensor | None) -> Tensor:
    """Σ_t ‖y_t‖² over the real tokens t of ``y`` (..., d) in float64; rows that do not line up
    with the (batch, seq) mask are all summed."""
    per_token = y.double().pow(2).sum(-1)  # (...,)
    if mask is not None and per_token.shape == mask.shape:
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum()


def _squared_update(layer: nn.Module, adapter: str, x: Tensor, mask: Tensor | None) -> Tensor:
    """Σ_t ‖s · B(A(x_t))‖² over the real tokens t of ``x`` (float64 scalar).

    ``x``: (batch, seq, d_in), or rows that do not line up with the (batch, seq) mask (e.g. the
    tokens routed to one MoE expert), which are all summed. Computed as PEFT's ``Linear.forward``
    computes the term it adds (input cast to lora_A's dtype, lora_B's bias included when
    ``lora_bias``), without the dropout (an identity in eval mode)."""
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    delta = lora_B(lora_A(x.to(lora_A.weight.dtype))) * layer.scaling[adapter]  # (..., d_out)
    return _masked_square_sum(delta, mask)


def _move(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items() if k not in _LOSS_ONLY_KEYS}


def _effect_scores(model: nn.Module, layers: dict[int, dict[str, nn.Module]], num_layers: int, batches: Iterable[Mapping[str, Tensor]], adapter: str, *, relative: bool = False) -> list[float]:
    """Σ_m ‖Δ_m x‖² per token, per block, from forward hooks on the LoRA layers; ``relative``:
    the mean over the block's modules of Σ_t ‖Δ_m x_t‖² / Σ_t ‖base_m(x_t)‖² instead (base_m: the
    module's base layer, bias included)."""
    peft_model = _unwrap(model)
    device = next(peft_model.parameters()).device
    totals = torch.zeros(num_layers, dtype=torch.float64, device=device)
    # relative: per module, the update's and the base layer's squared sums
    updates: dict[str, Tensor] = {}
    bases: dict[str, Tensor] = {}
    current: dict[str, Tensor | None] = {"mask": None}  # the batch being scored, for the hooks

    def hook_for(index: int, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["x"]
            update = _squared_update(module, adapter, x, current["mask"]).to(device)
            if not relative:
                totals[index] += update
                return
            updates[name] = updates.get(name, 0.0) + update
            bases[name] = bases.get(name, 0.0) + _masked_square_sum(module.get_base_layer()(x), current["mask"]).to(device)

        return hook

    handles = [layer.register_forward_hook(hook_for(i, name), with_kwargs=True) for i, named in layers.items() for name, layer in named.items()]
    tokens = 0
    try:
        with _eval_mode(peft_model), torch.no_grad():
            for batch in batches:
                inputs = _move(batch, device)
                current["mask"] = inputs.get("attention_mask")
                tokens += _token_count(inputs)
                peft_model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("the selection batches hold no real tokens; pass at least one non-empty batch")
    if not relative:
        return (totals / tokens).tolist()
    for index, named in layers.items():
        ratios = [updates[name] / bases[name] for name in named if name in bases and float(bases[name]) > 0]
        totals[index] = sum(ratios) / len(ratios) if ratios else 0.0
    return totals.tolist()


def _weight_scores(layers: dict[int, dict[str, nn.Module]], num_layers: int, adapter: str) -> list[float]:
    """Σ_m ‖s_m B_m A_m‖_F² per block, as s² · Σ_jk (BᵀB)_jk (AAᵀ)_jk: two r×r Gram matrices
    instead of the d_out×d_in product (‖BA‖_F² = tr(Aᵀ BᵀB A) = ⟨BᵀB, AAᵀ⟩_F)."""
    scores = [0.0] * num_layers
    with torch.no_grad():
        for index, named in layers.items():
            for name, layer in named.items():
                A = layer.lora_A[adapter].weight.double()  # (r, d_in)
                B = layer.lora_B[adapter].weight.double()  # (d_out, r)
                if layer.lora_B[adapter].bias is not None:
                    raise ValueError(f"{name} has a LoRA bias (lora_bias=True), which score='weight' does not measure; use score='effect'")
                scale = float(layer.scaling[adapter])
                scores[index] += scale**2 * float(((B.T @ B) * (A @ A.T)).sum())
    return scores


def adapter_effect_scores(
    model: nn.Module,
    stack_path: str,
    num_layers: int,
    batches: Iterable[Mapping[str, Tensor]] = (),
    *,
    score: str = "effect",
    adapter_name: str = ADAPTER,
) -> list[float]:
    """Per block, the squared size of the update its LoRA adapters add to their layers' outputs.

    ``score="effect"`` (measured on ``batches``)::

        score_i = (1/N) Σ_batches Σ_{t: mask=1} Σ_{m ∈ block i} ‖s_m · B_m A_m x_{m,t}‖²

    with x_{m,t} the input of LoRA module m at token t and N the batches' real-token count (all
    positions without an attention_mask). ``score="weight"`` (data-free; ``batches`` unused)::

        score_i = Σ_{m ∈ block i} ‖s_m · B_m A_m‖_F²

    ``score="relative"`` (measured on ``batches``): the update against what the layer already
    outputs, averaged over the block's M_i modules, so that it does not grow with the size of the
    layers' inputs::

        score_i = (1/M_i) Σ_{m ∈ block i} [Σ_t ‖s_m · B_m A_m x_{m,t}‖²] / [Σ_t ‖W_m x_{m,t} + b_m‖²]

    (W_m, b_m: the base layer). After a short Adam warm-up every B_m has moved by about the same
    amount whatever its layer's inputs, so ``effect`` mostly ranks blocks by their input size,
    which grows with depth in a decoder's attention-output and MLP-down projections.

    All are sums of squared norms, not their square root. A block without adapters scores 0.

    Args:
        model: a ``PeftModel`` with LoRA adapters, possibly wrapped in DDP (``.module``). Scored
            in eval mode under ``no_grad``; every module's training flag is restored after.
        stack_path: dotted path of the blocks' ``ModuleList`` in the base model (``"model.layers"``).
        num_layers: the number of blocks (checked).
        batches: model inputs (``input_ids``, ``attention_mask``, ...; ``labels`` are dropped),
            moved to the model's device.
        score: ``"effect"``, ``"weight"`` or ``"relative"``.
        adapter_name: the PEFT adapter to score.

    Raises:
        ValueError: a LoRA variant (DoRA, ...), whose update is not ``s · B A x``; no real
            tokens in ``batches`` for ``"effect"``; a LoRA bias for ``"weight"``.
        TypeError: a LoRA layer that is not linear (embedding, conv).
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    layers = lora_layers_by_block(model, stack_path, num_layers)
    for named in layers.values():
        for name, layer in named.items():
            _check_scoreable(name, layer, adapter_name)
    if score == "weight":
        return _weight_scores(layers, num_layers, adapter_name)
    return _effect_scores(model, layers, num_layers, batches, adapter_name, relative=score == "relative")


def top_blocks(scores: Sequence[float], keep: int, among: Iterable[int] | None = None) -> list[int]:
    """The ``keep`` highest-scoring block indices (of ``among``, default all), ascending; ties go
    to the lower index."""
    if any(not math.isfinite(s) for s in scores):
        raise ValueError(f"block scores must be finite, got {list(scores)} (did the warm-up diverge?)")
    candidates = range(len(scores)) if among is None else among
    ranked = sorted(candidates, key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def _check_prunable(peft_model: nn.Module, adapter: str) -> Any:
    """The adapter's ``LoraConfig``, after refusing what pruning cannot keep consistent."""
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter not in configs:
        raise ValueError(f"expected a PeftModel with adapter {adapter!r}, got {type(peft_model).__name__}")
    if len(configs) > 1:
        # replacing a LoraLayer by its base layer removes every adapter it holds
        raise ValueError(f"the model holds several adapters ({', '.join(configs)}); pruning supports a single adapter")
    config = configs[adapter]
    if getattr(config, "peft_type", None) is None or str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"adapter {adapter!r} is {config.peft_type}, not LoRA")
    init = getattr(config, "init_lora_weights", True)
    if not any(init is ok or init == ok for ok in _BASE_PRESERVING_INITS):
        raise ValueError(
            f"init_lora_weights={init!r} rewrites the base weights around the initial adapter; removing its adapters "
            "would damage the base layers. Warm-up pruning supports lora and rslora (init True/'gaussian')"
        )
    if getattr(config, "target_parameters", None):
        raise ValueError("adapters on parameters (target_parameters) cannot be pruned by block")
    return config


def drop_from_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Remove ``params`` from every param group (the groups themselves stay, so an LR scheduler's
    per-group lists still line up) and their state (Adam moments, ...). Returns how many
    tensors were removed. Works through accelerate's ``AcceleratedOptimizer``, which forwards
    ``param_groups`` and ``state`` to the optimizer it wraps."""
    params = list(params)
    ids = {id(p) for p in params}
    removed = 0
    for group in optimizer.param_groups:
        keep = [i for i, p in enumerate(group["params"]) if id(p) not in ids]
        removed += len(group["params"]) - len(keep)
        group["params"] = [group["params"][i] for i in keep]
        if "param_names" in group:  # torch >= 2.6 named parameter groups
            group["param_names"] = [group["param_names"][i] for i in keep]
    for p in params:
        optimizer.state.pop(p, None)
    return removed


def _block_relative(name: str, prefix: str) -> tuple[int, str]:
    index, _, rest = name[len(prefix):].partition(".")
    return int(index), rest


def kept_target_regex(stack_path: str, adapted: Mapping[int, Iterable[str]]) -> str:
    """``target_modules`` full-matching exactly ``stack_path.<i>.<name>`` for each block i and
    block-relative module name of ``adapted`` (lwlora's :func:`~lwlora.adapters.placement.target_regex`
    style, anchored and exact; blocks with different module sets get one alternative each)."""
    by_names: dict[tuple[str, ...], list[int]] = {}
    for index, names in sorted(adapted.items()):
        by_names.setdefault(tuple(sorted(names)), []).append(index)
    parts = [target_regex(stack_path, indices, list(names), exact=True, anchored=True) for names, indices in by_names.items()]
    return parts[0] if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)


def _as_regex(exclude: str | Iterable[str]) -> str:
    """PEFT's list form of ``exclude_modules`` (exact names or name endings) as a regex."""
    if isinstance(exclude, str):
        return exclude
    return r"(?:.*\.)?(?:" + "|".join(re.escape(m) for m in sorted(exclude)) + ")"


def _plain_module_names(base: nn.Module) -> list[str]:
    """Module names of ``base`` as a fresh (adapter-free) copy has them: names inside PEFT's
    tuner layers (``….q_proj.base_layer``, ``….q_proj.lora_A.default``) are left out."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = [name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)]
    return [name for name, _ in base.named_modules() if not any(name.startswith(t + ".") for t in tuners)]


def _merged_exclude(names: Sequence[str], old: str | Iterable[str] | None, outside: str) -> str:
    """``exclude_modules`` after pruning: ``outside`` (everything not in a kept block), plus the
    old exclusion where it still excludes something more on this model (a user's exclusion inside
    the blocks); lwlora's own outside-the-selection exclusion is implied by ``outside`` and dropped."""
    if not old:
        return outside
    old = _as_regex(old)
    if all(re.fullmatch(outside, n) or not re.fullmatch(old, n) for n in names):
        return outside
    return f"(?:{old})|(?:{outside})"


def _update_config(peft_model: nn.Module, config: Any, stack_path: str, adapted: dict[int, set[str]]) -> None:
    """Point ``config`` at exactly the ``adapted`` modules and check that PEFT, matching a fresh
    base model against it, would adapt exactly the LoRA layers the pruned model has."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import check_target_module_exists

    base = peft_model.get_base_model()
    names = _plain_module_names(base)
    config.target_modules = kept_target_regex(stack_path, adapted)
    # the exclusion survives PEFT's MoE rewrite of target_modules (see build_peft_config)
    config.exclude_modules = _merged_exclude(names, config.exclude_modules, outside_blocks_regex(stack_path, adapted, anchored=True))
    config.layers_to_transform = None  # PEFT refuses them beside a regex target_modules
    config.layers_pattern = None
    expected = {name for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    actual = {n for n in names if check_target_module_exists(config, n)}  # an _ExcludedModule is falsy
    if actual != expected:
        raise AdapterPlacementError(
            f"the pruned config would adapt {sorted(actual - expected)[:10]} and miss {sorted(expected - actual)[:10]}"
        )


def _refuse_adapters_outside(base: nn.Module, prefix: str) -> None:
    """The pruned config names only blocks of the stack, so an adapter elsewhere (an ``lm_head``
    LoRA) would be saved but not rebuilt on reload."""
    from peft.tuners.lora import LoraLayer

    outside = [name for name, module in base.named_modules() if isinstance(module, LoraLayer) and not name.startswith(prefix)]
    if outside:
        raise ValueError(f"LoRA adapters outside the block stack {prefix[:-1]!r} ({', '.join(outside[:5])}) are not supported by block pruning")


def prune_blocks(
    model: PeftModel,
    stack_path: str,
    keep: Sequence[int],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    adapter_name: str = ADAPTER,
) -> list[str]:
    """Remove the LoRA adapters of every block of ``stack_path`` not in ``keep``.

    Each removed ``LoraLayer`` is replaced, in its parent module, by its base layer; its adapter
    parameters get ``requires_grad = False`` and no gradient, and leave ``optimizer`` (param
    groups and state; the groups themselves stay). The PEFT config then names exactly the kept
    modules: ``target_modules`` is an anchored, exact regex over the kept blocks, and
    ``exclude_modules`` also excludes everything outside them, so ``model.save_pretrained(d)`` +
    ``PeftModel.from_pretrained(base, d)`` rebuilds exactly the kept adapters (checked here with
    PEFT's own matcher). ``modules_to_save`` (a classification head) is left as it is; LoRA
    layers outside the stack are refused (lwlora puts none there). The removed blocks' warm-up
    updates are discarded, not merged: each removed layer's output loses its Δ(x), the quantity
    :func:`adapter_effect_scores` measures.

    Args:
        model: the ``PeftModel`` (DDP-wrapped is fine: ``.module`` is pruned).
        stack_path: the blocks' ``ModuleList`` path in the base model.
        keep: indices of the blocks whose adapters stay (at least one adapted block).
        optimizer: the optimizer training the adapters, or ``None``.
        adapter_name: the model's (single) adapter.

    Returns:
        The removed modules' names in the base model, sorted (empty when nothing was removed).
    """
    peft_model = _unwrap(model)
    config = _check_prunable(peft_model, adapter_name)
    base = peft_model.get_base_model()
    path = _stack_path(base, stack_path)
    num_layers = len(get_module(base, path))
    keep = sorted({int(i) for i in keep})
    if any(not 0 <= i < num_layers for i in keep):
        raise ValueError(f"keep={keep} names blocks outside 0..{num_layers - 1}")
    layers = lora_layers_by_block(peft_model, path)
    prefix = path + "."
    _refuse_adapters_outside(base, prefix)
    adapted = {i: {_block_relative(n, prefix)[1] for n in named} for i, named in layers.items() if i in keep}
    if not adapted:
        raise ValueError(f"keep={keep} holds no adapted block (adapted: {sorted(layers)}); nothing would be trained")

    removed_names: list[str] = []
    removed_params: list[nn.Parameter] = []
    for index, named in layers.items():
        if index in keep:
            continue
        for name, layer in named.items():
            base_layer = layer.get_base_layer()
            owned = {id(p) for p in base_layer.parameters()}
            removed_params += [p for p in layer.parameters() if id(p) not in owned]
            parent_name, _, child = name.rpartition(".")
            setattr(get_module(base, parent_name), child, base_layer)
            removed_names.append(name)
    for p in removed_params:
        # a DDP reducer still holds these; with no grad and no requires_grad they stay inert
        p.requires_grad_(False)
        p.grad = None
    if optimizer is not None:
        drop_from_optimizer(optimizer, removed_params)
    tuner = getattr(peft_model, "base_model", None)
    if isinstance(getattr(tuner, "targeted_module_names", None), list):
        gone = set(removed_names)
        tuner.targeted_module_names[:] = [n for n in tuner.targeted_module_names if n not in gone]
    _update_config(peft_model, config, path, adapted)
    return sorted(removed_names)


# ---------------------------------------------------------------------------------------------
# The Trainer callback
# ---------------------------------------------------------------------------------------------


def _rank_zero_scores(scores: list[float], device: torch.device) -> list[float]:
    """Rank 0's scores on every process: all ranks must prune the same blocks, and a last-bit
    difference between ranks (non-deterministic kernels) could otherwise reorder a near tie."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return scores
    tensor = torch.tensor(scores, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def _find_unused_parameters(args: Any, model: nn.Module) -> bool:
    """Whether the Trainer built DDP with ``find_unused_parameters`` (its own rule)."""
    from transformers import PreTrainedModel

    if getattr(args, "ddp_find_unused_parameters", None) is not None:
        return bool(args.ddp_find_unused_parameters)
    if isinstance(model, PreTrainedModel):
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        return not (checkpointing or getattr(args, "activation_checkpointing", False))
    return True  # a PeftModel is not a PreTrainedModel


class WarmupPrune(TrainerCallback, ExportableState):
    """Train all blocks' adapters until step ``at_step``, then keep only the ``keep`` best blocks.

    At the end of optimizer step ``at_step`` (``state.global_step == at_step``) the callback scores
    every block (:func:`adapter_effect_scores` on ``batches``, or ``score="weight"``), keeps the
    ``keep`` highest (ties: the lower index), and :func:`prune_blocks` the others out of the model
    and the Trainer's optimizer. The LR schedule goes on unchanged (same param groups).

    After pruning, ``scores`` (the scores used), ``local_scores`` (this process's own), ``kept``
    (sorted block indices), ``removed`` (module names) and ``removed_params`` (their parameter
    count) are set. ``kept``/``scores``/``removed_params`` are saved in every checkpoint's
    ``trainer_state.json`` (``stateful_callbacks["WarmupPrune"]``).

    Resume: the Trainer loads a checkpoint's adapter and optimizer state before any callback
    runs, so a checkpoint saved at or after ``at_step`` needs the model pruned first: call
    :func:`prune_to_saved` before ``trainer.train(resume_from_checkpoint=...)``. At train begin the
    callback checks that the model's adapted blocks are the saved ``kept`` and raises
    ``RuntimeError`` otherwise.

    DDP: the pruned parameters stay registered in DDP's reducer and no longer receive gradients,
    which DDP only accepts with ``find_unused_parameters=True`` (the Trainer's default for a
    ``PeftModel``; ``ddp_find_unused_parameters=False`` is refused at train begin). Every rank
    scores the same batches with the same weights; rank 0's scores are broadcast so that all
    ranks prune the same blocks.
    """

    def __init__(
        self,
        *,
        stack_path: str,
        num_layers: int,
        batches: Sequence[Mapping[str, Tensor]],
        at_step: int,
        keep: int,
        score: str = "effect",
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        if at_step < 1:
            raise ValueError(f"at_step must be >= 1 (an optimizer step of the warm-up), got {at_step}")
        if not 1 <= keep <= num_layers:
            raise ValueError(f"keep must be in 1..{num_layers}, got {keep}")
        self.stack_path = stack_path
        self.num_layers = num_layers
        self.batches = list(batches)
        self.at_step = at_step
        self.keep = keep
        self.score = score
        self.scores: list[float] | None = None
        self.local_scores: list[float] | None = None
        self.kept: list[int] | None = None
        self.removed: list[str] = []
        self.removed_params = 0

    # ExportableState: JSON only, so the batches are not saved (they are not needed once pruned;
    # a callback rebuilt from it before the prune step must be given them again, see on_train_begin)
    def state(self) -> dict[str, Any]:
        return {
            "args": {"stack_path": self.stack_path, "num_layers": self.num_layers, "batches": [], "at_step": self.at_step, "keep": self.keep, "score": self.score},
            "attributes": {"kept": self.kept, "scores": self.scores, "removed_params": self.removed_params},
        }

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            return
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise RuntimeError("WarmupPrune supports single-process and DDP training; FSDP and DeepSpeed flatten or shard the adapters it removes")
        world_size = getattr(args, "world_size", 1)
        if world_size > 1 and not _find_unused_parameters(args, _unwrap(model)):
            raise RuntimeError(
                "WarmupPrune removes adapters that DDP's reducer still holds; without find_unused_parameters=True DDP "
                "then fails at the next step ('Expected to have finished reduction in the prior iteration'). Set "
                "ddp_find_unused_parameters=True in TrainingArguments, or choose the blocks before training "
                "(lwlora's --layers / selection), which needs no pruning"
            )
        layers = lora_layers_by_block(model, self.stack_path, self.num_layers)
        if state.global_step >= self.at_step:
            self._check_resumed(state, sorted(layers))
            return
        _check_prunable(_unwrap(model), ADAPTER)
        if len(layers) < self.keep:
            raise ValueError(f"only blocks {sorted(layers)} have adapters, fewer than keep={self.keep}: WarmupPrune starts from LoRA on (nearly) every block")
        for named in layers.values():
            for name, layer in named.items():
                _check_scoreable(name, layer, ADAPTER)
        if self.score != "weight" and not self.batches:
            raise RuntimeError(
                f"WarmupPrune(score={self.score!r}) has no selection batches: a callback rebuilt from trainer_state.json "
                "(restore_callback_states_from_checkpoint=True) does not keep them; resume without that option "
                "(WarmupPrune reads its saved state itself) or use score='weight'"
            )

    def _check_resumed(self, state: Any, adapted: list[int]) -> None:
        """A run resumed at or after the prune step: the model must already be pruned as saved."""
        saved = _saved_state(getattr(state, "stateful_callbacks", None) or {})
        attributes = (saved or {}).get("attributes", {})
        if self.kept is None and attributes.get("kept") is not None:
            self.kept = list(attributes["kept"])
            self.scores = attributes.get("scores")
            self.removed_params = attributes.get("removed_params", 0)
        if self.kept is None:
            raise RuntimeError(
                f"resuming at step {state.global_step}, after the prune step {self.at_step}, from a checkpoint without "
                "WarmupPrune's saved state: the blocks kept are unknown"
            )
        if not set(adapted) <= set(self.kept):  # an unpruned model still has the removed blocks
            raise RuntimeError(
                f"resuming at step {state.global_step} (after the prune step {self.at_step}) with adapters on blocks "
                f"{adapted}, but the checkpoint kept {self.kept}: call lwlora.training.prune.prune_to_saved(model, "
                "checkpoint_dir) before trainer.train(resume_from_checkpoint=checkpoint_dir)"
            )

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        if self.kept is None and state.global_step == self.at_step and model is not None:
            self.prune(model, optimizer, device=getattr(args, "device", None))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.kept is None:
            logger.warning("WarmupPrune: training ended at step %d, before the prune step %d; every block kept its adapters", state.global_step, self.at_step)

    def prune(self, model: nn.Module, optimizer: Any = None, *, device: torch.device | None = None) -> list[str]:
        """Score, choose and prune now (what ``on_step_end`` does at ``at_step``)."""
        model = _unwrap(model)
        device = device or next(model.parameters()).device
        self.local_scores = adapter_effect_scores(model, self.stack_path, self.num_layers, self.batches, score=self.score)
        self.scores = _rank_zero_scores(self.local_scores, device)
        adapted = lora_layers_by_block(model, self.stack_path, self.num_layers)
        self.kept = top_blocks(self.scores, self.keep, among=adapted)  # a block without adapters has nothing to keep
        before = _adapter_parameter_count(model)
        self.removed = prune_blocks(model, self.stack_path, self.kept, optimizer)
        self.removed_params = before - _adapter_parameter_count(model)
        logger.info("WarmupPrune: kept blocks %s of %d (scores %s); removed %d adapter parameters", self.kept, self.num_layers, [f"{s:.3g}" for s in self.scores], self.removed_params)
        return self.removed


def _adapter_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def _saved_state(stateful_callbacks: Mapping[str, Any]) -> dict[str, Any] | None:
    saved = stateful_callbacks.get(WarmupPrune.__name__)
    if isinstance(saved, list):
        if len(saved) > 1:
            raise ValueError(f"the checkpoint holds {len(saved)} WarmupPrune states; expected one")
        saved = saved[0] if saved else None
    return saved if isinstance(saved, dict) else None


def _read_trainer_state(trainer_state: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(trainer_state, Mapping):
        return trainer_state
    path = Path(trainer_state)
    if path.is_dir():
        path = path / "trainer_state.json"
    return json.loads(path.read_text(encoding="utf-8"))


def prune_to_saved(model: PeftModel, trainer_state: Mapping[str, Any] | str | Path, *, adapter_name: str = ADAPTER) -> list[str]:
    """Prune ``model`` (all blocks adapted) as the checkpoint's run was pruned, if it was.

    Call before ``trainer.train(resume_from_checkpoint=checkpoint)`` (and before the Trainer makes
    its optimizer), so that the checkpoint's adapter weights and optimizer state fit the model.

    Args:
        trainer_state: the checkpoint directory, its ``trainer_state.json``, or that file's
            content (a dict, as ``json.load`` gives it).

    Returns:
        The removed module names; empty when the checkpoint was saved before the prune step, holds
        no WarmupPrune state, or the model is pruned already.
    """
    saved = _saved_state(_read_trainer_state(trainer_state).get("stateful_callbacks") or {})
    kept = ((saved or {}).get("attributes") or {}).get("kept")
    if kept is None:
        return []
    return prune_blocks(model, saved["args"]["stack_path"], kept, adapter_name=adapter_name)


__all__ = [
    "WarmupPrune",
    "adapter_effect_scores",
    "drop_from_optimizer",
    "kept_target_regex",
    "lora_layers_by_block",
    "prune_blocks",
    "prune_to_saved",
    "top_blocks",
]
