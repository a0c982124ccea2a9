"""Every command's flags come from the config dataclasses: each has help text and shows its default,
and the select and train configs share only the model/data source fields (plus the options)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lwlora.cli import build_parser

COMMANDS = ("select", "train", "run", "eval", "compare", "export")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def test_every_command_is_there():
    assert set(COMMANDS) <= set(subcommands())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help(command):
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in flag_actions(subcommands()[command]) if not (a.help or "").strip()]
    assert not missing, f"{command}: flags without help: {missing}"


def _dataclass_defaults() -> dict[str, object]:
    from lwlora.commands.compare import CompareConfig
    from lwlora.commands.select import SelectConfig
    from lwlora.selection.options import SelectOptions
    from lwlora.training.config import TrainConfig

    defaults: dict[str, object] = {}
    for cls in (SelectOptions, SelectConfig, TrainConfig, CompareConfig):
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                defaults.setdefault(field.name, field.default)
    return defaults


@pytest.mark.parametrize("command", ("select", "train", "compare"))
def test_flags_with_a_value_show_their_default(command):
    """A valued flag whose dataclass default is set (not None/False/empty) says ``(default: …)``."""
    defaults = _dataclass_defaults()
    silent = []
    for action in flag_actions(subcommands()[command]):
        if not action.option_strings or action.nargs == 0 or action.required:
            continue
        default = defaults.get(action.dest)
        if default in (None, False, (), "") or isinstance(default, bool):
            continue
        if "(default:" not in (action.help or ""):
            silent.append(action.option_strings[0])
    assert not silent, f"{command}: flags that hide their default: {silent}"


def test_select_and_train_share_only_the_source_fields():
    from lwlora.commands.select import SelectConfig
    from lwlora.training.config import TrainConfig

    shared = {f.name for f in dataclasses.fields(SelectConfig)} & {f.name for f in dataclasses.fields(TrainConfig)}
    source = {"model", "gguf_file", "data", "text_column", "text_pair_column", "label_column", "image_column", "template",
              "instruction_field", "output_field", "trust_remote_code", "task", "dtype", "device", "max_length", "options", "progress", "seed"}
    assert shared <= source, f"fields repeated outside the source: {sorted(shared - source)}"
