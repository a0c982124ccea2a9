"""Write the shipped `lwlora run` configs under src/lwlora/configs/ (paper/ and small/).

python scripts/make_configs.py    # idempotent; commit the YAML it writes

Paper setups (Ogawa et al., arXiv 2602.05988): encoders RoBERTa-base and DeBERTa-v3-base on GLUE with
LoRA r 8, alpha 16; decoders LLaMA-2-7B, Mistral-7B, Gemma-7B on MetaMathQA and Code-Feedback with
LoRA and PiSSA, r 128, alpha 128, lr 2e-5, 1 epoch, cosine, warmup 0.03, max length 512; the
vision-language model LLaVA-1.5-7B on ScienceQA (images) with LoRA on the language model, same
adapter and optimiser settings, max length 2048 (576 image tokens + text). The GLUE
epochs / learning rates / batch size are the LoRA paper's RoBERTa-base recipe (Hu et al. 2021,
table 9), which the layer-wise paper builds on; change them in the YAML if the paper's appendix differs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1] / "src" / "lwlora" / "configs"

# task: (epochs, lr) -- LoRA paper, RoBERTa-base (WNLI, absent there, follows RTE)
GLUE = {
    "cola": (80, 4e-4), "sst2": (60, 5e-4), "mrpc": (30, 4e-4), "qqp": (25, 5e-4), "stsb": (40, 4e-4),
    "mnli": (30, 5e-4), "qnli": (25, 4e-4), "rte": (80, 5e-4), "wnli": (80, 5e-4),
}
ENCODERS = {"roberta-base": "FacebookAI/roberta-base", "deberta-v3-base": "microsoft/deberta-v3-base"}
# LoRA on the attention query and value projections, as in LoRA's GLUE experiments.
ENCODER_TARGETS = {"roberta-base": "query,value", "deberta-v3-base": "query_proj,value_proj"}
DECODERS = {"llama-2-7b": "meta-llama/Llama-2-7b-hf", "mistral-7b": "mistralai/Mistral-7B-v0.1", "gemma-7b": "google/gemma-7b"}
DECODER_TASKS = {"metamath": "metamath", "code-feedback": "code-feedback"}
LAYERS = {"cka": "cka", "all": "all"}
VLMS = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf"}


def write(path: Path, header: str, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n" + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def main() -> None:
    for short, hub in ENCODERS.items():
        for task, (epochs, lr) in GLUE.items():
            for name, layers in LAYERS.items():
                config = {
                    "model": hub, "task": f"glue/{task}", "out": f"runs/paper/glue-{task}-{short}-{name}",
                    "layers": layers, "ratio": 0.5, "preset": "paper" if layers == "cka" else None, "num_samples": 128,
                    "method": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ENCODER_TARGETS[short],
                    "epochs": epochs, "lr": lr, "batch_size": 16, "max_length": 512, "warmup": 0.06,
                    "weight_decay": 0.1, "scheduler": "linear", "seed": 42,
                }
                config = {k: v for k, v in config.items() if v is not None}
                write(ROOT / "paper" / f"glue-{task}-{short}-{name}.yaml", f"Paper setup: {hub} on GLUE {task}, LoRA r 8 alpha 16, layers={name}.", config)
    for short, hub in DECODERS.items():
        for task_short, task in DECODER_TASKS.items():
            for method in ("lora", "pissa"):
                for name, layers in LAYERS.items():
                    config = {
                        "model": hub, "task": task, "out": f"runs/paper/{task_short}-{short}-{method}-{name}",
                        "layers": layers, "ratio": 0.5, "num_samples": 128,
                        "method": method, "r": 128, "alpha": 128, "dropout": 0.0, "target_modules": "auto",
                        "epochs": 1, "lr": 2.0e-5, "batch_size": 4, "grad_accum": 32, "max_length": 512,
                        "warmup": 0.03, "scheduler": "cosine", "bf16": True, "gradient_checkpointing": True,
                        "max_new_tokens": 512, "seed": 42,
                    }
                    config = {k: v for k, v in config.items() if v is not None}
                    write(ROOT / "paper" / f"{task_short}-{short}-{method}-{name}.yaml",
                          f"Paper setup: {hub} on {task} ({'GSM8K' if task == 'metamath' else 'HumanEval'} eval), {method} r 128 alpha 128, layers={name}. Global batch 128 on one GPU (4 x 32 accumulation): divide grad_accum by the number of GPUs under accelerate launch.", config)
    for short, hub in VLMS.items():
        for name, layers in LAYERS.items():
            config = {
                "model": hub, "task": "scienceqa", "out": f"runs/paper/scienceqa-{short}-lora-{name}",
                "layers": layers, "ratio": 0.5, "num_samples": 128, "tower": "language",
                "method": "lora", "r": 128, "alpha": 128, "dropout": 0.0, "target_modules": "auto",
                "epochs": 1, "lr": 2.0e-5, "batch_size": 4, "grad_accum": 32, "max_length": 2048,
                "warmup": 0.03, "scheduler": "cosine", "bf16": True, "gradient_checkpointing": True,
                "max_new_tokens": 16, "seed": 42,
            }
            write(ROOT / "paper" / f"scienceqa-{short}-lora-{name}.yaml",
                  f"Paper setup: {hub} on ScienceQA (examples with an image; accuracy of the answer letter), LoRA r 128 alpha 128 on the language model, vision tower and projector frozen, layers={name}. Global batch 128 on one GPU (4 x 32 accumulation): divide grad_accum by the number of GPUs under accelerate launch.", config)
    shared = "../../../../../shared/data"  # ../shared/data of the repository, read from configs/small/ (paths resolve against the config's folder)
    for data in ("sentiment_multiemo", "nli_vitaminc", "rte_epistemic"):
        for name, layers in LAYERS.items():
            config = {
                "model": "builtin:minilm", "task": "classification", "data": f"{shared}/{data}", "out": f"runs/small/{data}-minilm-{name}",
                "layers": layers, "ratio": 0.5, "preset": "paper" if layers == "cka" else None, "num_samples": 128,
                "method": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "query,value",
                "epochs": 3, "lr": 5e-4, "batch_size": 32, "max_length": 128, "warmup": 0.06,
                "max_train_samples": 4000, "max_eval_samples": 500, "seed": 42, "device": "cpu",
            }
            config = {k: v for k, v in config.items() if v is not None}
            write(ROOT / "small" / f"{data}-minilm-{name}.yaml", f"Runs here (CPU): all-MiniLM-L6-v2 on {shared}/{data}, LoRA r 8 on query/value, layers={name}.", config)
    for data in ("math_gsm_symbolic", "mathqa_choice"):
        for name, layers in LAYERS.items():
            config = {
                "model": "builtin:smollm2", "task": "instruction", "data": f"{shared}/{data}", "out": f"runs/small/{data}-smollm2-{name}",
                "layers": layers, "ratio": 0.5, "num_samples": 128, "method": "lora", "r": 16, "alpha": 32, "dropout": 0.05,
                "target_modules": "auto", "epochs": 1, "lr": 2e-4, "batch_size": 8, "max_length": 384, "warmup": 0.03,
                "scheduler": "cosine", "max_train_samples": 1000, "max_eval_samples": 100, "max_new_tokens": 256,
                "seed": 42, "device": "cpu",
            }
            write(ROOT / "small" / f"{data}-smollm2-{name}.yaml", f"Runs here (CPU; GPU recommended): SmolLM2-135M-Instruct on {shared}/{data}, LoRA r 16, layers={name}.", config)


if __name__ == "__main__":
    main()
