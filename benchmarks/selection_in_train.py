"""The selection phase of `lwlora train --layers cka` against `lwlora select` on the same model and
the same samples: does the selection inside training run where training runs?

Both score the blocks of one model on the training task's own selection samples (``--num-samples``
of the train split, drawn with the run's seed). The ``select`` side loads the bare model onto
``--device`` as ``lwlora select --device`` does and calls ``select_layers`` on those samples; the
``train`` side runs ``lwlora train`` for one step (its selection happens before training) and reads
the selection's own timings from ``RUN/selection.json``. Reported: the capture-and-score time
(``timings.score_s``) of each, their ratio (target: train ≤ 1.2× select), the device and dtype each
selection recorded, and whether both chose the same blocks.

    python benchmarks/selection_in_train.py --model /tmp/stage/qwen05-fp32 --data ../shared/data/math_gsm_symbolic \\
        --task instruction --out benchmarks/results/selection-in-train-gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lwlora.io import atomic_write_json, atomic_write_text  # noqa: E402


def select_side(model: str, task_name: str, data: str, *, num_samples: int, seed: int, device: str, max_length: int, batch_size: int) -> dict:
    """``lwlora select --device DEVICE`` on the task's selection samples (the bare model, its dtype)."""
    from lwlora.models import load_model
    from lwlora.commands.select import SelectConfig, select_layers
    from lwlora.tasks import load_task

    tick = time.perf_counter()
    loaded = load_model(model, device=device)
    load_s = time.perf_counter() - tick
    task = load_task(task_name, loaded.tokenizer, data=data, max_length=max_length, max_train_samples=None, max_eval_samples=1, selection_samples=num_samples, seed=seed)
    config = SelectConfig(model=model, data=data, num_samples=num_samples, ratio=0.5, batch_size=batch_size, max_length=max_length, device=device, seed=seed, progress=False)
    selection = select_layers(config, model=loaded.model, tokenizer=loaded.tokenizer, model_kind=loaded.kind, samples=task.selection_texts)
    return {"score_s": selection.timings["score_s"], "total_s": selection.timings["total_s"], "load_model_s": round(load_s, 3), "device": selection.device, "dtype": selection.dtype, "selected": selection.selected, "num_samples": selection.num_samples}


def train_side(model: str, task_name: str, data: str, *, num_samples: int, seed: int, device: str, max_length: int, batch_size: int, bf16: bool, run: Path) -> dict:
    """``lwlora train --layers cka --ratio 0.5`` for one step; the selection's timings from RUN."""
    from lwlora.training.config import TrainConfig
    from lwlora.training.trainer import train

    tick = time.perf_counter()
    config = TrainConfig(model=model, task=task_name, data=data, out=str(run), layers="cka", ratio=0.5, num_samples=num_samples, seed=seed, device=device, max_length=max_length,
                         select_batch_size=batch_size, max_steps=1, batch_size=2, max_eval_samples=1, max_new_tokens=4, bf16=bf16, progress=False, overwrite=True)
    train(config)
    wall = time.perf_counter() - tick
    saved = json.loads((run / "selection.json").read_text())
    return {"score_s": saved["timings"]["score_s"], "total_s": saved["timings"]["total_s"], "command_wall_s": round(wall, 3), "device": saved["device"], "dtype": saved["dtype"], "selected": saved["selected"], "num_samples": saved["num_samples"], "bf16": bf16}


def markdown(result: dict) -> str:
    lines = [f"Selection phase of `lwlora train` vs `lwlora select` ({result['environment'].get('gpu', 'cpu')}; {result['model']}, {result['num_samples']} samples of {result['data']})", "",
             "| side | device | dtype | capture + score (s) | ratio to select | same blocks |", "|---|---|---|---|---|---|"]
    base = result["select"]["score_s"]
    lines.append(f"| `lwlora select --device {result['device']}` | {result['select']['device']} | {result['select']['dtype']} | {base:.3f} | 1.00 | — |")
    for key, row in result["train"].items():
        same = "yes" if row["selected"] == result["select"]["selected"] else f"no ({row['selected']})"
        lines.append(f"| `lwlora train --layers cka`{' --bf16' if row['bf16'] else ''} | {row['device']} | {row['dtype']} | {row['score_s']:.3f} | {row['score_s'] / base:.2f} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--task", default="instruction")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42, help="lwlora train's default seed: the selection samples are drawn with it")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="each side this many times after a warm-up; the minimum is reported")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import torch

    common = dict(num_samples=args.num_samples, seed=args.seed, device=args.device, max_length=args.max_length, batch_size=args.batch_size)
    # the first run of each side warms up (CUDA context, kernels, file cache) and is not counted
    select_side_runs = [select_side(args.model, args.task, args.data, **common) for _ in range(args.repeats + 1)][1:]
    train_runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for bf16 in (False, True):
            key = "bf16" if bf16 else "fp32"
            train_runs[key] = [train_side(args.model, args.task, args.data, **common, bf16=bf16, run=Path(scratch) / f"run-{key}-{i}") for i in range(args.repeats + 1)][1:]

    def fastest(rows: list[dict]) -> dict:
        return min(rows, key=lambda r: r["score_s"])

    environment = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        environment["gpu"] = torch.cuda.get_device_name(0)
    result = {"environment": environment, "model": args.model, "data": args.data, "num_samples": args.num_samples, "device": args.device, "repeats": args.repeats,
              "select": fastest(select_side_runs), "train": {k: fastest(v) for k, v in train_runs.items()}, "all_runs": {"select": select_side_runs, **train_runs}}
    result["ratios"] = {k: round(v["score_s"] / result["select"]["score_s"], 3) for k, v in result["train"].items()}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
