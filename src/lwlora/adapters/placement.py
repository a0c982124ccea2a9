"""The PEFT bridge: a ``LoraConfig`` that adapts exactly the selected blocks, and a check that it did.

PEFT's ``layers_to_transform`` / ``layers_pattern`` guess the layer index from module names and
go wrong on root-level ``ModuleList`` s, nested indices (MoE experts), several towers (VLMs) and
bare base models. lwlora never relies on them: it writes ``target_modules`` as one regular
expression that PEFT full-matches against every module name::

    (?:.*\\.)?<layers_path>\\.(?:3|5|7)\\.(?:self_attn\\.q_proj|self_attn\\.v_proj)

With a model in hand (``apply_selection``, or ``model=``) the expression is anchored at the exact
stack path of that model, so no other stack can match. ``verify`` then compares the adapted
modules with the intended ones and raises with a readable diff if they differ.

Methods map onto PEFT's own LoRA implementations: ``lora``; ``pissa``
(``init_lora_weights="pissa"`` or ``"pissa_niter_N"``); ``dora`` (``use_dora``); ``rslora``
(``use_rslora``, scaling α/√r); ``olora`` (``init_lora_weights="olora"``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lwlora.blocks import BlockStack, find_block_stacks, get_module, is_linear, tower_of
from lwlora.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from lwlora.selection.artifact import LayerSelection

METHODS: tuple[str, ...] = ("lora", "pissa", "dora", "rslora", "olora", "eva")


logger = logging.getLogger("lwlora")


class AdapterPlacementError(AssertionError):
    """The adapted modules are not exactly the intended ones."""


def locate_stack(model: nn.Module, selection: "LayerSelection") -> BlockStack:
    """The block stack of ``model`` that ``selection`` refers to.

    The selection may come from the bare base model (``layers``) and be applied to a model with a
    head (``model.layers``) or inside a PEFT wrapper: the recorded path is matched as a suffix,
    then by block count and tower.
    """
    recorded = selection.layers_path
    matches = [
        s for s in find_block_stacks(model)
        if (s.path == recorded or s.path.endswith("." + recorded)) and s.num_layers == selection.num_layers
    ]
    if not matches:
        try:
            module = get_module(model, recorded)
            if isinstance(module, nn.ModuleList) and len(module) == selection.num_layers:
                return BlockStack(path=recorded, blocks=module, tower=tower_of(recorded))
        except AttributeError:
            pass
    if len(matches) > 1:
        matches = [s for s in matches if s.tower == selection.tower] or matches
    if len(matches) == 1:
        return matches[0]
    candidates = "; ".join(s.describe() for s in find_block_stacks(model)) or "none found"
    raise ConfigError(
        "--selection",
        f"the model has {'no' if not matches else 'more than one'} block stack matching {recorded!r} with "
        f"{selection.num_layers} blocks (candidates: {candidates}); was the selection made on another model?",
    )


def _tuner_layer_class():
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def block_linear_names(block: nn.Module) -> set[str]:
    """Names (relative to ``block``) of its adaptable linear layers, also after PEFT wrapped them."""
    tuner = _tuner_layer_class()
    wrapped = [name for name, module in block.named_modules() if isinstance(module, tuner)]
    names = set(wrapped)
    for name, module in block.named_modules():
        if name and is_linear(module) and not any(name.startswith(prefix + ".") for prefix in wrapped):
            names.add(name)
    return names


def _matches(suffix: str, name: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def resolve_target_suffixes(
    selection: "LayerSelection", target_modules: str | Sequence[str], stack: BlockStack | None = None
) -> tuple[list[str], bool]:
    """Block-relative module names to adapt, and whether they are exact (``auto``) or name endings.

    ``"auto"`` means every linear layer inside the blocks (from ``stack`` when given, else from the
    selection's ``block_linear_modules``). A list is taken as PEFT takes it: each entry matches a
    module whose name is, or ends with, that entry. With ``stack`` given, every entry must match a
    linear layer in the selected blocks.
    """
    if isinstance(target_modules, str):
        if target_modules != "auto":
            target_modules = [t for t in (part.strip() for part in target_modules.split(",")) if t]
        else:
            names = sorted(set().union(*(block_linear_names(stack.blocks[i]) for i in selection.selected))) if stack else list(selection.block_linear_modules)
            if not names:
                raise ConfigError("--target-modules", "'auto' found no linear layers inside the selected blocks; name the modules to adapt")
            return names, True
    targets = list(target_modules)
    if not targets:
        raise ConfigError("--target-modules", "must name at least one module, or be 'auto'")
    if stack is not None:
        available = sorted(set().union(*(block_linear_names(stack.blocks[i]) for i in selection.selected)))
        missing = [t for t in targets if not any(_matches(t, name) for name in available)]
        if missing:
            raise ConfigError(
                "--target-modules",
                f"{missing} match no linear layer in the selected blocks; available: {', '.join(available)}",
            )
    return targets, False


def target_regex(stack_path: str, indices: Iterable[int], suffixes: Sequence[str], *, exact: bool, anchored: bool) -> str:
    """The ``target_modules`` regular expression for blocks ``indices`` of ``stack_path``."""
    blocks = "|".join(str(i) for i in sorted(set(indices)))
    modules = "|".join(re.escape(s) for s in suffixes)
    prefix = "" if anchored else r"(?:.*\.)?"
    inner = "" if exact else r"(?:.*\.)?"
    return rf"{prefix}{re.escape(stack_path)}\.(?:{blocks})\.{inner}(?:{modules})"


def units_regex(selection: "LayerSelection", suffixes: Sequence[str], *, exact: bool, stack: BlockStack | None) -> str:
    """``target_modules`` for a sub-layer selection: per part (attention, MLP), the blocks whose
    unit of that part is adapted, with that part's modules only (exact block-relative names)."""
    from lwlora.selection.units import PARTS, part_of

    names = sorted(set().union(*(block_linear_names(stack.blocks[i]) for i in selection.selected))) if stack else list(selection.block_linear_modules)
    targeted = names if exact else [n for n in names if any(_matches(t, n) for t in suffixes)]
    chosen = selection.selected_units or {}
    stack_path = stack.path if stack else selection.layers_path
    alternatives = []
    for part in PARTS:
        blocks = [i for i, parts in chosen.items() if part in parts]
        modules = [n for n in targeted if part_of(n) == part]
        if blocks and modules:
            alternatives.append(target_regex(stack_path, blocks, modules, exact=True, anchored=stack is not None))
    if not alternatives:
        raise ConfigError("--target-modules", "no targeted linear layer lies in the selected units")
    return "|".join(f"(?:{a})" for a in alternatives)


def outside_blocks_regex(stack_path: str, indices: Iterable[int], *, anchored: bool) -> str:
    """A regex full-matching every module name that is *not* inside blocks ``indices`` of the stack."""
    blocks = "|".join(str(i) for i in sorted(set(indices)))
    prefix = "" if anchored else r"(?:.*\.)?"
    return rf"(?!{prefix}{re.escape(stack_path)}\.(?:{blocks})\.).*"


def _reject_olora_on_conv1d(stack: BlockStack, indices: Sequence[int], suffixes: Sequence[str], exact: bool) -> None:
    """PEFT's OLoRA init ignores ``fan_in_fan_out``, so on GPT-2 style ``Conv1D`` it breaks the model."""
    for i in indices:
        for name, module in stack.blocks[i].named_modules():
            targeted = name in suffixes if exact else any(_matches(s, name) for s in suffixes)
            if targeted and type(module).__name__ == "Conv1D":
                raise ConfigError(
                    "--method",
                    f"olora cannot adapt Conv1D layers such as {stack.path}.{i}.{name} (PEFT's OLoRA init ignores "
                    "fan_in_fan_out and corrupts them); use lora, pissa, dora or rslora for this model",
                )


def build_peft_config(
    selection: "LayerSelection",
    *,
    method: str = "lora",
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "auto",
    model: nn.Module | None = None,
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    pissa_niter: int | None = None,
    eva_rho: float = 2.0,
    **lora_kwargs: Any,
) -> "LoraConfig":
    """A ``peft.LoraConfig`` putting adapters on exactly ``selection.selected``.

    Args:
        method: ``lora`` | ``pissa`` | ``dora`` | ``rslora`` | ``olora`` | ``eva`` (PEFT's
            Explained Variance Adaptation: A initialised from the top right-singular vectors of
            each layer's inputs, ranks redistributed by explained variance up to ``eva_rho`` x r at
            the same total rank; needs :func:`initialize_eva` on data after wrapping).
        r: adapter rank. alpha: LoRA α (default ``2 r``, the paper's 8/16). dropout: LoRA dropout.
        target_modules: ``"auto"`` (every linear layer inside the blocks) or module names.
        model: the model the config is for; anchors the expression at its exact stack path and
            checks ``target_modules`` against it. Without it the config matches the recorded
            stack path under any prefix.
        task_type: PEFT task type (e.g. ``"SEQ_CLS"``, ``"CAUSAL_LM"``), optional.
        modules_to_save: extra fully trained modules (e.g. a classification head).
        pissa_niter: fast-SVD iterations for PiSSA (``pissa_niter_N``); ``None`` = exact SVD.
        eva_rho: EVA's redistribution bound (``EvaConfig.rho``; 1 = no redistribution).
        lora_kwargs: passed through to ``LoraConfig``.
    """
    from peft import LoraConfig

    if method not in METHODS:
        raise ConfigError("--method", f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if r < 1:
        raise ConfigError("--r", f"must be a positive integer, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError("--dropout", f"must be in [0, 1), got {dropout}")
    if not selection.selected:
        raise ConfigError("--selection", "selects no blocks")
    stack = locate_stack(model, selection) if model is not None else None
    suffixes, exact = resolve_target_suffixes(selection, target_modules, stack)
    stack_path = stack.path if stack else selection.layers_path
    if selection.units is not None:
        regex = units_regex(selection, suffixes, exact=exact, stack=stack)
    else:
        regex = target_regex(stack_path, selection.selected, suffixes, exact=exact, anchored=stack is not None)
    if method == "olora" and stack is not None:
        _reject_olora_on_conv1d(stack, selection.selected, suffixes, exact)
    # PEFT >= 0.18 rewrites a regex target_modules of some MoE models (Mixtral, ...) into bare
    # module names for transformers 5's fused experts, dropping the block indices. An exclusion
    # of everything outside the selected blocks survives that rewrite.
    exclude = outside_blocks_regex(stack_path, selection.selected, anchored=stack is not None)
    user_exclude = lora_kwargs.pop("exclude_modules", None)
    if user_exclude:
        if not isinstance(user_exclude, str):
            user_exclude = r"(?:.*\.)?(?:" + "|".join(re.escape(m) for m in user_exclude) + ")"
        exclude = f"(?:{user_exclude})|(?:{exclude})"

    options: dict[str, Any] = {}
    if method == "pissa":
        options["init_lora_weights"] = "pissa" if pissa_niter is None else f"pissa_niter_{pissa_niter}"
    elif method == "olora":
        options["init_lora_weights"] = "olora"
    elif method == "dora":
        options["use_dora"] = True
    elif method == "rslora":
        options["use_rslora"] = True
    elif method == "eva":
        from peft import EvaConfig

        if not eva_rho >= 1.0:
            raise ConfigError("--eva-rho", f"must be >= 1 (1: no rank redistribution), got {eva_rho}")
        # classification labels are one per sequence, not per token: no label mask for them
        options["init_lora_weights"] = "eva"
        options["eva_config"] = EvaConfig(rho=eva_rho, use_label_mask=task_type != "SEQ_CLS")
    options.update(lora_kwargs)
    return LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=regex,
        exclude_modules=exclude,
        task_type=task_type,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        **options,
    )


def adapted_module_names(model: nn.Module) -> list[str]:
    """Names (in the base model) of the modules that carry a PEFT adapter."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tuner = _tuner_layer_class()
    return sorted(name for name, module in base.named_modules() if isinstance(module, tuner))


def verify(peft_model: nn.Module, selection: "LayerSelection", target_modules: str | Sequence[str] | None = None) -> None:
    """Raise :class:`AdapterPlacementError` unless the adapters sit exactly where intended.

    Intended: adapters only inside the selected blocks of the selection's stack; every selected
    block adapted; and in each selected block exactly the modules that ``target_modules`` names
    (``"auto"``: all its linear layers; a list: those whose name is or ends with an entry; ``None``:
    the same modules in every selected block).
    """
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    stack = locate_stack(base, selection)
    prefix = stack.path + "."
    actual = adapted_module_names(base)
    per_block: dict[int, set[str]] = {i: set() for i in selection.selected}
    unexpected: list[str] = []
    for name in actual:
        if not name.startswith(prefix):
            unexpected.append(name)
            continue
        index_text, _, rest = name[len(prefix):].partition(".")
        index = int(index_text)
        if index not in per_block:
            unexpected.append(name)
        else:
            per_block[index].add(rest)

    if isinstance(target_modules, str) and target_modules != "auto":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    expected: dict[int, set[str]] = {}
    if target_modules is None:
        reference = next((per_block[i] for i in selection.selected if per_block[i]), set())
        expected = {i: set(reference) for i in selection.selected}
    else:
        for i in selection.selected:
            linear = block_linear_names(stack.blocks[i])
            if isinstance(target_modules, str) and target_modules == "auto":
                expected[i] = linear
            else:
                expected[i] = {name for name in linear if any(_matches(t, name) for t in target_modules)}

    chosen_units = selection.selected_units
    if chosen_units is not None:  # a sub-layer selection: only the chosen parts' modules of each block
        from lwlora.selection.units import part_of

        expected = {i: {m for m in names if part_of(m) in chosen_units.get(i, [])} for i, names in expected.items()}
    missing: list[str] = []
    extra_in_block: list[str] = []
    for i in selection.selected:
        if not expected[i]:
            missing.append(f"{prefix}{i}.* (no adapter in this selected block)")
        missing += [f"{prefix}{i}.{m}" for m in sorted(expected[i] - per_block[i])]
        extra_in_block += [f"{prefix}{i}.{m}" for m in sorted(per_block[i] - expected[i])]
    unexpected += extra_in_block
    if unexpected or missing:
        lines = [f"adapters do not match the selection (blocks {selection.selected} of {stack.path}):"]
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:20]) + (" ..." if len(unexpected) > 20 else ""))
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        raise AdapterPlacementError("\n".join(lines))


def apply_selection(
    model: nn.Module,
    selection: "LayerSelection",
    *,
    method: str = "lora",
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "auto",
    **kwargs: Any,
) -> "PeftModel":
    """Wrap ``model`` with adapters on the selected blocks (``peft.get_peft_model``) and verify.

    ``method="eva"`` also needs ``init_batches``: model inputs (dicts of tensors on the model's
    device) whose layer inputs initialise the adapters (:func:`initialize_eva`)."""
    from peft import get_peft_model

    init_batches = kwargs.pop("init_batches", None)
    config = build_peft_config(selection, method=method, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, model=model, **kwargs)
    if method == "eva":
        if not init_batches:
            raise ConfigError("--method", "eva initialises the adapters from data: pass init_batches (model inputs)")
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)  # EVA sets the weights: skip the default init
        verify(peft_model, selection, target_modules)
        placed = set(adapted_module_names(peft_model))
        initialize_eva(peft_model, init_batches)
        # EVA may give a layer rank 0 and then removes its adapter; it never adds one
        dropped = sorted(placed - set(adapted_module_names(peft_model)))
        if set(adapted_module_names(peft_model)) - placed:
            raise AdapterPlacementError("EVA initialisation added adapters outside the selection")
        if dropped:
            logger.warning(f"EVA gave {len(dropped)} layer(s) rank 0 and removed their adapters: {', '.join(dropped[:8])}{' ...' if len(dropped) > 8 else ''}")
        return peft_model
    peft_model = get_peft_model(model, config)
    verify(peft_model, selection, target_modules)
    return peft_model


#: passes over the initialisation batches after which EVA is given up. PEFT cycles them until
#: every layer's top components converge: measured, 5.5 passes on 4 blocks of SmolLM2 with math
#: text, 25 with random tokens, up to 70 on the tests' tiny random models, and none in 100 on a
#: random 512-wide Llama (a flat spectrum; benchmarks/eva_convergence.py, docs/methods.md)
EVA_MAX_PASSES = 100


class _EvaNotConverging(Exception):
    """Raised from a forward hook to stop PEFT's EVA loop after ``EVA_MAX_PASSES`` passes."""


def initialize_eva(peft_model: nn.Module, batches: Sequence[dict[str, Any]], max_passes: int | None = None) -> None:
    """PEFT's EVA initialisation (``peft.initialize_lora_eva_weights``) on ``batches``: each
    adapted layer's A takes the top right-singular vectors of its inputs (incremental SVD until
    they stop changing, cosine ≥ tau), its rank the share of explained variance (at most rho x r,
    the total kept), B starts at zero. Runs the model forward only, in eval mode, with autocast off:
    under ``--bf16`` the caller's autocast would turn the matmuls inside ``torch.svd_lowrank`` into
    bfloat16 ones, and torch's QR (geqrf) has no bfloat16 kernel on CPU or CUDA. The layer inputs
    are then taken in the weights' dtype (float32 under mixed precision) and PEFT's SVD runs in
    float32.

    PEFT reads ``batches`` again and again until every layer has converged, with no limit; after
    ``max_passes`` passes (``max_passes · len(batches)`` forward calls; default
    ``EVA_MAX_PASSES``) this gives up with a ConfigError instead of running on."""
    from peft import initialize_lora_eva_weights

    batches = list(batches)
    max_passes = EVA_MAX_PASSES if max_passes is None else max_passes
    limit = max_passes * len(batches)
    calls = [0]

    def count(_module, _args):
        calls[0] += 1
        if calls[0] > limit:
            raise _EvaNotConverging

    was_training = peft_model.training
    peft_model.eval()
    device_type = next(peft_model.parameters()).device.type
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    handle = inner.register_forward_pre_hook(count)
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
    except _EvaNotConverging:
        raise ConfigError("--method", f"PEFT's EVA did not converge in {max_passes} passes over its {len(batches)} batches (the layers' top input components kept changing, as on random weights); give more --num-samples or use another --method") from None
    except (IndexError, ValueError, RuntimeError) as exc:  # PEFT's EVA assumes (batch, tokens, features) layer inputs
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError("--method", f"PEFT's EVA could not initialise this model ({type(exc).__name__}: {first}); use another --method") from None
    finally:
        handle.remove()
        _remove_eva_hooks(inner)
        peft_model.train(was_training)


def _remove_eva_hooks(model: nn.Module) -> None:
    """Drop the forward hooks PEFT's EVA left on ``model``'s layers. PEFT removes its SVD hooks only
    when the loop ends normally; after an error (or the pass limit) they would keep running on
    every later forward of the same model."""
    from peft.tuners.lora import eva

    hook_types = tuple(t for t in (getattr(eva, "SVDHook", None), getattr(eva, "HashHook", None)) if isinstance(t, type))
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, hook_types)]:
            del module._forward_hooks[key]
