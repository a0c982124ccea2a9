"""Importance-sampled dynamic LoRA: adapters on every block, only ``k`` of them train at a time.

Every ``every`` optimizer steps a new set of ``k`` distinct blocks is drawn, with probabilities
from per-block importance scores (e.g. 1 − CKA of each block's input and output, measured before
training) mixed with a uniform floor so that no block starves::

    w_i = max(importance_i, 0)                  (a block scored None: the mean of the others' w)
    p_i = (1 − floor) · w_i / Σ_j w_j + floor / L

Draw ``d`` (covering optimizer steps ``d·every … (d+1)·every − 1``) takes ``k`` blocks without
replacement from ``p`` with a NumPy generator seeded by ``(seed, d)`` only, so every process of a
DDP run draws the same blocks without talking to the others, and a resumed run draws what an
uninterrupted one would have.

It is a plain ``transformers.TrainerCallback`` (:class:`DynamicBlocks`) plus a helper
(:func:`adapter_params_by_block`), so it works in any stack built on the HF Trainer (TRL,
Axolotl, LLaMA-Factory, lwlora's own). The LISA callback of LMFlow (``DynamicLayerActivationCallback``)
does the same for whole layers at full rank, uniformly; this one samples LoRA adapters by importance.

Why it saves time: the base model is frozen and the input embeddings do not require grad, so
autograd records nothing below the lowest active block; its backward (and the activations kept
for it) disappear. It saves no adapter parameters: the final adapter has every block. See
docs/dynamic.md for the optimizer-state and DDP decisions.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn
from transformers import TrainerCallback

__all__ = ["LORA_PARAM_KEYS", "DynamicBlocks", "adapter_params_by_block", "block_probabilities", "draw_blocks", "effective_find_unused_parameters"]

logger = logging.getLogger(__name__)

#: the parameter-name components PEFT gives LoRA (and DoRA) weights
LORA_PARAM_KEYS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
_LORA_NAME = re.compile(r"(^|\.)(" + "|".join(LORA_PARAM_KEYS) + r")(\.|$)")


# ---------------------------------------------------------------------------------------------
# Finding the adapter parameters of each block
# ---------------------------------------------------------------------------------------------


def block_index_pattern(stack_path: str) -> re.Pattern[str]:
    """``(^|\\.)<stack_path>\\.(\\d+)\\.``: matches ``stack_path.<i>.`` as whole name components, also
    behind the ``base_model.model.`` prefix PEFT adds (``model.layers`` matches
    ``base_model.model.model.layers.3.self_attn...`` but not ``vision_model.layers.3...``)."""
    return re.compile(r"(^|\.)" + re.escape(stack_path) + r"\.(\d+)\.")


def adapter_params_by_block(model: nn.Module, stack_path: str, num_layers: int) -> list[list[nn.Parameter]]:
    """The trainable LoRA parameters (``lora_A``, ``lora_B``, ``lora_magnitude_vector``,
    ``lora_embedding_*``) inside each block ``stack_path.<i>.`` of a PEFT model: ``result[i]`` for
    block ``i`` of ``num_layers``.

    Only parameters that require grad now are taken: PEFT makes the active adapter trainable and
    leaves the others frozen, and those must stay frozen. So call this before anything freezes
    blocks (:class:`DynamicBlocks` calls it in ``on_train_begin``, before its first draw).
    Raises ``ValueError`` if a LoRA parameter sits in a block ``>= num_layers`` (the stack has more
    blocks than scores) or if nothing matched at all (a wrong ``stack_path``).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    pattern = block_index_pattern(stack_path)
    blocks: list[list[nn.Parameter]] = [[] for _ in range(num_layers)]
    for name, param in model.named_parameters():
        match = pattern.search(name)
        if match is None or not param.requires_grad:
            continue
        if _LORA_NAME.search(name[match.end():]) is None:  # a LoRA weight below the block, not the block's own
            continue
        index = int(match.group(2))
        if index >= num_layers:
            raise ValueError(f"{name} is in block {index} of {stack_path!r}, but only {num_layers} blocks were given (importances has one entry per block)")
        blocks[index].append(param)
    if not any(blocks):
        raise ValueError(
            f"no trainable LoRA parameters found under {stack_path!r}.<i>. (looked for {', '.join(LORA_PARAM_KEYS)}); "
            "check stack_path (the block ModuleList's dotted path, e.g. 'model.layers') and that the PEFT model is not frozen"
        )
    return blocks


# ---------------------------------------------------------------------------------------------
# The sampling
# ---------------------------------------------------------------------------------------------


def block_probabilities(importances: Sequence[float | None], floor: float = 0.1) -> np.ndarray:
    """The sampling distribution over ``L = len(importances)`` blocks::

        w_i = max(importance_i, 0)      (None or NaN: the mean w of the scored blocks)
        p_i = (1 − floor) · w_i / Σ_j w_j + floor / L

    Negative importances (possible with debiased estimators, or with scores of your own) count as
    0, so only the floor can draw such a block. With no scored block, or all weights 0, ``w`` is uniform.
    """
    L = len(importances)
    if L < 1:
        raise ValueError("importances must have one entry per block (got none)")
    if isinstance(floor, bool) or not isinstance(floor, (int, float, np.number)) or not 0.0 <= float(floor) <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor!r}")
    weights: list[float | None] = []
    for i, value in enumerate(importances):
        value = None if value is None else float(value)
        if value is None or math.isnan(value):
            weights.append(None)
        elif math.isinf(value):
            raise ValueError(f"importance of block {i} is {value}; give finite scores (None for a block without one)")
        else:
            weights.append(max(value, 0.0))
    scored = [w for w in weights if w is not None]
    fill = float(np.mean(scored)) if scored else 1.0  # an unscored block is an average one
    w = np.array([fill if x is None else x for x in weights], dtype=np.float64)
    total = w.sum()
    if total <= 0.0:  # nothing distinguishes the blocks: uniform
        w, total = np.ones(L), float(L)
    p = (1.0 - float(floor)) * w / total + float(floor) / L
    return p / p.sum()  # exact normalisation against rounding (choice() checks the sum)


def draw_blocks(probabilities: np.ndarray, k: int, seed: int, draw_index: int) -> list[int]:
    """Draw ``draw_index``: ``k`` distinct blocks, sorted, sampled without replacement from
    ``probabilities`` (successive sampling: each pick ∝ p among the blocks not yet picked).

    The generator is seeded by ``(seed, draw_index)`` alone, so the result is a pure function of
    them: the same on every DDP rank and after a resume. With ``k > 1`` a block's chance of being
    in the set is not ``k·p_i`` exactly (likely blocks saturate near 1), but it is monotone in ``p_i``.
    """
    rng = np.random.default_rng([int(seed), int(draw_index)])
    picked = rng.choice(len(probabilities), size=k, replace=False, p=probabilities)
    return sorted(int(i) for i in picked)


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------


class DynamicBlocks(TrainerCallback):
    """Train only ``k`` of the ``L`` adapted blocks at a time, redrawn every ``every`` optimizer steps.

    Blocks are drawn with ``p_i = (1 − floor) · w_i / Σ w + floor / L``, ``w_i = max(importance_i, 0)``
    (see :func:`block_probabilities`), ``k`` distinct ones per draw, from a generator seeded by
    ``(seed, global_step // every)`` (see :func:`draw_blocks`).

    Give either ``block_params`` (``block_params[i]``: the adapter parameters of block ``i``) or
    ``stack_path`` (the blocks' dotted path, e.g. ``"model.layers"``), with ``model`` or else the
    Trainer's model, from which :func:`adapter_params_by_block` finds them at ``on_train_begin``.

    Switching: at ``on_train_begin`` (also on resume, where ``global_step`` is restored) and at each
    ``on_step_begin`` that starts a new window (``global_step % every == 0``), the active blocks'
    parameters get ``requires_grad=True`` and all others ``False``; a deactivated parameter's
    ``.grad`` is set to ``None``. At ``on_train_end`` every block is trainable again.

    Optimizer state: kept by default. AdamW (and the other torch optimizers) skip a parameter whose
    ``.grad`` is None: no update, no weight decay, its moments and step count stay as they were and
    resume when the block is drawn again. This releases no memory (for LoRA the states are small).
    ``reset_optimizer_state=True`` instead drops a block's state when it is deactivated, so it
    restarts fresh (as the LISA paper's separate runs per interval do) and only the active blocks
    hold state once each was deactivated once.

    The optimizer must be built while every adapter is trainable (the Trainer builds it from the
    parameters with ``requires_grad`` before ``on_train_begin``; this callback freezes nothing
    earlier) — ``on_train_begin`` checks it.

    DDP: the DDP reducer expects a gradient for every parameter that was trainable at wrap time;
    frozen blocks give none, which only ``find_unused_parameters=True`` allows. ``on_train_begin``
    raises ``ValueError`` in a distributed run where ``TrainingArguments.ddp_find_unused_parameters``
    resolves to False (explicit False; or None for a ``PreTrainedModel`` with activation
    checkpointing, which the Trainer turns into False), and for ``ddp_static_graph=True``,
    DeepSpeed and FSDP. Parameters unused on every rank keep ``.grad is None`` under DDP, so the
    optimizer skips them as in a single process; active ones are averaged as usual.

    Attributes for logging and tests: ``probabilities`` (the p vector), ``active`` (sorted indices of
    the current draw), ``history`` (``(global_step, active)`` for every draw applied, in order).
    """

    def __init__(
        self,
        block_params: Sequence[Sequence[nn.Parameter]] | None = None,
        *,
        importances: Sequence[float | None],
        k: int,
        every: int,
        floor: float = 0.1,
        seed: int = 0,
        model: nn.Module | None = None,
        stack_path: str | None = None,
        reset_optimizer_state: bool = False,
    ) -> None:
        super().__init__()
        self.num_blocks = len(importances)
        if self.num_blocks < 1:
            raise ValueError("importances must have one entry per block (got none)")
        _check_int("k", k, 1, self.num_blocks, hint=f"the number of blocks (len(importances) = {self.num_blocks})")
        _check_int("every", every, 1, None, hint="optimizer steps between draws")
        _check_int("seed", seed, 0, None, hint="a non-negative int")
        self.probabilities = block_probabilities(importances, floor)
        possible = int((self.probabilities > 0).sum())
        if possible < k:
            raise ValueError(f"only {possible} blocks have a nonzero probability but k={k} must be drawn at once; raise floor above 0 or lower k")
        self.importances = list(importances)
        self.k, self.every, self.floor, self.seed = k, every, float(floor), seed
        self.reset_optimizer_state = bool(reset_optimizer_state)
        self.stack_path = stack_path
        self._model = model
        self._blocks: list[list[nn.Parameter]] | None = None
        if block_params is not None:
            if model is not None or stack_path is not None:
                raise ValueError("give either block_params or model/stack_path, not both")
            self._blocks = self._checked_blocks([list(params) for params in block_params])
        elif stack_path is None:
            raise ValueError("give block_params, or stack_path (with model=, or the Trainer's model at on_train_begin)")
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []
        self._draw: int | None = None  # index of the draw applied now; None: none yet (or training ended)

    # -- the blocks ---------------------------------------------------------------------------

    @property
    def block_params(self) -> list[list[nn.Parameter]] | None:
        """``block_params[i]``: the parameters switched for block ``i`` (None until resolved)."""
        return self._blocks

    def _checked_blocks(self, blocks: list[list[nn.Parameter]]) -> list[list[nn.Parameter]]:
        if len(blocks) != self.num_blocks:
            raise ValueError(f"block_params has {len(blocks)} blocks but importances has {self.num_blocks}; give one importance per block")
        empty = [i for i, params in enumerate(blocks) if not params]
        if empty:
            raise ValueError(f"blocks {empty} have no adapter parameters; put adapters on every block (a drawn block without them would train nothing)")
        seen: dict[int, int] = {}
        for i, params in enumerate(blocks):
            for param in params:
                if seen.setdefault(id(param), i) != i:
                    raise ValueError(f"a parameter is listed in blocks {seen[id(param)]} and {i}; each belongs to one block")
        return blocks

    def _resolve_blocks(self, model: nn.Module | None) -> list[list[nn.Parameter]]:
        if self._blocks is None:
            source = self._model if self._model is not None else model
            if source is None:
                raise ValueError("DynamicBlocks(stack_path=...) needs a model: pass model=, or use it as a Trainer callback")
            assert self.stack_path is not None
            self._blocks = self._checked_blocks(adapter_params_by_block(source, self.stack_path, self.num_blocks))
        return self._blocks

    # -- drawing and switching ----------------------------------------------------------------

    def draw(self, draw_index: int) -> list[int]:
        """The sorted active blocks of draw ``draw_index`` (steps ``draw_index·every`` onward)."""
        return draw_blocks(self.probabilities, self.k, self.seed, draw_index)

    def blocks_at(self, global_step: int) -> list[int]:
        """The active blocks during optimizer step ``global_step`` (0-based)."""
        return self.draw(global_step // self.every)

    def activate(self, global_step: int, optimizer: Any = None) -> bool:
        """Apply the draw that covers ``global_step`` unless it is already applied; True if it switched."""
        if self._blocks is None:
            raise RuntimeError("DynamicBlocks has no block parameters yet: call on_train_begin (or pass block_params)")
        index = global_step // self.every
        if index == self._draw:
            return False
        active = self.draw(index)
        chosen = set(active)
        state = _optimizer_state(optimizer) if self.reset_optimizer_state else None
        for i, params in enumerate(self._blocks):
            on = i in chosen
            for param in params:
                if not on and param.requires_grad and state is not None:
                    state.pop(param, None)  # restarts fresh when drawn again; AdamW re-creates it lazily
                param.requires_grad_(on)
                if not on:
                    # Nothing may apply a stale gradient: the Trainer zeroes with set_to_none=True, but a
                    # zero_grad(set_to_none=False) would leave a zero tensor, and AdamW updates a
                    # parameter with any non-None grad (momentum and weight decay still move it).
                    param.grad = None
        self._draw, self.active = index, active
        self.history.append((int(global_step), list(active)))
        logger.info("DynamicBlocks: step %d, draw %d: training blocks %s", global_step, index, active)
        return True

    def restore(self) -> None:
        """Make every block's adapters trainable again (done at ``on_train_end``)."""
        for params in self._blocks or []:
            for param in params:
                param.requires_grad_(True)
        self._draw = None

    # -- TrainerCallback ----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        _check_training_setup(args, model)
        blocks = self._resolve_blocks(model)
        _check_optimizer(optimizer, blocks)
        self._agree_across_ranks()
        _warn_if_input_grads(self._model if self._model is not None else model)
        self._draw = None  # a new train() call (or a resume) applies its draw afresh
        self.activate(state.global_step, optimizer)

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        # Called before the first micro-batch of each optimizer step, when the previous step's
        # gradients have been applied and zeroed: the one safe moment to change what trains.
        self.activate(state.global_step, optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.restore()

    # -- distributed --------------------------------------------------------------------------

    def _agree_across_ranks(self) -> None:
        """One exchange at train begin so that the ranks' draws cannot differ: (seed, k, every)
        must match (else ValueError on every rank), and rank 0's probabilities are adopted (the
        importances may have been measured per rank, and float noise could change a draw)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        mine = (self.seed, self.k, self.every, self.num_blocks, self.probabilities.tolist())
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        settings = {tuple(g[:4]) for g in gathered}
        if len(settings) > 1:
            raise ValueError(f"DynamicBlocks (seed, k, every, blocks) differ across ranks: {sorted(settings)}; every rank must draw the same blocks")
        reference = np.asarray(gathered[0][4], dtype=np.float64)
        if not np.allclose(reference, self.probabilities, rtol=0, atol=1e-12):
            warnings.warn("DynamicBlocks: importances differ across ranks; using rank 0's", stacklevel=2)
        self.probabilities = reference


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int, high: int | None, *, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int ({hint}), got {value!r}")
    if value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {span} ({hint}), got {value}")


def _checkpointing(model: Any, args: Any) -> bool:
    # the newer name first: reading the deprecated one warns in transformers 5
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(model, flag, False) is True:
        return True
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def effective_find_unused_parameters(args: Any, model: Any) -> bool:
    """``find_unused_parameters`` as the Trainer hands it to DDP: the TrainingArguments value when
    set; for None, ``not checkpointing`` on a ``PreTrainedModel`` and True on anything else (a
    ``PeftModel`` is not a ``PreTrainedModel``, so it gets True)."""
    from transformers import PreTrainedModel

    explicit = getattr(args, "ddp_find_unused_parameters", None)
    if explicit is not None:
        return bool(explicit)
    if isinstance(model, PreTrainedModel):
        return not _checkpointing(model, args)
    return True


def _check_training_setup(args: Any, model: Any) -> None:
    """Refuse distributed setups in which a block that gets no gradient breaks or is still moved."""
    if getattr(args, "deepspeed", None):
        raise ValueError("DynamicBlocks does not support DeepSpeed: ZeRO keeps flat optimizer partitions that update every adapter, trained or not")
    if getattr(args, "fsdp", None):
        raise ValueError("DynamicBlocks does not support FSDP: flattened parameters cannot be frozen block by block")
    if int(getattr(args, "world_size", 1) or 1) <= 1:
        return
    if not effective_find_unused_parameters(args, model):
        raise ValueError(
            "DynamicBlocks in a distributed run needs TrainingArguments(ddp_find_unused_parameters=True): the frozen "
            "blocks get no gradient, and DDP without find_unused_parameters waits for them forever (it fails at the next "
            "step with 'Expected to have finished reduction in the prior iteration')"
        )
    if getattr(args, "ddp_static_graph", None):
        raise ValueError("DynamicBlocks cannot run with TrainingArguments(ddp_static_graph=True): the set of trained parameters changes with every draw")


def _optimizer_state(optimizer: Any) -> Any:
    """The per-parameter state dict of a (possibly accelerate-wrapped) torch optimizer, or None."""
    state = getattr(optimizer, "state", None)
    return state if hasattr(state, "pop") else None


def _check_optimizer(optimizer: Any, blocks: list[list[nn.Parameter]]) -> None:
    """Every adapter must be in the optimizer, else a block drawn later would never be updated
    (what happens when blocks are frozen before the Trainer builds its optimizer from the
    parameters that require grad)."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return
    known = {id(p) for group in groups for p in group.get("params", [])}
    missing = [i for i, params in enumerate(blocks) if any(id(p) not in known for p in params)]
    if missing:
        raise ValueError(
            f"the optimizer lacks adapter parameters of blocks {missing}: build it while every adapter requires grad "
            "(do not freeze blocks before Trainer.train(); DynamicBlocks does the freezing itself)"
        )


def _warn_if_input_grads(model: Any) -> None:
    """``enable_input_require_grads`` (added by activation checkpointing in transformers, and by
    ``prepare_model_for_kbit_training``) makes the embeddings' output require grad, so the backward
    runs through every block and the saving below the lowest active block is lost."""
    if model is None:
        return
    for module in model.modules():
        if getattr(module, "_require_grads_hooks", None) or getattr(module, "_require_grads_hook", None):
            warnings.warn(
                "DynamicBlocks: the input embeddings were set to require grad (enable_input_require_grads, e.g. by "
                "activation checkpointing), so the backward still runs through the frozen blocks below the lowest active "
                "one; with non-reentrant checkpointing (use_reentrant=False) model.disable_input_require_grads() restores the saving",
                stacklevel=3,
            )
            return
