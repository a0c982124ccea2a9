"""Checks of the options that ``SelectConfig`` (``lwlora select``) and ``TrainConfig``
(``lwlora train`` / ``lwlora run``) share, and the typing of dataclass fields.

Both configs call these from ``__post_init__``, so a value one of them refuses the other refuses
too, with the same one-line :class:`~lwlora.errors.ConfigError`, before anything is loaded or
written. The module imports no torch on purpose: ``lwlora.training.config`` stays importable (and
a ``TrainConfig`` buildable) without it. The few facts below that torch-importing modules own
(scorer names and sample minimums, poolings, dtypes) are restated here;
``tests/test_config_validation.py`` checks that both copies agree.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lwlora.errors import ConfigError
from lwlora.policy import RULES

logger = logging.getLogger("lwlora")

# --- field types ----------------------------------------------------------------------------

#: Strings a boolean option accepts (compared case-insensitively): YAML configs and Python callers
#: sometimes quote them, and a non-empty string such as "no" must never mean True.
BOOL_STRINGS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def flag_of(name: str) -> str:
    """The CLI flag of a dataclass field (``num_layers`` → ``--num-layers``)."""
    return "--" + name.replace("_", "-")


def field_of(flag: str) -> str:
    """The field name of a CLI flag (``--num-layers`` → ``num_layers``); inverse of :func:`flag_of`."""
    return flag.removeprefix("--").replace("-", "_")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached: ``__post_init__`` runs per instance)."""
    return typing.get_type_hints(cls)


def coerce_fields(instance: Any) -> None:
    """Check every field of the (frozen) dataclass ``instance`` against its annotation and store
    the converted value: numbers given as strings (YAML reads ``2e-4`` as a string), booleans
    given as strings, paths given as ``os.PathLike``.

    Accepted: ``int`` (an integer; a float or numeric string with an integral value such as 3.0
    or "1e3" is taken as that integer, 2.5 is refused; ``True`` is not an integer), ``float`` (any
    finite real number, an int included), ``bool`` (True/False, 0/1, or the strings of
    :data:`BOOL_STRINGS`), ``str``, ``Literal[...]`` (one of its values), ``tuple[int, ...]``
    (a list or tuple of integers), and ``X | None``. A refused value is a ConfigError naming the
    field's flag, e.g. ``--max-steps: expected an integer, got 2.5``.
    """
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        converted = _coerce(_field_hints(type(instance))[f.name], value, flag_of(f.name))
        if converted is not value:
            object.__setattr__(instance, f.name, converted)  # frozen dataclass: set once, while building


def _coerce(hint: Any, value: Any, flag: str) -> Any:
    """``value`` converted to ``hint`` (see :func:`coerce_fields`), or a ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) != 1:
            raise TypeError(f"{flag}: unsupported field type {hint!r}")  # a programming error, not bad input
        return _coerce(options[0], value, flag)
    if origin is typing.Literal:
        check_choice(flag, value, typing.get_args(hint))
        return value
    if origin is tuple:
        return _to_int_tuple(hint, value, flag)
    if hint is bool:
        return _to_bool(value, flag)
    if hint is int:
        return _to_int(value, flag)
    if hint is float:
        return _to_float(value, flag)
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(flag, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{flag}: unsupported field type {hint!r}")


def _to_bool(value: Any, flag: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOL_STRINGS:
        return BOOL_STRINGS[value.strip().lower()]
    raise ConfigError(flag, f"expected true or false (or yes/no, on/off, 1/0), got {value!r}")


def _number(value: Any) -> float | int | None:
    """``value`` as a Python number (strings parsed), or None when it is not one; bool is not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    return None


def _to_int(value: Any, flag: str) -> int:
    number = _number(value)
    if isinstance(number, int):
        return number
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise ConfigError(flag, f"expected an integer, got {value!r}")


def _to_float(value: Any, flag: str) -> float:
    number = _number(value)
    if number is None:
        raise ConfigError(flag, f"expected a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(flag, f"expected a finite number, got {value!r}")
    return float(number)


def _to_int_tuple(hint: Any, value: Any, flag: str) -> tuple[int, ...]:
    if typing.get_args(hint)[-1:] != (Ellipsis,) or typing.get_args(hint)[0] is not int:
        raise TypeError(f"{flag}: unsupported field type {hint!r}")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(flag, f"expected a list of block indices like 0,3,5, got {value!r}")
    return tuple(_to_int(item, flag) for item in value)


# --- choices ------------------------------------------------------------------------------


def check_choice(flag: str, value: Any, choices: Iterable[str], *, what: str = "choice") -> None:
    """``value`` must be one of ``choices``: a ``Literal`` field's values (:func:`coerce_fields`)
    or, for an option typed ``str``, a table's (scorer names, towers)."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(flag, f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def check_at_least(flag: str, value: int | None, minimum: int = 1) -> None:
    """A count option (None: not given) must be at least ``minimum``."""
    if value is not None and value < minimum:
        raise ConfigError(flag, f"must be at least {minimum}, got {value}")


#: Choice-valued options as types: a field annotated with one is checked by :func:`coerce_fields`,
#: and ``lwlora train`` offers its values as the flag's choices. Each tuple is the same list.
Pooling = Literal["cls", "last", "mean"]
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)  # = lwlora.capture.POOLINGS
Statistics = Literal["rows", "covariance", "auto"]
STATISTICS: tuple[str, ...] = typing.get_args(Statistics)  # = lwlora.capture.STATISTICS
FeatureNorm = Literal["none", "standardize"]
FEATURE_NORMS: tuple[str, ...] = typing.get_args(FeatureNorm)  # = lwlora.scoring.FEATURE_NORMS
DegenerateFallback = Literal["exclude", "mean"]
Preset = Literal["paper"]
DType = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
DTYPES: tuple[str, ...] = typing.get_args(DType)  # = the keys of lwlora.models.DTYPES
#: What lwlora.models.resolve_device and lwlora.training.device.parse_device place a model on.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class ScorerFacts:
    """What validation needs to know of a similarity scorer of ``lwlora.scoring.SCORERS``."""

    min_samples: int  # CKA of fewer samples is undefined (debiased CKA: n >= 4)
    cka: bool  # a CKA scorer: --feature-norm applies
    streams: bool  # scores from covariance statistics (--statistics covariance)


#: = lwlora.scoring.SCORERS, in the same order
SIMILARITY_SCORERS: dict[str, ScorerFacts] = {
    "cka": ScorerFacts(min_samples=2, cka=True, streams=True),
    "cka-debiased": ScorerFacts(min_samples=4, cka=True, streams=False),
    "bi": ScorerFacts(min_samples=1, cka=False, streams=False),
    "angular": ScorerFacts(min_samples=1, cka=False, streams=False),
}
#: = the keys of lwlora.gradient_scores.GRADIENT_SCORERS
GRADIENT_SCORERS: tuple[str, ...] = ("fim", "gradnorm")
#: = lwlora.select.ALL_SCORERS: every ``lwlora select --scorer``
ALL_SCORERS: tuple[str, ...] = (*SIMILARITY_SCORERS, *GRADIENT_SCORERS, *RULES)


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
    ``lwlora.select.resolve_statistics``, which also decides what ``auto`` becomes."""
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
