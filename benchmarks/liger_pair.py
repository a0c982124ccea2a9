"""``--liger`` against the plain loss: the same ``lwlora train`` run twice, with and without
Liger's fused linear cross-entropy (no vocabulary-sized logits are materialised), compared on
what it must not change (loss curve, final losses) and what it should change (peak memory,
train time).

The loss is the same function either way, so the curves agree to bfloat16 rounding; the peak
falls by about the logits' share (for a 152k-token vocabulary, batch 8 × 384 tokens: 8 · 384 ·
151,936 floats ≈ 1.9 GB per copy in float32, and the loss keeps several copies).

    # on a GPU: two runs one after the other (timings are comparable only if nothing else shares the GPU)
    python benchmarks/liger_pair.py --out benchmarks/results/liger-qwen05 -- \\
        /tmp/st/qwen05-fp32 --task instruction --data /tmp/st/data/math_gsm_symbolic --layers all --r 16 \\
        --max-steps 40 --batch-size 8 --grad-accum 2 --max-length 384 --bf16 --device cuda
    # runs made earlier (any machine): compare their run folders
    python benchmarks/liger_pair.py --from-runs RUN_WITHOUT RUN_WITH --out benchmarks/results/liger-qwen05

Writes ``OUT.json``, ``OUT.md`` and ``OUT.png`` (the two loss curves).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lwlora.io import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402


def run_facts(run: Path) -> dict[str, Any]:
    """What one run's ``metrics.json`` says about cost and loss: train time, tokens/s, peak
    memory (GiB), final train loss, the logged loss curve [(step, loss)] and each eval split's loss."""
    try:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"--from-runs: {run} has no readable metrics.json ({error}); give two finished `lwlora train` run folders") from None
    train = metrics.get("train", {})
    peak = train.get("peak_memory_bytes")
    return {
        "run": str(run),
        "train_runtime_s": train.get("runtime_s"),
        "tokens_per_s": train.get("tokens_per_s"),
        "peak_memory_gib": None if peak is None else peak / 2**30,
        "peak_memory_kind": train.get("peak_memory_kind"),
        "train_loss": train.get("train_loss"),
        "steps": train.get("global_step"),
        "loss_curve": [(h["step"], h["loss"]) for h in metrics.get("loss_history", []) if "loss" in h],
        "eval_loss": {split: scores.get("loss") for split, scores in (metrics.get("final") or {}).items() if isinstance(scores, dict) and "loss" in scores},
    }


def compare(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """Ratios with / without Liger, and the largest gap between the two loss curves at the
    steps both logged (absolute and relative to the plain loss)."""

    def ratio(key: str) -> float | None:
        a, b = off.get(key), on.get(key)
        return None if not a or b is None else b / a

    plain = dict(off["loss_curve"])
    shared = [(step, plain[step], loss) for step, loss in on["loss_curve"] if step in plain]
    gaps = [abs(b - a) for _, a, b in shared]
    relative = [abs(b - a) / abs(a) for _, a, b in shared if a]
    return {
        "peak_memory_ratio": ratio("peak_memory_gib"),
        "train_time_ratio": ratio("train_runtime_s"),
        "train_loss_gap": None if off.get("train_loss") is None or on.get("train_loss") is None else abs(on["train_loss"] - off["train_loss"]),
        "loss_curve_steps_compared": len(shared),
        "loss_curve_max_gap": max(gaps) if gaps else None,
        "loss_curve_max_relative_gap": max(relative) if relative else None,
        "eval_loss_gap": {s: abs(on["eval_loss"][s] - off["eval_loss"][s]) for s in off["eval_loss"] if s in on["eval_loss"] and off["eval_loss"][s] is not None and on["eval_loss"][s] is not None},
    }


def markdown(result: dict[str, Any]) -> str:
    off, on, gap = result["without"], result["with"], result["comparison"]

    def num(value: Any, digits: int) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    lines = [
        "`--liger` (fused linear cross-entropy) against the plain loss, same run otherwise.", "",
        "| | train time (s) | tokens/s | peak memory (GiB) | train loss | " + " | ".join(f"{s} loss" for s in off["eval_loss"]) + " |",
        "|---|---|---|---|---|" + "---|" * len(off["eval_loss"]),
    ]
    for name, facts in (("without", off), ("with --liger", on)):
        evals = " | ".join(num(facts["eval_loss"].get(s), 4) for s in off["eval_loss"])
        lines.append(f"| {name} | {num(facts['train_runtime_s'], 1)} | {num(facts['tokens_per_s'], 0)} | {num(facts['peak_memory_gib'], 2)} | {num(facts['train_loss'], 4)} | {evals} |")
    lines += [
        "",
        f"Peak memory ×{num(gap['peak_memory_ratio'], 2)}, train time ×{num(gap['train_time_ratio'], 2)} with `--liger`. "
        f"Loss curves at {gap['loss_curve_steps_compared']} logged steps differ by at most {num(gap['loss_curve_max_gap'], 4)} "
        f"({num(None if gap['loss_curve_max_relative_gap'] is None else 100 * gap['loss_curve_max_relative_gap'], 2)}%).",
    ]
    if result.get("note"):
        lines += ["", result["note"]]
    if result.get("command"):
        lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """The two loss curves on one axis (train loss per logged step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, facts, style in (("without", result["without"], dict(color="C0", linewidth=2)), ("with --liger", result["with"], dict(color="C1", linestyle="--", marker="o", markersize=3))):
        if facts["loss_curve"]:
            steps, losses = zip(*facts["loss_curve"])
            ax.plot(steps, losses, label=name, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-runs", nargs=2, metavar=("WITHOUT", "WITH"), help="compare two finished run folders instead of training")
    parser.add_argument("--note", help="a sentence kept in OUT.json and OUT.md (how the runs were made)")
    parser.add_argument("--out", required=True, help="output path without extension: OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    if bool(args.from_runs) == bool(train_args):
        raise SystemExit("give either --from-runs WITHOUT WITH or `-- MODEL ...` (the `lwlora train` arguments without --out and --liger)")
    out = Path(args.out)
    command = None
    if args.from_runs:
        off_dir, on_dir = map(Path, args.from_runs)
    else:
        if "--out" in train_args or "--liger" in train_args:
            raise SystemExit("the `lwlora train` arguments after -- must not contain --out or --liger (this script sets both)")
        runs = out.with_name(out.name + "-runs")
        off_dir, on_dir = runs / "without", runs / "with-liger"
        for run, extra in ((off_dir, []), (on_dir, ["--liger"])):  # one after the other: the timings must not share the GPU
            subprocess.run([sys.executable, "-m", "lwlora.cli", "train", *train_args, *extra, "--out", str(run), "--overwrite"], check=True)
        command = "python benchmarks/liger_pair.py --out " + str(out) + " -- " + " ".join(train_args)
    result = {"without": run_facts(off_dir), "with": run_facts(on_dir)}
    result["comparison"] = compare(result["without"], result["with"])
    result["note"], result["command"] = args.note, command
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
