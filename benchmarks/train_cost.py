"""Training cost of a selection: step time, tokens/s and peak memory per adapted-block set.

For one base model (random initialisation: cost does not depend on the weights), every selection
gets adapters through lwlora's PEFT bridge (LoRA on every linear layer of the selected blocks),
then a few AdamW steps on random token ids are timed (median after warm-up) and the peak device
memory is read. Selections: all blocks (all-layer LoRA), ``cka50`` (a realistic CKA-50% pick for a
decoder: the first L/2 − 1 blocks plus the last, as the paper reports), ``last50``, ``first50``,
full fine-tuning, and the candidates of the selection-science issue:

- ``equal-budget``: every block at rank ⌊r/2⌋ (the parameters of half the blocks at r);
- ``units50``: sub-layer units (``--granularity sublayer``) filling half of all-layer LoRA's
  parameters: on a random model no unit is more important than another, so the stand-in takes
  every block's attention half, then MLP halves from the top block down while they fit;
- ``dynamic50``: adapters on every block, half of them trainable at a time (lwlora's
  ``DynamicBlocks``): each timed step draws its own half uniformly (a random model's importances
  are flat), so the median covers the spread of lowest active blocks; optimizer state is kept
  for every adapter, as the callback keeps it;
- ``importance-ranks``: every block, equal-budget's total rank redistributed by importance
  (``--rank-allocation importance``); a random model has no importances, so the stand-in's rise
  linearly with depth (block ranks from about r/4 to 3r/4);
- ``eva-budget``: PEFT's EVA initialisation at equal-budget's rank (ranks redistributed by
  explained variance), from ``EVA_BATCHES`` batches of the case's shape; the row also reports the
  one-off initialisation time ``init_s`` (incremental SVD of every adapted layer's inputs). On
  random weights EVA's components may never settle (``benchmarks/eva_convergence.py``: a random
  4-block Llama had not converged after 100 passes); lwlora then stops it after
  ``EVA_MAX_PASSES`` passes and the row records that error: on the 7B case this row needs real
  weights (the tiny cases converge).

- ``prune50``: warm-up then prune (``--layers all --prune-at …``): adapters on every block for the
  untimed warm-up steps, then lwlora's ``prune_blocks`` removes half of them (adapters, optimizer
  state, PEFT config) and the timed steps train the rest. A random model's adapter effects carry
  no information, so the kept half is a stand-in: every other block from block 0 (on Qwen,
  prune-rel-50 kept block 0 too, so the backward pass reaches the bottom). ``step_s`` is the
  pruned phase's step; the peak includes the warm-up, i.e. all-layer LoRA's. A run that prunes at
  share ``p`` of its steps averages ``p × all-layer's step + (1 − p) × step_s``
  (``run_step_s_at_5pct`` for ``--prune-at 0.05``).

Ratios are to all-layer LoRA.

    python benchmarks/train_cost.py --case llama7b --device cuda --out benchmarks/results/train-cost-gpu
    python benchmarks/train_cost.py --case roberta-base --device cuda --out benchmarks/results/train-cost-roberta-gpu
    python benchmarks/train_cost.py --case tiny --out /tmp/train-cost     # CPU smoke (decoder)
    python benchmarks/train_cost.py --case tiny-encoder --out /tmp/cost   # CPU smoke (encoder)

The decoder cases train causal LM on random token ids; the encoder cases train sequence
classification (2 labels, random labels) on random token ids, as GLUE fine-tuning does.

Writes ``OUT.json`` and ``OUT.md``.
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
from lwlora.adapters.placement import apply_selection
from lwlora.selection.artifact import LayerRecord, LayerSelection


@dataclass
class Case:
    name: str
    seq_len: int
    batch_size: int
    r: int
    steps: int
    warmup: int
    encoder: bool = False  # sequence classification (RoBERTa) instead of causal LM (Llama)


CASES = {
    "tiny": Case("tiny", 32, 4, 4, 3, 1),
    "tiny-encoder": Case("tiny-encoder", 32, 4, 4, 3, 1, encoder=True),
    "llama7b": Case("llama7b", 512, 4, 128, 6, 2),
    "roberta-base": Case("roberta-base", 128, 32, 128, 10, 3, encoder=True),
}


def build_model(case: Case, device: str):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        LlamaConfig,
        RobertaConfig,
    )

    if case.name == "tiny":
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    elif case.name == "tiny-encoder":
        config = RobertaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, max_position_embeddings=64)
    elif case.name == "roberta-base":  # the roberta-base architecture
        config = RobertaConfig(vocab_size=50265, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=514, type_vocab_size=1)
    else:  # the Llama-2-7B architecture
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    dtype = torch.float32 if case.name.startswith("tiny") else torch.bfloat16
    factory = AutoModelForSequenceClassification if case.encoder else AutoModelForCausalLM
    with torch.device(device):
        model = factory.from_config(config, dtype=dtype)
    return model.to(device)


def selections(num_layers: int) -> dict[str, list[int] | None]:
    half = num_layers // 2
    return {
        "all": list(range(num_layers)),
        "cka50": list(range(half - 1)) + [num_layers - 1],
        "last50": list(range(num_layers - half, num_layers)),
        "first50": list(range(half)),
        "full": None,
        "equal-budget": list(range(num_layers)),
        "units50": list(range(num_layers)),
        "dynamic50": list(range(num_layers)),
        "importance-ranks": list(range(num_layers)),
        "prune50": list(range(num_layers)),  # adapted at first; prune_keep's blocks after the warm-up
        "eva-budget": list(range(num_layers)),  # last: a failed EVA initialisation ends the rows
    }


def prune_keep(num_layers: int) -> list[int]:
    """``prune50``'s kept blocks (a stand-in, see the module docstring): every other block from 0."""
    return list(range(0, num_layers, 2))


#: the warm-up share ``run_step_s_at_5pct`` assumes (``--prune-at 0.05``, the share benchmarked)
PRUNE_AT = 0.05


#: batches EVA's initialisation reads in the ``eva-budget`` row (lwlora train reads --num-samples
#: examples in --select-batch-size batches; 4 batches of the case's shape is of that order)
EVA_BATCHES = 4


def ranks_stand_in(stack, r: int) -> dict:
    """``importance-ranks``' rank plan: equal-budget's total rank (⌊r/2⌋ per block) redistributed
    by importances that rise linearly with depth; returns apply_selection's rank keywords."""
    from lwlora.adapters.ranks import alpha_pattern_for_peft, importance_rank_pattern, rank_pattern_for_peft

    budget = max(1, r // 2)
    blocks = list(range(stack.num_layers))
    ranks = importance_rank_pattern([0.25 + 0.5 * i / max(1, stack.num_layers - 1) for i in blocks], blocks, budget * len(blocks))
    return {"r": budget, "alpha": budget, "ranks": [ranks[i] for i in blocks], "rank_pattern": rank_pattern_for_peft(stack.path, ranks, budget), "alpha_pattern": alpha_pattern_for_peft(stack.path, ranks, 1.0)}


def units_stand_in(stack, r: int) -> dict:
    """The ``units50`` stand-in's unit records: every attention half, then MLP halves from the top
    block down while Σ parameters ≤ half of all-layer LoRA's (see the module docstring)."""
    from lwlora.selection.units import PARTS, unit_params

    names = stack.block_linear_modules()
    params = unit_params(stack, names, r)
    budget = 0.5 * sum(params)
    chosen = {2 * i for i in range(stack.num_layers)}
    spent = sum(params[u] for u in chosen)
    for i in reversed(range(stack.num_layers)):
        if spent + params[2 * i + 1] <= budget:
            chosen.add(2 * i + 1)
            spent += params[2 * i + 1]
    return [{"block": u // 2, "part": PARTS[u % 2], "params": params[u], "selected": u in chosen} for u in range(2 * stack.num_layers)]


def make_selection(stack, selected: list[int], units: list[dict] | None = None) -> LayerSelection:
    if units is not None:
        selected = sorted({u["block"] for u in units if u["selected"]})
    return LayerSelection(
        model="benchmark",
        layers_path=stack.path,
        num_layers=stack.num_layers,
        layers=[LayerRecord(index=i, cka=None, similarity=None, importance=None, degenerate=False) for i in range(stack.num_layers)],
        selected=selected,
        block_linear_modules=stack.block_linear_modules(),
        units=units,
    )


def block_adapters(model, stack_path: str, num_layers: int) -> list[list]:
    """Each block's adapter parameters (for ``dynamic50``'s switching)."""
    import re

    pattern = re.compile(rf"(?:^|\.){re.escape(stack_path)}\.(\d+)\.")
    blocks: list[list] = [[] for _ in range(num_layers)]
    for name, param in model.named_parameters():
        match = pattern.search(name)
        if match and "lora_" in name:
            blocks[int(match.group(1))].append(param)
    return blocks


def time_steps(model, case: Case, device: str, vocab: int, switch=None, prune=None) -> dict:
    """Median step time and peak memory; ``switch(step)`` (``dynamic50``) changes which adapters
    train before each step (outside the timed region); ``prune(optimizer)`` (``prune50``) runs
    once after the warm-up steps, so the timed steps are the pruned model's and the peak memory
    includes the warm-up's."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (case.batch_size, case.seq_len), generator=g).to(device)
    labels = torch.randint(0, 2, (case.batch_size,), generator=g).to(device) if case.encoder else ids
    model.train()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(case.warmup + case.steps):
        if switch is not None:
            switch(step)
        if prune is not None and step == case.warmup:
            prune(optimizer)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= case.warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    # every adapter with optimizer state (dynamic50's inactive ones too); after a prune, the kept ones
    counted = [p for p in model.parameters() if p.requires_grad] if prune is not None else params
    result = {
        "step_s": step_s,
        "tokens_per_s": case.batch_size * case.seq_len / step_s,
        "trainable_params": sum(p.numel() for p in counted),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None,
    }
    del optimizer
    return result


def bench(case: Case, device: str, only: list[str] | None = None) -> list[dict]:
    """Every row of :func:`selections` (``only``: those rows and ``all``, the reference)."""
    model = build_model(case, device)
    vocab = model.config.vocab_size
    stack = resolve_block_stack(model)
    rows = []
    for name, selected in selections(stack.num_layers).items():
        if only is not None and name != "all" and name not in only:
            continue
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if selected is None:
            for p in model.parameters():
                p.requires_grad_(True)
            measured = time_steps(model, case, device, vocab)
            for p in model.parameters():
                p.requires_grad_(False)
            lowest = 0
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            r = max(1, case.r // 2) if name in ("equal-budget", "eva-budget") else case.r
            units = units_stand_in(stack, case.r) if name == "units50" else None
            extra: dict = {}
            if name == "importance-ranks":
                extra = ranks_stand_in(stack, case.r)
                r = extra.pop("r")
                extra.pop("alpha")
                block_ranks = extra.pop("ranks")
            if name == "eva-budget":
                g = torch.Generator().manual_seed(1)
                extra = {"method": "eva", "init_batches": [{"input_ids": torch.randint(5, vocab, (case.batch_size, case.seq_len), generator=g).to(device)} for _ in range(EVA_BATCHES)]}
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
            started = time.perf_counter()
            try:
                peft_model = apply_selection(model, make_selection(stack, selected, units), r=r, alpha=r, target_modules="auto", task_type="SEQ_CLS" if case.encoder else None, **extra)
            except Exception as error:  # noqa: BLE001 - EVA's SVD on this device/dtype; the rows measured so far are kept
                if name != "eva-budget":
                    raise
                rows.append({"selection": name, "blocks": selected, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"})
                print(json.dumps(rows[-1]), flush=True)
                break  # the model may hold EVA's half-made adapters: eva-budget is the last row
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            init_s = time.perf_counter() - started
            switch = None
            if name == "dynamic50":
                adapters = block_adapters(peft_model, stack.path, stack.num_layers)
                draws = torch.Generator().manual_seed(0)

                def switch(step, adapters=adapters, draws=draws):
                    active = set(torch.randperm(len(adapters), generator=draws)[: len(adapters) // 2].tolist())
                    for i, params in enumerate(adapters):
                        for p in params:
                            p.requires_grad_(i in active)
                            if i not in active:
                                p.grad = None
            prune = None
            if name == "prune50":
                from lwlora.training.prune import prune_blocks

                selected = prune_keep(stack.num_layers)  # the row reports the blocks that train after the prune

                def prune(optimizer, peft_model=peft_model, path=stack.path, keep=selected):
                    prune_blocks(peft_model, path, keep, optimizer)

            measured = time_steps(peft_model, case, device, vocab, switch=switch, prune=prune)
            model = peft_model.unload()
            stack = resolve_block_stack(model)
            lowest = min(selected) if name != "dynamic50" else "drawn"
            if name == "eva-budget":
                measured["init_s"] = init_s
            if name == "importance-ranks":
                measured["block_ranks"] = block_ranks
        rows.append({"selection": name, "blocks": selected, "lowest_adapted_block": lowest, **measured})
        print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if r["selection"] == "all")
    for row in rows:
        if "error" in row:
            continue
        row["step_time_ratio_to_all"] = row["step_s"] / base["step_s"]
        if row["selection"] == "prune50":
            row["run_step_s_at_5pct"] = PRUNE_AT * base["step_s"] + (1 - PRUNE_AT) * row["step_s"]
        if row["peak_memory_bytes"] and base["peak_memory_bytes"]:
            row["peak_memory_ratio_to_all"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
    return rows


def markdown(case: Case, rows: list[dict], env: dict) -> str:
    lines = [
        f"Training cost, {case.name} (seq {case.seq_len}, batch {case.batch_size}, LoRA r {case.r} on all linear layers; {env['device']}{', ' + env['gpu'] if 'gpu' in env else ''}; torch {env['torch']}, transformers {env['transformers']})",
        "",
        "| selection | lowest block | trainable params | step s | tokens/s | peak memory | step / all-layer | memory / all-layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['selection']} | failed: {r['error']} | | | | | | |")
            continue
        mem = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] else "—"
        mem_ratio = f"{r['peak_memory_ratio_to_all']:.2f}" if "peak_memory_ratio_to_all" in r else "—"
        lines.append(f"| {r['selection']} | {r['lowest_adapted_block']} | {r['trainable_params']:,} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {mem} | {r['step_time_ratio_to_all']:.2f} | {mem_ratio} |")
    lines += [f"{r['selection']}: one-off initialisation {r['init_s']:.1f} s (EVA's SVD of the adapted layers' inputs, {EVA_BATCHES} batches)" for r in rows if "init_s" in r]
    lines += [f"{r['selection']}: warm-up on every block (all-layer LoRA's step and peak), then blocks {r['blocks']} (a stand-in); its step is the pruned phase's; a run pruning at {PRUNE_AT:g} of its steps averages {r['run_step_s_at_5pct']:.3f} s a step" for r in rows if "run_step_s_at_5pct" in r]
    lines += ["", f"Command: `{env['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--selections", help="comma-separated rows to measure (all-layer's row, the reference, always runs); default: every row")
    parser.add_argument("--out", required=True, help="output path without extension: OUT.json and OUT.md")
    args = parser.parse_args(argv)
    only = None
    if args.selections is not None:
        only = [name.strip() for name in args.selections.split(",") if name.strip()]
        known = list(selections(2))
        unknown = [name for name in only if name not in known]
        if unknown or not only:
            parser.error(f"--selections: unknown {unknown or 'empty list'}; choose from {', '.join(known)}")
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "device": args.device, "command": " ".join(sys.argv)}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    case = CASES[args.case]
    rows = bench(case, args.device, only)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "case": asdict(case), "results": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(case, rows, env))
    print(markdown(case, rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
