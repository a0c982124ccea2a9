"""`lwlora train` on tiny random models: learning, placement, gradients, resume, reload, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from lwlora.errors import ConfigError
from lwlora.training.config import TrainConfig
from lwlora.training.trainer import train

WORDS = ["good", "bad"]


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory):
    """A learnable 2-class task: the label is whether the sentence contains 'good'."""
    root = tmp_path_factory.mktemp("cls")
    subjects = ["the cat", "a dog", "the big bird", "my small fish", "a red fox", "the old man", "a happy child", "the green frog"]
    rows = [{"text": f"{s} was {WORDS[i % 2]} today", "label": i % 2 == 0 and 1 or 0} for i, s in enumerate(subjects * 4)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:8])
    return root


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    rows = [{"instruction": f"the cat sat {i} times", "output": f"the dog ran #### {i}", "answer": str(i)} for i in range(12)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:3])
    return root


def config(model, data, out, **overrides) -> TrainConfig:
    values = dict(
        model=str(model), task="classification", data=str(data), out=str(out), layers="last", num_layers=1,
        r=4, lr=5e-3, batch_size=8, max_steps=12, logging_steps=1, max_length=32, device="cpu", progress=False,
        num_samples=16, seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_encoder_learns_and_only_adapters_and_head_train(tiny_bert_dir, cls_dir, tmp_path):
    result = train(config(tiny_bert_dir, cls_dir, tmp_path / "run", layers="1", num_layers=None, max_steps=30))
    losses = [entry["loss"] for entry in result.metrics["loss_history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or (".modules_to_save." in n) for n in trainable)
    assert any(".modules_to_save." in n and "classifier" in n for n in trainable)  # the head trains, as in the paper
    blocks = {int(n.split("encoder.layer.")[1].split(".")[0]) for n in trainable if "encoder.layer." in n}
    assert blocks == {1}
    params = result.metrics["params"]
    assert params["trainable"] == params["adapter"] + params["head"] and params["adapter"] > 0 and params["head"] > 0
    run = result.run_dir
    for name in ("train_config.json", "selection.json", "metrics.json", "loss_curve.png", "adapter/adapter_config.json"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["validation"]["accuracy"] >= 0.0 and metrics["selected"] == [1]
    assert metrics["train"]["tokens"] > 0 and metrics["train"]["peak_memory_bytes"] > 0


def test_frozen_blocks_do_not_change(tiny_bert_dir, cls_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    before = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).state_dict()
    result = train(config(tiny_bert_dir, cls_dir, tmp_path / "run", layers="2", num_layers=None, max_steps=5))
    merged = result.model.merge_and_unload().state_dict()
    for name, value in before.items():
        if "classifier" in name:
            continue
        changed = not torch.equal(value, merged[name])
        in_block_2 = "encoder.layer.2." in name
        assert changed == (in_block_2 and name.endswith("weight") and any(t in name for t in ("query", "key", "value", "dense"))), name


@pytest.mark.parametrize(
    "layers, num_layers, expected",
    [("all", None, [0, 1, 2]), ("first", 2, [0, 1]), ("last", 2, [1, 2]), ("0,2", None, [0, 2]), ("random", 2, None), ("cka", 1, None)],
)
def test_layer_rules_select_what_they_claim(tiny_bert_dir, cls_dir, tmp_path, layers, num_layers, expected):
    result = train(config(tiny_bert_dir, cls_dir, tmp_path / "run", layers=layers, num_layers=num_layers, max_steps=1))
    selected = result.selection.selected
    if expected is not None:
        assert selected == expected
    elif layers == "random":
        assert len(selected) == 2
        again = train(config(tiny_bert_dir, cls_dir, tmp_path / "again", layers=layers, num_layers=num_layers, max_steps=1))
        assert again.selection.selected == selected  # seeded
    else:  # cka: measured on the task's inputs, stored in RUN
        saved = json.loads((result.run_dir / "selection.json").read_text())
        assert saved["scorer"] == "cka" and len(saved["selected"]) == 1 and saved["num_samples"] > 0
    adapted = {int(n.split("encoder.layer.")[1].split(".")[0]) for n, p in result.model.named_parameters() if "lora_A" in n}
    assert adapted == set(selected)


def test_selection_file_is_used(tiny_bert_dir, cls_dir, tmp_path):
    first = train(config(tiny_bert_dir, cls_dir, tmp_path / "one", layers="0,2", num_layers=None, max_steps=1))
    second = train(config(tiny_bert_dir, cls_dir, tmp_path / "two", layers="cka", num_layers=None, selection=str(first.run_dir / "selection.json"), max_steps=1))
    assert second.selection.selected == [0, 2]


def test_saved_adapter_reloads_with_identical_outputs(tiny_bert_dir, cls_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = train(config(tiny_bert_dir, cls_dir, tmp_path / "run", max_steps=6))
    batch = result.task.data_collator([result.task.eval["validation"][i] for i in range(4)])
    batch.pop("labels")
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch).logits
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(result.run_dir / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)


class _Interrupt(Exception):
    pass


def test_resume_continues_where_it_stopped(tiny_bert_dir, cls_dir, tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer, TrainerCallback

    # Without dropout the only randomness left is the data order, which resume must reproduce.
    quiet = tmp_path / "no-dropout"
    AutoModel.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(quiet)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(quiet)
    tiny_bert_dir = quiet
    full = train(config(tiny_bert_dir, cls_dir, tmp_path / "full", max_steps=6, save_every=2, dropout=0.0))

    class StopAtFive(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Interrupt

    import transformers

    original_init = transformers.Trainer.__init__

    def init_with_interrupt(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(StopAtFive())

    monkeypatch.setattr(transformers.Trainer, "__init__", init_with_interrupt)
    with pytest.raises(_Interrupt):
        train(config(tiny_bert_dir, cls_dir, tmp_path / "cut", max_steps=6, save_every=2, dropout=0.0))
    monkeypatch.setattr(transformers.Trainer, "__init__", original_init)
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "cut" / "metrics.json").exists()

    with pytest.raises(ConfigError, match="--out"):
        train(config(tiny_bert_dir, cls_dir, tmp_path / "cut", max_steps=6, save_every=2, dropout=0.0))
    resumed = train(config(tiny_bert_dir, cls_dir, tmp_path / "cut", max_steps=6, save_every=2, dropout=0.0, resume=True))
    assert resumed.metrics["train"]["resumed_from"].endswith("checkpoint-4")
    assert resumed.metrics["train"]["global_step"] == 6
    full_state = {k: v for k, v in full.model.state_dict().items() if "lora_" in k}
    resumed_state = {k: v for k, v in resumed.model.state_dict().items() if "lora_" in k}
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        torch.testing.assert_close(resumed_state[key], full_state[key], rtol=1e-5, atol=1e-6)


def test_run_directory_guards(tiny_bert_dir, cls_dir, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_bert_dir, cls_dir, run, max_steps=1))
    with pytest.raises(ConfigError) as info:
        train(config(tiny_bert_dir, cls_dir, run, max_steps=1))
    assert info.value.flag == "--out" and "--overwrite" in str(info.value)
    with pytest.raises(ConfigError) as info:
        train(config(tiny_bert_dir, cls_dir, run, max_steps=1, r=8, resume=True))
    assert info.value.flag == "--resume" and "r: 4 -> 8" in str(info.value)
    result = train(config(tiny_bert_dir, cls_dir, run, max_steps=1, r=8, overwrite=True))
    assert json.loads((run / "train_config.json").read_text())["r"] == 8 and result.metrics["train"]["global_step"] == 1
    with pytest.raises(ConfigError, match="--resume"):
        train(config(tiny_bert_dir, cls_dir, tmp_path / "nothing-here", max_steps=1, resume=True))


def _backward_blocks(model, blocks) -> list[int]:
    seen: list[int] = []
    handles = [block.register_full_backward_hook(lambda m, gi, go, i=i: seen.append(i)) for i, block in enumerate(blocks)]
    return seen, handles


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_backward_below_the_lowest_adapted_block_and_checkpointing_keeps_gradients(tiny_llama_dir, checkpointing):
    from transformers import AutoModelForCausalLM

    from lwlora.blocks import resolve_block_stack
    from lwlora.adapters.placement import apply_selection
    from lwlora.selection.artifact import rule_selection
    from lwlora.selection.options import SelectOptions
    from lwlora.training.trainer import enable_gradient_checkpointing

    def gradients(with_checkpointing: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        stack = resolve_block_stack(model)
        selection = rule_selection(SelectOptions(layers=(2,)), stack, "decoder", [2], "explicit", model_label="m")
        peft_model = apply_selection(model, selection, r=4)
        for name, param in peft_model.named_parameters():  # non-zero B so that A gets a gradient too
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        if with_checkpointing:
            enable_gradient_checkpointing(peft_model)
        peft_model.train()
        stack = resolve_block_stack(peft_model.get_base_model())
        seen, handles = _backward_blocks(peft_model, stack.blocks)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
        peft_model(input_ids=ids, labels=ids).loss.backward()
        for handle in handles:
            handle.remove()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return grads, sorted(set(seen))

    reference, seen_plain = gradients(False)
    grads, seen = gradients(checkpointing)
    assert grads.keys() == reference.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7)
    assert 0 not in seen and 1 not in seen, seen  # blocks below block 2 pay no backward pass
    assert 0 not in seen_plain and 1 not in seen_plain


def test_causal_lm_instruction_training_and_generation_eval(tiny_llama_dir, instruct_dir, tmp_path):
    result = train(config(tiny_llama_dir, instruct_dir, tmp_path / "run", task="instruction", layers="last", num_layers=2, max_steps=15, lr=1e-2, max_new_tokens=4, max_length=48))
    losses = [entry["loss"] for entry in result.metrics["loss_history"]]
    assert losses[-1] < losses[0]
    final = result.metrics["final"]
    generation = [v for v in final.values() if "exact_match" in v]
    assert generation and generation[0]["n"] == 3 and 0.0 <= generation[0]["exact_match"] <= 1.0


def test_full_fine_tuning_trains_everything(tiny_bert_dir, cls_dir, tmp_path):
    result = train(config(tiny_bert_dir, cls_dir, tmp_path / "run", method="full", max_steps=2))
    assert all(p.requires_grad for p in result.model.parameters())
    assert result.metrics["params"]["trainable"] == result.metrics["params"]["total"]
    assert (result.run_dir / "model" / "config.json").is_file() and not (result.run_dir / "adapter").exists()


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"task": "no-such-task"}, "--task"),
        ({"text_column": "nope"}, "--text-column"),
        ({"label_column": "nope"}, "--label-column"),
        ({"layers": "sideways"}, "--layers"),
        ({"method": "adalora"}, "--method"),
        ({"ratio": 1.5}, "--ratio"),
        ({"lr": 0.0}, "--lr"),
        ({"layers": "0,9", "num_layers": None}, "--layers"),
        ({"target_modules": "no_such_proj"}, "--target-modules"),
        ({"modules_to_save": "no_such_module"}, "--modules-to-save"),
        ({"modules_to_save": " , "}, "--modules-to-save"),
    ],
)
def test_bad_input_names_the_flag_and_writes_nothing(tiny_bert_dir, cls_dir, tmp_path, overrides, flag):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        train(config(tiny_bert_dir, cls_dir, out, **overrides))
    assert info.value.flag == flag
    assert not out.exists()


def test_label_out_of_range_and_empty_split(tiny_bert_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    write_jsonl(bad / "train.jsonl", [{"text": "a b", "label": 0}, {"text": "c d", "label": 7}])
    (bad / "meta.json").write_text(json.dumps({"label_names": ["x", "y"]}))
    with pytest.raises(ConfigError) as info:
        train(config(tiny_bert_dir, bad, tmp_path / "run"))
    assert info.value.flag == "--label-column"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    with pytest.raises(ConfigError) as info:
        train(config(tiny_bert_dir, empty, tmp_path / "run2"))
    assert info.value.flag == "--data"


def test_merged_export_matches_the_adapted_model(tiny_bert_dir, cls_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = train(config(tiny_bert_dir, cls_dir, tmp_path / "run", max_steps=4, merge=True))
    batch = result.task.data_collator([result.task.eval["validation"][i] for i in range(4)])
    batch.pop("labels")
    merged = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "merged").eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, result.model.eval()(**batch).logits, rtol=1e-4, atol=1e-5)


def test_modules_to_save_trains_the_pooler_too(tiny_bert_dir, cls_dir, tmp_path):
    """BERT's pooler sits between the blocks and the classifier; PEFT's SEQ_CLS default keeps it
    frozen. --modules-to-save pooler trains it in full, saves it with the adapter and reloads it."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = train(config(tiny_bert_dir, cls_dir, tmp_path / "run", layers="1", num_layers=None, max_steps=6, modules_to_save="pooler"))
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any(".modules_to_save." in n and "pooler" in n for n in trainable)
    assert any(".modules_to_save." in n and "classifier" in n for n in trainable)  # the head still trains
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    pooler_params = sum(p.numel() for p in base.bert.pooler.parameters())
    without = train(config(tiny_bert_dir, cls_dir, tmp_path / "plain", layers="1", num_layers=None, max_steps=1))
    assert result.metrics["params"]["head"] == without.metrics["params"]["head"] + pooler_params
    trained = {n.split(".modules_to_save.")[0] + n.split(".modules_to_save.default")[1]: p.detach().clone() for n, p in result.model.named_parameters() if ".modules_to_save." in n and "pooler" in n}
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2), str(result.run_dir / "adapter"))
    restored = {n.split(".modules_to_save.")[0] + n.split(".modules_to_save.default")[1]: p for n, p in reloaded.named_parameters() if ".modules_to_save." in n and "pooler" in n}
    assert trained.keys() == restored.keys() and all(torch.equal(trained[k], restored[k]) for k in trained)
    original = dict(base.bert.pooler.named_parameters())
    assert any(not torch.equal(value, original[name.split("pooler.")[1]]) for name, value in trained.items())  # it did train


def test_newly_initialized_modules_before_the_head_are_trained(tiny_bert_dir, cls_dir, tmp_path):
    """A checkpoint without BERT's pooler (sentence-transformers and DeBERTa's ContextPooler are like
    this) leaves it randomly initialised; frozen, it could only scramble the CLS state, so it is
    trained in full with the head. The blocks and the pretrained parts stay as PEFT leaves them."""
    import shutil

    from transformers import AutoModel, AutoModelForSequenceClassification

    from lwlora.training.loading import newly_initialized_modules

    no_pooler = tmp_path / "no-pooler"
    AutoModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False).save_pretrained(no_pooler)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_bert_dir / name).exists():
            shutil.copy(tiny_bert_dir / name, no_pooler / name)
    model, info = AutoModelForSequenceClassification.from_pretrained(no_pooler, num_labels=2, output_loading_info=True)
    assert newly_initialized_modules(model, info["missing_keys"]) == ("bert.pooler.dense",)
    full = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2, output_loading_info=True)
    assert newly_initialized_modules(full[0], full[1]["missing_keys"]) == ()  # only the classifier is new: PEFT trains it
    assert newly_initialized_modules(full[0], ["bert.embeddings.position_ids", "bert.encoder.layer.0.output.dense.weight"]) == ()  # buffers and blocks are not head layers

    result = train(config(no_pooler, cls_dir, tmp_path / "run", layers="1", num_layers=None, max_steps=2))
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any(".modules_to_save." in n and "pooler" in n for n in trainable)
    assert all(("lora_" in n) or (".modules_to_save." in n) for n in trainable)
    plain = train(config(tiny_bert_dir, cls_dir, tmp_path / "plain", layers="1", num_layers=None, max_steps=1))
    assert not any("pooler" in n for n, p in plain.model.named_parameters() if p.requires_grad)  # a pretrained pooler stays frozen
