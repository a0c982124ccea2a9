"""The command line's flags, generated from the config dataclasses (the only place flags are made).

Each field of a config becomes ``--field-name`` with the field's help text and default; a nested
:class:`~lwlora.selection.options.SelectOptions` field (``options``) contributes its own fields
flat. Values reach the dataclass as typed on the command line (strings, tuples of block indices,
booleans), and the dataclass converts and checks them (:func:`lwlora.fields.coerce_fields`), so a
bad flag and a bad YAML value get the same one-line error. Flags not given are not passed at all
(``argparse.SUPPRESS``): the dataclass's defaults are the defaults, stated once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from lwlora.fields import flag_of, help_of


def int_list(text: str) -> tuple[int, ...]:
    """``0,3,5`` → (0, 3, 5): block indices."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices like 0,3,5, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one block index")
    return values


def _base_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else str
    return hint


def _default_text(field: dataclasses.Field) -> str:
    default = field.default
    if default is dataclasses.MISSING or default is None or default is False or default == ():
        return ""
    if default is True:
        return ""
    return f" (default: {','.join(map(str, default)) if isinstance(default, tuple) else default})"


def add_field(parser: argparse.ArgumentParser | argparse._ArgumentGroup, field: dataclasses.Field, hint: Any, *, flag: str | None = None, dest: str | None = None, help_text: str | None = None, default: Any = dataclasses.MISSING, choices: tuple[str, ...] | None = None) -> None:
    """One flag for ``field`` (see the module docstring). ``flag``/``dest`` rename it (train's
    ``--select-batch-size`` for the options' ``batch_size``); ``default`` overrides the shown one;
    ``choices`` the values a Literal field's usage line lists (where a command accepts fewer)."""
    name = dest or field.name
    flag = flag or flag_of(field.name)
    text = help_text if help_text is not None else help_of(field)
    suffix = _default_text(field) if default is dataclasses.MISSING else (f" (default: {default})" if default not in (None, False) else "")
    kind = _base_type(hint)
    if kind is bool:
        if field.default is True:  # e.g. progress -> --no-progress
            parser.add_argument("--no-" + flag.removeprefix("--"), dest=name, action="store_false", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=text)
        return
    if typing.get_origin(kind) is typing.Literal:  # the dataclass checks the value: the same message as for a YAML key
        parser.add_argument(flag, dest=name, metavar="{" + ",".join(choices or typing.get_args(kind)) + "}", default=argparse.SUPPRESS, help=text + suffix)
        return
    if typing.get_origin(kind) is tuple:
        parser.add_argument(flag, dest=name, type=int_list, default=argparse.SUPPRESS, metavar="0,3,5", help=text + suffix)
        return
    parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=text + suffix)


def add_config(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    positional: Iterable[str] = (),
    required: Iterable[str] = (),
    skip: Iterable[str] = (),
    renames: Mapping[str, str] | None = None,
    option_skip: Iterable[str] = (),
    option_defaults: Mapping[str, Any] | None = None,
    option_help: Mapping[str, str] | None = None,
    option_choices: Mapping[str, tuple[str, ...]] | None = None,
    group: str | None = "selection (how the blocks are chosen)",
    optional_positional: bool = False,
) -> None:
    """Flags for every field of the config dataclass ``cls`` and of its nested ``options``.

    ``positional``: fields given without a flag (MODEL); ``required``: flags that must be given;
    ``skip``: own fields without a flag; ``renames``: option field → flag name (``batch_size`` →
    ``select_batch_size`` for train); ``option_skip``: option fields without a flag (train's
    ``layers``/``rule``, spelled by its own ``--layers``); ``option_defaults`` / ``option_help``:
    what the help says where the command's default or meaning differs; ``option_choices``: the
    values a Literal option's usage line lists where the command accepts fewer (the dataclass still
    checks the value); ``optional_positional``:
    the positional fields may be left out (train with ``--config``)."""
    hints = typing.get_type_hints(cls)
    positional, required, skip, option_skip = set(positional), set(required), set(skip), set(option_skip)
    renames, option_defaults, option_help = dict(renames or {}), dict(option_defaults or {}), dict(option_help or {})
    nested = None
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        if field.name == "options":
            nested = hints[field.name]
            continue
        if field.name in positional:
            parser.add_argument(field.name, metavar=field.name.upper(), help=help_of(field), **({"nargs": "?", "default": None} if optional_positional else {}))
            continue
        if field.name in required:
            parser.add_argument(flag_of(field.name), dest=field.name, required=True, help=help_of(field))
            continue
        add_field(parser, field, hints[field.name])
    if nested is None:
        return
    target = parser.add_argument_group(group) if group else parser
    nested_hints = typing.get_type_hints(nested)
    for field in dataclasses.fields(nested):
        if field.name in option_skip:
            continue
        alias = renames.get(field.name)
        add_field(target, field, nested_hints[field.name], flag=flag_of(alias) if alias else None, dest=alias or field.name,
                  help_text=option_help.get(field.name), default=option_defaults.get(field.name, dataclasses.MISSING),
                  choices=(option_choices or {}).get(field.name))


def given(args: argparse.Namespace, exclude: Iterable[str] = ("command", "run")) -> dict[str, Any]:
    """The flags the user gave (everything else keeps the dataclass default)."""
    excluded = set(exclude)
    return {k: v for k, v in vars(args).items() if k not in excluded}
