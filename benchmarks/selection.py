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
median of ``--repeats`` is reported, with peak device memory (CUDA) or peak host RSS growth (CPU).

    python benchmarks/selection.py --case minilm --case smollm2 --out benchmarks/results/selection-cpu
    python benchmarks/selection.py --case llama7b-128 --case llama7b-2048 --device cuda --out benchmarks/results/selection-gpu

Writes ``OUT.json`` and ``OUT.md``. The 7B cases use a randomly initialised Llama-2-7B
architecture (timing does not depend on the weights) and random token ids of length 512.
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lwlora.blocks import resolve_block_stack  # noqa: E402
from lwlora.capture import capture_block_representations  # noqa: E402
from lwlora.scoring import get_scorer  # noqa: E402


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


def load_case(case: Case, device: str):
    """(causal-or-encoder model with head, base model, batches) for a case."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    g = torch.Generator().manual_seed(0)
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
    ids = torch.randint(5, vocab, (case.num_samples, case.max_length), generator=g)
    lengths = torch.randint(case.max_length // 2, case.max_length + 1, (case.num_samples,), generator=g)
    mask = (torch.arange(case.max_length)[None, :] < lengths[:, None]).long()
    batches = [{"input_ids": ids[i : i + case.batch_size].to(device), "attention_mask": mask[i : i + case.batch_size].to(device)} for i in range(0, case.num_samples, case.batch_size)]
    return model, base, batches


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


def run_lwlora(model, base, batches) -> list[float]:
    stack = resolve_block_stack(model)
    reps = capture_block_representations(model, stack, batches, pooling="last", progress=False)
    scorer = get_scorer("cka")
    return [scorer(x, y).similarity for x, y in zip(reps.inputs, reps.outputs)]


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


def run_lwlora_pipeline(model, base, batches) -> list[float]:
    return run_lwlora(model, base, length_sorted(batches))


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


def bench_case(case: Case, device: str, repeats: int) -> dict:
    model, base, batches = load_case(case, device)
    runs = {"reference": run_reference, "lwlora": run_lwlora, "lwlora_length_sorted": run_lwlora_pipeline, "bare_forward": run_bare}
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
    ours = run_lwlora(model, base, batches)
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
        # The reference's last entry is after the final norm, so its last block differs by design.
        "max_abs_cka_difference_except_last": max(abs(a - b) for a, b in zip(ours[:-1], ref_scores[:-1])) if len(ours) > 1 else 0.0,
    }
    del model, base, batches
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


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
        "| case | n | len | reference s | lwlora s | lwlora, length-sorted s | bare forward s | lwlora / reference | lwlora / bare | length-sorted / reference | peak mem reference | peak mem lwlora | max CKA diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, p, c = r["median_s"], r["peak_memory_bytes"], r["case"]
        lines.append(
            f"| {c['name']} | {c['num_samples']} | {c['max_length']} | {m['reference']:.3f} | {m['lwlora']:.3f} | {m['lwlora_length_sorted']:.3f} | {m['bare_forward']:.3f} | "
            f"{r['ratio_lwlora_to_reference']:.2f} | {r['ratio_lwlora_to_bare_forward']:.2f} | {r['ratio_lwlora_length_sorted_to_reference']:.2f} | "
            f"{p['reference'] / 2**20:.0f} MiB | {p['lwlora'] / 2**20:.0f} MiB | {r['max_abs_cka_difference_except_last']:.1e} |"
        )
    lines += ["", f"Command: `{env['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=list(CASES), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True, help="output path without extension: OUT.json and OUT.md")
    args = parser.parse_args(argv)
    env = environment(args.device)
    results = [bench_case(CASES[name], args.device, args.repeats) for name in args.case]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results, env))
    print(markdown(results, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
