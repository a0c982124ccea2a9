"""``SelectOptions``: how the blocks that get adapters are chosen, defined once for ``lwlora
select``, ``train``, ``compare`` and ``run`` (``SelectConfig`` and ``TrainConfig`` hold one).

What is measured (``scorer``: a similarity of each block's input and output, or a gradient probe),
how the blocks are chosen from it (``rule``: the top ones by ``ratio`` / ``num_layers`` / a
parameter budget, or a rule that needs no score), and how the measurement is made (samples,
pooling, statistics, ...). Every field validates itself when the options are built, so a bad value
is one ``ConfigError`` naming its flag before anything is loaded. The module imports no torch on
purpose (a ``TrainConfig`` is built without it); the few facts it needs of the scorers and the
capture are restated here, and ``tests/test_config_validation.py`` checks that both copies agree.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lwlora.errors import ConfigError
from lwlora.fields import check_at_least, check_choice, coerce_fields, option
from lwlora.selection.policy import RULES, SelectionPolicy, paper_policy

logger = logging.getLogger("lwlora")

#: Choice-valued options as types: a field annotated with one is checked by :func:`coerce_fields`,
#: and ``lwlora train`` offers its values as the flag's choices. Each tuple is the same list.
Pooling = Literal["cls", "last", "mean"]
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)  # = lwlora.selection.capture.POOLINGS
Statistics = Literal["rows", "covariance", "auto"]
STATISTICS: tuple[str, ...] = typing.get_args(Statistics)  # = lwlora.selection.capture.STATISTICS
FeatureNorm = Literal["none", "standardize"]
FEATURE_NORMS: tuple[str, ...] = typing.get_args(FeatureNorm)  # = lwlora.selection.scoring.FEATURE_NORMS
DegenerateFallback = Literal["exclude", "mean"]
Preset = Literal["paper", "recommended"]  # recommended: a training mode (lwlora.training.modes)
DType = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
DTYPES: tuple[str, ...] = typing.get_args(DType)  # = the keys of lwlora.models.DTYPES
#: What lwlora.models.resolve_device and lwlora.training.device.parse_device place a model on.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class ScorerFacts:
    """What validation needs to know of a similarity scorer of ``lwlora.selection.scoring.SCORERS``."""

    min_samples: int  # CKA of fewer samples is undefined (debiased CKA: n >= 4)
    cka: bool  # a CKA scorer: --feature-norm applies
    streams: bool  # scores from covariance statistics (--statistics covariance)


#: = lwlora.selection.scoring.SCORERS, in the same order
SIMILARITY_SCORERS: dict[str, ScorerFacts] = {
    "cka": ScorerFacts(min_samples=2, cka=True, streams=True),
    "cka-debiased": ScorerFacts(min_samples=4, cka=True, streams=False),
    "bi": ScorerFacts(min_samples=1, cka=False, streams=False),
    "angular": ScorerFacts(min_samples=1, cka=False, streams=False),
}
#: = the keys of lwlora.selection.gradients.GRADIENT_SCORERS
GRADIENT_SCORERS: tuple[str, ...] = ("fim", "gradnorm")
#: what measures the blocks (``--scorer``)
SCORER_NAMES: tuple[str, ...] = (*SIMILARITY_SCORERS, *GRADIENT_SCORERS)
#: every name that chooses blocks: a scorer (top blocks by it) or a rule (``lwlora select
#: --scorer``, ``lwlora train --layers``, ``compare --methods``)
ALL_SCORERS: tuple[str, ...] = (*SCORER_NAMES, *RULES)
Rule = Literal["top", "all", "first", "last", "random"]


def check_device(device: str) -> None:
    """``--device`` syntax, checked without torch (whether the device exists is checked on use)."""
    if DEVICE_PATTERN.fullmatch(device) is None:
        raise ConfigError("--device", f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def check_target_modules(target_modules: str) -> None:
    """``auto`` or at least one module name: an empty list would give PEFT nothing to adapt,
    which it reports only after the run directory is written."""
    if target_modules != "auto" and not [part for part in target_modules.split(",") if part.strip()]:
        raise ConfigError("--target-modules", f"must be auto or comma-separated module names such as q_proj,v_proj; got {target_modules!r}")


# --- the selection ------------------------------------------------------------------------


def check_measurement(scorer: str, *, feature_norm: str, num_samples: int, statistics: str, bootstrap: int = 0) -> None:
    """The options whose validity depends on the scorer that measures the blocks (a name of
    :data:`ALL_SCORERS`): ``--feature-norm`` applies to CKA scorers only, the scorer's minimum
    ``--num-samples``, and ``--statistics``."""
    facts = SIMILARITY_SCORERS.get(scorer)
    if feature_norm != "none" and (facts is None or not facts.cka):
        raise ConfigError("--feature-norm", f"applies to the CKA scorers, not {scorer!r}")
    min_samples = facts.min_samples if facts is not None else 1
    if num_samples < min_samples:
        raise ConfigError("--num-samples", f"the {scorer} scorer needs at least {min_samples} samples, got {num_samples}")
    check_statistics(statistics, scorer, bootstrap=bootstrap)


def check_statistics(statistics: str, scorer: str, *, bootstrap: int = 0) -> None:
    """``--statistics``: ``covariance`` keeps no rows, so it serves only a scorer that streams
    (plain linear CKA) and no ``--bootstrap`` (which resamples rows). Same rules as
    ``lwlora.selection.pipeline.resolve_statistics``, which also decides what ``auto`` becomes."""
    facts = SIMILARITY_SCORERS.get(scorer)
    if statistics == "covariance" and (facts is None or not facts.streams):
        raise ConfigError("--statistics", f"covariance statistics serve only plain linear CKA (cka), not the {scorer} scorer; use cka, or --statistics auto or rows")
    if statistics == "covariance" and bootstrap:
        raise ConfigError("--statistics", "covariance keeps no rows, and --bootstrap resamples them; use --statistics auto or rows, or --bootstrap 0")


def check_one_count(given: Sequence[tuple[str, bool]]) -> None:
    """At most one of the options that decide how many blocks are selected (``--ratio``,
    ``--num-layers``, explicit ``--layers``, ``--param-budget``, ``--auto``): with two, one of
    them would be silently ignored."""
    counts = [flag for flag, present in given if present]
    if len(counts) > 1:
        raise ConfigError(counts[-1], f"give only one of {', '.join(counts)}")


def check_budget_options(param_budget: float | None, prefer_shallow: float | None) -> None:
    """``--param-budget`` (a fraction <= 1 or a count, positive) and ``--prefer-shallow`` (a
    share of the total importance, in [0, 1))."""
    if param_budget is not None and not param_budget > 0:
        raise ConfigError("--param-budget", f"must be positive (a fraction <= 1 of all-layer LoRA parameters, or a count), got {param_budget}")
    if prefer_shallow is not None and not 0 <= prefer_shallow < 1:
        raise ConfigError("--prefer-shallow", f"must be in [0, 1): the share of total importance one may give up, got {prefer_shallow}")


def unique_blocks(flag: str, blocks: Sequence[int]) -> tuple[int, ...]:
    """``blocks`` without repeats (first occurrence kept), warning when there were any: a block
    named twice is adapted once, and the user likely mistyped another one."""
    unique = tuple(dict.fromkeys(blocks))
    if len(unique) < len(blocks):
        repeated = sorted({b for b in blocks if list(blocks).count(b) > 1})
        logger.warning(f"{flag} names block(s) {repeated} more than once; using {','.join(map(str, unique))}")
    return unique


Granularity = Literal["block", "sublayer"]


def check_granularity(granularity: str, scorer: str, *, given: Sequence[tuple[str, bool]]) -> None:
    """``--granularity sublayer`` scores attention and MLP halves with a similarity scorer and
    fills a parameter budget (``--ratio`` or ``--param-budget``, a fraction of all-layer LoRA's
    parameters); options that count or pin whole blocks have no meaning there and are refused
    rather than ignored. ``given``: (flag, present) of those options."""
    if granularity == "block":
        return
    if scorer not in SIMILARITY_SCORERS:
        raise ConfigError("--granularity", f"sublayer units are scored by a similarity scorer ({', '.join(SIMILARITY_SCORERS)}), not {scorer!r}")
    refused = [flag for flag, present in given if present]
    if refused:
        raise ConfigError(refused[0], "does not apply with --granularity sublayer (units fill a parameter budget: give --ratio or --param-budget)")


TOWER_NAMES: tuple[str, ...] = ("language", "vision", "audio")  # = lwlora.blocks.TOWERS


@dataclass(frozen=True)
class SelectOptions:
    """How the blocks that get adapters are chosen (see the module docstring). Each field is a
    flag of ``lwlora select`` / ``train`` / ``compare`` / ``run`` and a YAML key of the same name."""

    # what is measured, and how blocks are chosen from it
    scorer: str = option("cka", "what measures the blocks: cka (the paper), cka-debiased, bi, angular (input/output similarity); fim, gradnorm (gradient probes: need labelled inputs)")
    rule: Rule = option("top", "how blocks are chosen: top (the most important by --scorer), or a rule needing no score: all, first, last, random (seeded)")
    ratio: float | None = option(None, "choose floor(ratio x L) blocks (default 0.5, the paper's rule)")
    num_layers: int | None = option(None, "choose this many blocks")
    layers: tuple[int, ...] | None = option(None, "explicit blocks, e.g. 0,3,5 (lwlora select still reports every block's score)")
    include: tuple[int, ...] = option((), "blocks always chosen, e.g. 0,1")
    exclude: tuple[int, ...] = option((), "blocks never chosen")
    param_budget: float | None = option(None, "choose by adapter parameters: a fraction (<= 1) of all-layer LoRA's, or a count")
    auto: bool = option(False, "choose as many blocks as the point of the sorted importance curve farthest from its chord says")
    prefer_shallow: float | None = option(None, "prefer a deeper lowest adapted block (a cheaper backward) at up to this share of lost total importance")
    granularity: Granularity = option("block", "block: score whole blocks; sublayer: score each block's attention and MLP halves apart and fill --ratio / --param-budget (default 0.5) of all-layer LoRA's parameters with the most important")
    preset: Preset | None = option(None, "paper: reproduce the reference scripts (encoders never choose block 0; ties to the higher index); recommended (train, run): every block at the rank whose parameters equal --ratio (0.5) of the blocks, the half budget closest to all-layer LoRA that lwlora measured (docs/benchmarks.md 3c)")
    # how the measurement is made
    num_samples: int = option(128, "samples the blocks are scored on (drawn with --seed; 128 as in the paper)")
    pooling: Pooling | None = option(None, "one vector per sample: cls (first real token), last (last real token), mean; default cls for encoders, last for decoders")
    feature_norm: FeatureNorm = option("none", "standardize: z-score every feature before CKA (robust to decoders' massive activations)")
    degenerate_fallback: DegenerateFallback = option("exclude", "a block whose pooled representation is constant: exclude it (default; the paper's effect) or score it with mean pooling")
    statistics: Statistics = option("auto", "what is kept per block: rows (n x d), covariance (d x d CKA statistics, memory bounded in n; cka only, no --bootstrap), auto (rows until the statistics are smaller)")
    bootstrap: int = option(0, "resample the samples N times (N >= 2): per-block selection frequency, importance intervals, n/2-vs-n rank agreement (stability.png)")
    batch_size: int = option(8, "samples per forward pass while scoring")
    max_length: int = option(512, "truncate samples to this many tokens (fitted to the model's positions)")
    # the adapter that budgets and the cost report assume
    r: int = option(8, "adapter rank (the one trained, and the one --param-budget and the cost report count)")
    target_modules: str = option("auto", "auto (every linear layer inside the blocks) or comma-separated module names")
    # which blocks
    layers_path: str | None = option(None, "dotted path of the blocks' ModuleList when discovery is ambiguous")
    tower: str = option("language", "which tower of a multimodal model: language (default), vision")
    seed: int = option(0, "seed of the sample draw (and of --rule random)")

    def __post_init__(self) -> None:
        coerce_fields(self)  # types first: the checks below compare typed values
        check_choice("--scorer", self.scorer, SCORER_NAMES, what="scorer")
        check_choice("--tower", self.tower, TOWER_NAMES, what="tower")
        check_at_least("--num-samples", self.num_samples)
        check_at_least("--batch-size", self.batch_size)
        check_at_least("--max-length", self.max_length)
        check_at_least("--r", self.r)
        if self.layers is not None:
            object.__setattr__(self, "layers", unique_blocks("--layers", self.layers))
        if self.preset == "recommended":  # lwlora train expands it before its options are built
            raise ConfigError("--preset", "recommended is a training mode (lwlora train / run: every block at half the rank, no blocks chosen); to choose blocks give --preset paper or none")
        if self.preset == "paper" and (self.layers is not None or self.include or self.exclude):
            raise ConfigError("--preset", "paper fixes the exclusions itself; drop --layers/--include/--exclude")
        self.policy_for("decoder")  # validates ratio / num_layers / include / exclude early
        check_one_count([("--ratio", self.ratio is not None), ("--num-layers", self.num_layers is not None), ("--layers", self.layers is not None), ("--param-budget", self.param_budget is not None), ("--auto", self.auto)])
        check_budget_options(self.param_budget, self.prefer_shallow)
        check_target_modules(self.target_modules)
        if self.measures:  # (a rule's measurement options are the command's to check: train may measure importances anyway)
            check_measurement(self.scorer, feature_norm=self.feature_norm, num_samples=self.num_samples, statistics=self.statistics, bootstrap=self.bootstrap)
        if self.bootstrap < 0 or self.bootstrap == 1:  # one replicate gives an empty interval and no agreement
            raise ConfigError("--bootstrap", f"must be 0 (no stability report) or at least 2 replicates, got {self.bootstrap}")
        if self.bootstrap and not self.measures:
            raise ConfigError("--bootstrap", f"resamples scores; the {self.rule} rule scores nothing")
        check_granularity(self.granularity, self.scorer if self.measures else self.rule, given=[
            ("--num-layers", self.num_layers is not None), ("--layers", self.layers is not None), ("--include", bool(self.include)), ("--exclude", bool(self.exclude)),
            ("--auto", self.auto), ("--prefer-shallow", self.prefer_shallow is not None), ("--bootstrap", bool(self.bootstrap)), ("--preset", self.preset is not None)])

    @property
    def measures(self) -> bool:
        """Whether the blocks are scored (``rule=top``); the other rules choose without a score."""
        return self.rule == "top"

    @property
    def method(self) -> str:
        """The name this choice goes by (a scorer for ``rule=top``, else the rule): what
        ``selection.json`` records as ``scorer`` and ``compare`` calls a method."""
        return self.scorer if self.measures else self.rule

    def policy_for(self, model_kind: str) -> SelectionPolicy:
        if self.preset == "paper":
            return paper_policy(model_kind, ratio=self.ratio, num_layers=self.num_layers)
        return SelectionPolicy(num_layers=self.num_layers, ratio=self.ratio, layers=self.layers, include=self.include, exclude=self.exclude)

    def with_method(self, name: str) -> "SelectOptions":
        """These options choosing by ``name``: a scorer (the top blocks by it) or a rule."""
        return dataclasses.replace(self, **method_fields(name))


def method_fields(name: str) -> dict[str, str]:
    """The fields a method name sets: ``{"scorer": name, "rule": "top"}`` for a scorer,
    ``{"rule": name}`` for a rule (``lwlora select --scorer random``, ``train --layers all``)."""
    if name in RULES:
        return {"rule": name}
    check_choice("--scorer", name, ALL_SCORERS, what="scorer")
    return {"scorer": name, "rule": "top"}


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SelectOptions))


def split_options(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keys of ``values`` that are SelectOptions fields, the others)."""
    ours = {k: v for k, v in values.items() if k in OPTION_NAMES}
    return ours, {k: v for k, v in values.items() if k not in OPTION_NAMES}
