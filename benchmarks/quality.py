"""Quality of layer selections: every method × seed trained with `lwlora train`, side by side.

For each case (a real pretrained model on a real task of ../shared/data) every method is trained
with the same hyperparameters and the same seeds, through the ``lwlora train`` command line (each
run in its own process, its own run directory), and the test metric, the trainable parameters and
the train time are reported as mean ± std over seeds.

Methods (all at ratio 0.5 where a ratio applies):

- ``all-layer``: LoRA on every block;
- ``cka-50`` (the paper), ``cka-debiased-50``, ``fim-50`` (the paper's Fisher baseline),
  ``random-50``, ``last-50``: LoRA on the floor(L/2) blocks each picks;
- ``equal-budget``: every block at the rank that gives the parameter count of 50% of the blocks at
  ``r`` (``--layers all --budget-from-ratio 0.5``) — is dropping blocks better than lowering ranks?
- ``importance-ranks``: every block, ranks proportional to CKA importance at the same total
  (``--rank-allocation importance``);
- ``full``: full fine-tuning (the only method with its own learning rate, ``full_lr``: a LoRA
  learning rate diverges full fine-tuning).

    python benchmarks/quality.py --out benchmarks/results/quality-gpu --jobs 12 --gpus 0,1 \\
        --model mpnet=/path/to/all-mpnet-base-v2
    python benchmarks/quality.py --case minilm/rte_epistemic --methods all-layer,cka-50 --seeds 0 --out /tmp/q

Runs are resumable: a run that finished (``metrics.json``) with the same ``lwlora train`` command
line (kept in ``RUN.argv.json``) is read, not retrained, so the command can be repeated until every
run is done; a run of another recipe is trained again. Writes ``OUT.json`` (every run and the summary),
``OUT.md`` (one table per case) and ``OUT.png`` (test metric per method and case, mean ± std).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lwlora.compare import summarise_runs  # noqa: E402
from lwlora.io import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters shared by every method of a case (``lwlora train`` flags)."""

    task: str  # lwlora task: classification | instruction
    metric: str  # the reported metric of the ``test`` split
    r: int
    lr: float
    full_lr: float
    epochs: float
    batch_size: int
    max_length: int
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    extra: tuple[str, ...] = ()  # further flags, e.g. ("--choice-mode", "loglik")


ENCODER = Recipe("classification", "accuracy", r=8, lr=5e-4, full_lr=5e-5, epochs=3, batch_size=32, max_length=128, max_train_samples=4000, max_eval_samples=1000, extra=("--warmup", "0.06"))
#: BERT-family encoders (MiniLM) put a pooler (dense + tanh) between the blocks and the classifier;
#: PEFT keeps it frozen, and with all-MiniLM-L6-v2's stale pooler LoRA then does not learn the pair
#: tasks at all (every method at the majority class). Trained in full, as the classifier is.
ENCODER_WITH_POOLER = dataclasses.replace(ENCODER, extra=(*ENCODER.extra, "--modules-to-save", "pooler"))
#: The same classification recipe on a decoder (the sequence head reads the last real token); full
#: fine-tuning at the decoder's learning rate.
DECODER_CLASSIFICATION = dataclasses.replace(ENCODER, full_lr=2e-5)
#: all-MiniLM-L6-v2 does not learn nli_vitaminc in 375 steps (4000 samples × 3 epochs: every method,
#: full fine-tuning included, at or below the majority class); 16000 samples × 1 epoch (500 steps of
#: fresh data) reaches 56.1% with all-layer LoRA (majority 50.9%; calibration-minilm-nli-16k.json).
ENCODER_WITH_POOLER_LONG = dataclasses.replace(ENCODER_WITH_POOLER, epochs=1, max_train_samples=16000)
DECODER_GSM = Recipe("instruction", "exact_match", r=16, lr=2e-4, full_lr=2e-5, epochs=2, batch_size=16, max_length=384, extra=("--warmup", "0.03", "--max-new-tokens", "256"))
DECODER_CHOICE = Recipe("instruction", "accuracy", r=16, lr=2e-4, full_lr=2e-5, epochs=2, batch_size=16, max_length=256, max_train_samples=3000, max_eval_samples=1000, extra=("--warmup", "0.03", "--choice-mode", "loglik"))

#: model key -> default model (a Hub id, a local directory or builtin:NAME); override with --model KEY=PATH
MODELS = {
    "minilm": "builtin:minilm",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
    "smollm2": "builtin:smollm2",
}

#: case "model/task folder of --data-root" -> recipe
CASES: dict[str, Recipe] = {
    **{f"minilm/{t}": ENCODER_WITH_POOLER for t in ("sentiment_multiemo", "rte_epistemic")},
    "minilm/nli_vitaminc": ENCODER_WITH_POOLER_LONG,
    **{f"mpnet/{t}": ENCODER for t in ("sentiment_multiemo", "nli_vitaminc", "rte_epistemic")},
    #: SmolLM2-135M is at the floor on GSM-style math and at chance on MathQA (docs/benchmarks.md):
    #: a 30-block decoder on a task it does learn, so that the decoder's selections can be ranked
    "smollm2/nli_vitaminc": DECODER_CLASSIFICATION,
    "smollm2/math_gsm_symbolic": DECODER_GSM,
    "smollm2/mathqa_choice": DECODER_CHOICE,
}

#: method -> `lwlora train` flags
METHODS: dict[str, tuple[str, ...]] = {
    "all-layer": ("--layers", "all"),
    "cka-50": ("--layers", "cka", "--ratio", "0.5"),
    "cka-debiased-50": ("--layers", "cka-debiased", "--ratio", "0.5"),
    "fim-50": ("--layers", "fim", "--ratio", "0.5"),
    "random-50": ("--layers", "random", "--ratio", "0.5"),
    "last-50": ("--layers", "last", "--ratio", "0.5"),
    "equal-budget": ("--layers", "all", "--budget-from-ratio", "0.5"),
    "importance-ranks": ("--layers", "all", "--budget-from-ratio", "0.5", "--rank-allocation", "importance"),
    "full": ("--method", "full"),
}


@dataclass
class Job:
    case: str
    method: str
    seed: int
    run_dir: Path
    argv: list[str]
    result: dict[str, Any] | None = None
    error: str | None = None
    log: Path | None = field(default=None, repr=False)
    wall_s: float | None = None  # the whole process: start, load, select, train, evaluate


def build_argv(case: str, method: str, seed: int, *, model: str, data_root: Path, run_dir: Path, recipe: Recipe, bf16: bool, max_steps: int | None) -> list[str]:
    """The ``lwlora train`` arguments of one run."""
    _, task_dir = case.split("/", 1)
    lr = recipe.full_lr if method == "full" else recipe.lr
    extra = list(recipe.extra)
    if method == "full" and "--modules-to-save" in extra:  # full fine-tuning trains every module already
        at = extra.index("--modules-to-save")
        del extra[at : at + 2]
    argv = [
        "train", model, "--task", recipe.task, "--data", str(data_root / task_dir), "--out", str(run_dir),
        *METHODS[method], "--r", str(recipe.r), "--lr", str(lr), "--epochs", str(recipe.epochs),
        "--batch-size", str(recipe.batch_size), "--max-length", str(recipe.max_length), "--seed", str(seed),
        "--eval-splits", "test", "--eval-every", "1000000", "--eval-batch-size", "64", "--dropout", "0.05", "--save-every", "1000000", "--logging-steps", "10", "--no-progress", *extra,
    ]
    if recipe.max_train_samples:
        argv += ["--max-train-samples", str(recipe.max_train_samples)]
    if recipe.max_eval_samples:
        argv += ["--max-eval-samples", str(recipe.max_eval_samples)]
    if max_steps:
        argv += ["--max-steps", str(max_steps)]
    if bf16:
        argv += ["--bf16"]
    return argv


NOT_RUN = "not run: --time-limit reached (run the command again to continue)"


def read_run(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return {
        "final": metrics.get("final", {}),
        "params": metrics.get("params"),
        "runtime_s": metrics.get("train", {}).get("runtime_s"),
        "selected": metrics.get("selected"),
        "adapter_rank": metrics.get("adapter_rank"),
        "train_loss": metrics.get("train", {}).get("train_loss"),
    }


def _argv_file(job: Job) -> Path:
    return job.run_dir.parent / f"{job.run_dir.name}.argv.json"


def finished(job: Job) -> dict[str, Any] | None:
    """The run's results if it finished with exactly this command line (a run of an older recipe
    is trained again), else None."""
    stored = _argv_file(job)
    if not stored.is_file() or json.loads(stored.read_text()) != job.argv:
        return None
    return read_run(job.run_dir)


def execute(job: Job, gpu: str | None) -> None:
    """Run one job in its own process (``python -m lwlora train ...``); a run that finished with the
    same command line is only read."""
    job.result = finished(job)
    if job.result is not None:
        return
    cache = tempfile.mkdtemp(prefix="lwlora-quality-")  # one datasets cache per run: no cross-process file locks
    env = dict(os.environ, HF_DATASETS_CACHE=cache, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    job.log = job.run_dir.parent / f"{job.run_dir.name}.log"
    started = time.perf_counter()
    try:
        with open(job.log, "w") as log:
            done = subprocess.run([sys.executable, "-m", "lwlora", *job.argv, "--overwrite"], stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    job.wall_s = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        tail = job.log.read_text(errors="replace").strip().splitlines()[-3:]
        job.error = f"exit {done.returncode}: " + " / ".join(tail)
        return
    job.result = read_run(job.run_dir)
    if job.result is not None:
        atomic_write_json(_argv_file(job), job.argv)


def run_jobs(jobs: list[Job], *, workers: int, gpus: list[str | None], time_limit: float | None = None, retries: int = 0) -> None:
    """Run ``jobs`` on ``workers`` threads, each starting one process at a time, spread over ``gpus``.
    After ``time_limit`` seconds no new run starts (those left say so in ``error``; rerun to finish).

    Runs that failed are tried again up to ``retries`` times, one at a time per GPU: many training
    processes sharing a GPU can exhaust its memory (out-of-memory, or cuBLAS/cuDNN errors from failed
    allocations), which a run alone on the GPU does not."""
    lock, done = threading.Lock(), [0]
    started = time.perf_counter()

    def work(job: Job, gpu: str | None) -> None:
        if time_limit is not None and time.perf_counter() - started > time_limit:
            job.result = finished(job)
            if job.result is None:
                job.error = NOT_RUN
        else:
            execute(job, gpu)
        with lock:
            done[0] += 1
            state = "failed: " + job.error if job.error else f"ok ({job.wall_s or 0:.0f} s)"
            print(f"[{done[0]}/{len(jobs)} {time.perf_counter() - started:6.0f}s] {job.case} {job.method} seed {job.seed}: {state}", flush=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda index_job: work(index_job[1], gpus[index_job[0] % len(gpus)]), enumerate(jobs)))

    free_gpus: queue.Queue[str | None] = queue.Queue()
    for gpu in gpus:
        free_gpus.put(gpu)

    def alone(job: Job) -> None:
        gpu = free_gpus.get()
        try:
            work(job, gpu)
        finally:
            free_gpus.put(gpu)

    for attempt in range(1, retries + 1):
        failed = [j for j in jobs if j.error and j.error != NOT_RUN]
        if not failed:
            return
        print(f"retry {attempt}/{retries}: {len(failed)} failed run(s), one at a time per GPU", flush=True)
        for job in failed:
            job.error = None
        done[0] = len(jobs) - len(failed)
        with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
            list(pool.map(alone, failed))


def test_metric(final: dict[str, Any], metric: str) -> float | None:
    value = (final.get("test") or {}).get(metric)
    return None if value is None else float(value)


def summarise(jobs: list[Job]) -> dict[str, Any]:
    """Per case: summarise_runs (mean ± std of every metric, params, time) plus the test metric."""
    out: dict[str, Any] = {}
    for case in dict.fromkeys(j.case for j in jobs):
        runs = [{"method": j.method, "seed": j.seed, "final": j.result["final"], "params": j.result["params"], "runtime_s": j.result["runtime_s"]} for j in jobs if j.case == case and j.result]
        out[case] = summarise_runs(runs) if runs else {}
        for method, stats in out[case].items():
            stats["selected"] = {str(j.seed): j.result["selected"] for j in jobs if j.case == case and j.method == method and j.result}
    return out


def trivial_baseline(data_root: Path, case: str) -> float | None:
    """The score of a model that learned nothing, on the case's test split: the majority class's
    share (classification) or the mean of 1 / number of choices (multiple choice); None otherwise
    or when the data is not there."""
    path = data_root / case.split("/", 1)[1] / "test.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if records and all("label" in r for r in records):
        labels = [str(r["label"]) for r in records]
        return max(labels.count(label) for label in set(labels)) / len(labels)
    if records and all(isinstance(r.get("choices"), list) and r["choices"] for r in records):
        return sum(1 / len(r["choices"]) for r in records) / len(records)
    return None


def _fmt(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if not stat else f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown(summary: dict[str, Any], env: dict[str, Any], baselines: dict[str, float | None], recipes: dict[str, dict[str, Any]]) -> str:
    """One table per case; ``recipes``: case -> the recipe the runs used (as saved in the JSON)."""
    lines = [f"Quality of layer selections ({env.get('gpu', 'cpu')}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}). Test metric in %, mean ± std over seeds.", ""]
    for case, methods in summary.items():
        recipe = Recipe(**{**recipes[case], "extra": tuple(recipes[case]["extra"])}) if case in recipes else None
        lines += [f"### {case}", ""]
        if recipe is not None:
            lines += [f"`{recipe.task}`, r {recipe.r}, lr {recipe.lr:g} (full: {recipe.full_lr:g}), {recipe.epochs:g} epochs, batch {recipe.batch_size}, max length {recipe.max_length}, train samples {recipe.max_train_samples or 'all'}, `{' '.join(recipe.extra)}`", ""]
        if baselines.get(case) is not None:
            lines += [f"Trivial baseline (majority class or 1 / choices) on the test split: {100 * baselines[case]:.1f}%", ""]
        lines += [f"| method | seeds | test {recipe.metric if recipe else 'accuracy'} (%) | trainable params | train time (s) | blocks (seed 0) |", "|---|---|---|---|---|---|"]
        metric = recipe.metric if recipe else "accuracy"
        for method, stats in methods.items():
            test = stats["final"].get("test", {}).get(metric)
            blocks = next(iter(stats.get("selected", {}).values()), None)
            lines.append(f"| {method} | {stats['num_seeds']} | {_fmt(test, 100)} | {_fmt(stats['trainable_params'], 1, 0)} | {_fmt(stats['train_runtime_s'], 1, 1)} | {','.join(map(str, blocks)) if blocks else '—'} |")
        lines.append("")
    lines.append(f"Command: `{env['command']}`")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, baselines: dict[str, float | None], recipes: dict[str, dict[str, Any]]) -> None:
    """Test metric per method (bars: mean, whiskers: std), one panel per case; the dotted line is
    the trivial baseline (majority class, or 1 / number of choices)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in summary if summary[c]]
    if not cases:
        return
    columns = min(4, len(cases))
    rows = -(-len(cases) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    for ax, case in zip(axes.flat, cases):
        metric = recipes.get(case, {}).get("metric", "accuracy")
        names = list(summary[case])
        stats = [summary[case][m]["final"].get("test", {}).get(metric) for m in names]
        means = [100 * s["mean"] if s else 0.0 for s in stats]
        stds = [100 * s["std"] if s else 0.0 for s in stats]
        colors = ["#c44e52" if m.startswith("cka") else "#4c72b0" for m in names]
        ax.barh(range(len(names)), means, xerr=stds, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        low = min((m - s for m, s in zip(means, stds) if m), default=0.0)
        ax.set_xlim(max(0.0, low - 5), max(means) + max(stds) + 2)
        if baselines.get(case) is not None:
            ax.axvline(100 * baselines[case], color="grey", linestyle=":", linewidth=1)
        ax.set_title(case, fontsize=8)
        ax.set_xlabel(f"test {metric} (%)", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "command": " ".join(["python", *sys.argv])}
    if torch.cuda.is_available():
        env["gpu"] = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    return env


def parse_models(pairs: list[str]) -> dict[str, str]:
    models = dict(MODELS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in MODELS or not value:
            raise SystemExit(f"--model: expected KEY=PATH with KEY one of {', '.join(MODELS)}, got {pair!r}")
        models[key] = value
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help=f"model/task (default: all): {', '.join(CASES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", action="append", default=[], help="KEY=PATH_OR_ID, overriding a default model")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="folder of the task folders (../shared/data)")
    parser.add_argument("--runs", help="where the run directories go (default: OUT-runs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one process each)")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids to spread the runs over (default: none / as visible)")
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 even on a GPU")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every run's steps (smoke runs)")
    parser.add_argument("--retries", type=int, default=1, help="times a failed run is tried again, alone on its GPU (default 1)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds after which no new run starts; the summary covers the finished runs")
    parser.add_argument("--recipe", choices=["encoder", "decoder-classification", "decoder-gsm", "decoder-choice"], help="recipe for cases not in the table (e.g. a tiny model in a smoke test)")
    parser.add_argument("--from-json", help="re-render OUT.md and OUT.png from a quality JSON written earlier (no training)")
    parser.add_argument("--out", required=True, help="output path without extension: OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        baselines = {case: trivial_baseline(Path(args.data_root), case) for case in saved["summary"]}
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.with_suffix(".md"), markdown(saved["summary"], saved["environment"], baselines, saved["recipes"]))
        plot(saved["summary"], out.with_suffix(".png"), baselines, saved["recipes"])
        return 0

    models = parse_models(args.model)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    cases = args.case or list(CASES)
    recipes = {"encoder": ENCODER, "decoder-classification": DECODER_CLASSIFICATION, "decoder-gsm": DECODER_GSM, "decoder-choice": DECODER_CHOICE}
    for case in cases:
        key = case.split("/", 1)[0]
        if "/" not in case or key not in models:
            raise SystemExit(f"--case: expected MODEL/TASK with MODEL one of {', '.join(models)}, got {case!r}")
        if case not in CASES and args.recipe is None:
            raise SystemExit(f"--case {case}: not in the table ({', '.join(CASES)}); give --recipe for it")
    data_root = Path(args.data_root)
    missing = sorted({c.split('/', 1)[1] for c in cases if not (data_root / c.split('/', 1)[1]).is_dir()})
    if missing:
        raise SystemExit(f"--data-root: {data_root} lacks the task folder(s) {missing} (see ../shared/data/README.md)")

    import torch

    bf16 = torch.cuda.is_available() and not args.no_bf16
    runs_root = Path(args.runs) if args.runs else out.with_name(out.name + "-runs")
    jobs = []
    for seed in seeds:  # seed-major: every method's first seed finishes before any second seed
        for case in cases:
            for method in methods:
                run_dir = runs_root / case.replace("/", "__") / f"{method}-seed{seed}"
                recipe = CASES.get(case) or recipes[args.recipe]
                model = models[case.split("/", 1)[0]]
                jobs.append(Job(case, method, seed, run_dir, build_argv(case, method, seed, model=model, data_root=data_root, run_dir=run_dir, recipe=recipe, bf16=bf16, max_steps=args.max_steps)))
    gpus: list[str | None] = args.gpus.split(",") if args.gpus else [None]
    if args.retries < 0:
        raise SystemExit(f"--retries: must be >= 0, got {args.retries}")
    run_jobs(jobs, workers=max(1, args.jobs), gpus=gpus, time_limit=args.time_limit, retries=args.retries)

    env = environment()
    summary = summarise(jobs)
    result = {
        "environment": env,
        "recipes": {case: asdict(CASES.get(case) or recipes[args.recipe]) for case in cases},
        "methods": {m: list(METHODS[m]) for m in methods},
        "seeds": seeds,
        "runs": [{"case": j.case, "method": j.method, "seed": j.seed, "run_dir": str(j.run_dir), "argv": j.argv, "error": j.error, "wall_s": j.wall_s, **(j.result or {})} for j in jobs],
        "summary": summary,
    }
    baselines = {case: trivial_baseline(data_root, case) for case in cases}
    result["trivial_baselines"] = baselines
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown(summary, env, baselines, result["recipes"]))
    plot(summary, out.with_suffix(".png"), baselines, result["recipes"])
    print(markdown(summary, env, baselines, result["recipes"]))
    failed = [j for j in jobs if j.error]
    for j in failed:
        print(f"FAILED {j.case} {j.method} seed {j.seed}: {j.error} (log: {j.log})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
