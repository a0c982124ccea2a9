"""``lwlora train``: fine-tune with adapters on the selected blocks, through transformers' Trainer.

The Trainer (not a hand-rolled loop) is what makes ``accelerate launch`` / ``torchrun`` run the
same command data-parallel (DDP) or with FSDP on several GPUs.

Frozen lower blocks cost no backward pass: autograd stops at the lowest block with a trainable
parameter, because nothing below it requires grad. Gradient checkpointing would normally break
that — transformers then makes the embedding output require grad ("enable_input_require_grads"),
so backward runs through every block — and the reentrant variant even silently zeroes adapter
gradients without it. lwlora uses the non-reentrant variant, which needs neither, and switches
the input-grad hook off again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lwlora.errors import ConfigError
from lwlora.io import atomic_write_json
from lwlora.training.config import LATER_IDENTITY_FIELDS, TrainConfig
from lwlora.training.run_dir import (
    RunPlace,
    finish_run,
    hold_run,
    last_checkpoint,
    plan_run_dir,
    prepare_run_dir,
    publish_directory,
    read_trainer_state,
    write_config,
)

logger = logging.getLogger("lwlora")


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    selection: Any
    model: nn.Module
    tokenizer: Any
    task: Any


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (accelerate, torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Every ``--modules-to-save`` name must be a module of ``model`` (matched as PEFT does: the
    whole dotted name or its last components), or PEFT would silently train nothing extra."""
    paths = [name for name, _ in model.named_modules() if name]
    missing = [n for n in names if not any(p == n or p.endswith("." + n) for p in paths)]
    if missing:
        tops = sorted({p.split(".")[-1] for p in paths if "layer" not in p})[:12]
        raise ConfigError("--modules-to-save", f"no module named {', '.join(missing)} in the model; e.g. {', '.join(tops)}")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts. ``total`` is the base model (adapter weights and PEFT's trainable copies
    of saved modules excluded); ``adapter`` the LoRA weights; ``head`` the fully trained extra
    modules (``modules_to_save``, e.g. the classification head)."""
    total = adapter = head = trainable = 0
    for name, param in model.named_parameters():
        count = param.numel()
        is_adapter = "lora_" in name or "lora_magnitude" in name
        is_head_copy = ".modules_to_save." in name
        if not (is_adapter or is_head_copy):
            total += count
        if param.requires_grad:
            trainable += count
            if is_adapter:
                adapter += count
            elif is_head_copy:
                head += count
    return {"total": total, "trainable": trainable, "adapter": adapter, "head": head}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing, without forcing grads through the frozen blocks below."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError("--gradient-checkpointing", f"{type(base).__name__} does not support gradient checkpointing")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "disable_input_require_grads") and getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()


def _training_arguments(config: TrainConfig, run: Path, has_eval: bool, device: torch.device, causal_lm: bool = False):
    """The Trainer's arguments for ``config``. For causal-LM tasks the Trainer's evaluation only
    computes the loss (``prediction_loss_only``: otherwise it gathers every eval batch's
    vocabulary-sized logits, 23 GB for 200 examples of a 152k-token vocabulary) and at the training
    batch size (``--eval-batch-size`` is the generation batch: the loss needs logits for every
    token, which fit where the training batch's fit)."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    strategy = "steps" if config.eval_every else "epoch"
    kwargs: dict[str, Any] = dict(
        output_dir=str(run / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps else -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size if causal_lm else (config.eval_batch_size or config.batch_size),
        prediction_loss_only=causal_lm,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.scheduler,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        fp16=config.fp16,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # a NaN step must show in the logged loss (DivergenceGuard)
        # --prune-at / --dynamic-blocks leave adapters without gradients, which DDP allows only so
        ddp_find_unused_parameters=True if (config.prune_at is not None or config.dynamic_blocks is not None) else None,
        eval_strategy=strategy if has_eval else "no",
        save_strategy="steps" if config.save_every else "epoch",
        save_total_limit=1,
        report_to=[] if config.report_to.strip() == "none" else [part.strip() for part in config.report_to.split(",") if part.strip()],
        optim=config.optim,
        max_grad_norm=config.max_grad_norm,
        deepspeed=config.deepspeed,
        disable_tqdm=not config.progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        use_liger_kernel=config.liger,
    )
    if config.eval_every:
        kwargs["eval_steps"] = config.eval_every
    if config.save_every:
        kwargs["save_steps"] = config.save_every
    if config.warmup >= 1:
        kwargs["warmup_steps"] = int(config.warmup)
    elif "warmup_ratio" in fields:  # transformers 4.x
        kwargs["warmup_ratio"] = config.warmup
    else:  # transformers 5: a float in [0, 1) is a ratio
        kwargs["warmup_steps"] = config.warmup
    if device.type == "cpu":
        kwargs["use_cpu"] = True
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in fields})


def declare_loss_reduction(model: nn.Module, task: Any) -> None:
    """Tell the Trainer whether the model's loss uses ``num_items_in_batch``.

    transformers 5 passes ``num_items_in_batch`` (the batch's label count, summed over processes and
    accumulated micro-batches) to every model whose ``forward`` takes ``**kwargs``, and then treats
    the returned loss as a sum over that count: it skips the division by the gradient-accumulation
    steps and multiplies by the number of processes (``average_tokens_across_devices``). Causal-LM
    losses do divide by that count. Sequence-classification and regression heads ignore it and
    return a batch mean, so the Trainer doubled their loss (and gradient) under 2 processes and
    summed instead of averaged over accumulated micro-batches. ``accepts_loss_kwargs = False`` on
    the unwrapped model is the Trainer's own switch for such models: the loss is then averaged over
    micro-batches and over processes (DDP's gradient mean), as the head computes it."""
    from transformers.trainer_utils import unwrap_peft_model

    if task.kind == "causal_lm":
        return
    unwrap_peft_model(model).accepts_loss_kwargs = False


def _metrics_function(task: Any):
    from lwlora.evaluation.metrics import compute_metrics, predictions_from_logits

    def compute(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions[0] if isinstance(eval_prediction.predictions, tuple) else eval_prediction.predictions
        labels = eval_prediction.label_ids
        predictions = predictions_from_logits(logits, task.kind)
        return compute_metrics(task.metric_names, predictions.tolist(), labels.tolist())

    return compute


def _peak_memory() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak_memory_kind": "host_max_rss"}


def plan_ranks(config: TrainConfig, selection: Any, stack: Any, model: nn.Module, tokenizer: Any, model_kind: str, task: Any) -> dict[str, Any]:
    """The adapter ranks of a run: uniform ``--r``; with ``--budget-from-ratio`` (and ``--layers
    all``) the rank that gives every block the parameters of floor(ratio × L) blocks at ``--r``;
    with ``--rank-allocation importance`` per-block ranks growing with importance at the same
    total (Σ r_i = r × selected blocks; lwlora.adapters.ranks.importance_rank_pattern), α/r kept."""
    from lwlora.adapters.ranks import alpha_pattern_for_peft, equal_budget_rank, importance_rank_pattern, rank_pattern_for_peft

    r = config.r
    alpha = 2 * config.r if config.alpha is None else config.alpha
    if config.budget_from_ratio is not None:
        kept = max(1, math.floor(config.budget_from_ratio * stack.num_layers))
        r_budget = equal_budget_rank(config.r, kept, stack.num_layers)
        alpha, r = alpha * r_budget / r, r_budget
    plan: dict[str, Any] = {"r": r, "alpha": alpha, "ranks": None, "peft_patterns": {}}
    if config.rank_allocation == "importance":
        importances = selection.importances
        if all(importances[i] is None for i in selection.selected):  # a rule-made selection: measure
            from lwlora.training.layers import measure_every_block

            scored = measure_every_block(config, model, tokenizer, model_kind, task.selection_texts, stack.num_layers)
            importances = scored.importances
            selection.diagnostics["rank_allocation_scores"] = {"scorer": config.scorer, "importances": importances}
        ranks = importance_rank_pattern(importances, selection.selected, r * len(selection.selected))
        plan["ranks"] = ranks
        plan["peft_patterns"] = {"rank_pattern": rank_pattern_for_peft(stack.path, ranks, r), "alpha_pattern": alpha_pattern_for_peft(stack.path, ranks, alpha / r)}
        selection.diagnostics["rank_allocation"] = {"rule": "importance", "total_rank": r * len(selection.selected), "ranks": {str(k): v for k, v in ranks.items()}}
    return plan


def fit_lengths(config: TrainConfig, source: str, gguf_file: str | None, tokenizer: Any) -> TrainConfig:
    """``config`` with ``max_length`` fitted to the model (lwlora.models.fit_max_length: lowered
    to its positions with a warning, or refused when no text would fit), read from the model's
    config before any weights are loaded. Image tasks are never truncated and keep theirs."""
    from transformers import AutoConfig

    from lwlora.models import fit_max_length
    from lwlora.selection.pipeline import DEFAULT_MAX_LENGTH
    from lwlora.tasks.presets import IMAGE_TASKS

    if config.task in IMAGE_TASKS:
        return config
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model_config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - an unreadable MODEL
        raise ConfigError("MODEL", f"cannot read the config of {config.model!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    asked = config.max_length != DEFAULT_MAX_LENGTH
    fitted = fit_max_length(config.max_length, model_config, tokenizer, pair=config.text_pair_column is not None, asked=asked)
    return config if fitted == config.max_length else dataclasses.replace(config, max_length=fitted)


def _measures_blocks(config: TrainConfig) -> bool:
    """Whether the run scores blocks on selection samples (so the task draws them): a measuring
    scorer that is not resumed from a saved selection."""
    if config.resume and (Path(config.out) / "selection.json").is_file():
        return False
    return config.measuring_scorer is not None


def warmup_pruner(config: TrainConfig, task: Any, stack: Any, planned: int, device: torch.device) -> Any:
    """``--prune-at``: the WarmupPrune callback (lwlora.training.prune) that keeps floor(ratio x L)
    (``--ratio``, default 0.5) or ``--num-layers`` blocks at step ``prune_at`` (a share of the
    planned steps below 1, else a step), scored on ``--num-samples`` training examples."""
    from lwlora.tasks.base import probe_batches
    from lwlora.training.prune import WarmupPrune

    keep = config.num_layers or max(1, math.floor((config.ratio if config.ratio is not None else 0.5) * stack.num_layers))
    at_step = max(1, round(config.prune_at * planned)) if config.prune_at < 1 else int(config.prune_at)
    if at_step >= planned:
        raise ConfigError("--prune-at", f"prunes at step {at_step}, but the run makes {planned} steps: prune earlier (a share such as 0.05, or a step below {planned})")
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in probe_batches(task, num_samples=config.num_samples, batch_size=config.select_batch_size, seed=config.seed)]
    return WarmupPrune(stack_path=stack.path, num_layers=stack.num_layers, batches=batches, at_step=at_step, keep=keep, score=config.prune_score)


def dynamic_sampler(config: TrainConfig, model: nn.Module, tokenizer: Any, stack: Any, model_kind: str, task: Any, selection: Any) -> Any:
    """``--dynamic-blocks``: the DynamicBlocks callback (lwlora.training.dynamic) over every
    block's adapters, drawing ``k`` (a share of L below 1, else a count) every ``--dynamic-every``
    steps with probabilities from the blocks' importances, measured here with ``--scorer`` on the
    task's selection samples (recorded in ``selection.diagnostics["dynamic"]``)."""
    from lwlora.training.dynamic import DynamicBlocks, block_probabilities
    from lwlora.training.layers import measure_every_block

    k = max(1, math.floor(config.dynamic_blocks * stack.num_layers)) if config.dynamic_blocks < 1 else int(config.dynamic_blocks)
    if k > stack.num_layers:
        raise ConfigError("--dynamic-blocks", f"{k} blocks at a time, but the model has {stack.num_layers}")
    scored = measure_every_block(config, model.get_base_model(), tokenizer, model_kind, task.selection_texts, stack.num_layers)
    importances = scored.importances
    selection.diagnostics["dynamic"] = {"k": k, "every": config.dynamic_every, "floor": config.dynamic_floor, "scorer": config.scorer, "importances": importances,
                                        "probabilities": [float(p) for p in block_probabilities(importances, config.dynamic_floor)]}
    return DynamicBlocks(importances=importances, k=k, every=config.dynamic_every, floor=config.dynamic_floor, seed=config.seed, model=model, stack_path=stack.path)


def pruned_selection(selection: Any, pruner: Any, saved_state: dict[str, Any] | None) -> Any:
    """The run's selection once WarmupPrune kept its blocks: those blocks, each block's score
    (the size of its adapters' updates at the prune step) as its importance, and the pruning's
    step and counts in ``diagnostics["prune"]``."""
    from lwlora.selection.artifact import LayerRecord

    scores = pruner.scores or [None] * selection.num_layers
    total = sum(s for s in scores if s is not None) or 1.0
    records = [LayerRecord(index=i, cka=None, similarity=None, importance=None if s is None else s / total, degenerate=False, reason=None) for i, s in enumerate(scores)]
    return dataclasses.replace(
        selection,
        selected=list(pruner.kept),
        layers=records,
        scorer=f"prune-{pruner.score}",
        similarity_name="none",
        policy={**selection.policy, "rule": "warmup-prune", "keep": pruner.keep, "at_step": pruner.at_step},
        diagnostics={**selection.diagnostics, "prune": {"at_step": pruner.at_step, "score": pruner.score, "scores": scores, "kept": list(pruner.kept), "removed_params": pruner.removed_params, "resumed_after_prune": saved_state is not None and saved_state["global_step"] >= pruner.at_step}},
    )


def _trainer_class():
    """transformers' Trainer, feeding each training step's loss to the run's RunLoss."""
    from transformers import Trainer

    class LwloraTrainer(Trainer):
        run_loss: Any = None

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001 - Trainer's signature
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.run_loss is not None:
                self.run_loss.add(loss)
            return loss

    return LwloraTrainer


def fsdp_launch() -> int | None:
    """The FSDP version ``accelerate launch`` asked for (its ``ACCELERATE_USE_FSDP`` and
    ``FSDP_VERSION`` environment, which the Trainer's Accelerator reads), else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def sharded_generation(trainer: Any) -> bool:
    """Whether generating with ``trainer``'s model needs every process: under FSDP the model is
    sharded (FSDP2's ``fully_shard`` in place, once the Trainer has prepared it), and each forward
    pass all-gathers the blocks' weights from all processes. Generation on the main process alone
    then fails (gloo: "Connection closed by peer" once the other processes have exited) or hangs."""
    return bool(getattr(trainer, "is_fsdp_enabled", False)) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def planned_steps(config: TrainConfig, num_examples: int, processes: int) -> int:
    """The optimizer steps the whole run makes, as the Trainer counts them: ``--max-steps``, else
    ceil(epochs x steps per epoch), a step being ``--grad-accum`` batches of every process."""
    if config.max_steps:
        return config.max_steps
    batches = math.ceil(num_examples / (config.batch_size * processes))
    return math.ceil(config.epochs * math.ceil(batches / config.grad_accum))


def merge_scores(into: dict[str, dict[str, Any]], scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add ``scores`` (split -> metric -> value) to ``into`` split by split, so a split's generated
    scores (exact match, pass@1) join its teacher-forced loss instead of replacing it."""
    for split, values in scores.items():
        into.setdefault(split, {}).update(values)
    return into


def train(config: TrainConfig, callbacks: list[Any] | None = None) -> TrainResult:
    """Select (if asked), train, evaluate and write RUN; see ``lwlora.training.run_dir``.

    ``callbacks``: ``transformers.TrainerCallback`` instances added to the Trainer (after
    lwlora's own), e.g. to log to a tracker of your own. The main process holds RUN's lock
    (:func:`lwlora.training.run_dir.hold_run`) throughout: a second run writing the same RUN at
    the same time is refused (``--out`` ConfigError)."""
    with hold_run(config.out) if is_main_process() else contextlib.nullcontext():
        return _train(config, callbacks)


def _train(config: TrainConfig, callbacks: list[Any] | None) -> TrainResult:
    from peft import PeftModel
    from transformers import TrainerState, set_seed

    from lwlora.blocks import resolve_block_stack
    from lwlora.models import infer_model_kind
    from lwlora.adapters.placement import apply_selection, verify
    from lwlora.selection.artifact import LayerSelection
    from lwlora.tasks import load_task
    from lwlora.training.agreement import rank_zero_choice
    from lwlora.training.callbacks import DivergenceGuard, RunLoss, check_finite
    from lwlora.training.device import compute_context, place_model, resolve_training_device
    from lwlora.selection.artifact import rule_selection
    from lwlora.training.layers import choose_layers
    from lwlora.training.loading import load_task_model, load_tokenizer
    from lwlora.training.report import plot_loss_curve, summarise_history

    device = resolve_training_device(config.device)  # a missing GPU fails here, before anything else
    if config.liger and device.type != "cuda":
        raise ConfigError("--liger", f"liger-kernel's Triton kernels need a CUDA GPU; this run trains on {device} (drop --liger or use --device cuda)")
    if config.merge and fsdp_launch() is not None:
        raise ConfigError("--merge", "cannot run under FSDP: the trained weights are sharded over the processes, and merging on the main process alone needs the others (PEFT's merge_and_unload gathers them); drop --merge and merge RUN/adapter in one process (PeftModel.from_pretrained(base, RUN/adapter).merge_and_unload())")
    if fsdp_launch() is not None and (config.prune_at is not None or config.dynamic_blocks is not None):
        flag = "--prune-at" if config.prune_at is not None else "--dynamic-blocks"
        raise ConfigError(flag, "supports one process and DDP, not FSDP: FSDP shards the adapters it removes or freezes block by block; launch without the FSDP config (plain accelerate launch / torchrun is DDP)")
    if config.eval_untuned and fsdp_launch() == 2:
        raise ConfigError("--eval-untuned", "cannot run under FSDP2: the Trainer's evaluation before training prepares the model alone, and accelerate's FSDP2 needs the model and its optimizer together (ValueError in Accelerator.prepare); drop --eval-untuned (or measure the untuned model in one process with `lwlora eval`)")
    # Under accelerate launch / torchrun every process runs this function; only the main one
    # checks and writes RUN (the Trainer coordinates checkpoints itself).
    main_process = is_main_process()
    # An overwriting run is written beside the old one (place.work) and replaces it at the end.
    place: RunPlace = prepare_run_dir(config.out, config.identity(), resume=config.resume, overwrite=config.overwrite, optional=LATER_IDENTITY_FIELDS) if main_process else plan_run_dir(config.out, overwrite=config.overwrite)
    run = place.work
    set_seed(config.seed)
    tokenizer, source, gguf_file = load_tokenizer(config.model, task=config.task, gguf_file=config.gguf_file, trust_remote_code=config.trust_remote_code)
    asked = config  # what RUN/train_config.json records (and --resume compares), before lengths are fitted
    config = fit_lengths(config, source, gguf_file, tokenizer)
    task = load_task(
        config.task,
        tokenizer,
        data=config.data,
        text_column=config.text_column,
        text_pair_column=config.text_pair_column,
        label_column=config.label_column,
        instruction_field=config.instruction_field,
        output_field=config.output_field,
        max_length=config.max_length,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
        eval_splits=config.eval_splits,
        selection_samples=config.num_samples if _measures_blocks(config) else 1,
        seed=config.seed,
        packing=config.packing,
    )
    if len(task.train) == 0:
        raise ConfigError("--data", f"task {config.task} has an empty training split")
    model = load_task_model(config.model, source, gguf_file, task, tokenizer, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    # The selection runs on the training device in the training precision; the Trainer then finds
    # the model where it would put it and moves nothing.
    place_model(model, device)
    model_kind = infer_model_kind(model.config)
    stack = resolve_block_stack(model, layers_path=config.layers_path, tower=config.tower)

    selection_path = run / "selection.json"
    if config.resume and selection_path.is_file():
        selection = LayerSelection.load(selection_path)
    elif config.method == "full":
        selection = rule_selection(config.options, stack, model_kind, list(range(stack.num_layers)), "all", model_label=config.model, gguf_file=config.gguf_file)
    else:
        with compute_context(device, bf16=config.bf16, fp16=config.fp16):
            selection = choose_layers(config, model, tokenizer, stack, model_kind, task)

    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        ranks = None
    else:
        task_type = "CAUSAL_LM" if task.kind == "causal_lm" else "SEQ_CLS"
        with compute_context(device, bf16=config.bf16, fp16=config.fp16):
            plan = plan_ranks(config, selection, stack, model, tokenizer, model_kind, task)
        selection, plan = rank_zero_choice(selection, plan)  # every process of a launch adapts the same blocks
        ranks = plan["ranks"]
        extra_modules = [m.strip() for m in config.modules_to_save.split(",") if m.strip()] if config.modules_to_save else []
        if extra_modules:
            check_modules_to_save(model, extra_modules)
        fresh = [m for m in getattr(model, "lwlora_new_head_modules", ()) if not any(m == e or m.endswith("." + e) for e in extra_modules)]
        if fresh:
            logger.warning("training in full the newly initialised module(s) %s (not in the checkpoint; a frozen random layer before the classifier cannot learn)", ", ".join(fresh))
            extra_modules += fresh
        extra_modules = extra_modules or None
        eva = {}
        if config.method == "eva":  # EVA initialises the adapters from the layers' inputs on training examples
            from lwlora.tasks.base import probe_batches

            batches = probe_batches(task, num_samples=config.num_samples, batch_size=config.select_batch_size, seed=config.seed)
            eva = {"init_batches": [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches], "eva_rho": config.eva_rho}
        with compute_context(device, bf16=config.bf16, fp16=config.fp16):
            model = apply_selection(model, selection, method=config.method, r=plan["r"], alpha=plan["alpha"], dropout=config.dropout, target_modules=config.target_modules, task_type=task_type, modules_to_save=extra_modules, **eva, **plan["peft_patterns"])
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = count_parameters(model)
    # Every input is validated by now: only from here on does RUN get files.
    if main_process:
        write_config(run, asked.to_json())
        selection.save(selection_path)

    declare_loss_reduction(model, task)
    guard = DivergenceGuard()
    # every process resumes the same, complete checkpoint; the main one removes incomplete ones
    checkpoint = last_checkpoint(run, remove_incomplete=main_process) if config.resume else None
    saved_state = read_trainer_state(Path(checkpoint)) if checkpoint else None
    run_loss = RunLoss.restore(saved_state)  # the loss of the steps before the resume, as the checkpoint kept it
    planned = planned_steps(config, len(task.train), int(os.environ.get("WORLD_SIZE", "1")))
    pruner = warmup_pruner(config, task, stack, planned, device) if config.prune_at is not None else None
    sampler = None
    if config.dynamic_blocks is not None:
        with compute_context(device, bf16=config.bf16, fp16=config.fp16):
            sampler = dynamic_sampler(config, model, tokenizer, stack, model_kind, task, selection)
    if pruner is not None and checkpoint is not None:
        from lwlora.training.prune import prune_to_saved

        prune_to_saved(model, checkpoint)  # a checkpoint saved after the prune step holds the kept blocks only
    eval_sets = dict(task.eval)
    trainer = _trainer_class()(
        model=model,
        args=_training_arguments(config, run, has_eval=bool(eval_sets), device=device, causal_lm=task.kind == "causal_lm"),
        train_dataset=task.train,
        eval_dataset=eval_sets or None,
        data_collator=task.data_collator,
        compute_metrics=_metrics_function(task) if task.kind != "causal_lm" else None,
        callbacks=[guard, run_loss, *(c for c in (pruner, sampler) if c is not None), *(callbacks or [])],
    )
    trainer.run_loss = run_loss
    untuned: dict[str, dict[str, Any]] = {}
    if config.eval_untuned and task.kind == "causal_lm" and saved_state is None:
        # adapters at initialisation leave the function unchanged (B = 0; PiSSA/EVA keep base + adapter
        # equal to the base). The teacher-forced loss of the references first (every process: the
        # Trainer gathers it), a far finer signal than a few problems' exact match.
        for name, dataset in (eval_sets or {}).items():
            untuned[name] = {"loss": trainer.evaluate(dataset, metric_key_prefix="eval")["eval_loss"]}
        if task.eval_examples and main_process:
            from lwlora.training.evaluate import evaluate_task

            merge_scores(untuned, evaluate_task(model, tokenizer, task, batch_size=config.eval_batch_size or config.batch_size, max_new_tokens=config.max_new_tokens, choice_mode=config.choice_mode, progress=config.progress))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if saved_state is not None and saved_state["global_step"] >= planned:
        # Killed after its last checkpoint: the Trainer would train one step past the end, so the
        # checkpoint's weights and state are taken as they are and the run goes on to evaluation.
        logger.warning(f"{Path(checkpoint).name} already holds step {saved_state['global_step']} of {planned}: nothing left to train; evaluating and saving it")
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        if pruner is not None:  # the callback reads what it kept from the checkpoint (and checks the model)
            pruner.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
        session_loss = None
    else:
        session_loss = trainer.train(resume_from_checkpoint=checkpoint).training_loss
    train_seconds = time.perf_counter() - started
    train_loss = run_loss.mean if run_loss.steps == trainer.state.global_step else session_loss
    check_finite(model, guard, train_loss)  # a diverged run fails here, before any result is written
    if sampler is not None and main_process:  # which blocks trained when
        selection.diagnostics["dynamic"] = {**selection.diagnostics.get("dynamic", {}), "history": [[step, list(active)] for step, active in sampler.history]}
        selection.save(selection_path)
    if pruner is not None and pruner.kept is not None:  # the blocks measured during training are the run's selection
        selection = pruned_selection(selection, pruner, saved_state)
        verify(model, selection, config.target_modules)
        params = count_parameters(model)
        if main_process:
            selection.save(selection_path)

    final: dict[str, Any] = {}
    if eval_sets:
        for name, dataset in eval_sets.items():
            final[name] = {k.removeprefix("eval_"): v for k, v in trainer.evaluate(dataset, metric_key_prefix="eval").items()}
    # Weights are saved through the Trainer on every process (it gathers FSDP shards and writes on
    # the main process only); the main process then moves them into place atomically.
    weights = "adapter" if isinstance(model, PeftModel) else "model"
    staging = run / f".{weights}.tmp"
    trainer.save_model(str(staging))
    if not main_process:  # evaluation by generation and all other writing: the main process only
        if task.kind == "causal_lm" and task.eval_examples and sharded_generation(trainer):
            from lwlora.training.evaluate import evaluate_task

            # the main process generates with the sharded model: each of its forward passes gathers
            # every block from all processes, so they all run the same generation (scores unused)
            evaluate_task(trainer.model, tokenizer, task, batch_size=config.eval_batch_size or config.batch_size, max_new_tokens=config.max_new_tokens, choice_mode=config.choice_mode, progress=False)
        return TrainResult(run_dir=place.target, metrics={"final": final}, selection=selection, model=model, tokenizer=tokenizer, task=task)
    tokenizer.save_pretrained(staging)
    publish_directory(run, weights, staging)

    if task.kind == "causal_lm" and task.eval_examples:
        from lwlora.training.evaluate import evaluate_task

        merge_scores(final, evaluate_task(trainer.model, tokenizer, task, batch_size=config.eval_batch_size or config.batch_size, max_new_tokens=config.max_new_tokens, choice_mode=config.choice_mode, progress=config.progress))
    if config.merge and isinstance(model, PeftModel):
        merged = model.merge_and_unload()
        staging = run / ".merged.tmp"
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish_directory(run, "merged", staging)

    # trainer.train() starts a fresh log history: the untuned losses go in front, as step 0
    history = [{"step": 0, f"eval_{name}_loss": scores["loss"]} for name, scores in untuned.items() if "loss" in scores] + trainer.state.log_history
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    metrics = {
        "task": config.task,
        "model": config.model,
        "method": config.method,
        "layers": config.layers if config.selection is None else f"selection:{config.selection}",
        "selected": selection.selected,
        "num_layers": selection.num_layers,
        "max_length": config.max_length,  # as fitted to the model's positions (lwlora.models.fit_max_length)
        "lowest_adapted_block": min(selection.selected) if selection.selected else None,
        "params": params,
        "adapter_rank": None if config.method == "full" else {"r": plan_r(model), "per_block": ranks, "rank_pattern": rank_pattern_of(model)},
        "cost": run_cost(config, selection, model, params, ranks),
        "train": {
            "runtime_s": round(train_seconds, 3),
            "global_step": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "train_loss": train_loss,  # the mean over every step of the run, resumed ones included (RunLoss)
            "train_loss_this_session": session_loss,
            "tokens": tokens,
            "tokens_per_s": round(tokens / train_seconds, 2) if train_seconds > 0 and tokens else None,
            "resumed_from": checkpoint,
            **_peak_memory(),
        },
        **summarise_history(history),
        "final": final,
        **({"untuned": untuned} if untuned else {}),
    }
    atomic_write_json(run / "metrics.json", _json_safe(metrics))
    if weights == "adapter":  # the base model as the user named it, and a model card of what was trained
        from lwlora.adapters.card import finish_adapter

        finish_adapter(run / weights, model=config.model, gguf_file=gguf_file, selection=selection, metrics=_json_safe(metrics), task=config.task, method=config.method)
    plot_loss_curve(history, run / "loss_curve.png", title=f"{config.task} · {config.method} · blocks {selection.selected}")
    target = finish_run(place)  # an overwriting run replaces the old one only now, complete
    return TrainResult(run_dir=target, metrics=metrics, selection=selection, model=model, tokenizer=tokenizer, task=task)


def rank_pattern_of(model: nn.Module) -> dict[str, int] | None:
    """The adapter's per-module ranks where they differ from r (PEFT's ``rank_pattern``: set by
    ``--rank-allocation importance`` and by EVA's redistribution), else None."""
    config = getattr(model, "peft_config", {}).get("default")
    pattern = dict(getattr(config, "rank_pattern", None) or {})
    return pattern or None


def plan_r(model: nn.Module) -> int | None:
    config = getattr(model, "peft_config", {}).get("default")
    return getattr(config, "r", None)


def run_cost(config: TrainConfig, selection: Any, model: nn.Module, params: dict[str, int], ranks: dict[int, int] | None) -> dict[str, Any]:
    """lwlora.selection.cost.SelectionCost of the trained selection, with the run's real head size."""
    from lwlora.selection.cost import selection_cost
    from lwlora.selection.cost import adapter_targets

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if config.method == "full":
        return {"full_fine_tuning": True, "trainable_params": params["trainable"]}
    from lwlora.adapters.placement import locate_stack

    stack = locate_stack(base, selection)
    suffixes, exact = adapter_targets(stack, config.target_modules)
    r = plan_r(model) or config.r
    cost = selection_cost(stack, selection.selected, suffixes, r, exact=exact, head_params=params["head"], hidden_size=getattr(base.config, "hidden_size", None), seq_len=config.max_length, batch_size=config.batch_size, rank_pattern=ranks)
    if selection.units is not None:  # recounted over the adapted units, not whole blocks
        from lwlora.selection.units import unit_cost, unit_params

        names = suffixes if exact else [n for n in stack.block_linear_modules() if any(n == t or n.endswith("." + t) for t in suffixes)]
        chosen = [2 * u["block"] + (0 if u["part"] == "attention" else 1) for u in selection.units if u["selected"]]
        return unit_cost(cost.to_json(), unit_params(stack, names, r), chosen, head_params=params["head"])
    return cost.to_json()


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
