"""Selection speed and memory: `lwlora select`'s capture+scoring vs the reference procedure vs a bare forward.

``lwlora, length-sorted`` is the same capture on the same samples batched as ``lwlora select``
batches them (sorted by length, each batch trimmed to its longest sample).

Reference procedure (re-implemented from the paper's description of its scripts, not copied): one
forward of the causal LM with ``output_hidden_states=True`` *including the LM head*, the last real
token of every hidden state moved to the CPU, then feature-space linear CKA (d × d cross
covariances) per block in float32. lwlora: forward hooks on the blocks, pooled statistics kept on
the device, the forward stopped after the last block (no final norm, no LM head), Gram-space CKA
in float64. Bare forward: the base model's forward over the same batches (no hidden states, no
head) — the floor any selection method pays.

All three run in one process on the same model, samples and batch size, interleaved, and the
median of ``--repeats`` is reported, with peak device memory (CUDA) or peak host RSS growth (CPU),
and the bytes of the selection state lwlora holds at the end of its capture (``--statistics``:
what it keeps, as ``lwlora select --statistics``).

    python benchmarks/selection.py --case minilm --case smollm2 --out benchmarks/results/selection-cpu
    python benchmarks/selection.py --case llama7b-128 --case llama7b-2048 --device cuda --out benchmarks/results/selection-gpu

Writes ``OUT.json`` and ``OUT.md``. The 7B cases use a randomly initialised Llama-2-7B
architecture (timing does not depend on the weights) and random token ids of length 512.

``--sweep NAME`` instead shows that lwlora's selection memory is bounded in n: on a small random
Llama it captures and scores n samples for every n of the sweep with ``--statistics`` rows, auto
and covariance, and reports the bytes of the state held at the end of the capture (the tensors'
numel × element size, measured, not a formula), the median time, and how far the CKA values are
from the rows' ones:

    python benchmarks/selection.py --sweep llama-h128 --out benchmarks/results/selection-memory-cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lwlora.blocks import resolve_block_stack  # noqa: E402
from lwlora.selection.capture import STATISTICS, Captured, capture_block_representations
from lwlora.selection.scoring import get_scorer, score_pair
from lwlora.streaming import CKAStatistics  # noqa: E402


@dataclass
class Case:
    name: str
    num_samples: int
    max_length: int
    batch_size: int


CASES = {
    "minilm": Case("minilm", 128, 128, 16),
    "smollm2": Case("smollm2", 128, 256, 8),
    "tiny": Case("tiny", 32, 32, 8),  # CI smoke
    "llama7b-128": Case("llama7b-128", 128, 512, 8),
    "llama7b-2048": Case("llama7b-2048", 2048, 512, 16),
}


@dataclass
class Sweep:
    """A small random Llama (``hidden`` wide, ``num_layers`` blocks) over n in ``sizes``."""

    name: str
    hidden: int
    num_layers: int
    sizes: tuple[int, ...]
    max_length: int
    batch_size: int


SWEEPS = {
    # the float32 rows (2 × 4 × hidden bytes per sample and block) outgrow the float64 statistics
    # (8 × (3 hidden² + 2 hidden) bytes per block) at n ≈ 3 × hidden: 387 here, 51 for "tiny"
    "llama-h128": Sweep("llama-h128", hidden=128, num_layers=4, sizes=(64, 256, 1024, 4096), max_length=32, batch_size=16),
    "tiny": Sweep("tiny", hidden=16, num_layers=2, sizes=(16, 128), max_length=8, batch_size=8),  # CI smoke
}


def random_batches(num_samples: int, max_length: int, batch_size: int, vocab: int, device: str) -> list[dict]:
    """Random token ids, lengths uniform in [max_length / 2, max_length], right padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (num_samples, max_length), generator=g)
    lengths = torch.randint(max_length // 2, max_length + 1, (num_samples,), generator=g)
    mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    return [{"input_ids": ids[i : i + batch_size].to(device), "attention_mask": mask[i : i + batch_size].to(device)} for i in range(0, num_samples, batch_size)]


def load_case(case: Case, device: str):
    """(causal-or-encoder model with head, base model, batches) for a case."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if case.name == "minilm":
        from lwlora.models import resolve_model_source

        path, _ = resolve_model_source("builtin:minilm", None)
        from transformers import AutoModelForMaskedLM

        model = AutoModelForMaskedLM.from_pretrained(path)  # encoder with an MLM head: the "LM head" of the reference
        base = model.bert
        vocab = model.config.vocab_size
    elif case.name == "smollm2":
        from lwlora.models import forget_gguf_quantization, resolve_model_source

        path, gguf = resolve_model_source("builtin:smollm2", None)
        model = forget_gguf_quantization(AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf))
        base = model.model
        vocab = model.config.vocab_size
    elif case.name == "tiny":
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
        base = model.model
        vocab = 512
    else:  # Llama-2-7B architecture, random weights
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        base = model.model
        vocab = 32000
    model.to(device).eval()
    return model, base, random_batches(case.num_samples, case.max_length, case.batch_size, vocab, device)


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Feature-space linear CKA in float32, as the reference scripts compute it."""
    x = x.float() - x.float().mean(0, keepdim=True)
    y = y.float() - y.float().mean(0, keepdim=True)
    return float(torch.linalg.norm(x.T @ y) ** 2 / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)).clamp_min(1e-12))


def run_reference(model, base, batches) -> list[float]:
    per_layer: list[list[torch.Tensor]] | None = None
    with torch.inference_mode():
        for batch in batches:
            out = model(**batch, output_hidden_states=True)
            last = batch["attention_mask"].sum(1) - 1
            rows = torch.arange(len(last), device=last.device)
            states = [h[rows, last].cpu() for h in out.hidden_states]
            per_layer = [[s] for s in states] if per_layer is None else [acc + [s] for acc, s in zip(per_layer, states)]
    reps = [torch.cat(chunks) for chunks in per_layer]
    return [reference_cka(reps[i], reps[i + 1]) for i in range(len(reps) - 1)]


def capture_and_score(model, batches, statistics: str) -> tuple[list[float | None], Captured]:
    """lwlora's capture (last-token pooling, keeping ``statistics``) and its CKA per block."""
    reps = capture_block_representations(model, resolve_block_stack(model), batches, pooling="last", progress=False, statistics=statistics)
    scorer = get_scorer("cka")
    return [score_pair(scorer, reps.pair(i)).similarity for i in range(len(reps.blocks))], reps


def cka_difference(ours: list[float | None], theirs: list[float | None]) -> float:
    """Largest |CKA difference| over the blocks; NaN when one side is degenerate and the other not."""
    if any((a is None) != (b is None) for a, b in zip(ours, theirs)):
        return float("nan")
    return max((abs(a - b) for a, b in zip(ours, theirs) if a is not None and b is not None), default=0.0)


def run_lwlora(model, base, batches, statistics: str = "auto") -> list[float | None]:
    return capture_and_score(model, batches, statistics)[0]


def length_sorted(batches: list[dict]) -> list[dict]:
    """The same samples re-batched the way `lwlora select` batches them: by length, each batch
    trimmed to its longest sample (less padding). Row order changes, the sample set does not."""
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    order = torch.argsort(mask.sum(1), descending=True, stable=True)
    size = len(batches[0]["input_ids"])
    out = []
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        width = int(mask[rows].sum(1).max())
        out.append({"input_ids": ids[rows, :width], "attention_mask": mask[rows, :width]})
    return out


def run_lwlora_pipeline(model, base, batches, statistics: str = "auto") -> list[float | None]:
    return run_lwlora(model, base, length_sorted(batches), statistics)


def run_bare(model, base, batches) -> None:
    with torch.inference_mode():
        for batch in batches:
            base(**batch)


def measure(fn, model, base, batches, device: str) -> tuple[float, int]:
    """(seconds, peak bytes): CUDA peak allocated above the start, or host max-RSS growth."""
    import resource

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    else:
        start_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    fn(model, base, batches)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_mem
    return time.perf_counter() - started, int(peak)


def bench_case(case: Case, device: str, repeats: int, keep: str = "auto") -> dict:
    """``keep``: what lwlora's capture keeps (``--statistics``)."""
    model, base, batches = load_case(case, device)
    runs = {"reference": run_reference, "lwlora": partial(run_lwlora, statistics=keep), "lwlora_length_sorted": partial(run_lwlora_pipeline, statistics=keep), "bare_forward": run_bare}
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, list[int]] = {k: [] for k in runs}
    for name, fn in runs.items():  # warm-up
        fn(model, base, batches[:1])
    for _ in range(repeats):
        for name, fn in runs.items():  # interleaved
            seconds, peak = measure(fn, model, base, batches, device)
            times[name].append(seconds)
            peaks[name].append(peak)
    ref_scores = run_reference(model, base, batches)
    ours, reps = capture_and_score(model, batches, keep)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "case": asdict(case),
        "num_layers": len(ours),
        "median_s": median,
        "all_s": times,
        "peak_memory_bytes": {k: max(v) for k, v in peaks.items()},
        "memory_kind": "cuda_allocated_above_start" if device.startswith("cuda") else "host_max_rss_growth (monotone: later runs may show 0)",
        "ratio_lwlora_to_reference": median["lwlora"] / median["reference"],
        "ratio_lwlora_to_bare_forward": median["lwlora"] / median["bare_forward"],
        "ratio_lwlora_length_sorted_to_reference": median["lwlora_length_sorted"] / median["reference"],
        "lwlora_statistics": {"requested": keep, "kept": reps.kept, "state_bytes": reps.nbytes},
        # The reference's last entry is after the final norm, so its last block differs by design.
        "max_abs_cka_difference_except_last": max(abs(a - b) for a, b in zip(ours[:-1], ref_scores[:-1])) if len(ours) > 1 else 0.0,
    }
    del model, base, batches
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def bench_sweep(sweep: Sweep, device: str, repeats: int) -> list[dict]:
    """Per n and per ``--statistics`` choice: the state held at the end of the capture, the
    median time of capture + scoring, and the largest CKA difference from the rows'."""
    from transformers import AutoModel, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=sweep.hidden, intermediate_size=2 * sweep.hidden, num_hidden_layers=sweep.num_layers, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModel.from_config(config).to(device).eval()
    results = []
    for n in sweep.sizes:
        batches = random_batches(n, sweep.max_length, sweep.batch_size, config.vocab_size, device)
        capture_and_score(model, batches[:1], "rows")  # warm-up
        scores: dict[str, list[float | None]] = {}
        for choice in STATISTICS:  # rows first: the others are compared with it
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                scores[choice], reps = capture_and_score(model, batches, choice)
                times.append(time.perf_counter() - started)
            results.append({"n": n, "statistics": choice, "kept": reps.kept, "state_bytes": reps.nbytes, "median_s": statistics.median(times), "all_s": times,
                            "max_abs_cka_difference_vs_rows": cka_difference(scores[choice], scores["rows"])})
            del reps
    return results


def environment(device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "device": device, "command": " ".join(sys.argv)}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def markdown(results: list[dict], env: dict) -> str:
    lines = [
        f"Selection speed ({env['device']}{', ' + env['gpu'] if 'gpu' in env else ''}; torch {env['torch']}, transformers {env['transformers']})",
        "",
        "| case | n | len | reference s | lwlora s | lwlora, length-sorted s | bare forward s | lwlora / reference | lwlora / bare | length-sorted / reference | peak mem reference | peak mem lwlora | lwlora state | max CKA diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, p, c = r["median_s"], r["peak_memory_bytes"], r["case"]
        lines.append(
            f"| {c['name']} | {c['num_samples']} | {c['max_length']} | {m['reference']:.3f} | {m['lwlora']:.3f} | {m['lwlora_length_sorted']:.3f} | {m['bare_forward']:.3f} | "
            f"{r['ratio_lwlora_to_reference']:.2f} | {r['ratio_lwlora_to_bare_forward']:.2f} | {r['ratio_lwlora_length_sorted_to_reference']:.2f} | "
            f"{p['reference'] / 2**20:.0f} MiB | {p['lwlora'] / 2**20:.0f} MiB | {r['lwlora_statistics']['kept']}, {_size(r['lwlora_statistics']['state_bytes'])} | {r['max_abs_cka_difference_except_last']:.1e} |"
        )
    lines += ["", f"Command: `{env['command']}`"]
    return "\n".join(lines) + "\n"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**10:.0f} KiB" if nbytes < 2**20 else f"{nbytes / 2**20:.1f} MiB"


def sweep_markdown(sweep: Sweep, results: list[dict], env: dict) -> str:
    state = sweep.num_layers * CKAStatistics.state_nbytes(sweep.hidden, sweep.hidden)
    crossover = CKAStatistics.state_nbytes(sweep.hidden, sweep.hidden) // (2 * sweep.hidden * 4) + 1
    lines = [
        f"Selection state vs n ({env['device']}; torch {env['torch']}, transformers {env['transformers']}): random Llama, hidden {sweep.hidden}, "
        f"{sweep.num_layers} blocks, last-token pooling, random token ids of length {sweep.max_length // 2}–{sweep.max_length}, batch {sweep.batch_size}. "
        f"The covariance statistics take {_size(state)} (float64) whatever n; the float32 rows outgrow them from n = {crossover}.",
        "",
        "| n | rows: state | rows: s | auto: kept | auto: state | auto: s | covariance: state | covariance: s | max CKA diff vs rows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sweep.sizes:
        row = {r["statistics"]: r for r in results if r["n"] == n}
        difference = max(row["auto"]["max_abs_cka_difference_vs_rows"], row["covariance"]["max_abs_cka_difference_vs_rows"])
        lines.append(
            f"| {n} | {_size(row['rows']['state_bytes'])} | {row['rows']['median_s']:.3f} | {row['auto']['kept']} | {_size(row['auto']['state_bytes'])} | {row['auto']['median_s']:.3f} | "
            f"{_size(row['covariance']['state_bytes'])} | {row['covariance']['median_s']:.3f} | {difference:.1e} |"
        )
    lines += ["", f"Command: `{env['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=list(CASES), help="compare with the reference and a bare forward")
    parser.add_argument("--sweep", choices=list(SWEEPS), help="instead: lwlora's selection state over a range of n (rows, auto, covariance)")
    parser.add_argument("--statistics", choices=list(STATISTICS), default="auto", help="--case: what lwlora's capture keeps (default auto, as lwlora select)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); small models on a small CPU run faster on 1")
    parser.add_argument("--out", required=True, help="output path without extension: OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if bool(args.case) == bool(args.sweep):
        parser.error("give --case (one or more) or --sweep")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    if args.sweep:
        sweep = SWEEPS[args.sweep]
        results = bench_sweep(sweep, args.device, args.repeats)
        data = {"environment": env, "sweep": asdict(sweep), "results": results}
        text = sweep_markdown(sweep, results, env)
    else:
        results = [bench_case(CASES[name], args.device, args.repeats, args.statistics) for name in args.case]
        data = {"environment": env, "results": results}
        text = markdown(results, env)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
