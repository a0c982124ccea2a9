"""Importance-sampled dynamic LoRA (lwlora.training.dynamic): the draw, the switching inside a real
``transformers.Trainer``, resume, the backward that stops below the lowest active block, DDP."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lwlora.training.dynamic import (
    DynamicBlocks,
    adapter_params_by_block,
    block_probabilities,
    draw_blocks,
    effective_find_unused_parameters,
)

NUM_BLOCKS = 4
STACK = "model.layers"


# ---------------------------------------------------------------------------------------------
# Tiny models and data
# ---------------------------------------------------------------------------------------------


def tiny_lora_llama(num_layers: int = NUM_BLOCKS, **lora):
    """A random LlamaForCausalLM (hidden 32) with LoRA on q/v of every block. ``init_lora_weights=False``
    makes lora_B nonzero, so every adapter weight gets a gradient (with B = 0, A gets none)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT reads a deprecated transformers property
        return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora))


class TokenData(torch.utils.data.Dataset):
    """Random token sequences (a language-modelling task the Trainer can run; nothing to learn)."""

    def __len__(self) -> int:
        return 256

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 64, (10,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def trainer_for(model, callbacks, out, **overrides):
    from transformers import Trainer, TrainingArguments

    values = dict(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.1,
        report_to=[], save_strategy="no", logging_steps=1000, use_cpu=True, disable_tqdm=True, seed=0,
    )
    values.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**values), train_dataset=TokenData(), callbacks=callbacks)


def block_of(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


# ---------------------------------------------------------------------------------------------
# The sampling distribution and the draw
# ---------------------------------------------------------------------------------------------


def test_probabilities_follow_the_equation():
    # w = [0.1, 0.5, 0.2, mean(0.1, 0.5, 0.2, 0) = 0.2, 0 (negative clipped)], Σw = 1.0
    p = block_probabilities([0.1, 0.5, 0.2, None, -0.3], floor=0.2)
    w = np.array([0.1, 0.5, 0.2, 0.2, 0.0])
    np.testing.assert_allclose(p, 0.8 * w / w.sum() + 0.2 / 5)
    assert p.sum() == pytest.approx(1.0) and (p > 0).all()  # floor > 0: even the clipped block can be drawn
    np.testing.assert_allclose(block_probabilities([None, None, None]), [1 / 3] * 3)  # nothing scored: uniform
    np.testing.assert_allclose(block_probabilities([0.0, 0.0], floor=0.0), [0.5, 0.5])  # all zero: uniform
    np.testing.assert_allclose(block_probabilities([0.3, float("nan")], floor=0.0), [0.5, 0.5])  # NaN counts as None
    zero = block_probabilities([1.0, 0.0, 1.0], floor=0.0)
    assert zero[1] == 0.0  # no floor: a zero-importance block starves
    np.testing.assert_allclose(block_probabilities([1.0, 0.0, 1.0], floor=1.0), [1 / 3] * 3)  # floor 1: uniform (LISA)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k=0), "k must be in 1..4"),
        (dict(k=5), "k must be in 1..4"),
        (dict(k=1.5), "k must be an int"),
        (dict(every=0), "every must be in >= 1"),
        (dict(floor=-0.1), r"floor must be in \[0, 1\]"),
        (dict(floor=1.5), r"floor must be in \[0, 1\]"),
        (dict(seed=-1), "seed must be in >= 0"),
        (dict(importances=[1.0, 1.0, 1.0]), "block_params has 4 blocks but importances has 3"),
        (dict(importances=[1.0, float("inf"), 1.0, 1.0]), "importance of block 1 is inf"),
        (dict(importances=[1.0, 0.0, 0.0, 0.0], floor=0.0, k=2), "only 1 blocks have a nonzero probability"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    params = [[torch.nn.Parameter(torch.zeros(1))] for _ in range(NUM_BLOCKS)]
    values = dict(importances=[0.1, 0.2, 0.3, 0.4], k=2, every=2)
    values.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DynamicBlocks(params, **values)


def test_block_sources_are_refused_when_missing_empty_or_doubled():
    params = [[torch.nn.Parameter(torch.zeros(1))] for _ in range(3)]
    with pytest.raises(ValueError, match="give block_params, or stack_path"):
        DynamicBlocks(importances=[1, 1, 1], k=1, every=1)
    with pytest.raises(ValueError, match="either block_params or model/stack_path"):
        DynamicBlocks(params, importances=[1, 1, 1], k=1, every=1, stack_path=STACK)
    with pytest.raises(ValueError, match=r"blocks \[1\] have no adapter parameters"):
        DynamicBlocks([params[0], [], params[2]], importances=[1, 1, 1], k=1, every=1)
    with pytest.raises(ValueError, match="listed in blocks 0 and 1"):
        DynamicBlocks([params[0], params[0], params[2]], importances=[1, 1, 1], k=1, every=1)


def test_draw_is_seeded_distinct_and_a_function_of_seed_and_window_only():
    p = block_probabilities([0.1, 0.5, 0.2, None, 0.05, 0.3], floor=0.1)
    draws = [draw_blocks(p, 3, seed=7, draw_index=d) for d in range(50)]
    assert draws == [draw_blocks(p, 3, seed=7, draw_index=d) for d in range(50)]
    assert all(len(set(d)) == 3 and d == sorted(d) and all(0 <= i < 6 for i in d) for d in draws)
    assert len({tuple(d) for d in draws}) > 5  # it does change between windows
    assert draws != [draw_blocks(p, 3, seed=8, draw_index=d) for d in range(50)]
    callback = DynamicBlocks([[torch.nn.Parameter(torch.zeros(1))] for _ in range(6)], importances=[0.1, 0.5, 0.2, None, 0.05, 0.3], k=3, every=4, seed=7)
    assert [callback.blocks_at(step) for step in range(12)] == [draws[step // 4] for step in range(12)]


def test_single_block_draw_frequencies_follow_p():
    p = block_probabilities([0.1, 0.5, 0.2, None, 0.0], floor=0.1)
    n = 4000
    counts = np.bincount([draw_blocks(p, 1, seed=3, draw_index=d)[0] for d in range(n)], minlength=5)
    chi2 = float((((counts - n * p) ** 2) / (n * p)).sum())
    assert chi2 < 18.5, (counts, n * p)  # chi-square, 4 degrees of freedom, p-value 0.001


def test_multi_block_draw_frequencies_follow_successive_sampling():
    """With k = 2 a block is in the set with the inclusion probability of sampling without
    replacement (pick ∝ p, then ∝ p among the rest), computed exactly over all ordered pairs."""
    p = block_probabilities([0.1, 0.5, 0.2, None, 0.0], floor=0.1)
    inclusion = np.zeros(5)
    for a, b in itertools.permutations(range(5), 2):
        chance = p[a] * p[b] / (1 - p[a])
        inclusion[a] += chance
        inclusion[b] += chance
    assert inclusion.sum() == pytest.approx(2.0)
    n = 4000
    counts = np.zeros(5)
    for d in range(n):
        counts[draw_blocks(p, 2, seed=5, draw_index=d)] += 1
    sigma = np.sqrt(n * inclusion * (1 - inclusion))
    assert (np.abs(counts - n * inclusion) < 5 * sigma).all(), (counts, n * inclusion)


def test_resume_draws_what_an_uninterrupted_run_draws():
    def fresh():
        return DynamicBlocks([[torch.nn.Parameter(torch.zeros(1))] for _ in range(5)], importances=[0.3, 0.1, None, 0.6, 0.2], k=2, every=3, seed=11)

    whole = fresh()
    for step in range(15):
        whole.activate(step)
    resumed = fresh()
    for step in range(7, 15):  # resumed at step 7, mid-window 2
        resumed.activate(step)
    assert [step for step, _ in whole.history] == [0, 3, 6, 9, 12]
    assert resumed.history[0] == (7, whole.history[2][1])
    assert resumed.history[1:] == whole.history[3:]


# ---------------------------------------------------------------------------------------------
# Finding the adapter parameters of each block
# ---------------------------------------------------------------------------------------------


def test_adapter_params_by_block_in_peft_models():
    from peft import LoraConfig, get_peft_model
    from tiny_models import build

    model = tiny_lora_llama(use_dora=True)
    blocks = adapter_params_by_block(model, STACK, NUM_BLOCKS)
    names = {id(p): n for n, p in model.named_parameters()}
    for i, params in enumerate(blocks):
        found = sorted(names[id(p)].split(f"layers.{i}.")[1] for p in params)
        assert len(params) == 6 and all(block_of(names[id(p)]) == i for p in params)  # q, v: A, B, magnitude
        assert any("lora_magnitude_vector" in name for name in found)
    # the full path with PEFT's prefix finds the same; a wrong path or too few blocks is an error
    assert adapter_params_by_block(model, "base_model.model.model.layers", NUM_BLOCKS) == blocks
    with pytest.raises(ValueError, match="no trainable LoRA parameters found under 'model.layer'"):
        adapter_params_by_block(model, "model.layer", NUM_BLOCKS)
    with pytest.raises(ValueError, match="in block 3 of 'model.layers', but only 3 blocks"):
        adapter_params_by_block(model, STACK, 3)

    # an encoder; and a VLM, whose vision tower's blocks are not the language tower's
    bert, info = build("bert-seqcls")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT reads a deprecated transformers property
        bert = get_peft_model(bert, LoraConfig(r=2, target_modules=list(info.qv_targets)))
    assert [len(params) for params in adapter_params_by_block(bert, info.layers_path, info.num_layers)] == [4] * info.num_layers
    llava, info = build("llava")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llava = get_peft_model(llava, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    names = {id(p): n for n, p in llava.named_parameters()}
    assert any("vision_tower" in n and "lora_A" in n for n in names.values())
    language = adapter_params_by_block(llava, info.layers_path, info.num_layers)
    assert all(len(params) == 4 and all("language_model" in names[id(p)] for p in params) for params in language)


# ---------------------------------------------------------------------------------------------
# Inside a real Trainer
# ---------------------------------------------------------------------------------------------


class Probe:
    """Records, per optimizer step, which blocks' adapters hold a gradient before the optimizer
    step, and the adapter weights / AdamW moments at the start of every window."""

    def __new__(cls, dynamic: DynamicBlocks, model):
        from transformers import TrainerCallback

        class _Probe(TrainerCallback):
            def __init__(self):
                self.with_grad: list[tuple[int, list[int]]] = []
                self.snapshots: list[tuple[int, list[torch.Tensor], list[torch.Tensor | None]]] = []
                self.optimizer = None

            def _snapshot(self, step, optimizer):
                weights, moments = [], []
                for params in dynamic.block_params:
                    weights.append(torch.cat([p.detach().flatten() for p in params]).clone())
                    states = [optimizer.state.get(p, {}).get("exp_avg") for p in params]
                    moments.append(None if any(s is None for s in states) else torch.cat([s.flatten() for s in states]).clone())
                self.snapshots.append((step, weights, moments))

            def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
                if state.global_step % dynamic.every == 0:
                    self._snapshot(state.global_step, optimizer)

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                blocks = sorted({block_of(n) for n, p in model.named_parameters() if "lora_" in n and p.grad is not None})
                self.with_grad.append((state.global_step, blocks))

            def on_train_end(self, args, state, control, optimizer=None, **kwargs):
                self._snapshot(state.global_step, optimizer)

        return _Probe()


def test_only_the_active_blocks_train_in_each_window(tmp_path):
    model = tiny_lora_llama()
    dynamic = DynamicBlocks(importances=[0.9, 0.1, 0.5, 0.3], k=2, every=3, floor=0.2, seed=1, model=model, stack_path=STACK)
    probe = Probe(dynamic, model)
    trainer = trainer_for(model, [dynamic, probe], tmp_path, max_steps=12)  # probe after dynamic: sees the switched state
    trainer.train()

    assert [step for step, _ in dynamic.history] == [0, 3, 6, 9]
    assert [active for _, active in dynamic.history] == [dynamic.draw(d) for d in range(4)]
    # the blocks holding a gradient at each optimizer step are exactly the window's active blocks
    assert probe.with_grad == [(step, dynamic.blocks_at(step)) for step in range(12)]
    kept = 0
    for (start, before, moments_before), (_, after, moments_after) in itertools.pairwise(probe.snapshots):
        active = dynamic.blocks_at(start)
        for i in range(NUM_BLOCKS):
            moved = not torch.equal(before[i], after[i])
            assert moved == (i in active), (start, i, active)  # inactive: no update, no weight decay either
            if i not in active and moments_before[i] is not None:
                assert torch.equal(moments_before[i], moments_after[i])  # its AdamW moments are kept as they were
                kept += 1
    assert kept > 0  # some block was trained, then sat out a window holding its moments
    # at the end every adapter is trainable again (and the final adapter has every block)
    assert all(p.requires_grad for params in dynamic.block_params for p in params)


def test_every_block_trains_at_some_point_with_a_floor(tmp_path):
    model = tiny_lora_llama()
    start = [p.detach().clone() for p in model.parameters()]
    dynamic = DynamicBlocks(importances=[1.0, 0.0, 0.0, None], k=1, every=1, floor=0.5, seed=0, model=model, stack_path=STACK)
    trainer_for(model, [dynamic], tmp_path, max_steps=40, per_device_train_batch_size=1).train()
    drawn = {i for _, active in dynamic.history for i in active}
    assert drawn == set(range(NUM_BLOCKS))
    changed = {block_of(n) for (n, p), p0 in zip(model.named_parameters(), start, strict=True) if "lora_" in n and not torch.equal(p.detach(), p0)}
    assert changed == set(range(NUM_BLOCKS))


def test_resumed_trainer_continues_the_same_draws(tmp_path):
    def run(max_steps, resume=None):
        model = tiny_lora_llama()
        dynamic = DynamicBlocks(importances=[0.4, 0.2, None, 0.3], k=2, every=3, seed=4, model=model, stack_path=STACK)
        trainer = trainer_for(model, [dynamic], tmp_path / "run", max_steps=max_steps, save_strategy="steps", save_steps=4)
        trainer.train(resume_from_checkpoint=resume)
        return dynamic.history

    whole = run(8)
    assert [step for step, _ in whole] == [0, 3, 6]
    resumed = run(8, resume=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed == [(4, whole[1][1]), (6, whole[2][1])]  # at step 4 (mid-window 1), then at the next window


def test_backward_stops_below_the_lowest_active_block():
    model = tiny_lora_llama()
    blocks = adapter_params_by_block(model, STACK, NUM_BLOCKS)
    dynamic = DynamicBlocks(blocks, importances=[1.0] * NUM_BLOCKS, k=2, every=1, seed=2)
    inner = model.base_model.model.model
    fired: list[object] = []
    inner.embed_tokens.register_full_backward_hook(lambda *_: fired.append("embeddings"))
    for i, layer in enumerate(inner.layers):
        layer.register_full_backward_hook(lambda *_, i=i: fired.append(i))
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    seen_lowest = set()
    for step in range(12):
        dynamic.activate(step)
        fired.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "full backward hook is firing ... no inputs require gradient"
            model(input_ids=ids, labels=ids).loss.backward()
        lowest = dynamic.active[0]
        seen_lowest.add(lowest)
        assert sorted(set(fired)) == list(range(lowest, NUM_BLOCKS)), (dynamic.active, fired)  # nothing below, never the embeddings
        has_grad = {i for i, params in enumerate(blocks) if any(p.grad is not None for p in params)}
        assert has_grad == set(dynamic.active)
        model.zero_grad(set_to_none=False)  # even zeroed (not None) grads must not survive a deactivation
    assert len(seen_lowest) > 1  # the test saw blocks 0 and above become the lowest active one


def test_deactivation_drops_stale_gradients_and_optionally_the_optimizer_state():
    model = tiny_lora_llama()
    blocks = adapter_params_by_block(model, STACK, NUM_BLOCKS)
    optimizer = torch.optim.AdamW([p for params in blocks for p in params], lr=1e-2, weight_decay=0.1)
    dynamic = DynamicBlocks(blocks, importances=[1.0] * NUM_BLOCKS, k=1, every=1, seed=0, reset_optimizer_state=True)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in range(16):
        dynamic.activate(step, optimizer)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # leaves zero tensors: the deactivation must clear them
        (active,) = dynamic.active
        for i, params in enumerate(blocks):
            held = [p in optimizer.state and len(optimizer.state[p]) > 0 for p in params]
            assert all(held) if i == active else not any(held)  # only the active block has state
    assert len({i for _, active in dynamic.history for i in active}) > 1
    # a reactivated block restarts fresh: its AdamW step count covers only its current run of draws
    (last,) = dynamic.active
    run = 0
    for _, active in reversed(dynamic.history):
        if last not in active:
            break
        run += 1
    assert {int(optimizer.state[p]["step"]) for p in blocks[last]} == {run}


def test_optimizer_built_after_freezing_is_refused(tmp_path):
    """LISA-style freezing before ``train()`` leaves the frozen blocks out of the Trainer's optimizer
    (it only takes parameters that require grad), so they could never train when drawn."""
    model = tiny_lora_llama()
    blocks = adapter_params_by_block(model, STACK, NUM_BLOCKS)
    for p in blocks[2]:
        p.requires_grad_(False)
    dynamic = DynamicBlocks(blocks, importances=[1.0] * NUM_BLOCKS, k=2, every=2)
    with pytest.raises(ValueError, match=r"optimizer lacks adapter parameters of blocks \[2\]"):
        trainer_for(model, [dynamic], tmp_path).train()


def test_input_require_grads_warns_that_the_saving_is_lost():
    model = tiny_lora_llama()
    model.base_model.model.enable_input_require_grads()
    dynamic = DynamicBlocks(importances=[1.0] * NUM_BLOCKS, k=1, every=1, stack_path=STACK)
    args = SimpleNamespace(world_size=1)
    with pytest.warns(UserWarning, match="backward still runs through the frozen blocks"):
        dynamic.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model)
    assert len(dynamic.active) == 1


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------


def test_distributed_settings_that_break_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    blocks = [[torch.nn.Parameter(torch.zeros(1))] for _ in range(2)]
    peft_model = tiny_lora_llama(num_layers=2)

    def begin(model=peft_model, **args):
        values = dict(world_size=2, ddp_find_unused_parameters=None, ddp_static_graph=None, deepspeed=None, fsdp=None)
        values.update(args)
        DynamicBlocks(blocks, importances=[1, 1], k=1, every=1).on_train_begin(SimpleNamespace(**values), SimpleNamespace(global_step=0), None, model=model)

    with pytest.raises(ValueError, match=r"TrainingArguments\(ddp_find_unused_parameters=True\)"):
        begin(ddp_find_unused_parameters=False)
    begin(ddp_find_unused_parameters=True)
    begin()  # None: the Trainer gives a PeftModel find_unused_parameters=True
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
    assert effective_find_unused_parameters(SimpleNamespace(ddp_find_unused_parameters=None), plain) is True
    (getattr(plain, "activation_checkpointing_enable", None) or plain.gradient_checkpointing_enable)()
    assert effective_find_unused_parameters(SimpleNamespace(ddp_find_unused_parameters=None), plain) is False
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        begin(model=plain)  # None on a checkpointed PreTrainedModel: the Trainer passes False
    with pytest.raises(ValueError, match="ddp_static_graph=True"):
        begin(ddp_static_graph=True)
    with pytest.raises(ValueError, match="DeepSpeed"):
        begin(deepspeed="ds.json")
    with pytest.raises(ValueError, match="FSDP"):
        begin(fsdp="full_shard")
    begin(world_size=1, ddp_find_unused_parameters=False)  # one process: no DDP, nothing to check


DDP_SCRIPT = r'''
import json, os, sys, warnings
import torch
import torch.distributed as dist
from transformers import TrainerCallback
sys.path.insert(0, {tests!r})
from test_dynamic import STACK, block_of, tiny_lora_llama, trainer_for
from lwlora.training.dynamic import DynamicBlocks

torch.set_num_threads(1)
model = tiny_lora_llama()
dynamic = DynamicBlocks(importances=[0.1, 0.5, 0.2, None], k=2, every=2, seed=3, stack_path=STACK)
local = {{}}

class Averaging(TrainerCallback):
    """Each rank's own gradient (a tensor hook on the parameter fires before DDP's all-reduce)
    against the gradient the optimizer sees: it must be the mean over the ranks."""
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.register_hook(lambda g, name=name: local.__setitem__(name, g.detach().clone()))
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        with_grad, error, spread = set(), 0.0, 0.0
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            with_grad.add(block_of(name))
            both = [torch.zeros_like(p.grad) for _ in range(2)]
            dist.all_gather(both, local[name])
            error = max(error, (p.grad - (both[0] + both[1]) / 2).abs().max().item())
            spread = max(spread, (both[0] - both[1]).abs().max().item())
        steps.append(dict(step=state.global_step, active=dynamic.active, with_grad=sorted(with_grad), error=error, spread=spread))
        local.clear()

steps = []
trainer = trainer_for(model, [Averaging(), dynamic], {out!r}, max_steps=6, ddp_backend="gloo", ddp_find_unused_parameters=True)
trainer.train()
weights = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_" in n])
gathered = [torch.zeros_like(weights) for _ in range(2)]
dist.all_gather(gathered, weights)

refused = None
try:  # the same run without find_unused_parameters: refused on every rank before the first step
    trainer_for(tiny_lora_llama(), [DynamicBlocks(importances=[1] * 4, k=1, every=1, stack_path=STACK)], {out!r}, max_steps=2,
                ddp_backend="gloo", ddp_find_unused_parameters=False).train()
except ValueError as error:
    refused = str(error)
rank = dist.get_rank()
# importances measured per rank may differ by float noise: every rank adopts rank 0's probabilities
noisy = DynamicBlocks([[p] for p in [torch.nn.Parameter(torch.zeros(1)) for _ in range(4)]], importances=[0.1 + 1e-6 * rank, 0.5, 0.2, 0.3], k=2, every=1)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    noisy._agree_across_ranks()
adopted = noisy.probabilities.tolist()
mismatch = None
try:  # different k per rank: a setting error, raised on every rank (not only where it differs)
    DynamicBlocks([[torch.nn.Parameter(torch.zeros(1))] for _ in range(4)], importances=[1] * 4, k=1 + rank, every=1)._agree_across_ranks()
except ValueError as error:
    mismatch = str(error)
result = dict(rank=rank, world=dist.get_world_size(), history=dynamic.history, steps=steps, adopted=adopted,
              mismatch=mismatch, same_weights=torch.equal(gathered[0], gathered[1]), global_step=trainer.state.global_step, refused=refused)
with open({out!r} + f"/result-{{rank}}.json", "w") as handle:  # a file per rank: the ranks' stdout lines interleave
    json.dump(result, handle)
dist.barrier()
dist.destroy_process_group()
# Skip the interpreter's teardown: now and then a background thread of the process group is still
# joinable when C++ statics are destroyed ("terminate called without an active exception", SIGABRT)
# although everything above finished; the results are on disk already.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


def test_two_ddp_processes_draw_the_same_blocks_and_average_the_active_gradients(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "out").mkdir()
    script = tmp_path / "ddp_dynamic.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=tests, out=str(tmp_path / "out"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((tmp_path / "out" / f"result-{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    first, second = results
    assert first["history"] == second["history"] and [s for s, _ in first["history"]] == [0, 2, 4]  # same draws: a function of (seed, step // every)
    assert first["global_step"] == second["global_step"] == 6 and first["same_weights"] and second["same_weights"]
    for rank in results:
        assert [s["step"] for s in rank["steps"]] == list(range(6))
        for step in rank["steps"]:
            assert step["with_grad"] == step["active"]  # frozen blocks: .grad stays None under DDP too
            assert step["spread"] > 1e-4 and step["error"] < 1e-6  # ranks saw different data; the optimizer got their mean
        assert "ddp_find_unused_parameters=True" in rank["refused"]
        assert "differ across ranks" in rank["mismatch"]
    assert first["adopted"] == second["adopted"] == block_probabilities([0.1, 0.5, 0.2, 0.3]).tolist()


# ------------------------------------------------------------ through lwlora train --dynamic-blocks


def test_train_dynamic_blocks_records_its_draws(tiny_bert_dir, tmp_path):
    import json

    from conftest import write_jsonl

    from lwlora import cli

    data = tmp_path / "cls"
    data.mkdir()
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:6])
    out = tmp_path / "run"
    argv = ["train", str(tiny_bert_dir), "--task", "classification", "--data", str(data), "--out", str(out), "--layers", "all", "--dynamic-blocks", "1",
            "--dynamic-every", "2", "--max-steps", "6", "--batch-size", "8", "--max-length", "24", "--device", "cpu", "--no-progress", "--num-samples", "8"]
    assert cli.main(argv) == 0
    dynamic = json.loads((out / "selection.json").read_text())["diagnostics"]["dynamic"]
    assert dynamic["k"] == 1 and dynamic["every"] == 2 and len(dynamic["importances"]) == 3
    assert abs(sum(dynamic["probabilities"]) - 1) < 1e-9 and min(dynamic["probabilities"]) >= 0.1 / 3 - 1e-12
    assert [step for step, _ in dynamic["history"]] == [0, 2, 4] and all(len(active) == 1 for _, active in dynamic["history"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected"] == [0, 1, 2]  # every block carries an adapter; they trained in turn


def test_train_dynamic_blocks_refuses_what_it_cannot_combine():
    import pytest

    from lwlora.errors import ConfigError
    from lwlora.training.config import TrainConfig

    with pytest.raises(ConfigError, match="--dynamic-blocks"):
        TrainConfig(model="m", task="classification", out="-", layers="cka", dynamic_blocks=0.5)
    with pytest.raises(ConfigError, match="--dynamic-floor"):
        TrainConfig(model="m", task="classification", out="-", layers="all", dynamic_blocks=0.5, dynamic_floor=1.5)
    with pytest.raises(ConfigError, match="--prune-at"):
        TrainConfig(model="m", task="classification", out="-", layers="all", dynamic_blocks=0.5, prune_at=0.1)
