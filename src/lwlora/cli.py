"""``lwlora`` command line: a thin skin over the Python API.

Every command's flags come from its config dataclass (``lwlora.commands.arguments``): ``select``
(:class:`~lwlora.commands.select.SelectConfig`), ``train`` and ``run``
(:class:`~lwlora.training.config.TrainConfig`), ``compare``
(:class:`~lwlora.commands.compare.CompareConfig`), ``eval``
(:class:`~lwlora.training.evaluate.EvalConfig`), ``export``
(:class:`~lwlora.adapters.export.ExportConfig`). Every bad input ends in one line
``lwlora <command>: error: <flag>: <what is wrong>`` and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Sequence

from lwlora.errors import ConfigError

EXIT_USAGE = 2

TRAIN_LAYERS_HELP = "which blocks: cka (measured with --scorer; the paper), another scorer (cka-debiased, bi, angular, fim, gradnorm), a rule (all, first, last, random) or block indices like 0,3,5 (default cka)"
TRAIN_SCORER_HELP = "the similarity that measures the blocks for --layers cka (and the importances of --rank-allocation importance and --dynamic-blocks): cka, cka-debiased, bi, angular (default cka)"
SELECT_SCORER_HELP = "cka (default), cka-debiased, bi, angular; fim, gradnorm (gradient probes: need labels); all, first, last, random (rules, as --rule)"
#: select and compare choose blocks: the training preset (recommended) chooses none, and they refuse it
SELECT_PRESET_CHOICES = {"preset": ("paper",)}
SELECT_PRESET_HELP = "paper: reproduce the reference scripts (encoders never choose block 0; ties to the higher index). (recommended is lwlora train's mode, which chooses no blocks)"


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _train_flags(parser: argparse.ArgumentParser, *, model_positional: bool) -> None:
    """``lwlora train``'s flags (also ``lwlora run``'s overrides, where MODEL is ``--model`` and
    nothing is required)."""
    from lwlora.commands.arguments import add_config
    from lwlora.training.config import DEFAULT_SEED, TrainConfig

    add_config(parser, TrainConfig, positional=("model",) if model_positional else (), optional_positional=True,
               renames={"batch_size": "select_batch_size"}, option_skip=("layers", "rule"), option_defaults={"seed": DEFAULT_SEED},
               option_help={"scorer": TRAIN_SCORER_HELP, "batch_size": "samples per forward pass while scoring the blocks (default 8)", "seed": f"the run's seed, also of the selection samples (default {DEFAULT_SEED})"})
    parser.add_argument("--layers", default=argparse.SUPPRESS, help=TRAIN_LAYERS_HELP)


def build_parser() -> argparse.ArgumentParser:
    import lwlora
    from lwlora.adapters.export import ExportConfig
    from lwlora.commands.arguments import add_config
    from lwlora.commands.compare import CompareConfig
    from lwlora.commands.select import SelectConfig
    from lwlora.training.evaluate import EvalConfig

    parser = _Parser(prog="lwlora", description="Layer-wise LoRA: adapt only the transformer blocks that matter (CKA-scored).")
    parser.add_argument("--version", action="version", version=f"lwlora {lwlora.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("select", help="score every block (1 - CKA of its input and output) and choose the blocks to adapt",
                       description="Score every transformer block on a few task samples and write DIR/selection.json, DIR/scores.csv and DIR/importance.png.")
    add_config(p, SelectConfig, positional=("model",), required=("data",), option_help={"scorer": SELECT_SCORER_HELP, "preset": SELECT_PRESET_HELP}, option_choices=SELECT_PRESET_CHOICES)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")

    p = sub.add_parser("train", help="fine-tune with adapters on the selected blocks (transformers Trainer; works under accelerate launch / torchrun)",
                       description="Select (--layers cka) or take the blocks to adapt, train, evaluate, and write RUN (adapter, selection.json, train_config.json, metrics.json, loss_curve.png, checkpoints/).",
                       epilog=_task_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=argparse.SUPPRESS, help="a YAML config (or a shipped config's name) whose keys the other flags override, as lwlora run --config")
    _train_flags(p, model_positional=True)

    p = sub.add_parser("run", help="select + train + evaluate from one YAML config (no --config: the embedded CPU demo), any key overridden by its flag",
                       description="Every `lwlora train` flag is a YAML key (dashes or underscores) and overrides the config here, e.g. "
                       "`lwlora run --config paper/glue-rte-roberta-base-cka --lr 1e-4`. --config takes a file or a shipped config's name (--list).")
    p.add_argument("--config", help="YAML file, or a shipped config name such as demo or paper/glue-rte-roberta-base-cka")
    p.add_argument("--list", action="store_true", help="list the shipped configs")
    _train_flags(p, model_positional=False)

    p = sub.add_parser("eval", help="evaluate a run directory (base + adapter) or a model on a task")
    add_config(p, EvalConfig, positional=("target",))

    p = sub.add_parser("compare", help="run several selection methods, compare what they select (Jaccard, cost), optionally train each",
                       description="Select blocks with every --methods entry and write DIR/comparison.json, DIR/comparison.md and DIR/comparison.png; "
                       "with --train, train each selection for every --seeds entry and tabulate mean ± std.")
    add_config(p, CompareConfig, positional=("model",), required=("data", "out"), option_skip=("scorer", "rule"), option_help={"preset": SELECT_PRESET_HELP}, option_choices=SELECT_PRESET_CHOICES)

    p = sub.add_parser("export", help="write a selection as what another trainer reads: PEFT, LLaMA-Factory, Axolotl, Unsloth",
                       description="Turn SELECTION.json into PEFT's adapter_config.json / LoraConfig kwargs, LLaMA-Factory's lora_target, Axolotl's "
                       "lora_target_modules + peft_layers_to_transform, or Unsloth's get_peft_model kwargs.")
    add_config(p, ExportConfig, positional=("selection",))
    return parser


def _task_epilog() -> str:
    from lwlora.tasks import TASKS

    return "tasks:\n" + "\n".join(f"  {name:<16} {text}" for name, text in TASKS.items())


def _disable_progress_bars() -> None:
    """--no-progress: also silence the ecosystem's own bars (dataset building, weight loading, and
    the GGUF dequantization bar, which transformers draws with a bare ``tqdm`` that its own
    ``disable_progress_bar()`` does not reach)."""
    import functools

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support: no bar to silence
        return
    if not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


#: transformers' own deprecations inside the stack lwlora drives (the Trainer and PEFT calling
#: ``gradient_checkpointing_enable`` / ``is_gradient_checkpointing``): noise to a CLI user, who
#: cannot act on them. The library itself leaves every warning alone.
STACK_DEPRECATIONS = r".*is deprecated and will be removed in v6\b.*"


def _quiet_stack_deprecations() -> None:
    warnings.filterwarnings("ignore", message=STACK_DEPRECATIONS, category=FutureWarning)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _PlainText(logging.Filter):
    """Strips ANSI escape codes from a record's message unless the handler writes to a terminal
    (transformers' weight-loading report puts bold codes in its title even when logging to a file)."""

    def __init__(self, handler: logging.StreamHandler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        isatty = getattr(self.handler.stream, "isatty", None)
        if not (callable(isatty) and isatty()):
            message = record.getMessage()
            if "\x1b" in message:
                record.msg, record.args = _ANSI.sub("", message), None
        return True


def _plain_library_logs() -> None:
    """No ANSI codes in the ecosystem's log lines when stderr is a log file, not a terminal."""
    import transformers

    transformers.utils.logging.get_logger()  # makes sure its handler exists
    for handler in logging.getLogger("transformers").handlers:
        if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, _PlainText) for f in handler.filters):
            handler.addFilter(_PlainText(handler))


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (a ConfigError propagates; main turns it into one line)."""
    from lwlora.commands.arguments import given

    values = given(args)
    if values.get("progress") is False:
        _disable_progress_bars()
    if args.command == "select":
        from lwlora.commands.select import SelectConfig, run

        out = values.pop("out")
        return run(SelectConfig(**values), out)
    if args.command == "train":
        from lwlora.commands.train import run_config, run_train

        if "config" in values:
            return run_config(values.pop("config"), {k: v for k, v in values.items() if v is not None})
        missing = [flag for flag, key in (("MODEL", "model"), ("--task", "task"), ("--out", "out")) if values.get(key) is None]
        if missing:
            raise ConfigError(missing[0], "is required (or give --config FILE.yaml with it)")
        return run_train(values)
    if args.command == "run":
        from lwlora.commands.train import run_config

        if values.pop("list", False):
            from lwlora.configs import list_configs

            print("\n".join(list_configs()))
            return 0
        return run_config(values.pop("config", None), values)
    if args.command == "eval":
        from lwlora.training.evaluate import EvalConfig, run

        return run(EvalConfig(**values))
    if args.command == "compare":
        from lwlora.commands.compare import CompareConfig, run

        return run(CompareConfig(**values))
    if args.command == "export":
        from lwlora.adapters.export import ExportConfig, run

        return run(ExportConfig(**values))
    raise AssertionError(args.command)


class _WarningHandler(logging.StreamHandler):
    """lwlora's own warnings, one ``warning: ...`` line each on stderr (the stream of the moment,
    so a test's captured stderr sees them)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname_lower)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        record.levelname_lower = record.levelname.lower()
        super().emit(record)


def _route_warnings_to_stderr() -> None:
    """Every warning logged on the ``lwlora`` logger (few samples, degenerate blocks, newly
    initialised modules, ...) is printed once, as ``warning: <message>``; not again through the root
    logger, and not twice when ``main`` runs more than once in a process."""
    lwlora_logger = logging.getLogger("lwlora")
    lwlora_logger.handlers = [h for h in lwlora_logger.handlers if not isinstance(h, (_WarningHandler, logging.NullHandler))]
    lwlora_logger.addHandler(_WarningHandler())
    lwlora_logger.setLevel(logging.WARNING)
    lwlora_logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _route_warnings_to_stderr()
    _quiet_stack_deprecations()
    try:
        if args.command != "export":  # export only writes text: it need not load transformers
            _plain_library_logs()
        return run_command(args)
    except ConfigError as exc:
        print(f"lwlora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
