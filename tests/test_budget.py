"""lwlora.selection.cost, lwlora.selection.policy budgets and lwlora.adapters.ranks: adapter sizes checked against PEFT, budget selection, elbow, rank allocation, costs."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import build
from torch import nn

from lwlora.blocks import BlockStack, resolve_block_stack
from lwlora.selection.cost import ACTIVATION_VALUES_PER_HIDDEN, lora_params_per_block, selection_cost
from lwlora.adapters.ranks import alpha_pattern_for_peft, equal_budget_rank, importance_rank_pattern, params_ratio, rank_pattern_for_peft
from lwlora.selection.policy import auto_count, chord_elbow, prefer_shallow, select_by_param_budget
from lwlora.adapters.placement import apply_selection
from lwlora.selection.artifact import LayerRecord, LayerSelection


def make_selection(stack, selected, name: str) -> LayerSelection:
    return LayerSelection(
        model=f"tiny/{name}",
        layers_path=stack.path,
        num_layers=stack.num_layers,
        layers=[LayerRecord(index=i, cka=None, similarity=None, importance=None, degenerate=False) for i in range(stack.num_layers)],
        selected=list(selected),
        tower=stack.tower,
        block_linear_modules=stack.block_linear_modules(),
    )


def lora_counts_by_block(peft_model, stack_path: str, num_layers: int) -> list[int]:
    base = peft_model.get_base_model()
    pattern = re.compile(rf"{re.escape(stack_path)}\.(\d+)\..*lora_")
    counts = [0] * num_layers
    for name, param in base.named_parameters():
        if "lora_" not in name:
            continue
        match = pattern.match(name)
        assert match is not None, f"LoRA parameter outside the stack: {name}"
        assert param.requires_grad
        counts[int(match.group(1))] += param.numel()
    return counts


# ---------------------------------------------------------------------------------------------
# Adapter sizes vs PEFT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "llama-lm", "gpt2"])
@pytest.mark.parametrize("targets", ["auto", "qv"])
def test_lora_params_per_block_matches_peft(name: str, targets: str) -> None:
    model, info = build(name)
    stack = resolve_block_stack(model)
    r = 4
    selected = [0, 2]
    if targets == "auto":
        suffixes, exact, target_modules = stack.block_linear_modules(), True, "auto"
    else:
        suffixes, exact, target_modules = list(info.qv_targets), False, list(info.qv_targets)
    predicted = lora_params_per_block(stack, suffixes, r, exact=exact)
    assert all(p > 0 for p in predicted)
    peft_model = apply_selection(model, make_selection(stack, selected, name), r=r, target_modules=target_modules)
    actual = lora_counts_by_block(peft_model, stack.path, stack.num_layers)
    assert actual == [predicted[i] if i in selected else 0 for i in range(stack.num_layers)]
    # After wrapping, the count is unchanged (tuner layers are unwrapped, lora_A/B not counted).
    assert lora_params_per_block(stack, suffixes, r, exact=exact) == predicted


def test_gpt2_conv1d_orientation() -> None:
    model, _ = build("gpt2")
    stack = resolve_block_stack(model)
    h = 32
    # c_attn: h -> 3h; attn.c_proj: h -> h; mlp.c_fc: h -> 64; mlp.c_proj: 64 -> h
    assert lora_params_per_block(stack, ["attn.c_attn"], 2) == [2 * (h + 3 * h)] * 3
    expected = 2 * ((h + 3 * h) + (h + h) + (h + 64) + (64 + h))
    assert lora_params_per_block(stack, stack.block_linear_modules(), 2) == [expected] * 3
    # exact=True does not match by ending; exact=False does ("c_proj" is in attn and mlp)
    assert lora_params_per_block(stack, ["c_proj"], 1, exact=True) == [0, 0, 0]
    assert lora_params_per_block(stack, ["c_proj"], 1, exact=False) == [(h + h) + (64 + h)] * 3


# ---------------------------------------------------------------------------------------------
# Budget selection
# ---------------------------------------------------------------------------------------------


def test_select_by_param_budget_fraction_and_absolute() -> None:
    importances = [0.1, 0.9, 0.5, 0.7]
    params = [100, 100, 100, 100]
    assert select_by_param_budget(importances, params, 0.5) == [1, 3]
    assert select_by_param_budget(importances, params, 250) == [1, 3]
    assert select_by_param_budget(importances, params, 300) == [1, 2, 3]
    assert select_by_param_budget(importances, params, 1.0) == [0, 1, 2, 3]
    # fraction of a given all-layer count (e.g. all layers at another rank)
    assert select_by_param_budget(importances, params, 0.5, all_layer_params=800) == [0, 1, 2, 3]


def test_select_by_param_budget_skips_big_blocks_and_degenerate_last() -> None:
    importances = [None, 0.9, 0.8, 0.1]
    params = [10, 60, 50, 30]
    # 0.9 (60) fits; 0.8 (50) does not (110 > 100); 0.1 (30) fits; None (10) fits
    assert select_by_param_budget(importances, params, 100) == [0, 1, 3]


def test_select_by_param_budget_errors() -> None:
    with pytest.raises(ValueError):
        select_by_param_budget([1.0, 2.0], [10, 10], 0)
    with pytest.raises(ValueError):
        select_by_param_budget([1.0, 2.0], [10, 10], -0.5)
    with pytest.raises(ValueError):
        select_by_param_budget([1.0, 2.0], [10, 10], 0.25)  # 5 params: nothing fits
    with pytest.raises(ValueError):
        select_by_param_budget([1.0], [10, 10], 0.5)


importance_lists = st.lists(st.one_of(st.none(), st.floats(-1.0, 1.0, allow_nan=False)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_budget_never_exceeded(data) -> None:
    importances = data.draw(importance_lists)
    params = data.draw(st.lists(st.integers(1, 1000), min_size=len(importances), max_size=len(importances)))
    budget = data.draw(st.one_of(st.floats(0.01, 1.0), st.integers(2, 5000).map(float)))
    limit = budget * sum(params) if budget <= 1.0 else budget
    try:
        chosen = select_by_param_budget(importances, params, budget)
    except ValueError:
        assert min(params) > limit
        return
    assert chosen == sorted(set(chosen))
    assert sum(params[i] for i in chosen) <= limit
    # greedy is maximal: no unchosen block still fits
    total = sum(params[i] for i in chosen)
    assert all(total + params[i] > limit for i in range(len(params)) if i not in chosen)


# ---------------------------------------------------------------------------------------------
# Elbow (--auto)
# ---------------------------------------------------------------------------------------------


def test_auto_count_clear_elbow() -> None:
    # Sorted: 1.0, 0.95, 0.9, 0.2, 0.15, 0.1, 0.05, 0.0 (x_k = (k-1)/7, y_k = v_k):
    # x + y - 1 = 0, .093, .186, -.371, -.279, -.186, -.093, 0 -> the elbow is rank 4, the first point
    # of the flat tail (the elbow point itself is counted)
    importances = [0.15, 0.9, 1.0, 0.1, 0.95, 0.0, 0.2, 0.05]
    curve = chord_elbow(importances)
    assert curve.values == sorted(curve.values, reverse=True)
    assert curve.blocks[:4] == [2, 4, 1, 6]
    assert curve.count == 4 == auto_count(importances)
    assert curve.distances[curve.count - 1] == max(curve.distances)
    assert curve.distances[3] == pytest.approx(abs(3 / 7 + 0.2 - 1) / 2**0.5)
    assert curve.to_json()["count"] == 4


def test_auto_count_convex_drop_and_special_cases() -> None:
    # convex: 1.0, 0.3, 0.1, 0.05, 0.0 -> x+y-1 = 0, -.45, -.4, -.2, 0 -> elbow at rank 2
    assert auto_count([0.05, 1.0, 0.0, 0.3, 0.1]) == 2
    assert auto_count([0.5, 0.5, None, 0.5]) == 3  # all equal -> all valid blocks
    assert auto_count([None, 0.3]) == 1
    assert auto_count([0.3, 0.1]) == 1  # two points on the chord: tie -> smaller k
    # exact tie between ranks 3 and 4 -> smaller k
    assert auto_count([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]) == 3
    with pytest.raises(ValueError):
        auto_count([None, None])


# ---------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------


def test_equal_budget_rank() -> None:
    assert equal_budget_rank(8, 3, 6) == 4
    assert equal_budget_rank(8, 1, 3) == 2
    assert equal_budget_rank(1, 1, 12) == 1  # never 0
    assert equal_budget_rank(8, 6, 6) == 8
    assert params_ratio(8, 3, 6) == 1.0
    assert params_ratio(8, 1, 3) == pytest.approx(6 / 8)
    assert params_ratio(1, 1, 12) == 12.0
    for r in range(1, 33):
        for L in range(1, 13):
            for k in range(1, L + 1):
                rp = equal_budget_rank(r, k, L)
                assert rp >= 1 and (rp == 1 or rp * L <= r * k)
    with pytest.raises(ValueError):
        equal_budget_rank(8, 0, 6)
    with pytest.raises(ValueError):
        equal_budget_rank(8, 7, 6)


def test_importance_rank_pattern_examples() -> None:
    importances = [0.1, 0.4, None, 0.3, 0.2]
    ranks = importance_rank_pattern(importances, [0, 1, 3, 4], 8 * 4)
    assert sum(ranks.values()) == 32
    # proportional: 32 * (0.1, 0.4, 0.3, 0.2) = 3.2, 12.8, 9.6, 6.4 -> floors 3, 12, 9, 6 (+2 units)
    assert ranks == {0: 3, 1: 13, 3: 10, 4: 6}
    # r_min raises the low block; r_max caps the high one; the rest share proportionally
    bounded = importance_rank_pattern(importances, [0, 1, 3, 4], 32, r_min=5, r_max=11)
    assert sum(bounded.values()) == 32 and bounded[0] == 5 and bounded[1] == 11
    assert bounded[3] >= bounded[4]
    # None counts as the minimum; equal importances: lower index gets the extra unit
    assert importance_rank_pattern([None, 0.2, 0.6], [0, 1, 2], 5) == {0: 1, 1: 1, 2: 3}
    assert importance_rank_pattern([None, 0.5, 0.5], [0, 1, 2], 5) == {0: 2, 1: 2, 2: 1}
    assert importance_rank_pattern([0.5, 0.5, 0.5], [0, 1, 2], 4) == {0: 2, 1: 1, 2: 1}
    assert importance_rank_pattern([None, None], [0, 1], 3) == {0: 2, 1: 1}
    with pytest.raises(ValueError):
        importance_rank_pattern(importances, [0, 1], 3, r_min=2)
    with pytest.raises(ValueError):
        importance_rank_pattern(importances, [0, 1], 30, r_max=8)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_importance_rank_pattern_properties(data) -> None:
    importances = data.draw(st.lists(st.one_of(st.none(), st.floats(-2.0, 5.0, allow_nan=False)), min_size=1, max_size=10))
    blocks = data.draw(st.lists(st.integers(0, len(importances) - 1), min_size=1, unique=True))
    n = len(blocks)
    r_min = data.draw(st.integers(1, 4))
    r_max = data.draw(st.one_of(st.none(), st.integers(r_min, 20)))
    high = 40 * n if r_max is None else r_max * n
    total = data.draw(st.integers(r_min * n, high))
    ranks = importance_rank_pattern(importances, blocks, total, r_min=r_min, r_max=r_max)
    assert sorted(ranks) == sorted(blocks)
    assert sum(ranks.values()) == total
    assert all(v >= r_min and (r_max is None or v <= r_max) for v in ranks.values())
    valid = [v for v in (importances[b] for b in blocks) if v is not None]
    floor = min(valid) if valid else 0.0

    def value(b):
        return importances[b] if importances[b] is not None else floor

    for a in blocks:
        for b in blocks:
            if value(a) > value(b):
                assert ranks[a] >= ranks[b]


def test_rank_and_alpha_pattern_in_peft() -> None:
    from peft import LoraConfig, get_peft_model

    model, _ = build("llama-lm")
    stack = resolve_block_stack(model)
    assert stack.path == "model.layers"
    ranks = {0: 2, 1: 6, 2: 4}
    rank_pattern = rank_pattern_for_peft(stack.path, ranks, default_r=4)
    assert rank_pattern == {r"model\.layers\.0\..*": 2, r"model\.layers\.1\..*": 6}
    alpha_pattern = alpha_pattern_for_peft(stack.path, ranks, 2.0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
    )
    peft_model = get_peft_model(model, config)
    seen: dict[int, set[int]] = {}
    for name, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            index = int(re.match(r"model\.layers\.(\d+)\.", name).group(1))
            assert module.lora_A["default"].weight.shape[0] == ranks[index]
            assert module.lora_B["default"].weight.shape[1] == ranks[index]
            assert module.scaling["default"] == pytest.approx(2.0)
            seen.setdefault(index, set()).add(ranks[index])
    assert seen == {0: {2}, 1: {6}, 2: {4}}
    # and the stack-level count agrees with lora_params_per_block at the per-block ranks
    counts = lora_counts_by_block(peft_model, stack.path, 3)
    per_rank = lora_params_per_block(stack, ["q_proj", "v_proj", "down_proj"], 1, exact=False)
    assert counts == [per_rank[i] * ranks[i] for i in range(3)]


def test_rank_pattern_keys_do_not_cross_blocks() -> None:
    from peft.utils.other import get_pattern_key

    keys = list(rank_pattern_for_peft("layers", {1: 3, 11: 5}, default_r=8))
    assert get_pattern_key(keys, "model.layers.1.self_attn.q_proj") == keys[0]
    assert get_pattern_key(keys, "base_model.model.model.layers.11.mlp.up_proj") == keys[1]
    assert get_pattern_key(keys, "model.layers.2.self_attn.q_proj") == "model.layers.2.self_attn.q_proj"  # no key
    assert get_pattern_key(keys, "model.other_layers.1.q") == "model.other_layers.1.q"


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)  # r·16
        self.up = nn.Linear(8, 32)  # r·40
        self.down = nn.Linear(32, 8)  # r·40
        self.norm = nn.LayerNorm(8)


def test_selection_cost_hand_computed() -> None:
    torch.manual_seed(0)
    stack = BlockStack(path="layers", blocks=nn.ModuleList(_Block() for _ in range(4)))
    targets = ["attn", "up", "down"]
    assert lora_params_per_block(stack, targets, 2) == [192] * 4
    cost = selection_cost(stack, [3, 2], targets, 2, head_params=100, seq_len=16, batch_size=2)
    assert cost.lowest_adapted_block == 2
    assert cost.backward_depth_fraction == 0.5
    assert cost.adapter_params == 2 * 192
    assert cost.all_layer_adapter_params == 4 * 192
    assert cost.trainable_params == 384 + 100
    assert cost.adapter_fraction == 0.5
    assert cost.trainable_fraction == pytest.approx(484 / 868)
    assert cost.optimizer_state_bytes == 12 * 484
    assert cost.hidden_size == 8  # inferred: most common in_features
    assert cost.activation_bytes_estimate == 2 * 2 * 16 * 8 * 4 * ACTIVATION_VALUES_PER_HIDDEN
    data = cost.to_json()
    assert data["adapter_params"] == 384 and data["selected"] == [2, 3]
    # per-block ranks
    ranked = selection_cost(stack, [1, 3], targets, 2, rank_pattern={1: 4}, hidden_size=16)
    assert ranked.adapter_params == 96 * 4 + 96 * 2
    assert ranked.lowest_adapted_block == 1 and ranked.backward_depth_fraction == 0.75
    assert ranked.activation_bytes_estimate == 3 * 1 * 512 * 16 * 4 * ACTIVATION_VALUES_PER_HIDDEN
    with pytest.raises(ValueError):
        selection_cost(stack, [], targets, 2)


# ---------------------------------------------------------------------------------------------
# Shallow preference
# ---------------------------------------------------------------------------------------------


def test_prefer_shallow() -> None:
    importances = [1.0, 0.2, 0.97, 0.96, 0.1, 0.99]
    # top-3: blocks 0, 5, 2 (total 2.96), lowest block 0
    assert prefer_shallow(importances, 3, max_importance_loss=0.0) == [0, 2, 5]
    # 5% allowed: {2, 3, 5} (2.92 ≥ 0.95·2.96) has lowest block 2; b = 3 gives {3, 4, 5} (2.05), too low
    assert prefer_shallow(importances, 3, max_importance_loss=0.05) == [2, 3, 5]
    # 40% allowed: {3, 4, 5} (2.05 ≥ 0.6·2.96 = 1.776)
    assert prefer_shallow(importances, 3, max_importance_loss=0.4) == [3, 4, 5]
    assert prefer_shallow([None, 0.5, 0.4], 1) == [1]
    with pytest.raises(ValueError):
        prefer_shallow(importances, 0)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_prefer_shallow_bound_property(data) -> None:
    importances = data.draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=10))
    count = data.draw(st.integers(1, len(importances)))
    loss = data.draw(st.floats(0.0, 1.0))
    chosen = prefer_shallow(importances, count, max_importance_loss=loss)
    top = sorted(importances, reverse=True)[:count]
    assert len(chosen) == count == len(set(chosen))
    assert sum(importances[i] for i in chosen) >= (1 - loss) * sum(top) - 1e-9
    plain = prefer_shallow(importances, count, max_importance_loss=0.0)
    assert min(chosen) >= min(plain)
