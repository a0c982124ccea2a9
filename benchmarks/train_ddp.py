"""Data-parallel training of a CKA-50% selection: tokens/s scaling and loss-curve match.

The same run — one base model, LoRA on a realistic CKA-50% selection (the first L/2 − 1 blocks plus
the last) through lwlora's PEFT bridge, AdamW, fixed data — is launched twice with ``accelerate
launch``: on one process and on N processes (DDP). The global batch is the same in both (one
process accumulates N micro-batches per step; N processes take one micro-batch each), the data
order is the same (global batch k holds samples [kB, (k+1)B) in both), and dropout is off, so the
two loss curves must agree up to floating-point reduction order. Tokens/s scaling efficiency =
tokens/s on N processes / (N × tokens/s on one).

    accelerate launch --num_processes 1 benchmarks/train_ddp.py --case llama7b --out /tmp/ddp-1
    accelerate launch --num_processes 2 benchmarks/train_ddp.py --case llama7b --out /tmp/ddp-2
    python benchmarks/train_ddp.py --compare /tmp/ddp-1.json /tmp/ddp-2.json --out benchmarks/results/train-ddp-gpu

    python benchmarks/train_ddp.py --case tiny --out /tmp/ddp-tiny-1                        # CPU smoke
    torchrun --nproc_per_node 2 benchmarks/train_ddp.py --case tiny --out /tmp/ddp-tiny-2   # CPU, 2 processes (gloo)

Data: each sequence repeats a random 64-token chunk, so that the loss falls visibly (the model
learns to copy) even from a random initialisation; the weights are random (cost and the DDP
equivalence do not depend on them). Writes ``OUT.json`` per run; ``--compare`` writes
``OUT.json``, ``OUT.md`` and ``OUT.png`` (both loss curves).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_cost  # noqa: E402
from train_cost import make_selection, selections  # noqa: E402

from lwlora.blocks import resolve_block_stack  # noqa: E402
from lwlora.adapters.placement import apply_selection


@dataclass
class Case:
    name: str
    seq_len: int
    global_batch: int
    micro_batch: int
    r: int
    steps: int
    warmup: int  # steps excluded from the throughput median
    lr: float


CASES = {
    "tiny": Case("tiny", 64, 4, 2, 4, 6, 1, 1e-3),
    "llama7b": Case("llama7b", 512, 8, 4, 128, 30, 5, 1e-4),
}


def build_model(case: Case, device: torch.device):
    """train_cost's model of the same name, with the same random weights in every process and run."""
    torch.manual_seed(0)
    return train_cost.build_model(train_cost.CASES[case.name], str(device))


def make_data(case: Case, vocab: int) -> torch.Tensor:
    """(steps × global_batch, seq_len) token ids: each row repeats one random 64-token chunk."""
    g = torch.Generator().manual_seed(1)
    chunk = min(64, case.seq_len // 2)
    rows = case.steps * case.global_batch
    chunks = torch.randint(5, vocab, (rows, chunk), generator=g)
    return chunks.repeat(1, case.seq_len // chunk + 1)[:, : case.seq_len]


def run(case: Case) -> dict:
    from accelerate import Accelerator, PartialState

    cpu = not torch.cuda.is_available()  # accelerate runs several CPU processes (gloo) only when told cpu=True
    world = PartialState(cpu=cpu).num_processes  # the accumulation below depends on it
    if case.global_batch % (case.micro_batch * world):
        raise SystemExit(f"--case {case.name}: global batch {case.global_batch} is not a multiple of micro-batch {case.micro_batch} × {world} processes")
    accumulation = case.global_batch // (case.micro_batch * world)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=cpu)
    model = build_model(case, accelerator.device)
    stack = resolve_block_stack(model)
    selected = selections(stack.num_layers)["cka50"]
    model = apply_selection(model, make_selection(stack, selected), r=case.r, alpha=case.r, dropout=0.0, target_modules="auto")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=case.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = make_data(case, model.module.config.vocab_size if hasattr(model, "module") else model.config.vocab_size)
    rank, per_rank = accelerator.process_index, case.global_batch // world

    losses, step_times = [], []
    model.train()
    for step in range(case.steps):
        accelerator.wait_for_everyone()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        # global batch `step` = rows [step·B, (step+1)·B); this rank's share, cut into micro-batches
        mine = data[step * case.global_batch + rank * per_rank : step * case.global_batch + (rank + 1) * per_rank]
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in mine.split(case.micro_batch):
            ids = micro.to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=ids, labels=ids).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / accumulation
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - started)
        losses.append(accelerator.reduce(step_loss, reduction="mean").item())
        accelerator.print(f"step {step}: loss {losses[-1]:.4f} ({step_times[-1]:.3f} s)")
    step_s = statistics.median(step_times[case.warmup :])
    result = {
        "case": asdict(case),
        "processes": world,
        "micro_batch": case.micro_batch,
        "gradient_accumulation": accumulation,
        "selected": selected,
        "losses": losses,
        "step_s": step_s,
        "tokens_per_s": case.global_batch * case.seq_len / step_s,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if accelerator.device.type == "cuda" else None,
        "environment": environment(accelerator.device),
    }
    main_process = accelerator.is_main_process
    # every rank done, the DDP wrapper (its reducer holds gloo work) freed, then the process group
    # ended, all before the interpreter exits: left to exit-time teardown, gloo's threads can outlive
    # it and abort a rank ("terminate called without an active exception", exit -6)
    accelerator.wait_for_everyone()
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()
    return result, main_process


def environment(device: torch.device) -> dict:
    import accelerate
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__, "command": " ".join(sys.argv)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def compare(single: dict, parallel: dict) -> dict:
    """Loss-curve agreement and tokens/s scaling of ``parallel`` (N processes) against ``single``."""
    if single["processes"] != 1:
        raise SystemExit(f"--compare: the first file must be a one-process run, got {single['processes']} processes")
    if parallel["processes"] < 2:
        raise SystemExit(f"--compare: the second file must be a run on several processes, got {parallel['processes']}")
    if single["case"] != parallel["case"]:
        raise SystemExit("--compare: the two runs used different cases")
    a, b = single["losses"], parallel["losses"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    n = parallel["processes"]
    return {
        "processes": n,
        "max_abs_loss_difference": max(diffs),
        "max_rel_loss_difference": max(d / abs(x) for d, x in zip(diffs, a)),
        "loss_first_last_single": [a[0], a[-1]],
        "loss_first_last_parallel": [b[0], b[-1]],
        "tokens_per_s_single": single["tokens_per_s"],
        "tokens_per_s_parallel": parallel["tokens_per_s"],
        "scaling_efficiency": parallel["tokens_per_s"] / (n * single["tokens_per_s"]),
        "step_s_single": single["step_s"],
        "step_s_parallel": parallel["step_s"],
        "peak_memory_bytes_single": single["peak_memory_bytes"],
        "peak_memory_bytes_parallel_per_process": parallel["peak_memory_bytes"],
    }


def markdown(summary: dict, single: dict) -> str:
    case, env = single["case"], single["environment"]
    mem = lambda b: f"{b / 2**30:.1f} GiB" if b else "—"
    return "\n".join([
        f"Data-parallel CKA-50% LoRA, {case['name']} (seq {case['seq_len']}, global batch {case['global_batch']}, micro-batch {case['micro_batch']}, r {case['r']}, {case['steps']} steps; {env.get('gpu', 'cpu')}; torch {env['torch']}, transformers {env['transformers']}, accelerate {env['accelerate']})",
        "",
        "| processes | step s | tokens/s | peak memory per process | scaling efficiency | first loss | last loss |",
        "|---|---|---|---|---|---|---|",
        f"| 1 | {summary['step_s_single']:.3f} | {summary['tokens_per_s_single']:.0f} | {mem(summary['peak_memory_bytes_single'])} | — | {summary['loss_first_last_single'][0]:.4f} | {summary['loss_first_last_single'][1]:.4f} |",
        f"| {summary['processes']} | {summary['step_s_parallel']:.3f} | {summary['tokens_per_s_parallel']:.0f} | {mem(summary['peak_memory_bytes_parallel_per_process'])} | {summary['scaling_efficiency']:.2f} | {summary['loss_first_last_parallel'][0]:.4f} | {summary['loss_first_last_parallel'][1]:.4f} |",
        "",
        f"Loss curves: max |difference| {summary['max_abs_loss_difference']:.2e} (relative {summary['max_rel_loss_difference']:.2e}) over {case['steps']} steps.",
        "",
    ])


def plot(single: dict, parallel: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(single["losses"], label="1 process", linewidth=2)
    ax.plot(parallel["losses"], "--", label=f"{parallel['processes']} processes (DDP)", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("CKA-50% LoRA, same global batch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES))
    parser.add_argument("--compare", nargs=2, metavar=("SINGLE_JSON", "PARALLEL_JSON"), help="compare a one-process run with an N-process run")
    parser.add_argument("--out", required=True, help="output path without extension")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compare:
        single, parallel = (json.loads(Path(p).read_text()) for p in args.compare)
        summary = compare(single, parallel)
        out.with_suffix(".json").write_text(json.dumps({"summary": summary, "single": single, "parallel": parallel}, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(summary, single))
        plot(single, parallel, out.with_suffix(".png"))
        print(markdown(summary, single))
        return 0
    if args.case is None:
        parser.error("give --case (a run) or --compare (two run files)")
    result, main_process = run(CASES[args.case])
    if main_process:
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
