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
  learning rate diverges full fine-tuning);
- ``units-50``: attention and MLP halves scored apart, the most important filling 50% of
  all-layer LoRA's parameters (``--granularity sublayer``);
- ``prune-50``: LoRA on every block for 5% of the steps, then the half of the blocks whose
  adapters changed their layers' outputs most keep training (``--prune-at 0.05``);
- ``prune-rel-50``: the same, each update measured against its layer's own output
  (``--prune-score relative``: the absolute size grows with a decoder's input norms, with depth);
- ``dynamic-50``: adapters on every block, half of them trainable at a time, redrawn every 20
  steps with probabilities from CKA importance (``--dynamic-blocks 0.5``): full-size adapter,
  cheaper steps;
- ``eva-budget``: PEFT's EVA initialisation at the equal-budget rank, ranks redistributed by
  explained variance (the rank-redistribution baseline next to ``importance-ranks``);
- ``recommended``: ``--preset recommended``, the mode lwlora ships for half the parameters
  (``lwlora.training.modes``: today equal-budget's run, so it is not in the default ``--methods``
  and ``goal.py`` judges it on equal-budget's runs; give it by name to train it apart);
- ``untuned``: the pretrained model evaluated without training (instruction cases: the floor every
  method must clear).

Learning rate per method (``--protocol tuned``, the default): one learning rate for every method
favours the method it was tuned for. So each method's rate is chosen on the **validation** split
first: seed ``--tune-seed`` is trained at every multiple of the recipe's rate in ``--lr-grid``
(``--full-lr-grid`` for full fine-tuning) and scored on ``validation`` only; the best multiple
(ties: the smaller) is the method's rate, and when it sits at an edge of the grid the grid is
widened by a factor of 2 on that side (up to ``--widen`` times). A run scoring at or below a
constant prediction on that split (its majority class's share, or 1 / choices: OUT.json
``validation_floors``) learned nothing and is never chosen over one that did — a classifier that
collapsed onto the majority class scores exactly that and would otherwise win where the others
learned little; when no rate beats it the grid widens downwards and, failing that, the recipe's
rate is used (‡ in the table). Then every seed is trained at the chosen rate and scored on
``test``. The test split is never read before the rates are chosen.
Where records come in groups of near-duplicates that the test split keeps apart from train
(``Recipe.group_column``: math_gsm_symbolic's templates), the data's own validation split shares
train's groups and would reward recalling seen problems; the search then trains on the other
groups of train and validates on ``--tune-holdout`` of them held out whole (``tuning_split``).
An instruction case's search also evaluates the untrained model once on that validation split
(OUT.json ``untuned_validation``, a line under the search's table): the floor its scores read
against, since the held-out split is not the test split the ``untuned`` row measures.
``--protocol fixed`` trains every method at the recipe's rate (the older tables).

A search and its final runs can be split over machines: ``--search-only`` stops after the search
(OUT.json then holds the chosen rates and every search run), and ``--tuning-from OLD.json`` takes
the rates chosen there (for the cases and methods it has; the others are searched) and goes
straight to the final runs, recording where they came from; a saved search whose best rate sat at
the grid's edge goes on from its saved scores while ``--widen`` > 0 (only the new points train).

    python benchmarks/quality.py --out benchmarks/results/quality-gpu --jobs 12 --gpus 0,1 \\
        --model mpnet=/path/to/all-mpnet-base-v2
    python benchmarks/quality.py --case minilm/rte_epistemic --methods all-layer,cka-50 --seeds 0 --out /tmp/q
    python benchmarks/quality.py --case qwen05/math_gsm_symbolic --model qwen05=/path/to/qwen2.5-coder-0.5b \\
        --methods untuned,all-layer,cka-50,random-50,equal-budget --jobs 5 --out /tmp/q-qwen

Runs are resumable: a run that finished (``metrics.json``) with the same ``lwlora train`` command
line (kept in ``RUN.argv.json``) is read, not retrained, so the command can be repeated until every
run is done; a run of another recipe is trained again. Writes ``OUT.json`` (every run, the learning-rate search and the summary),
``OUT.md`` (one table per case, with the chosen rates and each run's step time and peak memory),
``OUT.png`` (test metric per method and case, mean ± std) and ``OUT-tradeoff.png`` (test metric
against trainable parameters and step time, per case).
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
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lwlora.commands.compare import summarise_runs
from lwlora.io import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from lwlora.training.modes import RECOMMENDED, recommended_flags  # noqa: E402


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
    grad_accum: int = 1  # the global batch is batch_size x grad_accum
    #: a column grouping near-duplicate records (math_gsm_symbolic's ``template``: a GSM8K problem and
    #: its generated variants). The test split holds other groups than train, but the data's
    #: validation split shares train's groups (57 of its 58 templates), so it measures how well
    #: variants of seen problems are recalled, not the test's transfer: the learning-rate search
    #: then holds out whole groups of train instead (see tuning_split).
    group_column: str | None = None


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
DECODER_GSM = Recipe("instruction", "exact_match", r=16, lr=2e-4, full_lr=2e-5, epochs=2, batch_size=16, max_length=384, extra=("--warmup", "0.03", "--max-new-tokens", "256"), group_column="template")
#: DECODER_GSM on Qwen2.5-Coder-0.5B: the same global batch of 16 in two micro-batches of 8, since a
#: 152k-token vocabulary's logits make a batch of 16 x 384 tokens peak far above 10 GB.
DECODER_GSM_QWEN = dataclasses.replace(DECODER_GSM, batch_size=8, grad_accum=2)
DECODER_CHOICE = Recipe("instruction", "accuracy", r=16, lr=2e-4, full_lr=2e-5, epochs=2, batch_size=16, max_length=256, max_train_samples=3000, max_eval_samples=1000, extra=("--warmup", "0.03", "--choice-mode", "loglik"))

#: model key -> default model (a Hub id, a local directory or builtin:NAME); override with --model KEY=PATH
MODELS = {
    "minilm": "builtin:minilm",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
    "smollm2": "builtin:smollm2",
    #: Qwen2.5-Coder-0.5B-Instruct (24 blocks): the one decoder here that learns the math task; pip
    #: ships it in six parts (../shared/MODELS.md), benchmarks/stage_models.py turns it into a checkpoint
    "qwen05": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
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
    "qwen05/math_gsm_symbolic": DECODER_GSM_QWEN,
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
    # candidates of the selection-science issue (docs/benchmarks.md, section 3b)
    "units-50": ("--layers", "cka", "--granularity", "sublayer", "--ratio", "0.5"),
    "eva-budget": ("--layers", "all", "--budget-from-ratio", "0.5", "--method", "eva"),
    "prune-50": ("--layers", "all", "--prune-at", "0.05", "--ratio", "0.5"),
    # prune-50's absolute score kept the deepest blocks on Qwen (inputs grow with depth): the update against the layer's output
    "prune-rel-50": ("--layers", "all", "--prune-at", "0.05", "--ratio", "0.5", "--prune-score", "relative"),
    # the NLI cases: only methods that train every block learned on MiniLM; a longer all-block warm-up
    # (a fifth of the steps) before the same pruning, final adapter still half of all-layer's
    "prune-rel-50-late": ("--layers", "all", "--prune-at", "0.2", "--ratio", "0.5", "--prune-score", "relative"),
    "dynamic-50": ("--layers", "all", "--dynamic-blocks", "0.5", "--dynamic-every", "20"),
    # the mode lwlora ships for half the parameters (lwlora.training.modes; docs/benchmarks.md 3c)
    "recommended": ("--preset", "recommended"),
    "untuned": (),  # no training: `lwlora eval MODEL` on the test split (instruction cases)
}

#: methods trained at the full fine-tuning grid / not trained at all
FULL_METHODS = ("full",)
UNTRAINED_METHODS = ("untuned",)


def same_run_as(method: str) -> str | None:
    """The other method of METHODS that trains the same run as ``method`` once a training preset is
    expanded (``recommended`` → equal-budget's flags today), or None."""
    flags = METHODS[method]
    if flags == ("--preset", RECOMMENDED):
        flags = recommended_flags()
    return next((other for other, theirs in METHODS.items() if other != method and theirs == flags), None)


#: the default --methods: every trained method once (a preset that is another method's run is left out)
DEFAULT_METHODS = tuple(m for m in METHODS if m not in UNTRAINED_METHODS and same_run_as(m) is None)


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
    lr: float | None = None  # the learning rate it trains at (None: not trained)
    phase: str = "final"  # "tune" (validation split, learning-rate search) or "final" (test split)
    lr_multiple: float | None = None
    gpu: str | None = None  # the CUDA_VISIBLE_DEVICES it ran on (None: the default device)
    started_at: float | None = None  # epoch seconds, set when the process really ran (not read back)
    ended_at: float | None = None


#: the fields of a run's JSON record that describe the job; the rest is what the run reported (read_run)
JOB_FIELDS = ("case", "method", "seed", "phase", "lr", "lr_multiple", "run_dir", "argv", "error", "wall_s", "gpu", "started_at", "ended_at")


def run_record(job: Job) -> dict[str, Any]:
    """A job as one entry of OUT.json's ``runs``: its fields, then its result's."""
    fields = {name: getattr(job, name) for name in JOB_FIELDS}
    return {**fields, "run_dir": str(job.run_dir), **(job.result or {})}


def job_from_record(record: dict[str, Any]) -> Job:
    """The inverse of :func:`run_record`: a finished job read back from a saved OUT.json."""
    job = Job(**{name: record.get(name) for name in JOB_FIELDS if name != "run_dir"}, run_dir=Path(record["run_dir"]))
    result = {key: value for key, value in record.items() if key not in JOB_FIELDS}
    job.result = result or None
    return job


def build_argv(case: str, method: str, seed: int, *, model: str, data_root: Path, run_dir: Path, recipe: Recipe, bf16: bool, max_steps: int | None, lr: float | None = None, eval_splits: str = "test", data_dir: Path | None = None) -> list[str]:
    """The ``lwlora train`` arguments of one run (``lwlora eval`` for ``untuned``) at ``lr``
    (default: the recipe's rate for the method), scored on ``eval_splits`` of the case's data
    folder (or of ``data_dir``: a learning-rate search's own split)."""
    _, task_dir = case.split("/", 1)
    if data_dir is not None:
        data_root, task_dir = data_dir.parent, data_dir.name
    if method in UNTRAINED_METHODS:
        return ["eval", model, "--task", recipe.task, "--data", str(data_root / task_dir), "--eval-splits", eval_splits, "--batch-size", "64",
                "--out", str(run_dir / "eval.json"), "--no-progress", *_eval_flags(recipe.extra)] + (["--max-eval-samples", str(recipe.max_eval_samples)] if recipe.max_eval_samples else [])
    if lr is None:
        lr = recipe.full_lr if method in FULL_METHODS else recipe.lr
    extra = list(recipe.extra)
    if method == "full" and "--modules-to-save" in extra:  # full fine-tuning trains every module already
        at = extra.index("--modules-to-save")
        del extra[at : at + 2]
    argv = [
        "train", model, "--task", recipe.task, "--data", str(data_root / task_dir), "--out", str(run_dir),
        *METHODS[method], "--r", str(recipe.r), "--lr", f"{lr:g}", "--epochs", str(recipe.epochs),
        "--batch-size", str(recipe.batch_size), "--max-length", str(recipe.max_length), "--seed", str(seed),
        "--eval-splits", eval_splits, "--eval-every", "1000000", "--eval-batch-size", "64", "--dropout", "0.05", "--save-every", "1000000", "--logging-steps", "10", "--no-progress", *extra,
    ]
    if recipe.grad_accum != 1:
        argv += ["--grad-accum", str(recipe.grad_accum)]
    if recipe.max_train_samples:
        argv += ["--max-train-samples", str(recipe.max_train_samples)]
    if recipe.max_eval_samples:
        argv += ["--max-eval-samples", str(recipe.max_eval_samples)]
    if max_steps:
        argv += ["--max-steps", str(max_steps)]
    if bf16:
        argv += ["--bf16"]
    return argv


def tuning_split(train_file: Path, group_column: str, out: Path, *, fraction: float, seed: int, max_validation: int | None = 200) -> dict[str, Any]:
    """Write ``out/train.jsonl`` and ``out/validation.jsonl`` from ``train_file``: ``fraction`` of
    its groups (values of ``group_column``, drawn with ``seed``) held out whole as validation, the
    rest to train on. A learning rate chosen there is chosen for unseen groups, as the test split
    asks. At most ``max_validation`` held-out records are scored (drawn with ``seed``: generation
    is the slow part of a decoder's run). Returns what was written (groups held out, counts)."""
    import random

    from lwlora.data import read_jsonl

    records = read_jsonl(train_file)
    missing = sum(1 for r in records if group_column not in r)
    if missing:
        raise SystemExit(f"{train_file}: {missing} records lack the group column {group_column!r}")
    groups = sorted({r[group_column] for r in records}, key=str)
    held = set(random.Random(seed).sample(groups, max(1, round(fraction * len(groups)))))
    train = [r for r in records if r[group_column] not in held]
    validation = [r for r in records if r[group_column] in held]
    if max_validation is not None and len(validation) > max_validation:
        keep = sorted(random.Random(seed).sample(range(len(validation)), max_validation))
        validation = [validation[i] for i in keep]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    meta = train_file.parent / "meta.json"
    if meta.is_file():
        shutil.copy2(meta, out / "meta.json")
    return {"group_column": group_column, "fraction": fraction, "seed": seed, "held_out_groups": sorted(held, key=str), "groups": len(groups), "train": len(train), "validation": len(validation)}


def _eval_flags(extra: tuple[str, ...]) -> list[str]:
    """The recipe's flags that ``lwlora eval`` takes too (how answers are generated and read)."""
    kept = []
    for flag in ("--max-new-tokens", "--choice-mode"):
        if flag in extra:
            at = extra.index(flag)
            kept += [flag, extra[at + 1]]
    return kept


NOT_RUN = "not run: --time-limit reached (run the command again to continue)"


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """What a finished run reports: its final evaluation, parameters, time, its cost per step
    (train seconds / optimizer steps, peak GPU memory) as the run itself measured them, and the
    selection's scorer with its per-block importances (CKA's, or the warm-up pruner's normalised
    scores; None for rule-made selections); or an untrained model's evaluation (``eval.json``)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        untrained = run_dir / "eval.json"
        if untrained.is_file():
            return {"final": json.loads(untrained.read_text()), "params": {"trainable": 0, "adapter": 0, "head": 0}, "runtime_s": None, "selected": [], "adapter_rank": None, "train_loss": None}
        return None
    metrics = json.loads(path.read_text())
    scorer, importance = None, None
    selection = run_dir / "selection.json"
    if selection.is_file():
        saved = json.loads(selection.read_text())
        scorer = saved.get("scorer")
        values = [layer.get("importance") for layer in saved.get("layers", [])]
        importance = values if any(v is not None for v in values) else None
    train = metrics.get("train", {})
    steps = train.get("global_step") or 0
    runtime = train.get("runtime_s")
    peak = train.get("peak_memory_bytes")
    return {
        "final": metrics.get("final", {}),
        "params": metrics.get("params"),
        "runtime_s": runtime,
        "selected": metrics.get("selected"),
        "adapter_rank": metrics.get("adapter_rank"),
        "train_loss": train.get("train_loss"),
        "step_s": round(runtime / steps, 4) if runtime and steps else None,
        "peak_memory_gib": round(peak / 2**30, 3) if peak and train.get("peak_memory_kind") == "cuda_allocated" else None,
        "scorer": scorer,
        "block_importance": importance,
    }


def _argv_file(job: Job) -> Path:
    return job.run_dir.parent / f"{job.run_dir.name}.argv.json"


def _timing_file(job: Job) -> Path:
    return job.run_dir.parent / f"{job.run_dir.name}.timing.json"


def finished(job: Job) -> dict[str, Any] | None:
    """The run's results if it finished with exactly this command line (a run of an older recipe
    is trained again), else None. A finished run's GPU, start and end times come back into
    ``job`` too (a later invocation that only reads the run still knows who shared its GPU)."""
    stored = _argv_file(job)
    if not stored.is_file() or json.loads(stored.read_text()) != job.argv:
        return None
    timing = _timing_file(job)
    if timing.is_file() and job.started_at is None:
        saved = json.loads(timing.read_text())
        job.gpu, job.started_at, job.ended_at, job.wall_s = saved.get("gpu"), saved.get("started_at"), saved.get("ended_at"), saved.get("wall_s")
    return read_run(job.run_dir)


def launch(argv: list[str], log: IO[str], env: dict[str, str]) -> int:
    """``python -m lwlora ARGV`` in its own process (its output into ``log``, environment ``env``):
    its exit status. One process per run keeps runs that share a GPU from sharing CUDA state."""
    return subprocess.run([sys.executable, "-m", "lwlora", *argv], stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def execute(job: Job, gpu: str | None) -> None:
    """Run one job in its own process (``python -m lwlora train ...``); a run that finished with the
    same command line is only read."""
    job.result = finished(job)
    if job.result is not None:
        return
    cache = tempfile.mkdtemp(prefix="lwlora-quality-")  # one datasets cache per run: no cross-process file locks
    env = dict(os.environ, HF_DATASETS_CACHE=cache, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               # several runs share a GPU: without expandable segments each process's cache fragments and
               # holds 2-3x its peak allocation (34 GiB reserved for a 13 GiB peak), starving the others
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    job.log = job.run_dir.parent / f"{job.run_dir.name}.log"
    job.gpu, job.started_at = gpu, time.time()
    started = time.perf_counter()
    try:
        with open(job.log, "w") as log:
            returncode = launch([*job.argv, *(["--overwrite"] if job.argv[0] == "train" else [])], log, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    job.wall_s = round(time.perf_counter() - started, 1)
    job.ended_at = time.time()
    if returncode != 0:
        tail = job.log.read_text(errors="replace").strip().splitlines()[-3:]
        job.error = f"exit {returncode}: " + " / ".join(tail)
        return
    job.result = read_run(job.run_dir)
    if job.result is not None:
        atomic_write_json(_timing_file(job), {"gpu": job.gpu, "started_at": job.started_at, "ended_at": job.ended_at, "wall_s": job.wall_s})
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


def gpu_sharing(job: Job, jobs: list[Job]) -> float | None:
    """How many other runs of ``jobs`` shared ``job``'s GPU, on average over its lifetime:
    Σ_k overlap(job, k) / duration(job), over the runs k ≠ job on the same GPU. A run's step time
    is comparable only with runs that shared the GPU about as much. None when ``job`` was not
    timed here (read back from an earlier session's JSON)."""
    if job.started_at is None or job.ended_at is None or job.ended_at <= job.started_at:
        return None
    overlap = 0.0
    for other in jobs:
        if other is job or other.gpu != job.gpu or other.started_at is None or other.ended_at is None:
            continue
        overlap += max(0.0, min(job.ended_at, other.ended_at) - max(job.started_at, other.started_at))
    return overlap / (job.ended_at - job.started_at)


def summarise(jobs: list[Job], timed: list[Job] | None = None) -> dict[str, Any]:
    """Per case: summarise_runs (mean ± std of every metric, params, time) plus the learning rate,
    step time, peak GPU memory and GPU sharing (:func:`gpu_sharing` among ``timed``, default
    ``jobs``), over the final (test-split) runs."""
    timed = jobs if timed is None else timed
    out: dict[str, Any] = {}
    final = [j for j in jobs if j.phase == "final"]
    for case in dict.fromkeys(j.case for j in final):
        mine = [j for j in final if j.case == case and j.result]
        runs = [{"method": j.method, "seed": j.seed, "final": j.result["final"], "params": j.result["params"], "runtime_s": j.result["runtime_s"]} for j in mine]
        out[case] = summarise_runs(runs) if runs else {}
        for method, stats in out[case].items():
            ran = [j for j in mine if j.method == method]
            stats["selected"] = {str(j.seed): j.result["selected"] for j in ran}
            stats["lr"] = next((j.lr for j in ran), None)
            for key in ("step_s", "peak_memory_gib"):
                values = [j.result.get(key) for j in ran if j.result.get(key) is not None]
                stats[key] = _mean_std(values) if values else None
            sharing = [x for x in (gpu_sharing(j, timed) for j in ran) if x is not None]
            stats["gpu_sharing"] = _mean_std(sharing) if sharing else None
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    import statistics

    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def validation_score(job: Job, metric: str) -> float | None:
    """A tuning run's score: ``metric`` on the validation split, the only split tuning reads."""
    if not job.result:
        return None
    value = (job.result.get("final", {}).get("validation") or {}).get(metric)
    return None if value is None else float(value)


def learned(value: float | None, floor: float | None) -> bool:
    """Whether a tuning run learned anything: its validation score is above ``floor``, what a
    model that learned nothing scores on the same split (the majority class's share for a
    classifier; None: no floor known, every finished run counts)."""
    return value is not None and (floor is None or value > floor + 1e-9)


def choose_multiple(scores: dict[float, float | None], floor: float | None = None) -> float | None:
    """The learning-rate multiple with the best validation score among the runs that learned
    (:func:`learned`; ties: the smaller multiple, the cautious choice). A run at or below
    ``floor`` is never chosen over one above it: a classifier that collapsed onto the majority
    class scores the floor exactly and would otherwise beat every run that learned a little.
    When no run learned, the recipe's own rate (1x, else the smallest finished multiple).
    None when no run of the grid finished."""
    scored = [(m, v) for m, v in scores.items() if v is not None]
    if not scored:
        return None
    learners = [(m, v) for m, v in scored if learned(v, floor)]
    if not learners:
        return 1.0 if any(m == 1.0 for m, _ in scored) else min(m for m, _ in scored)
    best = max(v for _, v in learners)
    return min(m for m, v in learners if v == best)


def widened(scores: dict[float, float | None], chosen: float | None, floor: float | None = None) -> float | None:
    """The next multiple to try when ``chosen`` sits at an edge of the grid (x2 beyond the top,
    /2 below the bottom), or when no run learned (/2 below the bottom: the higher rates diverged
    or collapsed), else None."""
    finished = [m for m, v in scores.items() if v is not None]
    if chosen is None or len(finished) < 2:  # one finished point says nothing about where the optimum lies
        return None
    grid = sorted(scores)
    if not any(learned(v, floor) for v in scores.values()):
        return grid[0] / 2
    if len(grid) > 1 and chosen == grid[-1]:
        return grid[-1] * 2
    if len(grid) > 1 and chosen == grid[0]:
        return grid[0] / 2
    return None


def tune_learning_rates(cases: list[str], methods: list[str], *, make_job, grids: dict[str, list[float]], metrics: dict[str, str], widen: int, run, done: dict[tuple[str, str, float], Job] | None = None, floors: dict[str, float | None] | None = None) -> dict[str, dict[str, Any]]:
    """Choose every (case, method)'s learning-rate multiple on the validation split.

    ``make_job(case, method, multiple)`` builds a tuning job; ``grids[method]`` is its starting
    grid; ``metrics[case]`` the metric compared; ``run(jobs)`` trains jobs (resumable, so finished runs are only read). Grids sitting at
    an edge grow by one point per round, at most ``widen`` times. ``done``: (case, method,
    multiple) -> a search run finished earlier (``--tuning-from``), read instead of trained.
    ``floors[case]``: what learning nothing scores on its validation split (:func:`choose_multiple`).
    Returns case -> method -> {"scores": {multiple: validation score}, "chosen": multiple,
    "edge": bool, "learned": bool (some run beat the floor), "jobs": [...]}.
    """
    floors = floors or {}
    state: dict[str, dict[str, Any]] = {c: {m: {"multiples": list(grids[m]), "added": 0} for m in methods if m not in UNTRAINED_METHODS} for c in cases}
    jobs: dict[tuple[str, str, float], Job] = dict(done or {})
    while True:
        pending = [(c, m, x) for c in state for m in state[c] for x in state[c][m]["multiples"] if (c, m, x) not in jobs]
        if pending:
            new = {key: make_job(*key) for key in pending}
            run(list(new.values()))
            jobs.update(new)
        grew = False
        for case, per_method in state.items():
            for method, entry in per_method.items():
                scores = {x: validation_score(jobs[(case, method, x)], metrics[case]) for x in entry["multiples"]}
                chosen = choose_multiple(scores, floors.get(case))
                entry.update(scores=scores, chosen=chosen)
                beyond = widened(scores, chosen, floors.get(case))
                if beyond is not None and entry["added"] < widen:
                    entry["multiples"].append(beyond)
                    entry["added"] += 1
                    grew = True
        if not grew:
            break
    result: dict[str, dict[str, Any]] = {}
    for case, per_method in state.items():
        result[case] = {}
        for method, entry in per_method.items():
            result[case][method] = {
                "scores": {f"{x:g}": entry["scores"][x] for x in sorted(entry["scores"])},
                "chosen": entry["chosen"],
                "edge": widened(entry["scores"], entry["chosen"], floors.get(case)) is not None,
                "learned": any(learned(v, floors.get(case)) for v in entry["scores"].values()),
                "jobs": [jobs[(case, method, x)] for x in sorted(entry["multiples"])],
            }
    return result


def reused_tuning(path: Path, cases: list[str], methods: list[str], *, widen: int, floors: dict[str, float | None] | None = None) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str, float], Job]]:
    """The learning-rate searches of an earlier quality JSON (``--tuning-from``) for ``cases`` ×
    ``methods``. Returns (chosen, done): ``chosen``: case -> method -> the saved entry (``scores``,
    ``chosen``, ``lr``, ...) plus ``"from": str(path)``, for the searches that are finished;
    ``done``: (case, method, multiple) -> the saved search run, for the searches to continue:
    those that chose nothing, that left a grid point without a score (not run or failed: it is
    tried again), whose best rate sat at the grid's edge while ``widen`` > 0, or whose
    saved choice differs from :func:`choose_multiple`'s under ``floors`` (a file written before
    the floor existed, where a collapsed run won; the search goes on from the saved scores,
    training only the new grid points)."""
    floors = floors or {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"--tuning-from: cannot read {path}: {error}") from None
    if saved.get("protocol") != "tuned":
        raise SystemExit(f"--tuning-from: {path} was not written by --protocol tuned")
    tuning = saved.get("tuning") or {}
    chosen: dict[str, dict[str, Any]] = {}
    done: dict[tuple[str, str, float], Job] = {}
    for case in cases:
        for method in methods:
            entry = tuning.get(case, {}).get(method)
            if entry is None:
                continue
            rechosen = choose_multiple({float(x): v for x, v in entry.get("scores", {}).items()}, floors.get(case))
            stale = entry.get("chosen") is not None and rechosen != float(entry["chosen"])
            unfinished = any(v is None for v in entry.get("scores", {}).values())  # a grid point not run (--time-limit) or failed
            if entry.get("lr") is not None and not stale and not unfinished and not (entry.get("edge") and widen > 0):
                chosen.setdefault(case, {})[method] = {**entry, "from": str(path)}
                continue
            for run in saved.get("runs", []):
                if run.get("phase") == "tune" and run["case"] == case and run["method"] == method and run.get("final"):
                    done[(case, method, float(run["lr_multiple"]))] = job_from_record(run)
    return chosen, done


def reused_floor(path: Path) -> dict[str, float]:
    """The untuned model's validation scores saved in an earlier quality JSON (``--tuning-from``):
    case -> score, for the cases where it was measured (read after :func:`reused_tuning`, which
    has checked the file)."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    return {case: float(value) for case, value in (saved.get("untuned_validation") or {}).items() if value is not None}


def trivial_baseline(data_root: Path, case: str, split: str = "test", folder: Path | None = None) -> float | None:
    """The score of a model that learned nothing, on the case's ``split``: the majority class's
    share (classification) or the mean of 1 / number of choices (multiple choice); None otherwise
    or when the data is not there. ``folder``: the split's folder when it is not the case's own
    (a search's held-out validation split)."""
    path = (folder or data_root / case.split("/", 1)[1]) / f"{split}.jsonl"
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


def markdown(summary: dict[str, Any], env: dict[str, Any], baselines: dict[str, float | None], recipes: dict[str, dict[str, Any]], tuning: dict[str, Any] | None = None, untuned_validation: dict[str, float | None] | None = None,
             validation_floors: dict[str, float | None] | None = None) -> str:
    """One table per case; ``recipes``: case -> the recipe the runs used (as saved in the JSON);
    ``tuning``: case -> method -> the learning-rate search on the validation split;
    ``untuned_validation``: case -> the untrained model's score on that split (the search's floor);
    ``validation_floors``: case -> a constant prediction's score on that split (classification)."""
    tuning = tuning or {}
    untuned_validation = untuned_validation or {}
    validation_floors = validation_floors or {}
    lines = [f"Quality of layer selections ({env.get('gpu', 'cpu')}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}). Test metric in %, mean ± std over seeds.", ""]
    for case in dict.fromkeys([*summary, *tuning]):
        methods = summary.get(case, {})
        recipe = Recipe(**{**recipes[case], "extra": tuple(recipes[case]["extra"])}) if case in recipes else None
        lines += [f"### {case}", ""]
        if recipe is not None:
            batch = f"{recipe.batch_size}" + (f" x {recipe.grad_accum} accumulated" if recipe.grad_accum != 1 else "")
            lines += [f"`{recipe.task}`, r {recipe.r}, recipe lr {recipe.lr:g} (full: {recipe.full_lr:g}), {recipe.epochs:g} epochs, batch {batch}, max length {recipe.max_length}, train samples {recipe.max_train_samples or 'all'}, `{' '.join(recipe.extra)}`", ""]
        if baselines.get(case) is not None:
            lines += [f"Trivial baseline (majority class or 1 / choices) on the test split: {100 * baselines[case]:.1f}%", ""]
        metric = recipe.metric if recipe else "accuracy"
        if methods:
            device = "GPU" if env.get("gpu") else "CPU"  # CPU runs have no peak-memory reading (—)
            lines += [f"| method | lr | seeds | test {metric} (%) | trainable params | train time (s) | step (s) | other runs on the {device} | peak GPU memory (GiB) | blocks (seed 0) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for method, stats in methods.items():
            test = stats["final"].get("test", {}).get(metric)
            blocks = next(iter(stats.get("selected", {}).values()), None)
            lr = stats.get("lr")
            lines.append(
                f"| {method} | {f'{lr:g}' if lr else '—'} | {stats['num_seeds']} | {_fmt(test, 100)} | {_fmt(stats['trainable_params'], 1, 0)} | {_fmt(stats['train_runtime_s'], 1, 1)} "
                f"| {_fmt(stats.get('step_s'), 1, 3)} | {_fmt(stats.get('gpu_sharing'), 1, 1)} | {_fmt(stats.get('peak_memory_gib'), 1, 1)} | {','.join(map(str, blocks)) if blocks else '—'} |"
            )
        lines.append("")
        if tuning.get(case):
            multiples = sorted({float(x) for entry in tuning[case].values() for x in entry["scores"]})
            lines += [f"Learning-rate search (seed {tuning[case][next(iter(tuning[case]))].get('seed', 0)}, validation {metric} in %, multiples of the recipe's rate; **bold**: chosen; † the best sits at the grid's edge after widening):", ""]
            lines += ["| method | " + " | ".join(f"{x:g}x" for x in multiples) + " |", "|---|" + "---|" * len(multiples)]
            for method, entry in tuning[case].items():
                cells = []
                for x in multiples:
                    value = entry["scores"].get(f"{x:g}")
                    text = "—" if value is None else f"{100 * value:.1f}"
                    if entry["chosen"] is not None and x == float(entry["chosen"]) and value is not None:
                        text = f"**{text}**" + (" ‡" if entry.get("learned") is False else " †" if entry.get("edge") else "")
                    cells.append(text)
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
            if validation_floors.get(case) is not None:
                lines += [f"A constant prediction (the majority class, or 1 / choices) on the same validation split: {100 * validation_floors[case]:.1f}%; a rate at or below it learned nothing and is never chosen over one above it (‡: no rate beat it; the recipe's rate is used).", ""]
            if case in untuned_validation:
                floor = untuned_validation[case]
                lines += [f"Untuned model on the same validation split: {'— (its evaluation failed)' if floor is None else f'{100 * floor:.1f}%'}", ""]
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


def method_styles(methods: list[str]) -> dict[str, dict[str, str]]:
    """One marker and colour per method, fixed for the whole figure (a panel that skips a method,
    such as the untuned model in the step-time panel, must not shift the others' colours). The
    paper's CKA rule is red; the rest take matplotlib's palette without its red."""
    markers = "osD^v<>pPX*h"
    palette = [f"C{i}" for i in range(10) if i != 3]  # C3 is red
    styles: dict[str, dict[str, str]] = {}
    others = 0
    for index, method in enumerate(methods):
        if method.startswith("cka"):
            color = "#c44e52"
        else:
            color, others = palette[others % len(palette)], others + 1
        styles[method] = {"marker": markers[index % len(markers)], "color": color}
    return styles


def plot_tradeoff(summary: dict[str, Any], path: Path, recipes: dict[str, dict[str, Any]]) -> None:
    """Quality against cost, one row per case: test metric (mean ± std over seeds) against the
    trainable parameters relative to all-layer LoRA (left) and against the step time (right), one
    marker per method; the dashed line is all-layer LoRA's score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in summary if summary[c] and "all-layer" in summary[c]]
    if not cases:
        return
    fig, axes = plt.subplots(len(cases), 2, figsize=(9, 3.2 * len(cases)), squeeze=False)
    styles = method_styles(list(dict.fromkeys(m for c in cases for m in summary[c])))
    for row, case in zip(axes, cases):
        metric = recipes.get(case, {}).get("metric", "accuracy")
        base = summary[case]["all-layer"]
        base_params = (base.get("trainable_params") or {}).get("mean")
        base_score = base["final"].get("test", {}).get(metric)
        for method, stats in summary[case].items():
            test = stats["final"].get("test", {}).get(metric)
            if not test:
                continue
            params = (stats.get("trainable_params") or {}).get("mean")
            step = (stats.get("step_s") or {}).get("mean")
            style = dict(linestyle="none", label=method, **styles[method])
            if params is not None and base_params:
                row[0].errorbar(params / base_params, 100 * test["mean"], yerr=100 * test["std"], **style)
            if step is not None:
                row[1].errorbar(step, 100 * test["mean"], yerr=100 * test["std"], **style)
        for ax, label in zip(row, ("trainable parameters / all-layer LoRA", "step time (s, shared GPU)")):
            if base_score:
                ax.axhline(100 * base_score["mean"], color="grey", linestyle="--", linewidth=1)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel(f"test {metric} (%)", fontsize=8)
            ax.set_title(case, fontsize=8)
        row[0].legend(fontsize=6, loc="best")
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


def _multiples(text: str, flag: str) -> list[float]:
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated positive numbers like 1,2,4,8, got {text!r}") from None
    if not values or min(values) <= 0:
        raise SystemExit(f"{flag}: expected comma-separated positive numbers like 1,2,4,8, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help=f"model/task (default: all): {', '.join(CASES)}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated: {', '.join(METHODS)} (default: every trained method once; a preset that trains another method's run, as recommended does, is left out)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--protocol", choices=["tuned", "fixed"], default="tuned", help="tuned (default): each method's learning rate chosen on the validation split first; fixed: the recipe's rate for every method")
    parser.add_argument("--lr-grid", default="1,2,4,8", help="tuned: multiples of the recipe's learning rate tried for the adapter methods (default 1,2,4,8)")
    parser.add_argument("--full-lr-grid", default="0.25,0.5,1,2", help="tuned: multiples of the recipe's full fine-tuning rate (default 0.25,0.5,1,2)")
    parser.add_argument("--widen", type=int, default=2, help="tuned: grid points added (x2 or /2) while the best rate sits at an edge (default 2)")
    parser.add_argument("--tune-seed", type=int, default=0, help="tuned: the seed of the learning-rate search (default 0)")
    parser.add_argument("--tune-holdout", type=float, default=0.2, help="tuned, cases with a group column: share of train's groups held out as the search's validation split (default 0.2)")
    parser.add_argument("--search-only", action="store_true", help="tuned: stop after the learning-rate search; OUT.json holds the chosen rates")
    parser.add_argument("--tuning-from", help="tuned: a quality JSON whose chosen learning rates are reused (those cases and methods are not searched again)")
    parser.add_argument("--model", action="append", default=[], help="KEY=PATH_OR_ID, overriding a default model")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="folder of the task folders (../shared/data)")
    parser.add_argument("--runs", help="where the run directories go (default: OUT-runs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one process each)")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids to spread the runs over (default: none / as visible)")
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 even on a GPU")
    parser.add_argument("--liger", action="store_true", help="instruction cases: train with lwlora train --liger (the loss fused with the output layer: no vocabulary-sized logits; needs liger-kernel and a GPU)")
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
        atomic_write_text(out.with_suffix(".md"), markdown(saved["summary"], saved["environment"], baselines, saved["recipes"], saved.get("tuning"), saved.get("untuned_validation"), saved.get("validation_floors")))
        plot(saved["summary"], out.with_suffix(".png"), baselines, saved["recipes"])
        plot_tradeoff(saved["summary"], out.with_name(out.name + "-tradeoff.png"), saved["recipes"])
        return 0

    models = parse_models(args.model)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    grids = {"lora": _multiples(args.lr_grid, "--lr-grid"), "full": _multiples(args.full_lr_grid, "--full-lr-grid")}
    if args.widen < 0:
        raise SystemExit(f"--widen: must be >= 0, got {args.widen}")
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
    if args.retries < 0:
        raise SystemExit(f"--retries: must be >= 0, got {args.retries}")

    import torch

    bf16 = torch.cuda.is_available() and not args.no_bf16
    runs_root = Path(args.runs) if args.runs else out.with_name(out.name + "-runs")
    gpus: list[str | None] = args.gpus.split(",") if args.gpus else [None]
    recipe_of = {case: CASES.get(case) or recipes[args.recipe] for case in cases}
    started = time.perf_counter()

    def run(batch: list[Job]) -> None:
        left = None if args.time_limit is None else args.time_limit - (time.perf_counter() - started)
        run_jobs(batch, workers=max(1, args.jobs), gpus=gpus, time_limit=left, retries=args.retries)

    def base_lr(case: str, method: str) -> float:
        recipe = recipe_of[case]
        return recipe.full_lr if method in FULL_METHODS else recipe.lr

    tuning_data: dict[str, dict[str, Any]] = {}
    if args.protocol == "tuned":
        if not 0 < args.tune_holdout < 1:
            raise SystemExit(f"--tune-holdout: must be in (0, 1), got {args.tune_holdout}")
        for case in cases:
            group = recipe_of[case].group_column
            if group:
                folder = runs_root / case.replace("/", "__") / "tune-data"
                tuning_data[case] = {"path": str(folder), **tuning_split(data_root / case.split("/", 1)[1] / "train.jsonl", group, folder, fraction=args.tune_holdout, seed=args.tune_seed)}

    def make_job(case: str, method: str, seed: int, *, lr: float | None, phase: str, multiple: float | None = None) -> Job:
        folder = runs_root / case.replace("/", "__")
        if phase == "tune":
            run_dir = folder / "tune" / (f"{method}-x{multiple:g}-seed{seed}" if method not in UNTRAINED_METHODS else method)
        else:
            run_dir = folder / (f"{method}-seed{seed}" if method not in UNTRAINED_METHODS else method)
        model = models[case.split("/", 1)[0]]
        argv = build_argv(case, method, seed, model=model, data_root=data_root, run_dir=run_dir, recipe=recipe_of[case], bf16=bf16, max_steps=args.max_steps, lr=lr, eval_splits="validation" if phase == "tune" else "test",
                          data_dir=Path(tuning_data[case]["path"]) if phase == "tune" and case in tuning_data else None)
        if args.liger and method not in UNTRAINED_METHODS and recipe_of[case].task == "instruction":
            argv.append("--liger")
        return Job(case, method, seed, run_dir, argv, lr=lr, phase=phase, lr_multiple=multiple)

    tuning: dict[str, Any] = {}
    chosen_lr: dict[tuple[str, str], float | None] = {}
    tune_jobs: list[Job] = []
    trained = [m for m in methods if m not in UNTRAINED_METHODS]
    # what learning nothing scores on each search's validation split (classification, multiple choice)
    validation_floors = {case: trivial_baseline(data_root, case, "validation", Path(tuning_data[case]["path"]) if case in tuning_data else None) for case in cases}
    reused, done = reused_tuning(Path(args.tuning_from), cases, trained, widen=args.widen, floors=validation_floors) if args.tuning_from else ({}, {})
    for case, per_method in reused.items():
        for method, entry in per_method.items():
            tuning.setdefault(case, {})[method] = entry
            chosen_lr[(case, method)] = entry["lr"]
    to_search = [m for m in trained if any(m not in reused.get(c, {}) for c in cases)]
    if args.protocol == "tuned" and to_search:
        searched = tune_learning_rates(
            cases, to_search,
            make_job=lambda c, m, x: make_job(c, m, args.tune_seed, lr=base_lr(c, m) * x, phase="tune", multiple=x),
            grids={m: sorted({x for (_, method, x) in done if method == m} | set(grids["full" if m in FULL_METHODS else "lora"])) for m in to_search},
            metrics={c: recipe_of[c].metric for c in cases}, widen=args.widen, run=run, done=done, floors=validation_floors,
        )
        for case, per_method in searched.items():
            tuning.setdefault(case, {})  # keeps the entries reused from --tuning-from next to the searched ones
            for method, entry in per_method.items():
                tune_jobs += entry.pop("jobs")
                if method in reused.get(case, {}):
                    continue
                chosen_lr[(case, method)] = None if entry["chosen"] is None else base_lr(case, method) * entry["chosen"]
                tuning[case][method] = {**entry, "seed": args.tune_seed, "lr": chosen_lr[(case, method)]}
    elif args.protocol != "tuned":
        chosen_lr = {(c, m): base_lr(c, m) for c in cases for m in trained}
    # The floor a search's validation scores read against: the untrained model on the same
    # validation split (instruction cases only; a classifier's untrained head is the trivial baseline).
    untuned_validation: dict[str, float | None] = {}
    if args.protocol == "tuned":
        saved_floor = reused_floor(Path(args.tuning_from)) if args.tuning_from else {}
        floor_jobs = {case: make_job(case, UNTRAINED_METHODS[0], 0, lr=None, phase="tune") for case in cases
                      if recipe_of[case].task == "instruction" and case not in saved_floor and (args.search_only or any(m not in reused.get(case, {}) for m in trained))}
        run(list(floor_jobs.values()))
        tune_jobs += floor_jobs.values()
        untuned_validation = {**{c: v for c, v in saved_floor.items() if c in cases}, **{c: validation_score(j, recipe_of[c].metric) for c, j in floor_jobs.items() if j.error != NOT_RUN}}

    jobs: list[Job] = []
    for case in cases if not args.search_only else []:  # the untrained model once per case, then seed-major: every method's first seed finishes first
        jobs += [make_job(case, m, 0, lr=None, phase="final") for m in methods if m in UNTRAINED_METHODS and recipe_of[case].task == "instruction"]
    unrunnable: list[Job] = []
    for seed in seeds if not args.search_only else []:
        for case in cases:
            for method in trained:
                lr = chosen_lr[(case, method)]
                job = make_job(case, method, seed, lr=lr if lr is not None else base_lr(case, method), phase="final")
                if lr is None:  # every run of its learning-rate search failed
                    job.error = "not run: no learning rate was chosen (every tuning run failed)"
                    unrunnable.append(job)
                else:
                    jobs.append(job)
    run(jobs)
    jobs += unrunnable

    env = environment()
    every = tune_jobs + jobs
    summary = summarise(jobs, timed=every)
    result = {
        "environment": env,
        "protocol": args.protocol,
        "recipes": {case: asdict(recipe_of[case]) for case in cases},
        "methods": {m: list(METHODS[m]) for m in methods},
        "seeds": seeds,
        "tuning": tuning,
        "search_only": args.search_only,
        "tuning_data": tuning_data,
        "untuned_validation": untuned_validation,
        "validation_floors": validation_floors,
        "runs": [run_record(j) for j in every],
        "summary": summary,
    }
    baselines = {case: trivial_baseline(data_root, case) for case in cases}
    result["trivial_baselines"] = baselines
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown(summary, env, baselines, result["recipes"], tuning, untuned_validation, validation_floors))
    plot(summary, out.with_suffix(".png"), baselines, result["recipes"])
    plot_tradeoff(summary, out.with_name(out.name + "-tradeoff.png"), result["recipes"])
    print(markdown(summary, env, baselines, result["recipes"], tuning, untuned_validation, validation_floors))
    failed = [j for j in every if j.error]
    for j in failed:
        print(f"FAILED {j.case} {j.method} seed {j.seed} ({j.phase}): {j.error} (log: {j.log})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
