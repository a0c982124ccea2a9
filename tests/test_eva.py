"""--method eva: PEFT's EVA initialisation on exactly the selected blocks, in lwlora train."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from lwlora import cli


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eva-instruct")
    rows = [{"instruction": f"the cat sat {i} times on the mat", "output": f"the dog ran {i} times #### {i}"} for i in range(24)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:4])
    return root


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eva-cls")
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:6])
    return root


def _train(model, task, data, out, *extra):
    return cli.main(["train", str(model), "--task", task, "--data", str(data), "--out", str(out), "--method", "eva", "--r", "4",
                     "--max-steps", "2", "--batch-size", "4", "--max-length", "96", "--device", "cpu", "--no-progress", "--num-samples", "16", *extra])


def test_eva_on_selected_blocks_of_a_decoder_redistributes_ranks_and_reloads(tiny_llama_dir, instruct_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert _train(tiny_llama_dir, "instruction", instruct_dir, out, "--layers", "2,3", "--max-new-tokens", "4") == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva"
    pattern = config["rank_pattern"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter_rank"]["rank_pattern"] == pattern
    # every adapted module is inside blocks 2 and 3, and the total rank is r x modules (redistributed, not grown)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    ranks = {name: module.r["default"] for name, module in model.named_modules() if hasattr(module, "r") and isinstance(getattr(module, "r"), dict) and "default" in module.r}
    assert ranks and all(".layers.2." in n or ".layers.3." in n for n in ranks)
    assert sum(ranks.values()) == 4 * len(ranks)  # EVA keeps the total rank budget r x modules
    assert max(ranks.values()) <= 8  # rho 2: at most 2 r per module


def test_eva_initialises_a_from_the_data(tiny_llama_dir, instruct_dir, tmp_path):
    """After EVA, each lora_A's rows are orthonormal right-singular vectors (not Kaiming noise)."""
    from lwlora.adapters.placement import apply_selection
    from lwlora.selection.artifact import LayerRecord, LayerSelection
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.pad_token = tokenizer.eos_token
    texts = [f"the cat sat {i} times on the mat and the dog ran" for i in range(16)]
    batches = []
    for start in range(0, 16, 4):
        enc = tokenizer(texts[start : start + 4], return_tensors="pt", padding=True)
        batches.append({**enc, "labels": enc["input_ids"].clone()})
    selection = LayerSelection(model="m", layers_path="model.layers", num_layers=4, layers=[LayerRecord(i, None, None, None, False) for i in range(4)], selected=[1])
    peft_model = apply_selection(model, selection, method="eva", r=2, target_modules="q_proj,v_proj", init_batches=batches, eva_rho=1.0)
    for name, module in peft_model.named_modules():
        if name.endswith("q_proj") and hasattr(module, "lora_A"):
            a = module.lora_A["default"].weight.detach().double()
            torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-4, rtol=0)


def test_eva_on_a_classifier(tiny_bert_dir, cls_dir, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_bert_dir, "classification", cls_dir, out, "--layers", "all") == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "eva"


@pytest.mark.parametrize("extra, flag", [(("--eva-rho", "0.5"), "--eva-rho"), (("--rank-allocation", "importance", "--layers", "all"), "--rank-allocation")])
def test_eva_bad_input(tiny_bert_dir, cls_dir, tmp_path, capsys, extra, flag):
    assert _train(tiny_bert_dir, "classification", cls_dir, tmp_path / "run", *extra) == 2
    assert flag in capsys.readouterr().err


def test_eva_under_bf16_autocast_takes_its_svd_in_float32(tiny_llama_dir, instruct_dir, tmp_path, monkeypatch):
    """`--bf16` applies the adapters inside the training autocast. CUDA autocast turns the matmuls
    inside torch.svd_lowrank into bfloat16 ones and torch's QR has no bfloat16 kernel: on the H200
    EVA failed with '"geqrf_cuda" not implemented for BFloat16'. CPU autocast hides this (it runs
    QR in float32 itself), so QR here refuses bfloat16 as CUDA's does: EVA must run autocast-free."""
    real_qr = torch.linalg.qr

    def cuda_like_qr(a, *args, **kwargs):
        if a.dtype == torch.bfloat16:
            raise RuntimeError('"geqrf_cuda" not implemented for \'BFloat16\'')
        return real_qr(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", cuda_like_qr)
    out = tmp_path / "run"
    assert _train(tiny_llama_dir, "instruction", instruct_dir, out, "--layers", "2,3", "--max-new-tokens", "4", "--bf16") == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"]


def test_eva_that_does_not_converge_stops_with_a_usage_error(tiny_llama_dir, instruct_dir, tmp_path, monkeypatch, capsys):
    """PEFT cycles EVA's batches until every layer converges, with no limit (on random weights it
    may never). After EVA_MAX_PASSES passes lwlora gives up: one line naming --method, exit 2,
    no run folder; the counting hook is gone afterwards, and a limit it stays within changes nothing."""
    from lwlora.adapters import placement

    calls = []
    real = placement.initialize_eva

    def spy(peft_model, batches, max_passes=None):
        calls.append(len(list(batches)))
        try:
            return real(peft_model, batches, max_passes)
        finally:
            assert not peft_model.get_base_model()._forward_pre_hooks  # the counter is removed, converged or not

    monkeypatch.setattr(placement, "initialize_eva", spy)
    monkeypatch.setattr(placement, "EVA_MAX_PASSES", 1)
    out = tmp_path / "run"
    assert _train(tiny_llama_dir, "instruction", instruct_dir, out, "--layers", "2,3", "--max-new-tokens", "4", "--num-samples", "4", "--select-batch-size", "4") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lwlora train: error: --method: PEFT's EVA did not converge in 1 passes over its 1 batches"), line
    assert calls == [1] and not (out / "metrics.json").exists()
    monkeypatch.setattr(placement, "EVA_MAX_PASSES", 1000)
    assert _train(tiny_llama_dir, "instruction", instruct_dir, out, "--layers", "2,3", "--max-new-tokens", "4", "--num-samples", "4", "--select-batch-size", "4") == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "eva"
