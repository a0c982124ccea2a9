"""``TrainConfig``: everything ``lwlora train`` takes. Each field is the CLI flag of the same name
(``num_layers`` → ``--num-layers``); ``lwlora run`` reads the same fields from YAML."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from lwlora.errors import ConfigError
from lwlora.options_checks import (
    ALL_SCORERS,
    GRADIENT_SCORERS,
    SIMILARITY_SCORERS,
    DegenerateFallback,
    DType,
    FeatureNorm,
    Pooling,
    Granularity,
    Preset,
    Statistics,
    check_at_least,
    check_budget_options,
    check_choice,
    check_device,
    check_granularity,
    check_measurement,
    check_one_count,
    check_target_modules,
    coerce_fields,
    field_of,
    flag_of,
    unique_blocks,
)
from lwlora.policy import RULES, SelectionPolicy

Method = Literal["lora", "pissa", "dora", "rslora", "olora", "eva", "full"]
TRAIN_METHODS: tuple[str, ...] = typing.get_args(Method)
#: ``--layers``: a scorer (measured) or a rule; see lwlora.training.layers.
LAYER_CHOICES: tuple[str, ...] = ALL_SCORERS
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)

#: Fields that define *what* a run trains; resuming a run directory with other values is refused.
IDENTITY_FIELDS = ("model", "gguf_file", "task", "data", "selection", "layers", "ratio", "num_layers", "method", "r", "alpha", "target_modules", "max_length", "seed")


@dataclass(frozen=True)
class TrainConfig:
    model: str
    task: str
    out: str
    data: str | None = None
    # which blocks get adapters
    selection: str | None = None  # a selection.json (or the directory holding it)
    layers: str = "cka"  # a scorer (cka, cka-debiased, bi, angular, fim, gradnorm), a rule (all, random, first, last) or 0,3,5
    ratio: float | None = None
    num_layers: int | None = None
    # adapters
    method: Method = "lora"
    r: int = 8
    alpha: float | None = None  # default 2 r
    dropout: float = 0.05
    target_modules: str = "auto"  # auto or comma-separated module names
    modules_to_save: str | None = None  # comma-separated modules trained in full besides the head PEFT's task type keeps (e.g. pooler)
    eva_rho: float = 2.0  # --method eva: ranks redistributed by explained variance up to eva_rho x r (1: none)
    # equal-budget baseline and importance-weighted ranks (lwlora.budget)
    budget_from_ratio: float | None = None  # with --layers all: rank scaled to the budget of floor(ratio x L) blocks
    rank_allocation: Literal["uniform", "importance"] = "uniform"
    # measured during training (lwlora.training.prune): LoRA on every block, then keep the best
    prune_at: float | None = None  # with --layers all: prune at this share of the steps (< 1) or step (>= 1) to --ratio (0.5) / --num-layers blocks
    prune_score: Literal["effect", "weight"] = "effect"  # effect: size of each block's adapter updates on selection samples; weight: ||s B A||_F^2
    # importance-sampled dynamic LoRA (lwlora.training.dynamic): adapters everywhere, k trainable at a time
    dynamic_blocks: float | None = None  # with --layers all: blocks trainable at a time, a share of L (< 1) or a count
    dynamic_every: int = 20  # optimizer steps between draws
    dynamic_floor: float = 0.1  # share of the draw probability spread uniformly, so no block starves
    # optimisation
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 16
    eval_batch_size: int | None = None
    grad_accum: int = 1
    max_length: int = 512
    warmup: float = 0.0  # < 1: fraction of the steps; >= 1: number of steps
    weight_decay: float = 0.0
    scheduler: Scheduler = "linear"
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    eval_every: int | None = None  # steps; None = every epoch
    save_every: int | None = None  # steps; None = every epoch
    logging_steps: int = 10
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_splits: str | None = None  # comma-separated splits of a --data directory to evaluate on (default: the first of validation, test)
    packing: bool = False
    # data columns
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    instruction_field: str | None = None
    output_field: str | None = None
    # selection options (used when a scorer measures the blocks: --layers cka with --scorer, or --layers SCORER)
    scorer: str = "cka"  # the similarity of --layers cka: cka, cka-debiased, bi, angular (gradient scorers: --layers fim)
    pooling: Pooling | None = None
    feature_norm: FeatureNorm = "none"
    degenerate_fallback: DegenerateFallback = "exclude"
    statistics: Statistics = "auto"  # what the selection's capture keeps (lwlora select --statistics)
    granularity: Granularity = "block"  # sublayer: score attention and MLP halves apart and fill --ratio of all-layer LoRA's parameters
    num_samples: int = 128
    param_budget: float | None = None
    auto: bool = False
    prefer_shallow: float | None = None
    select_batch_size: int = 8
    preset: Preset | None = None
    layers_path: str | None = None
    tower: Literal["language", "vision"] = "language"  # which tower of a vision-language model gets adapters
    # model loading
    gguf_file: str | None = None
    dtype: DType = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # generation eval (causal tasks)
    max_new_tokens: int = 256
    choice_mode: Literal["letter", "loglik"] = "letter"
    # run directory
    resume: bool = False
    overwrite: bool = False
    merge: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse a bad value or combination here, before anything is loaded or written (every
        entry point builds one: the CLI flags, ``lwlora run``'s YAML, Python callers)."""
        coerce_fields(self)  # types first: the checks below compare typed values
        self._check_layers()
        self._check_adapters()
        self._check_optimisation()
        self._check_selection()
        self._check_run()

    def _check_layers(self) -> None:
        """``--layers`` and the count options: what blocks, and how many."""
        indices = self.layer_indices
        if self.layers not in LAYER_CHOICES and indices is None:
            raise ConfigError("--layers", f"must be one of {', '.join(LAYER_CHOICES)} or block indices like 0,3,5, got {self.layers!r}")
        if indices is not None:
            unique = unique_blocks("--layers", indices)  # warns about a repeated block
            if unique != indices:
                object.__setattr__(self, "layers", ",".join(map(str, unique)))
                indices = unique
        for count in ({"ratio": self.ratio}, {"num_layers": self.num_layers}):
            SelectionPolicy(**count)  # lwlora select's checks: --ratio in (0, 1], --num-layers >= 1
        check_budget_options(self.param_budget, self.prefer_shallow)
        # as in lwlora select: of two count options one would be ignored without a word. (Explicit
        # --layers is not counted: --rank-allocation importance re-measures such a selection with
        # dataclasses.replace(config, num_layers=L), lwlora.training.trainer.plan_ranks.)
        check_one_count([("--ratio", self.ratio is not None), ("--num-layers", self.num_layers is not None), ("--param-budget", self.param_budget is not None), ("--auto", self.auto)])
        if self.selection is not None and self.layers not in ("cka",):
            raise ConfigError("--selection", "give either --selection or --layers, not both")
        if self.method == "full" and self.selection is not None:
            raise ConfigError("--method", "full fine-tuning trains every block; drop --selection")

    def _check_adapters(self) -> None:
        check_at_least("--r", self.r)
        if not self.eva_rho >= 1.0:
            raise ConfigError("--eva-rho", f"must be >= 1 (1: no rank redistribution), got {self.eva_rho}")
        if self.method == "eva" and self.rank_allocation == "importance":
            raise ConfigError("--rank-allocation", "eva sets every layer's rank itself (by explained variance); drop --rank-allocation importance")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError("--alpha", f"must be positive (omit it for the default 2 r), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("--dropout", f"must be in [0, 1), got {self.dropout}")
        check_target_modules(self.target_modules)
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
        counts = ("batch_size", "grad_accum", "max_length", "logging_steps", "max_new_tokens", "select_batch_size", "eval_every", "save_every", "max_steps", "max_train_samples", "max_eval_samples", "eval_batch_size")
        for name in counts:  # None (where allowed): not given
            check_at_least(flag_of(name), getattr(self, name))
        if not self.epochs > 0:
            raise ConfigError("--epochs", f"must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError("--lr", f"must be positive, got {self.lr}")
        if self.warmup < 0:
            raise ConfigError("--warmup", f"must be >= 0 (a fraction below 1, or steps), got {self.warmup}")
        if self.weight_decay < 0:
            raise ConfigError("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.bf16 and self.fp16:
            raise ConfigError("--fp16", "give only one of --bf16 and --fp16")

    def _check_selection(self) -> None:
        """The selection options, as strictly as ``SelectConfig`` checks them (the same shared
        checks), whether or not this run measures: a typo must not wait for a later run."""
        if self.scorer in GRADIENT_SCORERS:  # select_layers raises a ValueError for it, once the model is loaded
            raise ConfigError("--scorer", f"{self.scorer} is a gradient scorer: use --layers {self.scorer} (--scorer is the similarity of --layers cka: {', '.join(SIMILARITY_SCORERS)})")
        if self.scorer in RULES:
            raise ConfigError("--scorer", f"{self.scorer} is a rule, not a scorer: use --layers {self.scorer} (--scorer is the similarity of --layers cka: {', '.join(SIMILARITY_SCORERS)})")
        check_choice("--scorer", self.scorer, SIMILARITY_SCORERS, what="scorer")
        check_at_least("--num-samples", self.num_samples)
        scorer = self.measuring_scorer
        if scorer is not None:
            check_measurement(scorer, feature_norm=self.feature_norm, num_samples=self.num_samples, statistics=self.statistics)
        if self.granularity == "sublayer":
            if scorer is None or self.layers != "cka":
                raise ConfigError("--granularity", "sublayer units are measured by --layers cka (with a similarity --scorer)")
            check_granularity(self.granularity, scorer, given=[("--num-layers", self.num_layers is not None), ("--auto", self.auto), ("--prefer-shallow", self.prefer_shallow is not None),
                                                               ("--rank-allocation", self.rank_allocation != "uniform"), ("--preset", self.preset is not None), ("--budget-from-ratio", self.budget_from_ratio is not None)])
        check_device(self.device)

    def _check_run(self) -> None:
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

    @property
    def measuring_scorer(self) -> str | None:
        """The scorer that measures blocks in this run, or None when none does: ``--layers cka``
        measures with ``--scorer``, ``--layers NAME`` with scorer NAME, and ``--rank-allocation
        importance`` measures a rule-made selection with ``--scorer``."""
        if self.method == "full":
            return None
        if self.dynamic_blocks is not None:  # draw probabilities from the blocks' importances
            return self.scorer
        if self.selection is None and self.layer_indices is None and self.layers not in RULES:
            return self.scorer if self.layers == "cka" else self.layers
        return self.scorer if self.rank_allocation == "importance" else None

    @property
    def layer_indices(self) -> tuple[int, ...] | None:
        return tuple(int(part) for part in self.layers.split(",")) if _is_index_list(self.layers) else None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping (YAML/JSON); keys may use dashes or underscores; unknown keys are an
        error, and so is a bad value: ``--config: FILE: key: what is wrong`` (the same checks as
        the flags of ``lwlora train``, named by the key the user wrote in FILE)."""
        names = {f.name for f in dataclasses.fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - names)
        if unknown:
            raise ConfigError("--config", f"{source}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
        missing = [name for name in ("model", "task", "out") if normalised.get(name) in (None, "")]
        if missing:
            raise ConfigError("--config", f"{source}: missing required key(s) {missing}")
        # lists are the natural YAML for the comma-separated options
        for key in ("layers", "target_modules", "modules_to_save"):
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


def _is_index_list(text: str) -> bool:
    parts = [p.strip() for p in str(text).split(",")]
    return bool(parts) and all(p.isdigit() for p in parts)
