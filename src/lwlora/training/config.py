"""``TrainConfig``: everything ``lwlora train`` takes, and ``lwlora run``'s YAML keys.

A run is a source (model, task, data), the choice of blocks (``options``: the
:class:`~lwlora.selection.options.SelectOptions` that ``lwlora select`` takes too) and the
training itself (adapters, optimisation, run directory). Every field is the CLI flag of the same
name (``num_layers`` → ``--num-layers``) and a YAML key. The YAML configs and ``train`` flags
spell the choice of blocks flat, and so may Python callers (``TrainConfig(..., ratio=0.5)``):

- ``layers``: how the blocks are chosen — ``cka`` (measured with ``--scorer``, the paper's
  method), another scorer (``fim``, ``bi``, ...), a rule (``all``, ``first``, ``last``,
  ``random``) or block indices ``0,3,5``; read back as the property ``config.layers``;
- ``select_batch_size``: the options' ``batch_size`` (``batch_size`` is the training batch);
- ``seed``: the run's seed (default 42), also that of the selection samples;
- every other option by its own name (``ratio``, ``num_samples``, ``pooling``, ``r``, ...).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from typing import Any, Literal

from lwlora.errors import ConfigError
from lwlora.fields import check_at_least, check_choice, coerce_fields, field_of, flag_of, init_holding, option
from lwlora.selection.options import (
    ALL_SCORERS,
    GRADIENT_SCORERS,
    OPTION_NAMES,
    SCORER_NAMES,
    SIMILARITY_SCORERS,
    DType,
    SelectOptions,
    check_device,
    check_measurement,
)
from lwlora.selection.policy import RULES
from lwlora.training.modes import expand_preset

Method = Literal["lora", "pissa", "dora", "rslora", "olora", "eva", "full"]
TRAIN_METHODS: tuple[str, ...] = typing.get_args(Method)
#: ``--layers`` names: a scorer (measured) or a rule; also block indices like 0,3,5
LAYER_CHOICES: tuple[str, ...] = ALL_SCORERS
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)
#: the run's seed when none is given (the selection samples are drawn with it too)
DEFAULT_SEED = 42

#: Fields that define *what* a run trains; resuming a run directory with other values is refused.
IDENTITY_FIELDS = ("model", "gguf_file", "task", "data", "selection", "layers", "ratio", "num_layers", "method", "r", "alpha", "target_modules", "max_length", "seed",
                   # the adapters' shapes and what is pruned or sampled (a checkpoint of other ranks would not load)
                   "param_budget", "granularity", "budget_from_ratio", "rank_allocation", "eva_rho", "modules_to_save", "prune_at", "prune_score", "dynamic_blocks")
#: identity fields that train_config.json files of earlier versions may lack: compared where recorded
LATER_IDENTITY_FIELDS = IDENTITY_FIELDS[IDENTITY_FIELDS.index("param_budget"):]
#: how TrainConfig's flat spellings (``to_json``, YAML, flags) name options' fields
FLAT_ALIASES = {"select_batch_size": "batch_size"}


def _translate(flat: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The flat spellings of the options (module docstring) as SelectOptions fields."""
    flat = dict(flat)
    for alias, name in FLAT_ALIASES.items():
        if alias in flat:
            flat[name] = flat.pop(alias)
    scorer = flat.pop("scorer", None)
    if scorer is not None:
        if scorer in GRADIENT_SCORERS:  # select_layers would fail on it once the model is loaded
            raise ConfigError("--scorer", f"{scorer} is a gradient scorer: use --layers {scorer} (--scorer is the similarity of --layers cka: {', '.join(SIMILARITY_SCORERS)})")
        if scorer in RULES:
            raise ConfigError("--scorer", f"{scorer} is a rule, not a scorer: use --layers {scorer} (--scorer is the similarity of --layers cka: {', '.join(SIMILARITY_SCORERS)})")
        check_choice("--scorer", scorer, SIMILARITY_SCORERS, what="scorer")
        flat["scorer"] = scorer
    if "layers" in flat:
        flat.update(_layers_fields(flat.pop("layers"), scorer, values.get("options")))
    if "seed" not in flat and values.get("options") is None:
        flat["seed"] = DEFAULT_SEED
    return flat


def _layers_fields(layers: Any, scorer: str | None, base: SelectOptions | None) -> dict[str, Any]:
    """The options a ``--layers`` value sets (see the module docstring)."""
    if isinstance(layers, (list, tuple)):
        layers = ",".join(str(i) for i in layers)
    text = str(layers).strip()
    indices = _index_list(text)
    if indices is not None:
        return {"layers": indices, "rule": "top"}
    if text == "cka":
        measured = scorer or (base.scorer if base is not None and base.scorer in SIMILARITY_SCORERS else "cka")
        return {"layers": None, "rule": "top", "scorer": measured}
    if text in SCORER_NAMES:
        return {"layers": None, "rule": "top", "scorer": text}
    if text in RULES:
        return {"layers": None, "rule": text}
    raise ConfigError("--layers", f"must be one of {', '.join(LAYER_CHOICES)} or block indices like 0,3,5, got {layers!r}")


def _index_list(text: str) -> tuple[int, ...] | None:
    parts = [p.strip() for p in text.split(",")]
    return tuple(int(p) for p in parts) if parts and all(p.isdigit() for p in parts) else None


@dataclass(frozen=True, init=False)
class TrainConfig:
    """What one ``lwlora train`` run is (see the module docstring)."""

    # the source
    model: str = option(help="Hub id, local directory, or builtin:minilm / builtin:smollm2")
    task: str = option(help="task preset (see `lwlora train --help` epilog), e.g. glue/rte, classification, instruction, gsm-symbolic")
    out: str = option(help="run directory RUN")
    data: str | None = option(None, "data override: file, directory of splits, Hub name[:config][:split]")
    text_column: str | None = option(None, "classification: the text column (default: detected)")
    text_pair_column: str | None = option(None, "classification: the second text column of sentence pairs")
    label_column: str | None = option(None, "classification: the label column (default: label)")
    instruction_field: str | None = option(None, "instruction tasks: the prompt field (default: instruction, query, question or prompt)")
    output_field: str | None = option(None, "instruction tasks: the response field (default: output, response, answer or completion)")
    gguf_file: str | None = option(None, "GGUF file inside MODEL (dequantized on load)")
    dtype: DType = option("auto", "weights' dtype on load: auto (the checkpoint's), float32, bfloat16, float16")
    device: str = option("auto", "auto (the GPU when there is one, else cpu), cpu, cuda, cuda:N, mps; a device the machine lacks is an error")
    trust_remote_code: bool = option(False, "allow the model's own code from the Hub")
    # which blocks: a saved selection, or the options (``--layers`` and the selection flags)
    selection: str | None = option(None, "use this selection.json (or a directory holding one) instead of --layers")
    options: SelectOptions = option(SelectOptions(seed=DEFAULT_SEED), "how the blocks are chosen", cli=False)
    # adapters
    method: Method = option("lora", "lora, pissa, dora, rslora, olora, eva (PEFT's data-driven init, ranks redistributed by explained variance), or full (full fine-tuning)")
    alpha: float | None = option(None, "LoRA alpha (default 2 r)")
    dropout: float = option(0.05, "LoRA dropout")
    modules_to_save: str | None = option(None, "comma-separated modules trained in full besides the head PEFT's task type keeps (e.g. pooler)")
    eva_rho: float = option(2.0, "--method eva: a layer's rank may grow to eva_rho x r as ranks are redistributed (1: no redistribution)")
    budget_from_ratio: float | None = option(None, "with --layers all: every block at the rank whose adapter parameters equal floor(ratio x L) blocks at --r (the equal-budget baseline)")
    rank_allocation: Literal["uniform", "importance"] = option("uniform", "uniform (--r everywhere) or importance (ranks grow with block importance, same total)")
    prune_at: float | None = option(None, "with --layers all: train LoRA on every block, then at this share of the steps (< 1) or step (>= 1) keep the --ratio (0.5) / --num-layers blocks whose adapters change their layers' outputs most (docs/prune.md)")
    prune_score: Literal["effect", "weight", "relative"] = option("effect", "--prune-at: effect (size of each block's adapter updates on --num-samples training examples), weight (||s B A||_F^2, data-free) or relative (each update against its base layer's output, mean over the block's modules)")
    dynamic_blocks: float | None = option(None, "with --layers all: adapters on every block, this many trainable at a time (a share of the blocks below 1, or a count), drawn by --scorer importance (docs/dynamic.md)")
    dynamic_every: int = option(20, "--dynamic-blocks: optimizer steps between draws")
    dynamic_floor: float = option(0.1, "--dynamic-blocks: share of the draw probability spread uniformly so no block starves")
    # optimisation (the HF Trainer's)
    epochs: float = option(3.0, "training epochs")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides --epochs)")
    lr: float = option(2e-4, "peak learning rate")
    batch_size: int = option(16, "training batch per device (the global batch is batch x grad-accum x processes)")
    eval_batch_size: int | None = option(None, "evaluation batch (default --batch-size); for causal-LM tasks the generation batch")
    grad_accum: int = option(1, "gradient accumulation steps")
    warmup: float = option(0.0, "learning-rate warm-up: a fraction of the steps below 1, else a number of steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    scheduler: Scheduler = option("linear", "learning-rate schedule")
    optim: str = option("adamw_torch", "the Trainer's optimizer (TrainingArguments.optim: adamw_torch, adamw_torch_fused, adafactor, paged_adamw_8bit, ...)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: none)")
    bf16: bool = option(False, "bf16 mixed precision")
    fp16: bool = option(False, "fp16 mixed precision")
    gradient_checkpointing: bool = option(False, "non-reentrant activation checkpointing (frozen lower blocks still skip backward)")
    liger: bool = option(False, "liger-kernel's Triton kernels through the Trainer (TrainingArguments.use_liger_kernel): a causal LM's loss fused with its output layer, chunk by chunk, so the vocabulary-sized logits never exist whole; needs pip install liger-kernel and a CUDA GPU")
    deepspeed: str | None = option(None, "a DeepSpeed config file for the Trainer (TrainingArguments.deepspeed)")
    report_to: str = option("none", "where the Trainer logs: none, tensorboard, wandb, ... (comma-separated; TrainingArguments.report_to)")
    eval_every: int | None = option(None, "evaluate every N steps (default: every epoch)")
    save_every: int | None = option(None, "checkpoint every N steps (default: every epoch)")
    logging_steps: int = option(10, "log the training loss every N steps")
    max_train_samples: int | None = option(None, "use at most this many training examples (seeded)")
    max_eval_samples: int | None = option(None, "evaluate on at most this many examples per split")
    eval_splits: str | None = option(None, "comma-separated splits of a --data directory to evaluate on (default: the first of validation, test)")
    packing: bool = option(False, "pack instruction examples into --max-length blocks")
    # generation eval (causal tasks)
    eval_untuned: bool = option(False, "causal-LM tasks: also evaluate the model before training (metrics.json 'untuned'), to read the score against")
    max_new_tokens: int = option(256, "generation evaluation: tokens generated per answer")
    choice_mode: Literal["letter", "loglik"] = option("letter", "multiple-choice evaluation: letter (generated) or loglik (most likely option letter)")
    # run directory
    resume: bool = option(False, "continue the run in --out from its last complete checkpoint")
    overwrite: bool = option(False, "replace the run in --out (the old one is kept until the new one finished)")
    merge: bool = option(False, "also save base + adapter merged into RUN/merged")
    progress: bool = option(True, "show progress bars")

    def __init__(self, model: str, task: str, out: str, **values: Any) -> None:
        values = expand_preset(values)  # --preset recommended: the fields it stands for
        init_holding(self, {"model": model, "task": task, "out": out, **values}, nested="options", nested_type=SelectOptions, translate=_translate)

    def __getattr__(self, name: str) -> Any:
        """The options' fields read flat (``config.ratio``, ``config.r``), and ``select_batch_size``."""
        options = object.__getattribute__(self, "options")
        if name in OPTION_NAMES:
            return getattr(options, name)
        for alias, field_name in FLAT_ALIASES.items():
            if name == alias:
                return getattr(options, field_name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self) -> None:
        """Refuse a bad value or combination here, before anything is loaded or written (every
        entry point builds one: the CLI flags, ``lwlora run``'s YAML, Python callers)."""
        coerce_fields(self, skip=("options",))  # types first (the options coerced themselves)
        self._check_layers()
        self._check_adapters()
        self._check_optimisation()
        self._check_selection()
        self._check_run()

    # ------------------------------------------------------------------------- what --layers is

    @property
    def layers(self) -> str:
        """How the blocks are chosen, as ``--layers`` spells it: indices, a rule, ``cka`` (a
        similarity scorer, ``--scorer``) or a gradient scorer."""
        options = self.options
        if options.layers is not None:
            return ",".join(map(str, options.layers))
        if not options.measures:
            return options.rule
        return "cka" if options.scorer in SIMILARITY_SCORERS else options.scorer

    @property
    def layer_indices(self) -> tuple[int, ...] | None:
        return self.options.layers

    @property
    def measuring_scorer(self) -> str | None:
        """The scorer that measures blocks in this run, or None when none does: the choice
        itself (``--layers cka`` with ``--scorer``, ``--layers SCORER``), ``--dynamic-blocks``
        (draw probabilities), or ``--rank-allocation importance`` over a rule-made selection."""
        if self.method == "full":
            return None
        options = self.options
        if self.dynamic_blocks is not None:
            return options.scorer
        if self.selection is None and options.layers is None and options.measures:
            return options.scorer
        return options.scorer if self.rank_allocation == "importance" else None

    # ------------------------------------------------------------------------- checks

    def _check_layers(self) -> None:
        if self.selection is not None and self.layers != "cka":
            raise ConfigError("--selection", "give either --selection or --layers, not both")
        if self.method == "full" and self.selection is not None:
            raise ConfigError("--method", "full fine-tuning trains every block; drop --selection")

    def _check_adapters(self) -> None:
        if not self.eva_rho >= 1.0:
            raise ConfigError("--eva-rho", f"must be >= 1 (1: no rank redistribution), got {self.eva_rho}")
        if self.method == "eva" and self.rank_allocation == "importance":
            raise ConfigError("--rank-allocation", "eva sets every layer's rank itself (by explained variance); drop --rank-allocation importance")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError("--alpha", f"must be positive (omit it for the default 2 r), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("--dropout", f"must be in [0, 1), got {self.dropout}")
        if self.modules_to_save is not None:
            if not [part for part in self.modules_to_save.split(",") if part.strip()]:
                raise ConfigError("--modules-to-save", f"must name at least one module, e.g. pooler; got {self.modules_to_save!r}")
            if self.method == "full":
                raise ConfigError("--modules-to-save", "applies to adapters; --method full trains every module already")
        if self.budget_from_ratio is not None:
            if not 0 < self.budget_from_ratio <= 1:
                raise ConfigError("--budget-from-ratio", f"must be in (0, 1], got {self.budget_from_ratio}")
            if self.layers != "all":
                raise ConfigError("--budget-from-ratio", "applies to --layers all (every block at the rank that matches the ratio's parameter budget)")
        if self.rank_allocation == "importance" and self.method == "full":
            raise ConfigError("--rank-allocation", "applies to adapters, not --method full")

    def _check_optimisation(self) -> None:
        for name in ("batch_size", "grad_accum", "logging_steps", "max_new_tokens", "eval_every", "save_every", "max_steps", "max_train_samples", "max_eval_samples", "eval_batch_size"):
            check_at_least(flag_of(name), getattr(self, name))  # None (where allowed): not given
        if not self.epochs > 0:
            raise ConfigError("--epochs", f"must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError("--lr", f"must be positive, got {self.lr}")
        if self.warmup < 0:
            raise ConfigError("--warmup", f"must be >= 0 (a fraction below 1, or steps), got {self.warmup}")
        if self.weight_decay < 0:
            raise ConfigError("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise ConfigError("--max-grad-norm", f"must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.bf16 and self.fp16:
            raise ConfigError("--fp16", "give only one of --bf16 and --fp16")
        if not [part for part in self.report_to.split(",") if part.strip()]:
            raise ConfigError("--report-to", f"must be none or comma-separated integrations (tensorboard, wandb, ...); got {self.report_to!r}")

    def _check_selection(self) -> None:
        """The options checked themselves; what depends on the run is checked here."""
        options = self.options
        scorer = self.measuring_scorer
        if scorer is not None:
            check_measurement(scorer, feature_norm=options.feature_norm, num_samples=options.num_samples, statistics=options.statistics)
        if options.tower not in ("language", "vision"):
            raise ConfigError("--tower", f"training adapts the language or the vision tower, got {options.tower!r}")
        if options.granularity == "sublayer":
            if self.layers != "cka":
                raise ConfigError("--granularity", "sublayer units are measured by --layers cka (with a similarity --scorer)")
            for flag, given in (("--rank-allocation", self.rank_allocation != "uniform"), ("--budget-from-ratio", self.budget_from_ratio is not None)):
                if given:
                    raise ConfigError(flag, "does not apply with --granularity sublayer (units fill a parameter budget: give --ratio or --param-budget)")
        check_device(self.device)

    def _check_run(self) -> None:
        if self.liger and importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("--liger", "needs the liger-kernel package: pip install liger-kernel (its Triton kernels run on a CUDA GPU)")
        if self.dynamic_blocks is not None:
            if not self.dynamic_blocks > 0:
                raise ConfigError("--dynamic-blocks", f"must be positive (a share of the blocks below 1, or a count), got {self.dynamic_blocks}")
            if self.layers != "all" or self.selection is not None:
                raise ConfigError("--dynamic-blocks", "puts adapters on every block and trains some at a time: use it with --layers all")
            if self.prune_at is not None:
                raise ConfigError("--prune-at", "give only one of --prune-at and --dynamic-blocks")
            if self.method == "full":
                raise ConfigError("--dynamic-blocks", "samples adapter blocks; it does not apply to --method full")
            check_at_least("--dynamic-every", self.dynamic_every)
            if not 0.0 <= self.dynamic_floor <= 1.0:
                raise ConfigError("--dynamic-floor", f"must be in [0, 1], got {self.dynamic_floor}")
        if self.prune_at is not None:
            if not self.prune_at > 0:
                raise ConfigError("--prune-at", f"must be positive (a share of the steps below 1, or a step), got {self.prune_at}")
            if self.layers != "all" or self.selection is not None:
                raise ConfigError("--prune-at", "starts from LoRA on every block: use it with --layers all (the blocks kept are measured during training)")
            for flag, present in (("--budget-from-ratio", self.budget_from_ratio is not None), ("--rank-allocation", self.rank_allocation != "uniform"), ("--method", self.method not in ("lora", "rslora", "eva"))):
                if present:
                    raise ConfigError(flag, "does not combine with --prune-at (pruning keeps whole blocks of plain LoRA adapters)")
        if self.eval_splits is not None and not [part for part in self.eval_splits.split(",") if part.strip()]:
            raise ConfigError("--eval-splits", f"must name at least one split, e.g. validation,test; got {self.eval_splits!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--overwrite", "give only one of --resume and --overwrite")

    # ------------------------------------------------------------------------- flat form

    def to_json(self) -> dict[str, Any]:
        """The flat form (the YAML keys; ``train_config.json``): every own field, the options'
        fields by their flat spellings (module docstring), ``layers`` as ``--layers`` spells it."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        options = dataclasses.asdict(self.options)
        flat = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if k not in ("layers", "rule", *FLAT_ALIASES.values())}
        flat.update({alias: options[name] for alias, name in FLAT_ALIASES.items()})
        return {**own, "layers": self.layers, **flat}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping (YAML/JSON); keys may use dashes or underscores; unknown keys are an
        error, and so is a bad value: ``--config: FILE: key: what is wrong`` (the same checks as
        the flags of ``lwlora train``, named by the key the user wrote in FILE)."""
        names = set(flat_keys())
        normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - names)
        if unknown:
            raise ConfigError("--config", f"{source}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
        missing = [name for name in ("model", "task", "out") if normalised.get(name) in (None, "")]
        if missing:
            raise ConfigError("--config", f"{source}: missing required key(s) {missing}")
        # lists are the natural YAML for the comma-separated options
        for key in ("target_modules", "modules_to_save", "report_to"):
            value = normalised.get(key)
            if isinstance(value, (list, tuple)):
                normalised[key] = ",".join(str(item) for item in value)
        if isinstance(normalised.get("layers"), int) and not isinstance(normalised["layers"], bool):
            normalised["layers"] = str(normalised["layers"])  # layers: 3 is block 3
        try:
            return cls(**normalised)
        except ConfigError as exc:
            key = field_of(exc.flag)
            raise ConfigError("--config", f"{source}: {key if key in names else exc.flag}: {exc.message}") from None

    def identity(self) -> dict[str, Any]:
        data = self.to_json()
        return {name: data[name] for name in IDENTITY_FIELDS}


def flat_keys() -> list[str]:
    """Every key of the flat form (YAML, ``to_json``): own fields, ``layers``, the options' fields
    by their flat spellings."""
    own = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "options"]
    options = [FLAT_ALIASES_INVERSE.get(name, name) for name in OPTION_NAMES if name not in ("layers", "rule")]
    return [*own, "layers", *options]


FLAT_ALIASES_INVERSE = {name: alias for alias, name in FLAT_ALIASES.items()}
