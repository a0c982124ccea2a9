"""Sub-layer units (--granularity sublayer): the attention and MLP halves of each block."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import LOW_TOKEN, build

from lwlora import cli
from lwlora.blocks import resolve_block_stack
from lwlora.selection.capture import capture_block_representations
from lwlora.errors import ConfigError
from lwlora.selection.units import mlp_entries, part_of, unit_modules

# (table id, how the block's output follows from the residual stream between its halves, per token)
PRE_NORM = {
    "llama": lambda block, mid: mid + block.mlp(block.post_attention_layernorm(mid)),
    "qwen2": lambda block, mid: mid + block.mlp(block.post_attention_layernorm(mid)),
    "mistral": lambda block, mid: mid + block.mlp(block.post_attention_layernorm(mid)),
    "gemma2": lambda block, mid: mid + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(mid))),
    "gpt2": lambda block, mid: mid + block.mlp(block.ln_2(mid)),
    "bert": lambda block, mid: block.output(block.intermediate(mid), mid),
    "mpnet": lambda block, mid: block.output(block.intermediate(mid), mid),
}


def _batches(model, n=8, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else 128
    ids = torch.randint(LOW_TOKEN, min(vocab, 128) - 2, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, -2:] = 0  # some padding
    return [{"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4]} for i in range(0, n, 4)]


@pytest.mark.parametrize("name", list(PRE_NORM))
def test_the_mid_point_is_the_residual_stream_between_the_halves(name):
    """Unit 2i's output is what the MLP half reads; applying the MLP half to it (per token: the
    pooled token suffices) gives the block's output, unit 2i+1's output."""
    model, info = build(name)
    stack = resolve_block_stack(model)
    reps = capture_block_representations(model, stack, _batches(model), pooling="mean" if info.kind == "encoder" else "last", statistics="rows", progress=False, split_at=mlp_entries(stack, model.config))
    pooling = "mean" if info.kind == "encoder" else "last"
    assert reps.blocks == list(range(2 * stack.num_layers))
    plain = capture_block_representations(model, stack, _batches(model), pooling=pooling, statistics="rows", progress=False)
    for i, block in enumerate(stack.blocks):
        torch.testing.assert_close(reps.inputs[2 * i], plain.inputs[i])  # the attention unit starts at the block input
        torch.testing.assert_close(reps.outputs[2 * i + 1], plain.outputs[i])  # the MLP unit ends at the block output
        torch.testing.assert_close(reps.outputs[2 * i], reps.inputs[2 * i + 1])
        if pooling == "last":
            with torch.no_grad():
                expected = PRE_NORM[name](block, reps.inputs[2 * i + 1].unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(reps.outputs[2 * i + 1], expected, atol=1e-5, rtol=1e-4)


def test_post_norm_mid_point_on_single_tokens():
    """BERT normalises after each sum; on one token the MLP half's output is checked directly."""
    model, _ = build("bert")
    stack = resolve_block_stack(model)
    ids = torch.randint(LOW_TOKEN, 100, (6, 5), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    reps = capture_block_representations(model, stack, batches, pooling="cls", statistics="rows", progress=False, split_at=mlp_entries(stack, model.config))
    for i, block in enumerate(stack.blocks):
        with torch.no_grad():
            expected = PRE_NORM["bert"](block, reps.inputs[2 * i + 1].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(reps.outputs[2 * i + 1], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "name, attention, mlp",
    [
        ("llama", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}, {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        ("bert", {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}, {"intermediate.dense", "output.dense"}),
        ("gpt2", {"attn.c_attn", "attn.c_proj"}, {"mlp.c_fc", "mlp.c_proj"}),
        ("opt", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}, {"fc1", "fc2"}),
        ("distilbert", {"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"}, {"ffn.lin1", "ffn.lin2"}),
        ("phi3", {"self_attn.qkv_proj", "self_attn.o_proj"}, {"mlp.gate_up_proj", "mlp.down_proj"}),
    ],
)
def test_linear_layers_split_into_attention_and_mlp(name, attention, mlp):
    model, _ = build(name)
    split = unit_modules(resolve_block_stack(model).block_linear_modules())
    assert set(split["attention"]) == attention and set(split["mlp"]) == mlp
    assert part_of("attention.output.dense") == "attention" and part_of("output.dense") == "mlp"


def test_parallel_residual_blocks_are_refused():
    model, _ = build("gpt-neox")
    with pytest.raises(ConfigError, match="--granularity.*parallel"):
        mlp_entries(resolve_block_stack(model), model.config)


# -------------------------------------------------------------------- selection and placement


def _select(model_dir, data, out, *extra):
    return cli.main(["select", str(model_dir), "--data", str(data), "--out", str(out), "--num-samples", "16", "--device", "cpu", "--no-progress", "--granularity", "sublayer", *extra])


def test_select_fills_the_budget_with_the_most_important_units(tiny_llama_dir, data_files, tmp_path):
    out = tmp_path / "sel"
    assert _select(tiny_llama_dir, data_files.jsonl, out, "--ratio", "0.5") == 0
    saved = json.loads((out / "selection.json").read_text())
    assert saved["schema_version"] == 2
    units = saved["units"]
    assert len(units) == 8 and {u["part"] for u in units} == {"attention", "mlp"}
    chosen = [u for u in units if u["selected"]]
    total = sum(u["params"] for u in units)
    assert sum(u["params"] for u in chosen) <= 0.5 * total
    # greedy: every unit left out was either less important than every chosen one or did not fit
    spent = sum(u["params"] for u in chosen)
    for u in units:
        if not u["selected"] and u["importance"] is not None:
            assert all(u["importance"] <= c["importance"] for c in chosen if c["importance"] is not None) or spent + u["params"] > 0.5 * total
    assert saved["selected"] == sorted({u["block"] for u in chosen})
    assert saved["cost"]["adapter_params"] == sum(u["params"] for u in chosen)


def test_a_unit_selection_adapts_exactly_its_units_and_verify_checks_them(tiny_llama_dir, data_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from lwlora.adapters.placement import AdapterPlacementError, adapted_module_names, apply_selection, verify
    from lwlora.selection.artifact import LayerSelection
    from lwlora.selection.units import part_of as part

    out = tmp_path / "sel"
    assert _select(tiny_llama_dir, data_files.jsonl, out) == 0
    selection = LayerSelection.load(out)
    model = apply_selection(AutoModel.from_pretrained(tiny_llama_dir), selection, r=2)
    expected = {f"layers.{i}.{m}" for i, parts in selection.selected_units.items() for m in selection.block_linear_modules if part(m) in parts}
    assert set(adapted_module_names(model)) == expected
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    assert set(adapted_module_names(reloaded)) == expected
    # a block-level adapter on the same blocks is not this selection: verify says which modules
    assert any(len(parts) == 1 for parts in selection.selected_units.values())  # else the check below would be vacuous
    whole = apply_selection(AutoModel.from_pretrained(tiny_llama_dir), LayerSelection(**{**selection.__dict__, "units": None}), r=2)
    with pytest.raises(AdapterPlacementError, match="unexpected"):
        verify(whole, selection, "auto")


def test_train_with_sublayer_units(tiny_llama_dir, tmp_path):
    from conftest import write_jsonl

    data = tmp_path / "inst"
    data.mkdir()
    rows = [{"instruction": f"the cat sat {i} times", "output": f"the dog ran {i} times #### {i}"} for i in range(16)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:2])
    out = tmp_path / "run"
    assert cli.main(["train", str(tiny_llama_dir), "--task", "instruction", "--data", str(data), "--out", str(out), "--layers", "cka", "--granularity", "sublayer",
                     "--ratio", "0.5", "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--device", "cpu", "--no-progress", "--num-samples", "16", "--max-new-tokens", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    selection = json.loads((out / "selection.json").read_text())
    chosen = sum(u["params"] for u in selection["units"] if u["selected"])
    assert metrics["params"]["adapter"] == metrics["cost"]["adapter_params"] == chosen  # the selection's counts are at the run's r 8
    assert metrics["cost"]["adapter_fraction"] <= 0.5


@pytest.mark.parametrize(
    "extra, flag",
    [
        (("--num-layers", "2"), "--num-layers"),
        (("--scorer", "fim"), "--granularity"),
        (("--bootstrap", "4"), "--bootstrap"),
    ],
)
def test_select_refuses_what_units_cannot_use(tiny_llama_dir, data_files, tmp_path, capsys, extra, flag):
    assert _select(tiny_llama_dir, data_files.jsonl, tmp_path / "sel", *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and flag in err[0]


def test_train_refuses_units_without_a_measurement(tiny_llama_dir, tmp_path, capsys):
    from lwlora.training.config import TrainConfig

    with pytest.raises(ConfigError, match="--granularity"):
        TrainConfig(model="m", task="instruction", out="-", layers="last", granularity="sublayer")
    with pytest.raises(ConfigError, match="--rank-allocation"):
        TrainConfig(model="m", task="instruction", out="-", layers="cka", granularity="sublayer", rank_allocation="importance")
