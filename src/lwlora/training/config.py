"""``TrainConfig``: everything ``lwlora train`` takes. Each field is the CLI flag of the same name
(``num_layers`` → ``--num-layers``); ``lwlora run`` reads the same fields from YAML."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from lwlora.errors import ConfigError
from lwlora.policy import RULES

TRAIN_METHODS = ("lora", "pissa", "dora", "rslora", "olora", "full")
#: ``--layers``: a scorer (measured) or a rule; see lwlora.training.layers.
LAYER_CHOICES = ("cka", "cka-debiased", "bi", "angular", "fim", "gradnorm", "all", "random", "first", "last")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")

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
    method: Literal["lora", "pissa", "dora", "rslora", "olora", "full"] = "lora"
    r: int = 8
    alpha: float | None = None  # default 2 r
    dropout: float = 0.05
    target_modules: str = "auto"  # auto or comma-separated module names
    modules_to_save: str | None = None  # comma-separated modules trained in full besides the head PEFT's task type keeps (e.g. pooler)
    # equal-budget baseline and importance-weighted ranks (lwlora.budget)
    budget_from_ratio: float | None = None  # with --layers all: rank scaled to the budget of floor(ratio x L) blocks
    rank_allocation: Literal["uniform", "importance"] = "uniform"
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
    scheduler: str = "linear"
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
    # selection options (used when layers == "cka")
    scorer: str = "cka"
    pooling: str | None = None
    feature_norm: str = "none"
    degenerate_fallback: str = "exclude"
    statistics: Literal["rows", "covariance", "auto"] = "auto"  # what the selection's capture keeps (lwlora select --statistics)
    num_samples: int = 128
    param_budget: float | None = None
    auto: bool = False
    prefer_shallow: float | None = None
    select_batch_size: int = 8
    preset: str | None = None
    layers_path: str | None = None
    tower: Literal["language", "vision"] = "language"  # which tower of a vision-language model gets adapters
    # model loading
    gguf_file: str | None = None
    dtype: str = "auto"
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
        if self.method not in TRAIN_METHODS:
            raise ConfigError("--method", f"unknown method {self.method!r}; choose one of {', '.join(TRAIN_METHODS)}")
        if self.layers not in LAYER_CHOICES and not _is_index_list(self.layers):
            raise ConfigError("--layers", f"must be one of {', '.join(LAYER_CHOICES)} or block indices like 0,3,5, got {self.layers!r}")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ConfigError("--ratio", f"must be in (0, 1], got {self.ratio}")
        if self.ratio is not None and self.num_layers is not None:
            raise ConfigError("--num-layers", "give only one of --ratio and --num-layers")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError("--num-layers", f"must be at least 1, got {self.num_layers}")
        for flag, value in (("--r", self.r), ("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum), ("--max-length", self.max_length), ("--logging-steps", self.logging_steps), ("--max-new-tokens", self.max_new_tokens)):
            if value < 1:
                raise ConfigError(flag, f"must be at least 1, got {value}")
        for flag, value in (("--eval-every", self.eval_every), ("--save-every", self.save_every), ("--max-steps", self.max_steps), ("--max-train-samples", self.max_train_samples), ("--max-eval-samples", self.max_eval_samples), ("--eval-batch-size", self.eval_batch_size)):
            if value is not None and value < 1:
                raise ConfigError(flag, f"must be at least 1, got {value}")
        if not self.epochs > 0 or not math.isfinite(self.epochs):
            raise ConfigError("--epochs", f"must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError("--lr", f"must be positive, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("--dropout", f"must be in [0, 1), got {self.dropout}")
        if self.warmup < 0:
            raise ConfigError("--warmup", f"must be >= 0 (a fraction below 1, or steps), got {self.warmup}")
        if self.weight_decay < 0:
            raise ConfigError("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError("--scheduler", f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.budget_from_ratio is not None:
            if not 0 < self.budget_from_ratio <= 1:
                raise ConfigError("--budget-from-ratio", f"must be in (0, 1], got {self.budget_from_ratio}")
            if self.layers != "all":
                raise ConfigError("--budget-from-ratio", "applies to --layers all (every block at the rank that matches the ratio's parameter budget)")
        if self.rank_allocation not in ("uniform", "importance"):
            raise ConfigError("--rank-allocation", f"must be 'uniform' or 'importance', got {self.rank_allocation!r}")
        if self.rank_allocation == "importance" and self.method == "full":
            raise ConfigError("--rank-allocation", "applies to adapters, not --method full")
        if self.eval_splits is not None and not [part for part in self.eval_splits.split(",") if part.strip()]:
            raise ConfigError("--eval-splits", f"must name at least one split, e.g. validation,test; got {self.eval_splits!r}")
        if self.statistics not in ("rows", "covariance", "auto"):
            raise ConfigError("--statistics", f"must be 'rows', 'covariance' or 'auto', got {self.statistics!r}")
        if self.statistics == "covariance" and self.selection is None and self.method != "full" and self.layer_indices is None and self.layers not in RULES:
            from lwlora.select import resolve_statistics

            resolve_statistics(self.statistics, self.scorer if self.layers == "cka" else self.layers)  # the measuring scorer must use statistics
        if self.tower not in ("language", "vision"):
            raise ConfigError("--tower", f"must be 'language' or 'vision', got {self.tower!r}")
        if self.modules_to_save is not None:
            if not [part for part in self.modules_to_save.split(",") if part.strip()]:
                raise ConfigError("--modules-to-save", f"must name at least one module, e.g. pooler; got {self.modules_to_save!r}")
            if self.method == "full":
                raise ConfigError("--modules-to-save", "applies to adapters; --method full trains every module already")
        if self.choice_mode not in ("letter", "loglik"):
            raise ConfigError("--choice-mode", f"must be 'letter' or 'loglik', got {self.choice_mode!r}")
        if self.bf16 and self.fp16:
            raise ConfigError("--fp16", "give only one of --bf16 and --fp16")
        if self.resume and self.overwrite:
            raise ConfigError("--overwrite", "give only one of --resume and --overwrite")
        if self.selection is not None and self.layers not in ("cka",):
            raise ConfigError("--selection", "give either --selection or --layers, not both")
        if self.method == "full" and self.selection is not None:
            raise ConfigError("--method", "full fine-tuning trains every block; drop --selection")

    @property
    def layer_indices(self) -> tuple[int, ...] | None:
        return tuple(int(part) for part in self.layers.split(",")) if _is_index_list(self.layers) else None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a mapping (YAML/JSON); keys may use dashes or underscores; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - names)
        if unknown:
            raise ConfigError("--config", f"{source}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
        missing = [name for name in ("model", "task", "out") if normalised.get(name) in (None, "")]
        if missing:
            raise ConfigError("--config", f"{source}: missing required key(s) {missing}")
        if "layers" in normalised and not isinstance(normalised["layers"], str):
            value = normalised["layers"]
            normalised["layers"] = ",".join(str(i) for i in value) if isinstance(value, (list, tuple)) else str(value)
        for key in ("target_modules", "modules_to_save"):
            if isinstance(normalised.get(key), (list, tuple)):
                normalised[key] = ",".join(normalised[key])
        return cls(**normalised)

    def identity(self) -> dict[str, Any]:
        data = self.to_json()
        return {name: data[name] for name in IDENTITY_FIELDS}


def _is_index_list(text: str) -> bool:
    parts = [p.strip() for p in str(text).split(",")]
    return bool(parts) and all(p.isdigit() for p in parts)
