"""Warm-up, then prune (lwlora.training.prune): scores, pruning, save/reload, the Trainer callback
(resume, classification head) and DDP with two gloo processes. Tiny random models, CPU, offline."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lwlora.blocks import resolve_block_stack
from lwlora.adapters.placement import adapted_module_names, apply_selection, verify
from lwlora.selection.artifact import LayerRecord, LayerSelection
from lwlora.training.prune import (
    WarmupPrune,
    adapter_effect_scores,
    kept_target_regex,
    lora_layers_by_block,
    prune_blocks,
    prune_to_saved,
    top_blocks,
)

TESTS = Path(__file__).resolve().parent


def selection_of(stack, selected) -> LayerSelection:
    return LayerSelection(
        model="tiny",
        layers_path=stack.path,
        num_layers=stack.num_layers,
        layers=[LayerRecord(index=i, cka=None, similarity=None, importance=None, degenerate=False) for i in range(stack.num_layers)],
        selected=sorted(selected),
        tower=stack.tower,
        block_linear_modules=stack.block_linear_modules(),
    )


def all_blocks_lora(model: nn.Module, *, r: int = 2, **kwargs):
    """``model`` with LoRA on every linear layer of every block (lwlora's apply_selection)."""
    stack = resolve_block_stack(model)
    peft_model = apply_selection(model, selection_of(stack, range(stack.num_layers)), r=r, **kwargs)
    return peft_model, stack


def randomize_lora_B(peft_model, *, blocks=None, seed: int = 0, std: float = 0.1) -> None:
    """PEFT starts B at zero (no update); give it values so that the adapters do something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and (blocks is None or any(f".layers.{i}." in name or f".layer.{i}." in name for i in blocks)):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def padded_batch(vocab: int, *, seed: int, rows: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(1, rows):
        mask[row, length - 2 * row:] = 0  # right padding of 2, 4, ... tokens
    return {"input_ids": ids, "attention_mask": mask}


def lora_numel(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@pytest.fixture()
def llama(tiny_llama_dir):
    """A tiny LlamaModel (4 blocks, stack ``layers``) with rank-2 LoRA on all blocks, B random."""
    from transformers import AutoModel

    torch.manual_seed(0)
    peft_model, stack = all_blocks_lora(AutoModel.from_pretrained(tiny_llama_dir), dropout=0.1)
    randomize_lora_B(peft_model)
    return peft_model, stack


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def captured_lora_inputs(peft_model, layers, batches) -> dict[str, list[torch.Tensor]]:
    """Every LoRA layer's input on each batch (eval mode, no grad), for float64 references."""
    captured: dict[str, list[torch.Tensor]] = {}
    handles = [
        layer.register_forward_hook(lambda m, args, out, name=name: captured.setdefault(name, []).append(args[0].detach()))
        for named in layers.values() for name, layer in named.items()
    ]
    peft_model.eval()
    with torch.no_grad():
        for batch in batches:
            peft_model(**batch)
    for handle in handles:
        handle.remove()
    return captured


def test_effect_score_equals_a_float64_reference(llama):
    peft_model, stack = llama
    vocab = peft_model.get_base_model().config.vocab_size
    batches = [padded_batch(vocab, seed=1), padded_batch(vocab, seed=2, rows=2, length=5)]

    # reference: capture every LoRA layer's input, then apply ΔW = s·B·A in float64 by hand
    layers = lora_layers_by_block(peft_model, stack.path, stack.num_layers)
    captured = captured_lora_inputs(peft_model, layers, batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    reference = torch.zeros(stack.num_layers, dtype=torch.float64)
    with torch.no_grad():
        for index, named in layers.items():
            for name, layer in named.items():
                delta_w = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
                for x, batch in zip(captured[name], batches):
                    per_token = (x.double() @ delta_w.T).pow(2).sum(-1)  # (batch, seq)
                    reference[index] += (per_token * batch["attention_mask"]).sum()
    reference /= tokens

    peft_model.train()  # scoring must switch dropout off and restore the mode after
    scores = adapter_effect_scores(peft_model, stack.path, stack.num_layers, batches)
    assert peft_model.training and all(m.training for m in peft_model.modules())
    assert all(r > 0 for r in reference)
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), reference, rtol=1e-5, atol=0)
    assert adapter_effect_scores(peft_model, stack.path, stack.num_layers, batches) == scores  # no dropout noise


def test_relative_score_equals_a_float64_reference_and_ignores_the_inputs_scale(llama):
    """score="relative": per module Σ_t‖ΔW x_t‖² / Σ_t‖W x_t + b‖², averaged over the block's
    modules. Scaling one layer's base weight and its B by c scales both its update and its output
    by c: its ratio is unchanged, while the absolute effect grows by c²."""
    peft_model, stack = llama
    vocab = peft_model.get_base_model().config.vocab_size
    batches = [padded_batch(vocab, seed=1), padded_batch(vocab, seed=2, rows=2, length=5)]
    layers = lora_layers_by_block(peft_model, stack.path, stack.num_layers)
    captured = captured_lora_inputs(peft_model, layers, batches)
    reference = torch.zeros(stack.num_layers, dtype=torch.float64)
    with torch.no_grad():
        for index, named in layers.items():
            ratios = []
            for name, layer in named.items():
                base = layer.get_base_layer()
                w = base.weight.double()
                b = base.bias.double() if base.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
                delta_w = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
                update = output = 0.0
                for x, batch in zip(captured[name], batches):
                    mask = batch["attention_mask"].double()
                    update += float(((x.double() @ delta_w.T).pow(2).sum(-1) * mask).sum())
                    output += float(((x.double() @ w.T + b).pow(2).sum(-1) * mask).sum())
                ratios.append(update / output)
            reference[index] = sum(ratios) / len(ratios)
    scores = adapter_effect_scores(peft_model, stack.path, stack.num_layers, batches, score="relative")
    assert all(r > 0 for r in reference)
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), reference, rtol=1e-5, atol=0)

    # the last block's down_proj: no scored layer reads its output (only the final norm does), so
    # scaling it changes its own update and output alone
    name, layer = next((n, m) for n, m in layers[3].items() if n.endswith("down_proj"))
    effect_before = adapter_effect_scores(peft_model, stack.path, stack.num_layers, batches)[3]
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(10.0)
        layer.lora_B["default"].weight.mul_(10.0)
    after = adapter_effect_scores(peft_model, stack.path, stack.num_layers, batches, score="relative")
    effect_after = adapter_effect_scores(peft_model, stack.path, stack.num_layers, batches)[3]
    assert after[:3] == pytest.approx(scores[:3], rel=1e-9)
    assert after[3] == pytest.approx(scores[3], rel=1e-6)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    with torch.no_grad():
        delta_w = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double() / 10.0  # before the scaling
        own = sum(float(((x.double() @ delta_w.T).pow(2).sum(-1) * b["attention_mask"]).sum()) for x, b in zip(captured[name], batches)) / tokens
    assert own > 0 and effect_after == pytest.approx(effect_before + (100 - 1) * own, rel=1e-5)  # its term grew by c² = 100


def test_a_block_with_zero_lora_B_scores_zero_and_weight_score_is_the_frobenius_norm(tiny_llama_dir):
    from transformers import AutoModel

    torch.manual_seed(0)
    peft_model, stack = all_blocks_lora(AutoModel.from_pretrained(tiny_llama_dir), method="rslora", r=4, alpha=6)
    batch = padded_batch(peft_model.get_base_model().config.vocab_size, seed=3)
    assert adapter_effect_scores(peft_model, stack.path, stack.num_layers, [batch]) == [0.0] * 4  # PEFT's B = 0
    randomize_lora_B(peft_model, blocks=[1, 3])
    effect = adapter_effect_scores(peft_model, stack.path, stack.num_layers, [batch])
    weight = adapter_effect_scores(peft_model, stack.path, stack.num_layers, score="weight")
    assert effect[0] == effect[2] == 0.0 and effect[1] > 0 and effect[3] > 0
    assert weight[0] == weight[2] == 0.0

    reference = [0.0] * 4
    for index, named in lora_layers_by_block(peft_model, stack.path).items():
        for layer in named.values():
            assert layer.scaling["default"] == pytest.approx(6 / 4**0.5)  # rsLoRA: α/√r
            with torch.no_grad():
                product = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
                reference[index] += float(torch.linalg.matrix_norm(product) ** 2)
    assert weight == pytest.approx(reference, rel=1e-10)
    assert top_blocks(effect, 2) == [1, 3] and top_blocks([1.0, 2.0, 2.0, 0.5], 2) == [1, 2] and top_blocks([0.0] * 4, 2) == [0, 1]


def test_dora_cannot_be_scored_and_pissa_cannot_be_pruned(tiny_llama_dir):
    from transformers import AutoModel

    dora, stack = all_blocks_lora(AutoModel.from_pretrained(tiny_llama_dir), method="dora")
    batch = padded_batch(dora.get_base_model().config.vocab_size, seed=4)
    for score in ("effect", "weight"):
        with pytest.raises(ValueError, match="DoRA"):
            adapter_effect_scores(dora, stack.path, stack.num_layers, [batch], score=score)
    pissa, stack = all_blocks_lora(AutoModel.from_pretrained(tiny_llama_dir), method="pissa")
    with pytest.raises(ValueError, match="rewrites the base weights"):
        prune_blocks(pissa, stack.path, [0])


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def test_prune_removes_exactly_the_other_blocks_from_model_optimizer_and_config(llama):
    peft_model, stack = llama
    batch = padded_batch(peft_model.get_base_model().config.vocab_size, seed=5)
    layers = lora_layers_by_block(peft_model, stack.path)
    params_of = {i: [p for layer in named.values() for n, p in layer.named_parameters() if "lora_" in n] for i, named in layers.items()}
    decay = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_A" in n]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n], "weight_decay": 0.0}], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=4)

    def step():
        optimizer.zero_grad()
        peft_model(**batch).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
        scheduler.step()

    step()
    assert len(optimizer.state) == sum(len(v) for v in params_of.values())
    removed = prune_blocks(peft_model, stack.path, [1, 3], optimizer)

    assert removed == sorted(n for i in (0, 2) for n in layers[i])
    assert adapted_module_names(peft_model) == sorted(n for i in (1, 3) for n in layers[i])
    base = peft_model.get_base_model()
    assert type(base.layers[0].self_attn.q_proj) is nn.Linear and type(base.layers[2].mlp.down_proj) is nn.Linear
    verify(peft_model, selection_of(stack, [1, 3]), "auto")  # exactly the kept blocks' linear layers

    kept = {id(p) for i in (1, 3) for p in params_of[i]}
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == kept and len(in_optimizer) == len(kept)
    assert {id(p) for p in optimizer.state} == kept
    assert sum(p.numel() for p in in_optimizer) == lora_numel(peft_model)
    assert len(optimizer.param_groups) == 2 and all(group["params"] for group in optimizer.param_groups)
    assert all(not p.requires_grad and p.grad is None for i in (0, 2) for p in params_of[i])

    frozen = {id(p): p.detach().clone() for i in (0, 2) for p in params_of[i]}
    before = {id(p): p.detach().clone() for i in (1, 3) for p in params_of[i]}
    step()  # optimizer and LR schedule go on with the kept adapters only
    step()
    assert all(torch.equal(p, frozen[id(p)]) for i in (0, 2) for p in params_of[i])
    assert all(not torch.equal(p, before[id(p)]) for i in (1, 3) for p in params_of[i])
    assert scheduler.get_last_lr() == pytest.approx([1e-2 * 0.25] * 2)

    config = peft_model.peft_config["default"]
    assert config.target_modules == kept_target_regex(stack.path, {i: {n.split(f"{stack.path}.{i}.", 1)[1] for n in layers[i]} for i in (1, 3)})
    assert config.layers_to_transform is None
    with pytest.raises(ValueError, match="holds no adapted block"):
        prune_blocks(peft_model, stack.path, [0, 2])


def test_save_and_reload_rebuilds_exactly_the_kept_blocks(llama, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    peft_model, stack = llama
    batch = padded_batch(peft_model.get_base_model().config.vocab_size, seed=6)
    peft_model.eval()
    with torch.no_grad():
        all_blocks = peft_model(**batch).last_hidden_state
    prune_blocks(peft_model, stack.path, [2])
    with torch.no_grad():
        pruned = peft_model(**batch).last_hidden_state
    assert not torch.allclose(pruned, all_blocks)  # the removed blocks' updates are gone
    peft_model.save_pretrained(tmp_path / "adapter")

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == peft_model.peft_config["default"].target_modules
    assert saved["target_modules"].startswith(r"layers\.(?:2)\.") and saved["layers_to_transform"] is None
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors and all(".layers.2." in key for key in tensors)

    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_llama_dir), tmp_path / "adapter").eval()
    assert adapted_module_names(reloaded) == adapted_module_names(peft_model)
    verify(reloaded, selection_of(resolve_block_stack(reloaded.get_base_model()), [2]), "auto")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).last_hidden_state, pruned, rtol=0, atol=0)


def test_classification_head_stays_trained_saved_and_reloaded(tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    def classifier():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)

    peft_model, stack = all_blocks_lora(classifier(), task_type="SEQ_CLS")
    randomize_lora_B(peft_model)
    head = [p for n, p in peft_model.named_parameters() if p.requires_grad and "classifier" in n]
    assert head and all("modules_to_save" in n for n, p in peft_model.named_parameters() if p.requires_grad and "classifier" in n)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
    vocab = peft_model.get_base_model().config.vocab_size
    batch = padded_batch(vocab, seed=7)
    scores = adapter_effect_scores(peft_model, stack.path, stack.num_layers, [batch])
    assert len(scores) == 3 and all(s > 0 for s in scores)

    prune_blocks(peft_model, stack.path, [1], optimizer)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer and p.requires_grad for p in head)
    assert "classifier" in peft_model.peft_config["default"].modules_to_save
    verify(peft_model, selection_of(stack, [1]), "auto")

    with torch.no_grad():  # a trained head, so that a lost head would show
        for p in head:
            p.add_(0.5)
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(classifier(), tmp_path / "adapter").eval()
    assert adapted_module_names(reloaded) == adapted_module_names(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The Trainer callback
# ---------------------------------------------------------------------------------------------


class _Tokens(torch.utils.data.Dataset):
    """16 causal-LM examples of 8 tokens (a few right-padded)."""

    def __init__(self, vocab: int):
        self.batch = padded_batch(vocab, seed=11, rows=16, length=8)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self.batch["input_ids"][i], self.batch["attention_mask"][i]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class _Watch:
    """Per step end (after WarmupPrune's): the trainable adapter tensors and the optimizer's size."""

    def __init__(self):
        from transformers import TrainerCallback

        watch = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                watch.params[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                watch.optimizer[state.global_step] = (len(optimizer.param_groups), sum(p.numel() for g in optimizer.param_groups for p in g["params"]))

        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, tuple[int, int]] = {}
        self.callback = Callback()


def _causal_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model, stack = all_blocks_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), r=2)
    return peft_model, stack


def _trainer(peft_model, out: Path, callbacks, **overrides):
    from transformers import Trainer, TrainingArguments

    options = {
        "output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 6, "learning_rate": 5e-2, "lr_scheduler_type": "linear",
        "use_cpu": True, "report_to": [], "save_strategy": "steps", "save_steps": 3, "logging_steps": 1, "disable_tqdm": True, "seed": 0,
    } | overrides
    dataset = _Tokens(peft_model.get_base_model().config.vocab_size)
    return Trainer(model=peft_model, args=TrainingArguments(**options), train_dataset=dataset, callbacks=callbacks)


def test_trainer_prunes_at_the_step_trains_only_the_kept_blocks_and_resumes(tiny_llama_dir, tmp_path):
    peft_model, stack = _causal_llama(tiny_llama_dir)
    all_layer = lora_numel(peft_model)
    vocab = peft_model.get_base_model().config.vocab_size
    selection_batches = [padded_batch(vocab, seed=12, rows=4)]
    prune = WarmupPrune(stack_path=stack.path, num_layers=stack.num_layers, batches=selection_batches, at_step=2, keep=2)
    watch = _Watch()
    trainer = _trainer(peft_model, tmp_path / "run", [prune, watch.callback])
    trainer.train()

    assert len(prune.kept) == 2 and prune.kept == top_blocks(prune.scores, 2) and prune.scores == prune.local_scores
    kept_prefixes = tuple(f"{stack.path}.{i}." for i in prune.kept)
    assert all(".".join(n.split(".")[2:]).startswith(kept_prefixes) for n in watch.params[2])  # pruned at the end of step 2
    assert len(watch.params[1]) == 2 * len(watch.params[2])
    assert watch.params[2].keys() == watch.params[6].keys()
    lora_b = [n for n in watch.params[2] if "lora_B" in n]
    assert all(not torch.equal(watch.params[2][n], watch.params[6][n]) for n in lora_b)  # the kept blocks keep training
    kept_numel = lora_numel(peft_model)
    assert kept_numel == all_layer * 2 // stack.num_layers and prune.removed_params == all_layer - kept_numel
    groups = {count for count, _ in watch.optimizer.values()}
    assert len(groups) == 1  # param groups untouched, so the LR schedule lines up
    assert watch.optimizer[1][1] == all_layer and all(watch.optimizer[s][1] == kept_numel for s in range(2, 7))
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len(rates) == 6 and all(a > b for a, b in itertools.pairwise(rates))

    trainer.save_model(tmp_path / "final")
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == kept_numel  # about kept / L of all-layer LoRA

    checkpoint = tmp_path / "run" / "checkpoint-3"  # saved after the prune step
    state = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["WarmupPrune"]
    assert state["attributes"]["kept"] == prune.kept and state["attributes"]["scores"] == prune.scores

    # resuming a post-prune checkpoint: prune the fresh all-block model as saved, then resume
    resumed_model, _ = _causal_llama(tiny_llama_dir)
    assert prune_to_saved(resumed_model, checkpoint) == prune.removed
    assert prune_to_saved(resumed_model, checkpoint) == []  # already pruned
    again = WarmupPrune(stack_path=stack.path, num_layers=stack.num_layers, batches=selection_batches, at_step=2, keep=2)
    _trainer(resumed_model, tmp_path / "run", [again]).train(resume_from_checkpoint=str(checkpoint))
    assert again.kept == prune.kept and again.scores == prune.scores
    final = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, param in resumed_model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, final[name], rtol=0, atol=0)


def test_resume_after_the_prune_step_without_pruning_is_refused(tiny_llama_dir):
    peft_model, stack = _causal_llama(tiny_llama_dir)

    def callback(**overrides):
        return WarmupPrune(**{"stack_path": stack.path, "num_layers": stack.num_layers, "batches": [], "at_step": 2, "keep": 2, "score": "weight"} | overrides)

    args = SimpleNamespace(world_size=1)
    saved = {"WarmupPrune": callback().state() | {"attributes": {"kept": [1, 3], "scores": [0.0, 1.0, 0.0, 1.0], "removed_params": 1}}}
    with pytest.raises(RuntimeError, match="prune_to_saved"):  # the model still has all four blocks' adapters
        callback().on_train_begin(args, SimpleNamespace(global_step=3, stateful_callbacks=saved), None, model=peft_model)
    with pytest.raises(RuntimeError, match="without WarmupPrune's saved state"):  # step 2 = a checkpoint saved after pruning
        callback().on_train_begin(args, SimpleNamespace(global_step=2, stateful_callbacks={}), None, model=peft_model)
    prune_to_saved(peft_model, {"stateful_callbacks": saved})
    restored = WarmupPrune.from_state(saved["WarmupPrune"])  # what restore_callback_states_from_checkpoint does
    assert restored.kept == [1, 3] and restored.batches == []
    callback = callback()
    callback.on_train_begin(args, SimpleNamespace(global_step=3, stateful_callbacks=saved), None, model=peft_model)
    assert callback.kept == [1, 3] and callback.scores == [0.0, 1.0, 0.0, 1.0]

    fresh, _ = _causal_llama(tiny_llama_dir)
    effect = WarmupPrune(stack_path=stack.path, num_layers=stack.num_layers, batches=[], at_step=2, keep=2, score="effect")
    with pytest.raises(RuntimeError, match="no selection batches"):  # as rebuilt by restore_callback_states_from_checkpoint
        effect.on_train_begin(args, SimpleNamespace(global_step=0, stateful_callbacks={}), None, model=fresh)
    with pytest.raises(RuntimeError, match="ddp_find_unused_parameters=True"):
        effect.on_train_begin(SimpleNamespace(world_size=2, ddp_find_unused_parameters=False), SimpleNamespace(global_step=0), None, model=fresh)


# ---------------------------------------------------------------------------------------------
# DDP: two gloo processes
# ---------------------------------------------------------------------------------------------

_DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from test_prune import _Tokens, all_blocks_lora, lora_layers_by_block, padded_batch
    from tiny_models import build
    from lwlora.training.prune import WarmupPrune

    out = sys.argv[2]
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts rank 0's)
    model, info = build("llama-lm")  # 3 blocks, stack model.layers
    peft_model, stack = all_blocks_lora(model)
    lora = {n: p for named in lora_layers_by_block(peft_model, stack.path).values() for layer in named.values() for n, p in layer.named_parameters() if "lora_" in n}
    record = {"losses": [], "grads": {}}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # gradients after DDP's all-reduce
            record["grads"][state.global_step + 1] = {n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 2:
                record["removed_frozen"] = {n: p.detach().clone() for n, p in lora.items() if not p.requires_grad}
                record["optimizer_numel"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
                record["kept_numel"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    class LossTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            record["losses"].append(float(loss))
            return loss

    prune = WarmupPrune(stack_path=stack.path, num_layers=3, batches=[padded_batch(128, seed=12, rows=4)], at_step=2, keep=2)
    args = TrainingArguments(output_dir=out + "/run", per_device_train_batch_size=2, max_steps=4, learning_rate=5e-2, use_cpu=True,
                             ddp_backend="gloo", report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    trainer = LossTrainer(model=peft_model, args=args, train_dataset=_Tokens(128), callbacks=[prune, Record()])
    trainer.train()
    frozen = record.pop("removed_frozen")
    record.update(
        wrapped=type(trainer.model_wrapped).__name__, world_size=args.world_size, kept=prune.kept, scores=prune.scores,
        local_scores=prune.local_scores,
        removed_unchanged=bool(frozen) and all(torch.equal(p, frozen[n]) and p.grad is None for n, p in lora.items() if not p.requires_grad),
        final={n: p.detach().double().sum().item() for n, p in peft_model.named_parameters() if p.requires_grad},
    )
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(record, handle)
    # as in test_dynamic: now and then a background thread of the gloo group is still joinable when
    # C++ statics are destroyed ("terminate called without an active exception", SIGABRT) although
    # everything above finished and the results are on disk; so leave without the interpreter's teardown
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_prune_the_same_blocks_and_keep_gradients_in_sync(tmp_path):
    script = tmp_path / "ddp_prune.py"
    script.write_text(_DDP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(TESTS), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert all(r["wrapped"] == "DistributedDataParallel" and r["world_size"] == 2 for r in ranks)
    assert ranks[0]["local_scores"] == ranks[1]["local_scores"]  # same batches, synchronized weights
    assert ranks[0]["kept"] == ranks[1]["kept"] and len(ranks[0]["kept"]) == 2
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trains on its own shard...
    for step in (1, 3, 4):  # ...yet the all-reduced gradients agree, before and after pruning
        assert ranks[0]["grads"][str(step)] == pytest.approx(ranks[1]["grads"][str(step)], rel=1e-9)
        assert all(g > 0 for g in ranks[0]["grads"][str(step)].values())
    assert len(ranks[0]["grads"]["3"]) == len(ranks[0]["grads"]["1"]) * 2 // 3
    assert ranks[0]["final"] == pytest.approx(ranks[1]["final"], rel=1e-9)
    assert all(r["removed_unchanged"] and r["optimizer_numel"] == r["kept_numel"] for r in ranks)


# ------------------------------------------------------------------- through lwlora train --prune-at


@pytest.mark.parametrize("score", ["effect", "relative"])
def test_train_prune_at_keeps_the_measured_blocks_and_records_them(tiny_bert_dir, tmp_path, score):
    import json

    from conftest import write_jsonl
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lwlora import cli
    from lwlora.adapters.placement import adapted_module_names

    data = tmp_path / "cls"
    data.mkdir()
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:6])
    out = tmp_path / "run"
    argv = ["train", str(tiny_bert_dir), "--task", "classification", "--data", str(data), "--out", str(out), "--layers", "all", "--prune-at", "0.25",
            "--num-layers", "1", "--max-steps", "8", "--batch-size", "8", "--max-length", "24", "--device", "cpu", "--no-progress", "--num-samples", "8", "--lr", "5e-3", "--prune-score", score]
    assert cli.main(argv) == 0
    selection = json.loads((out / "selection.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    prune = selection["diagnostics"]["prune"]
    assert prune["at_step"] == 2 and len(selection["selected"]) == 1 and selection["selected"] == prune["kept"]
    assert selection["scorer"] == f"prune-{score}" and prune["score"] == score and metrics["selected"] == selection["selected"]
    kept = selection["selected"][0]
    assert prune["scores"][kept] == max(prune["scores"])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    assert {name.split(".")[3] for name in adapted_module_names(reloaded)} == {str(kept)}  # bert.encoder.layer.<i>.
    assert metrics["params"]["adapter"] == metrics["cost"]["adapter_params"]


def test_train_prune_at_refuses_what_it_cannot_combine(tiny_bert_dir, tmp_path):
    from lwlora.errors import ConfigError
    from lwlora.training.config import TrainConfig

    with pytest.raises(ConfigError, match="--prune-at"):
        TrainConfig(model="m", task="classification", out="-", layers="cka", prune_at=0.1)
    with pytest.raises(ConfigError, match="--method"):
        TrainConfig(model="m", task="classification", out="-", layers="all", prune_at=0.1, method="pissa")
