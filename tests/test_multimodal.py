"""Vision-language models: capture with images, selection per tower, adapters on the selected
language blocks only, training on ScienceQA-style data, evaluation by answer letter, bad input.

Three VLM families, saved tiny and random with their real processors (tests/vlm_fixtures.py):
LLaVA (CLIP + Llama), LLaVA-NeXT (any-resolution crops, ``image_sizes``) and Gemma 3 (SigLIP +
Gemma 3, with ``token_type_ids``).
"""

from __future__ import annotations

import json

import pytest
import torch
from vlm_fixtures import (
    make_scienceqa_dir,
    save_tiny_gemma3,
    save_tiny_llava,
    save_tiny_llava_next,
    write_jsonl,
)

from lwlora import cli
from lwlora.blocks import resolve_block_stack
from lwlora.selection.capture import pool
from lwlora.errors import ConfigError
from lwlora.multimodal import (
    ImageTextCollator,
    build_prompt,
    encode,
    load_image_text_samples,
    load_processor,
)
from lwlora.adapters.placement import adapted_module_names, apply_selection
from lwlora.commands.select import SelectConfig, select_layers
from lwlora.selection.pipeline import capture_samples
from lwlora.tasks import load_task
from lwlora.tasks.scienceqa import scienceqa_prompt, scienceqa_selection_samples

FAMILIES = ["llava", "gemma3", "llava-next"]
#: families whose vision tower sees one image per sample (LLaVA-NeXT tiles each image into crops)
ONE_IMAGE_PER_ROW = ["llava", "gemma3"]
#: family -> (language stack of the bare model, vision stack, language blocks, vision blocks)
STACKS = {
    "llava": ("language_model.layers", "vision_tower.encoder.layers", 4, 3),
    "gemma3": ("language_model.layers", "vision_tower.encoder.layers", 4, 2),
    "llava-next": ("language_model.layers", "vision_tower.encoder.layers", 4, 3),
}
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {"llava": save_tiny_llava(root / "llava"), "gemma3": save_tiny_gemma3(root / "gemma3"), "llava-next": save_tiny_llava_next(root / "llava-next")}


@pytest.fixture(scope="module")
def sqa_dir(tmp_path_factory):
    return make_scienceqa_dir(tmp_path_factory.mktemp("scienceqa"))


def _bare(directory):
    from transformers import AutoModel

    return AutoModel.from_pretrained(directory).eval()


def _with_head(directory):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(directory).eval()


def _select(directory, data, **overrides):
    options = dict(model=str(directory), data=str(data), task="scienceqa", num_samples=8, ratio=0.5, device="cpu", progress=False)
    return select_layers(SelectConfig(**{**options, **overrides}))


# ---------------------------------------------------------------------------------------------
# Discovery and capture


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_finds_both_towers_of_the_saved_model(vlm_dirs, family):
    language_path, vision_path, num_language, num_vision = STACKS[family]
    model = _bare(vlm_dirs[family])
    language, vision = resolve_block_stack(model), resolve_block_stack(model, tower="vision")
    assert (language.path, language.tower, language.num_layers) == (language_path, "language", num_language)
    assert (vision.path, vision.tower, vision.num_layers) == (vision_path, "vision", num_vision)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_language_capture_with_images_matches_the_hidden_states(vlm_dirs, sqa_dir, family, pooling):
    """Hooks read every language block's real input/output with the image tokens in the sequence;
    rows come back in sample order although batches run in length order; ``last`` is the last
    real token, ``mean`` averages every real token, image tokens included."""
    processor = load_processor(str(vlm_dirs[family]))
    model = _bare(vlm_dirs[family])
    stack = resolve_block_stack(model)
    samples = scienceqa_selection_samples(str(sqa_dir), num_samples=6, seed=0)
    reps = capture_samples(model, processor, samples, stack, pooling=pooling, batch_size=4, progress=False)
    assert reps.num_samples == 6 and reps.blocks == list(range(stack.num_layers))

    image_token = model.config.image_token_id
    for i in range(len(samples)):  # one sample at a time: no padding, the reference is unambiguous
        text = build_prompt(processor, samples.texts[i]) + samples.responses[i]
        batch = encode(processor, [text], [samples.images[i]])
        assert int((batch["input_ids"] == image_token).sum()) >= 4  # the placeholder was expanded
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"]
        torch.testing.assert_close(reps.inputs[0][i], pool(states[0], mask, pooling)[0], **TIGHT)
        for block in range(stack.num_layers - 1):  # the last entry is after the final norm
            torch.testing.assert_close(reps.outputs[block][i], pool(states[block + 1], mask, pooling)[0], **TIGHT)


@pytest.mark.parametrize("family", ONE_IMAGE_PER_ROW)
def test_vision_capture_pools_all_patch_tokens(vlm_dirs, sqa_dir, family):
    processor = load_processor(str(vlm_dirs[family]))
    model = _bare(vlm_dirs[family])
    stack = resolve_block_stack(model, tower="vision")
    samples = scienceqa_selection_samples(str(sqa_dir), num_samples=5, seed=0)
    reps = capture_samples(model, processor, samples, stack, pooling="mean", batch_size=2, progress=False)
    pixels = encode(processor, [build_prompt(processor, t) for t in samples.texts], samples.images)["pixel_values"]
    with torch.no_grad():
        states = model.vision_tower(pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(reps.inputs[0], pool(states[0], None, "mean"), **TIGHT)
    torch.testing.assert_close(reps.outputs[0], pool(states[1], None, "mean"), **TIGHT)


def test_vision_tower_with_several_crops_per_image_is_refused(vlm_dirs, sqa_dir):
    with pytest.raises(ConfigError, match=r"--tower: .* produced 24 rows for 8 samples"):
        _select(vlm_dirs["llava-next"], sqa_dir, tower="vision")


@pytest.mark.parametrize("family, tower", [(f, "language") for f in FAMILIES] + [(f, "vision") for f in ONE_IMAGE_PER_ROW])
def test_select_scores_the_requested_tower(vlm_dirs, sqa_dir, family, tower):
    language_path, vision_path, num_language, num_vision = STACKS[family]
    selection = _select(vlm_dirs[family], sqa_dir, tower=tower)
    expected = (language_path, num_language, "last") if tower == "language" else (vision_path, num_vision, "mean")
    assert (selection.layers_path, selection.num_layers, selection.pooling) == expected
    assert selection.tower == tower and len(selection.selected) == expected[1] // 2
    assert all(r.importance is not None for r in selection.layers)
    assert selection.data_fingerprint.startswith("sha256:")


def test_fixed_template_suffix_makes_the_last_token_degenerate_and_mean_fallback_scores_it(vlm_dirs, sqa_dir):
    """Without a response the prompt ends in the template's fixed "ASSISTANT :" in every sample: at
    block 0's input (the embeddings) the last token is identical, which is reported, not scored
    0/0; ``--degenerate-fallback mean`` scores that block on mean-pooled tokens instead."""
    options = dict(model=str(vlm_dirs["llava"]), data=str(sqa_dir / "train.jsonl"), image_column="image", text_column="question", num_samples=8, ratio=0.5, device="cpu", progress=False)
    excluded = select_layers(SelectConfig(**options))
    assert excluded.layers[0].degenerate and excluded.layers[0].importance is None and excluded.layers[0].fallback == "excluded"
    assert "constant" in excluded.layers[0].reason and any("block 0" in w for w in excluded.warnings)
    rescued = select_layers(SelectConfig(**options, degenerate_fallback="mean"))
    assert rescued.layers[0].fallback == "mean" and rescued.layers[0].importance is not None


def test_image_column_samples_resolve_paths_relative_to_the_data_file(sqa_dir):
    samples = load_image_text_samples(str(sqa_dir / "train.jsonl"), image_column="image", num_samples=4, text_column="question")
    assert len(samples) == 4 and all(str(sqa_dir) in path for path in samples.images)
    again = load_image_text_samples(str(sqa_dir / "train.jsonl"), image_column="image", num_samples=4, text_column="question")
    assert again.fingerprint == samples.fingerprint


# ---------------------------------------------------------------------------------------------
# Adapters, collator, training


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_land_on_the_selected_language_blocks_only(vlm_dirs, sqa_dir, family):
    """A selection made on the bare model applies to the model with its LM head; only the adapters
    of the selected language blocks train: vision tower, projector, embeddings and head frozen."""
    selection = _select(vlm_dirs[family], sqa_dir)
    peft_model = apply_selection(_with_head(vlm_dirs[family]), selection, r=2)  # verify() runs inside
    prefix = "model." + selection.layers_path + "."
    adapted = adapted_module_names(peft_model)
    assert adapted and all(n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) in selection.selected for n in adapted)
    assert {int(n[len(prefix):].split(".")[0]) for n in adapted} == set(selection.selected)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not [n for n in trainable if "vision" in n or "projector" in n]


@pytest.mark.parametrize("family", FAMILIES)
def test_collator_masks_the_prompt_and_carries_the_image_inputs(vlm_dirs, sqa_dir, family):
    processor = load_processor(str(vlm_dirs[family]))
    task = load_task("scienceqa", processor, data=str(sqa_dir), max_length=96, selection_samples=4)
    features = [task.train[i] for i in range(3)]
    batch = task.data_collator(features)
    tokenizer = processor.tokenizer
    assert batch["pixel_values"].shape[0] == 3 and batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    if family == "gemma3":
        assert batch["token_type_ids"].shape == batch["input_ids"].shape
    if family == "llava-next":
        assert batch["image_sizes"].tolist() == [[20, 24]] * 3 and batch["pixel_values"].ndim == 5  # (B, crops, C, H, W)
    for row, feature in enumerate(features):
        targets = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert targets == tokenizer(feature["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        real = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, real - 1] == tokenizer.eos_token_id  # right padding, EOS last
    assert task.metric_names == ["accuracy"] and len(task.eval_examples["scienceqa"]) == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_training_steps_lower_the_loss(vlm_dirs, sqa_dir, family):
    processor = load_processor(str(vlm_dirs[family]))
    task = load_task("scienceqa", processor, data=str(sqa_dir), max_length=96, selection_samples=4)
    selection = _select(vlm_dirs[family], sqa_dir)
    model = apply_selection(_with_head(vlm_dirs[family]), selection, r=4, alpha=8)
    batch = task.data_collator([task.train[i] for i in range(8)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses


# ---------------------------------------------------------------------------------------------
# Evaluation


class _Scripted(torch.nn.Module):
    """Stands in for a VLM whose greedy answer is ``reply`` for every image + prompt."""

    def __init__(self, tokenizer, reply: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.reply = tokenizer(reply, add_special_tokens=False)["input_ids"]
        self.seen: list[tuple[int, ...]] = []

    def generate(self, input_ids, pixel_values, **_):
        self.seen.append(tuple(pixel_values.shape))
        tail = torch.tensor(self.reply).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


@pytest.mark.parametrize("reply, letter", [("the answer is B", "B"), ("C .", "C"), ("green", None)])
def test_evaluation_parses_the_generated_letter(vlm_dirs, sqa_dir, reply, letter):
    from lwlora.evaluation.image_choice import evaluate_image_choices

    processor = load_processor(str(vlm_dirs["llava"]))
    examples = load_task("scienceqa", processor, data=str(sqa_dir), max_length=96, selection_samples=4).eval_examples["scienceqa"]
    model = _Scripted(processor.tokenizer, reply)
    result = evaluate_image_choices(model, processor, examples, batch_size=4, progress=False)
    assert [r["prediction"] for r in result["records"]] == [letter] * len(examples)
    expected = sum(e.reference == letter for e in examples) / len(examples)
    assert result["metrics"] == {"accuracy": pytest.approx(expected), "n": len(examples)}
    assert model.seen and all(shape[0] <= 4 for shape in model.seen)  # images went with every batch


def test_prompt_has_context_question_options_and_instruction():
    record = {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1, "hint": "Pick one.", "lecture": "long text"}
    assert scienceqa_prompt(record) == "Context: Pick one.\nWhich is a mammal?\nA. frog\nB. dog\nAnswer with the option's letter from the given choices directly."
    assert scienceqa_prompt({**record, "hint": ""}).startswith("Which is a mammal?")


@pytest.mark.parametrize("family", FAMILIES)
def test_train_then_eval_through_the_cli(vlm_dirs, sqa_dir, tmp_path, capsys, family):
    out = tmp_path / "run"
    args = ["train", str(vlm_dirs[family]), "--task", "scienceqa", "--data", str(sqa_dir), "--out", str(out), "--num-samples", "8",
            "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--r", "4", "--max-length", "96", "--device", "cpu",
            "--max-new-tokens", "4", "--no-progress"]
    assert cli.main(args) == 0
    assert "adapted blocks" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    selection = json.loads((out / "selection.json").read_text())
    assert selection["tower"] == "language" and selection["layers_path"].endswith("language_model.layers")
    assert metrics["final"]["scienceqa"]["n"] == 6 and 0 <= metrics["final"]["scienceqa"]["accuracy"] <= 1
    assert metrics["params"]["head"] == 0 and metrics["params"]["trainable"] == metrics["params"]["adapter"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "processor_config.json").is_file()

    assert cli.main(["eval", str(out), "--no-progress", "--choice-mode", "loglik"]) == 0
    assert json.loads((out / "eval.json").read_text())["scienceqa"]["n"] == 6


def test_cli_select_with_task_scienceqa(vlm_dirs, sqa_dir, tmp_path, capsys):
    out = tmp_path / "sel"
    assert cli.main(["select", str(vlm_dirs["llava"]), "--task", "scienceqa", "--data", str(sqa_dir), "--out", str(out), "--num-samples", "8", "--device", "cpu", "--no-progress"]) == 0
    saved = json.loads((out / "selection.json").read_text())
    assert saved["tower"] == "language" and saved["num_layers"] == 4 and len(saved["selected"]) == 2


# ---------------------------------------------------------------------------------------------
# Bad input


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lwlora")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture()
def broken_data(sqa_dir, tmp_path):
    """Variants of the training file: a missing image file, no image column, a text-only record."""
    rows = [json.loads(line) for line in (sqa_dir / "train.jsonl").read_text().splitlines()]
    for row in rows:
        row["image"] = str(sqa_dir / row["image"])
    missing = write_jsonl(tmp_path / "missing.jsonl", [{**rows[0], "image": "nowhere/none.png"}, *rows[1:]])
    no_column = write_jsonl(tmp_path / "no-column.jsonl", [{k: v for k, v in r.items() if k != "image"} for r in rows])
    text_only = write_jsonl(tmp_path / "text-only.jsonl", [{**rows[0], "image": None}, *rows[1:]])
    return {"missing": missing, "no_column": no_column, "text_only": text_only}


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing", ["--task", "scienceqa"], "--data: example 0 of"),
        ("no_column", ["--task", "scienceqa"], "has no 'image' column"),
        ("missing", ["--image-column", "image", "--text-column", "question"], "image file not found"),
        ("no_column", ["--image-column", "image", "--text-column", "question"], "--image-column: column 'image' not found"),
        ("text_only", ["--image-column", "image", "--text-column", "question"], "--image-column: record 0 of"),
        ("text_only", ["--image-column", "image", "--scorer", "fim"], "--image-column: the fim scorer takes labelled inputs from --task"),
    ],
)
def test_select_bad_image_input_is_one_line_and_exit_2(vlm_dirs, broken_data, tmp_path, capsys, case, extra, message):
    out = tmp_path / "sel"
    code = cli.main(["select", str(vlm_dirs["llava"]), "--data", str(broken_data[case]), "--out", str(out), "--num-samples", "12", "--device", "cpu", "--no-progress", *extra])
    assert code == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_text_only_examples_are_skipped_by_the_scienceqa_task(vlm_dirs, broken_data, caplog):
    processor = load_processor(str(vlm_dirs["llava"]))
    with caplog.at_level("WARNING", logger="lwlora"):
        task = load_task("scienceqa", processor, data=str(broken_data["text_only"]), max_length=96, selection_samples=4)
    assert task.info["skipped_without_image"] == 1 and len(task.train) == 11
    assert "skipped 1 training examples without an image" in caplog.text


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--max-length", "8"], "--max-length"),
        (["--packing"], "--packing"),
        (["--text-column", "question"], "--text-column"),
        (["--tower", "audio"], "--tower"),
    ],
)
def test_train_bad_input_is_one_line_and_exit_2(vlm_dirs, sqa_dir, tmp_path, capsys, extra, flag):
    out = tmp_path / "run"
    args = ["train", str(vlm_dirs["llava"]), "--task", "scienceqa", "--data", str(sqa_dir), "--out", str(out), "--max-steps", "1", "--device", "cpu", "--no-progress", *extra]
    assert cli.main(args) == 2
    assert flag in _error_line(capsys)
    assert not (out / "train_config.json").exists()


def test_text_only_model_is_refused_for_an_image_task(tiny_llama_dir, sqa_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", str(tiny_llama_dir), "--task", "scienceqa", "--data", str(sqa_dir), "--out", str(out), "--device", "cpu", "--no-progress"]) == 2
    assert "not a vision-language model" in _error_line(capsys)


def test_missing_image_file_in_the_task_data_names_the_file(vlm_dirs, broken_data):
    processor = load_processor(str(vlm_dirs["llava"]))
    with pytest.raises(ConfigError, match=r"--data: example 0 of .*image file not found: .*none\.png"):
        load_task("scienceqa", processor, data=str(broken_data["missing"]), max_length=96, selection_samples=4)


def test_collator_refuses_prompts_longer_than_max_length(vlm_dirs, sqa_dir):
    processor = load_processor(str(vlm_dirs["llava"]))
    collator = ImageTextCollator(processor, max_length=8)
    task = load_task("scienceqa", processor, data=str(sqa_dir), max_length=96, selection_samples=4)
    with pytest.raises(ConfigError, match="--max-length"):
        collator([task.train[0]])


def test_hub_layout_with_an_image_feature_and_text_only_questions(vlm_dirs, sqa_dir, monkeypatch):
    """derek-thomas/ScienceQA's layout, offline: a ``datasets.Image`` column with ``None`` for the
    text-only questions. Those are skipped; images stay undecoded in the records until a batch
    needs them."""
    import datasets
    from PIL import Image

    import lwlora.tasks.scienceqa as scienceqa

    rows = [json.loads(line) for line in (sqa_dir / "train.jsonl").read_text().splitlines()]
    images = [Image.open(sqa_dir / r["image"]).copy() if i % 4 else None for i, r in enumerate(rows)]  # bytes, as on the Hub
    extra = {"task": "closed choice", "grade": "grade2", "subject": "natural science", "topic": "colours", "category": "c", "skill": "s", "solution": "s"}
    hub = datasets.Dataset.from_list([{**r, **extra, "image": None} for r in rows]).cast_column("image", datasets.Image())
    hub = hub.map(lambda _, i: {"image": images[i]}, with_indices=True)
    calls = []

    def fake_hub(path, *, split, **_):
        calls.append((path, split))
        return hub

    monkeypatch.setattr(scienceqa, "load_hub_dataset", fake_hub)
    processor = load_processor(str(vlm_dirs["llava"]))
    task = load_task("scienceqa", processor, data=None, max_length=96, selection_samples=4, max_eval_samples=5)
    assert calls == [("derek-thomas/ScienceQA", "train"), ("derek-thomas/ScienceQA", "test")]
    assert task.info["skipped_without_image"] == 3 and len(task.train) == 9
    assert isinstance(task.train[0]["image"], dict) and task.train[0]["image"]["bytes"]
    assert len(task.eval_examples["scienceqa"]) == 5 and len(task.selection_texts) == 4
    batch = task.data_collator([task.train[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == 3


@pytest.mark.parametrize("bos", ["", "<s>"])
def test_prompt_uses_the_processor_chat_template_without_doubling_bos(vlm_dirs, bos):
    processor = load_processor(str(vlm_dirs["llava"]))
    assert build_prompt(processor, "Which colour ?") == "USER: <image>\nWhich colour ? ASSISTANT:"  # no template: LLaVA-1.5's
    processor.chat_template = (
        bos + "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    # The tokenizer adds BOS itself (real ones do): a template's own BOS is dropped.
    assert build_prompt(processor, "Which colour ?") == "USER: <image>\nWhich colour ? ASSISTANT:"


def test_train_on_the_vision_tower(vlm_dirs, sqa_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(vlm_dirs["llava"]), "--task", "scienceqa", "--data", str(sqa_dir), "--out", str(out), "--num-samples", "8", "--tower", "vision",
            "--max-steps", "1", "--batch-size", "4", "--r", "2", "--max-length", "96", "--device", "cpu", "--max-new-tokens", "2", "--no-progress"]
    assert cli.main(args) == 0
    selection = json.loads((out / "selection.json").read_text())
    assert (selection["tower"], selection["pooling"], selection["num_layers"]) == ("vision", "mean", 3)
    targets = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert targets.startswith(r"model\.vision_tower\.encoder\.layers\.")


def test_select_layers_takes_pil_images_in_memory(vlm_dirs):
    from PIL import Image

    from lwlora.multimodal import make_image_text_samples

    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (120, 120, 0), (0, 120, 120), (90, 0, 90)]
    images = [Image.new("RGB", (20 + i, 24), c) for i, c in enumerate(colours)]
    texts = [f"Which colour fills picture {i} ?" for i in range(len(images))]
    samples = make_image_text_samples(texts, images, source="memory", responses=[" A", " B", " C", " A", " B", " C"])
    selection = select_layers(SelectConfig(model=str(vlm_dirs["gemma3"]), data="", num_samples=6, ratio=0.5, device="cpu", progress=False), samples=samples)
    assert selection.num_samples == 6 and selection.data == "memory" and len(selection.selected) == 2
