"""``lwlora`` command line: a thin skin over the Python API.

Every bad input ends in one line ``lwlora <command>: error: <flag>: <what is wrong>`` and exit
status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lwlora.errors import ConfigError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _int_list(flag: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated block indices like 0,3,5, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one block index")
        return values

    parse.__name__ = flag
    return parse


def _add_select(subparsers) -> None:
    from lwlora.capture import POOLINGS, STATISTICS
    from lwlora.select import ALL_SCORERS

    p = subparsers.add_parser(
        "select",
        help="score every block (1 - CKA of its input and output) and choose the blocks to adapt",
        description="Score every transformer block on a few task samples and write DIR/selection.json, "
        "DIR/scores.csv and DIR/importance.png.",
    )
    p.add_argument("model", metavar="MODEL", help="Hub id, local directory, or builtin:minilm / builtin:smollm2")
    p.add_argument("--data", required=True, help="file (.jsonl/.json/.csv/.parquet/.txt), directory of splits (DIR[:split]), Hub dataset name[:config][:split], or builtin:humaneval")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--num-samples", type=int, default=128, help="samples drawn with --seed (default 128, as in the paper)")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--ratio", type=float, help="select floor(ratio x L) blocks (default 0.5, the paper's rule)")
    count.add_argument("--num-layers", type=int, help="select this many blocks")
    count.add_argument("--layers", type=_int_list("--layers"), help="explicit blocks, e.g. 0,3,5 (scores are still reported)")
    count.add_argument("--param-budget", type=float, help="select by adapter parameters: a fraction (<= 1) of all-layer LoRA's, or a count")
    count.add_argument("--auto", action="store_true", help="select as many blocks as the importance curve's knee suggests")
    p.add_argument("--prefer-shallow", type=float, metavar="LOSS", help="prefer a deeper lowest adapted block (cheaper backward) at up to this share of lost total importance")
    p.add_argument("--r", type=int, default=8, help="adapter rank assumed by --param-budget and the cost report (default 8)")
    p.add_argument("--target-modules", default="auto", help="adapter targets assumed by --param-budget and the cost report (default auto)")
    p.add_argument("--include", type=_int_list("--include"), default=(), help="blocks always selected, e.g. 0,1")
    p.add_argument("--exclude", type=_int_list("--exclude"), default=(), help="blocks never selected")
    p.add_argument("--scorer", default="cka", choices=list(ALL_SCORERS), help="cka (default), cka-debiased, bi, angular; fim, gradnorm (gradient probes: need labels); all, first, last, random (rules)")
    p.add_argument("--task", help="scienceqa: its image-text training inputs (vision-language models); fim/gradnorm: the task giving labelled inputs (default: classification for encoders, instruction for decoders)")
    p.add_argument("--label-column", help="fim/gradnorm on classification data: the label column")
    p.add_argument("--instruction-field", help="fim/gradnorm on instruction data: the prompt field")
    p.add_argument("--output-field", help="fim/gradnorm on instruction data: the response field")
    p.add_argument("--pooling", choices=list(POOLINGS), help="token pooling (default: cls for encoders, last for decoders)")
    p.add_argument("--feature-norm", choices=["none", "standardize"], default="none", help="standardize: z-score each feature before CKA (outlier-robust; decoders' massive activations)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="resample the samples N times: per-block selection frequency, importance intervals, n/2-vs-n rank agreement (stability.png)")
    p.add_argument("--degenerate-fallback", choices=["exclude", "mean"], default="exclude", help="a block whose pooled representation is constant: exclude it (default; the paper's effect) or score it with mean pooling")
    p.add_argument("--granularity", choices=["block", "sublayer"], default="block", help="block (default): score whole blocks; sublayer: score each block's attention and MLP halves apart and fill --ratio / --param-budget (default 0.5) of all-layer LoRA's parameters with the most important")
    p.add_argument("--statistics", choices=list(STATISTICS), default="auto", help="what is kept per block: rows (n x d), covariance (d x d CKA statistics, memory bounded in n; --scorer cka only, no --bootstrap), auto (default: rows until the statistics are smaller, when the scorer allows)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens")
    p.add_argument("--device", default="auto", help="auto (all GPUs via device_map=auto, else cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (pooled vectors are always fp32, the CKA maths float64)")
    p.add_argument("--text-column", help="column holding the text (default: detected)")
    p.add_argument("--text-pair-column", help="second text column for sentence pairs")
    p.add_argument("--template", help="format string over columns, e.g. '{question} {answer}', or a preset: alpaca, alpaca-response")
    p.add_argument("--image-column", help="vision-language models: column with each sample's image (a path relative to the data file, or an image column); not truncated")
    p.add_argument("--gguf-file", help="GGUF file inside MODEL (dequantized on load)")
    p.add_argument("--layers-path", help="dotted path of the blocks' ModuleList when discovery is ambiguous")
    p.add_argument("--tower", default="language", choices=["language", "vision", "audio"], help="which tower of a multimodal model (default language)")
    p.add_argument("--preset", choices=["paper"], help="paper: reproduce the reference scripts (encoders never select block 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=_run_select)


def _disable_progress_bars() -> None:
    """--no-progress: also silence the ecosystem's own bars (dataset building, weight loading)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _run_select(args: argparse.Namespace) -> int:
    from lwlora.report import format_table, peft_snippet, write_artifacts
    from lwlora.select import SelectConfig, select_layers

    if args.no_progress:
        _disable_progress_bars()
    from lwlora.io import check_output_dir
    from lwlora.training.run_dir import CONFIG_FILE

    out = check_output_dir(args.out, "--out")  # before any compute: an unwritable --out fails now
    if (out / CONFIG_FILE).is_file():
        raise ConfigError("--out", f"{out} is a training run ({CONFIG_FILE}): its selection.json belongs to that run (and to --resume); write the selection elsewhere")
    config = SelectConfig(
        model=args.model,
        data=args.data,
        num_samples=args.num_samples,
        ratio=args.ratio,
        num_layers=args.num_layers,
        layers=args.layers,
        include=args.include,
        exclude=args.exclude,
        scorer=args.scorer,
        pooling=args.pooling,
        feature_norm=args.feature_norm,
        degenerate_fallback=args.degenerate_fallback,
        bootstrap=args.bootstrap,
        statistics=args.statistics,
        granularity=args.granularity,
        param_budget=args.param_budget,
        auto=args.auto,
        prefer_shallow=args.prefer_shallow,
        r=args.r,
        target_modules=args.target_modules,
        task=args.task,
        label_column=args.label_column,
        instruction_field=args.instruction_field,
        output_field=args.output_field,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        dtype=args.dtype,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        template=args.template,
        image_column=args.image_column,
        gguf_file=args.gguf_file,
        layers_path=args.layers_path,
        tower=args.tower,
        preset=args.preset,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    selection = select_layers(config)
    paths = write_artifacts(selection, out)
    print(format_table(selection))  # its warnings reached stderr through the lwlora logger already
    print(f"\nwrote {paths['selection']}, {paths['scores']}, {paths['plot']}")
    print("\napply it:\n" + peft_snippet(str(paths["selection"])))
    return 0


TRAIN_HELP = {
    "model": "Hub id, local directory, or builtin:minilm / builtin:smollm2",
    "task": "task preset (see `lwlora train --help` epilog), e.g. glue/rte, classification, instruction, gsm-symbolic",
    "out": "run directory RUN",
    "data": "data override: file, directory of splits, Hub name[:config][:split]",
    "selection": "use this selection.json (or a directory holding one) instead of --layers",
    "layers": "cka (measure; the paper), all, random, first, last, or block indices like 0,3,5",
    "ratio": "adapt floor(ratio x L) blocks (default 0.5)",
    "num_layers": "adapt this many blocks",
    "method": "lora, pissa, dora, rslora, olora, eva (PEFT's data-driven init, ranks redistributed by explained variance), or full (full fine-tuning)",
    "eva_rho": "--method eva: a layer's rank may grow to eva_rho x r as ranks are redistributed (1: no redistribution; default 2)",
    "alpha": "LoRA alpha (default 2 r)",
    "target_modules": "auto (every linear layer in the blocks) or comma-separated module names",
    "warmup": "warmup: a fraction of the steps below 1, else a number of steps",
    "eval_every": "evaluate every N steps (default: every epoch)",
    "save_every": "checkpoint every N steps (default: every epoch)",
    "gradient_checkpointing": "non-reentrant activation checkpointing (frozen lower blocks still skip backward)",
    "packing": "pack instruction examples into --max-length blocks",
    "instruction_field": "instruction tasks: the prompt field (default: instruction, query, question or prompt)",
    "output_field": "instruction tasks: the response field (default: output, response, answer or completion)",
    "resume": "continue the run in --out from its last checkpoint",
    "overwrite": "replace the run in --out",
    "merge": "also save base + adapter merged into RUN/merged",
    "param_budget": "--layers <scorer>: select blocks by adapter parameters, a fraction (<= 1) of all-layer LoRA's or a count",
    "auto": "--layers <scorer>: as many blocks as the importance curve's knee suggests",
    "prefer_shallow": "--layers <scorer>: prefer a deeper lowest adapted block at up to this share of lost importance",
    "budget_from_ratio": "with --layers all: every block at the rank whose adapter parameters equal floor(ratio x L) blocks at --r (the equal-budget baseline)",
    "rank_allocation": "uniform (--r everywhere) or importance (ranks grow with block importance, same total)",
    "choice_mode": "multiple-choice evaluation: letter (generated) or loglik (most likely option letter)",
    "num_samples": "selection samples for --layers cka (default 128)",
    "preset": "selection preset for --layers cka: paper",
    "tower": "vision-language models: the tower whose blocks are selected and adapted (default language)",
    "dynamic_blocks": "with --layers all: adapters on every block, this many trainable at a time (a share of the blocks below 1, or a count), drawn by --scorer importance (docs/dynamic.md)",
    "dynamic_every": "--dynamic-blocks: optimizer steps between draws (default 20)",
    "dynamic_floor": "--dynamic-blocks: share of the draw probability spread uniformly so no block starves (default 0.1)",
    "prune_at": "with --layers all: train LoRA on every block, then at this share of the steps (< 1) or step (>= 1) keep the --ratio (0.5) / --num-layers blocks whose adapters change their layers' outputs most (docs/prune.md)",
    "prune_score": "--prune-at: effect (size of each block's adapter updates on --num-samples training examples; default) or weight (||s B A||_F^2, data-free)",
    "granularity": "--layers cka: block (default) or sublayer (score attention and MLP halves apart; adapt the units that fill --ratio of all-layer LoRA's parameters)",
    "statistics": "selection: what is kept per block, rows, covariance (memory bounded in n; cka only) or auto (default)",
}


def _add_dataclass_arguments(parser: argparse.ArgumentParser, cls, *, positional: tuple[str, ...] = (), required: tuple[str, ...] = (), help_texts: dict[str, str] | None = None) -> None:
    """One flag per dataclass field (``num_layers`` → ``--num-layers``); the field names are the
    YAML keys of ``lwlora run`` too. Values reach ``cls`` as the strings typed: ``cls`` converts
    and checks them (lwlora.options_checks.coerce_fields), so a bad flag and a bad YAML value get
    the same one-line ``<flag>: <message>`` error. A ``Literal`` field lists its values in the help."""
    import dataclasses
    import types
    import typing

    help_texts = help_texts or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        text = help_texts.get(f.name)
        if f.name in positional:
            parser.add_argument(f.name, metavar=f.name.upper(), help=text)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            if f.default is True:  # e.g. progress -> --no-progress
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=text)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=text)
            continue
        metavar = "{" + ",".join(typing.get_args(kind)) + "}" if typing.get_origin(kind) is typing.Literal else None
        default = None if f.name in required else f.default
        parser.add_argument(flag, dest=f.name, default=default, required=f.name in required, metavar=metavar, help=text)


def _add_train(subparsers) -> None:
    from lwlora.training.config import TrainConfig

    p = subparsers.add_parser(
        "train",
        help="fine-tune with adapters on the selected blocks (transformers Trainer; works under accelerate launch / torchrun)",
        description="Select (--layers cka) or take the blocks to adapt, train, evaluate, and write RUN (adapter, selection.json, "
        "train_config.json, metrics.json, loss_curve.png, checkpoints/).",
        epilog=_task_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_dataclass_arguments(p, TrainConfig, positional=("model",), required=("task", "out"), help_texts=TRAIN_HELP)
    p.set_defaults(run=_run_train)


def _task_epilog() -> str:
    try:
        from lwlora.tasks import TASKS
    except ImportError:  # pragma: no cover - tasks package missing
        return ""
    return "tasks:\n" + "\n".join(f"  {name:<16} {text}" for name, text in TASKS.items())


def _train_config_from_args(args: argparse.Namespace):
    import dataclasses

    from lwlora.training.config import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def _print_result(result) -> None:
    import json

    from lwlora.training.trainer import is_main_process

    if not is_main_process():  # one report per distributed launch
        return
    metrics = result.metrics
    params = metrics["params"]
    print(f"adapted blocks {metrics['selected']} of {metrics['num_layers']} ({metrics['method']})")
    print(f"trainable parameters {params['trainable']:,} of {params['total']:,} (adapter {params['adapter']:,}, head {params['head']:,})")
    print(f"train loss {metrics['train']['train_loss']:.4f} in {metrics['train']['runtime_s']:.1f} s, {metrics['train']['global_step']} steps")
    print("final evaluation: " + json.dumps(metrics["final"], indent=None))
    print(f"wrote {result.run_dir}")


def _finish_distributed() -> None:
    """End a distributed launch's process group cleanly (torchrun / accelerate launch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_train(args: argparse.Namespace) -> int:
    from lwlora.training.trainer import train

    if not args.progress:
        _disable_progress_bars()
    _print_result(train(_train_config_from_args(args)))
    _finish_distributed()
    return 0


#: ``lwlora run`` with no --config: the embedded demo (real weights and data from pip, CPU, minutes).
DEMO_CONFIG = "demo"


def _add_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="select + train + evaluate from one YAML config (no --config: the embedded CPU demo)",
        description="Every TrainConfig field (the flags of `lwlora train`, dashes or underscores) is a YAML key. "
        "--config takes a file or the name of a shipped config (lwlora run --list).",
    )
    p.add_argument("--config", help="YAML file, or a shipped config name such as demo or paper/glue-rte-roberta-base-cka")
    p.add_argument("--out", help="override the config's run directory")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--list", action="store_true", help="list the shipped configs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from lwlora.configs import list_configs, load_config
    from lwlora.training.config import TrainConfig
    from lwlora.training.trainer import train

    if args.list:
        print("\n".join(list_configs()))
        return 0
    if args.no_progress:
        _disable_progress_bars()
    data, source = load_config(args.config or DEMO_CONFIG)
    for key in ("out", "resume", "overwrite"):
        value = getattr(args, key)
        if value:
            data[key] = value
    if args.no_progress:
        data["progress"] = False
    _print_result(train(TrainConfig.from_dict(data, source=source)))
    _finish_distributed()
    return 0


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a run directory (base + adapter) or a model on a task")
    p.add_argument("target", metavar="RUN_OR_MODEL", help="a run directory written by lwlora train, or a model")
    p.add_argument("--task", help="task (default: the run's)")
    p.add_argument("--data", help="data override")
    p.add_argument("--gguf-file", help="GGUF file inside MODEL")
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--eval-splits", help="comma-separated splits of a --data directory (default: the run's, else the first of validation, test)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--choice-mode", choices=["letter", "loglik"], default="letter")
    p.add_argument("--out", help="write the results as JSON here (default: RUN/eval.json for a run)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lwlora.io import atomic_write_json
    from lwlora.training.evaluate import evaluate

    if args.no_progress:
        _disable_progress_bars()
    from lwlora.io import check_output_file

    if args.batch_size < 1:
        raise ConfigError("--batch-size", f"must be at least 1, got {args.batch_size}")
    out = args.out or (str(Path(args.target) / "eval.json") if (Path(args.target) / "train_config.json").is_file() else None)
    if out:
        check_output_file(out, "--out")  # before the model is loaded
    results = evaluate(args.target, task=args.task, data=args.data, max_eval_samples=args.max_eval_samples, eval_splits=args.eval_splits, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, choice_mode=args.choice_mode, progress=not args.no_progress, gguf_file=args.gguf_file)
    print(json.dumps(results, indent=2))
    if out:
        atomic_write_json(out, results)
        print(f"wrote {out}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    import lwlora

    parser = _Parser(prog="lwlora", description="Layer-wise LoRA: adapt only the transformer blocks that matter (CKA-scored).")
    parser.add_argument("--version", action="version", version=f"lwlora {lwlora.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_select(subparsers)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_run(subparsers)
    from lwlora.compare import add_compare_parser

    add_compare_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _route_warnings_to_stderr()
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"lwlora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
