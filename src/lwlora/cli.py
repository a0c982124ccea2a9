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
    from lwlora.capture import POOLINGS
    from lwlora.scoring import SCORERS

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
    p.add_argument("--include", type=_int_list("--include"), default=(), help="blocks always selected, e.g. 0,1")
    p.add_argument("--exclude", type=_int_list("--exclude"), default=(), help="blocks never selected")
    p.add_argument("--scorer", default="cka", choices=list(SCORERS), help="layer-change score (default cka)")
    p.add_argument("--pooling", choices=list(POOLINGS), help="token pooling (default: cls for encoders, last for decoders)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens")
    p.add_argument("--device", default="auto", help="auto (all GPUs via device_map=auto, else cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (statistics are always fp32+)")
    p.add_argument("--text-column", help="column holding the text (default: detected)")
    p.add_argument("--text-pair-column", help="second text column for sentence pairs")
    p.add_argument("--template", help="format string over columns, e.g. '{question} {answer}', or a preset: alpaca, alpaca-response")
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
    from pathlib import Path

    from lwlora.report import format_table, peft_snippet, write_artifacts
    from lwlora.select import SelectConfig, select_layers

    if args.no_progress:
        _disable_progress_bars()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
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
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        dtype=args.dtype,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        template=args.template,
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
    print(format_table(selection))
    for message in selection.warnings:
        print(f"warning: {message}", file=sys.stderr)
    print(f"\nwrote {paths['selection']}, {paths['scores']}, {paths['plot']}")
    print("\napply it:\n" + peft_snippet(str(paths["selection"])))
    return 0


def build_parser() -> argparse.ArgumentParser:
    import lwlora

    parser = _Parser(prog="lwlora", description="Layer-wise LoRA: adapt only the transformer blocks that matter (CKA-scored).")
    parser.add_argument("--version", action="version", version=f"lwlora {lwlora.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_select(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    lwlora_logger = logging.getLogger("lwlora")
    lwlora_logger.addHandler(logging.NullHandler())
    lwlora_logger.propagate = False  # warnings are printed once, by the command
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"lwlora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
