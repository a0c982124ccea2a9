"""Typed option dataclasses: one field factory with help text, and the conversion of every
field from its annotation.

Every option lwlora takes (selection, training, commands) is a field of a frozen dataclass. Its
help text lives in the field (``option(default, "help")``), so the command line, the YAML keys and
the docs come from one place; :func:`coerce_fields` converts and checks each value against its
annotation when the dataclass is built, so a flag, a YAML value and a Python argument are checked
alike (``lr: 2e-4`` is a string to YAML; ``max_steps: 2.5`` is refused by name). Nothing heavy is
imported here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable
from typing import Any

from lwlora.errors import ConfigError


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:  # noqa: A002 - argparse's word
    """A dataclass field with its help text (shown by ``--help``; the CLI flag is the field name
    with dashes). Extra metadata: ``flag`` (another flag name), ``cli=False`` (not a flag)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or None as a default, not a mutable value")
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


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


def coerce_fields(instance: Any, *, skip: Iterable[str] = ()) -> None:
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
    skipped = set(skip)
    for f in dataclasses.fields(instance):
        if f.name in skipped:  # e.g. a nested options dataclass, which coerces itself
            continue
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


# --- configs that hold a nested options dataclass -------------------------------------------


def init_holding(instance: Any, values: dict[str, Any], *, nested: str, nested_type: type, translate: Any = None) -> None:
    """``__init__`` of a frozen config dataclass with a nested options field ``nested`` (of
    ``nested_type``) that also takes the nested fields flat, as earlier versions and the YAML
    configs spell them: ``TrainConfig(model=..., ratio=0.5)`` is ``TrainConfig(model=...,
    options=SelectOptions(ratio=0.5))``.

    ``values``: every keyword given. Own fields are set (their defaults where missing); the other
    keys must be fields of ``nested_type`` after ``translate(flat) -> flat`` (the config's own
    spellings, e.g. train's ``layers`` mode or ``select_batch_size``), and are applied over
    ``values[nested]`` (default: ``nested_type()``). Then ``__post_init__`` runs, if defined.
    """
    own = {f.name: f for f in dataclasses.fields(instance) if f.name != nested}
    flat = {k: v for k, v in values.items() if k not in own and k != nested}
    if translate is not None:
        flat = translate(flat, values)
    names = {f.name for f in dataclasses.fields(nested_type)}
    unknown = sorted(set(flat) - names)
    if unknown:
        raise TypeError(f"{type(instance).__name__}() got unexpected keyword argument(s) {', '.join(unknown)}")
    base = values.get(nested)
    options = dataclasses.replace(base, **flat) if base is not None else nested_type(**flat)
    for name, f in own.items():
        if name in values:
            value = values[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            raise TypeError(f"{type(instance).__name__}() missing required argument {name!r}")
        object.__setattr__(instance, name, value)
    object.__setattr__(instance, nested, options)
    post = getattr(instance, "__post_init__", None)
    if post is not None:
        post()
