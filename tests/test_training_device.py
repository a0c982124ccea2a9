"""The selection inside `lwlora train` runs where training runs (issue: selection on the CPU).

These machines have no GPU, so a fake accelerator stands in: the training device resolves to a
``cuda:0`` that only exists in the test, ``place_model`` records the move instead of making it,
and spies on the capture and on the gradient probe check that the model had been placed on that
device (in the training precision) before the first batch was scored.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from lwlora import cli
from lwlora.errors import ConfigError
from lwlora.training import device as device_module
from lwlora.training.config import TrainConfig
from lwlora.training.device import resolve_training_device
from lwlora.training.trainer import train


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls-device")
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[:6])
    return root


def _config(model, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(model), task="classification", data=str(data), out=str(out), layers="cka", num_layers=1, r=4, lr=5e-3, batch_size=8, max_steps=2, max_length=24, progress=False, num_samples=8, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


# ---------------------------------------------------------------------------- resolving --device


def _fake_cuda(monkeypatch, count: int = 2, current: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


@pytest.mark.parametrize(
    "flag, env, expected",
    [
        ("auto", {}, "cuda:0"),
        ("cuda", {}, "cuda:0"),
        ("cuda:1", {}, "cuda:1"),
        ("cpu", {}, "cpu"),
        ("auto", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1"),
        ("cuda", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1"),
        ("cuda:1", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1"),
    ],
)
def test_training_device_is_the_one_the_trainer_uses(monkeypatch, flag, env, expected):
    _fake_cuda(monkeypatch)
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert str(resolve_training_device(flag)) == expected


@pytest.mark.parametrize(
    "flag, gpus, env, message",
    [
        ("cuda", 0, {}, "CUDA is not available"),
        ("cuda:0", 0, {}, "CUDA is not available"),
        ("cuda:2", 2, {}, "has 2 CUDA device(s)"),
        ("cuda:0", 2, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "process 1 trains on cuda:1"),
        ("xla", 0, {}, "unsupported device"),
        ("tpu", 0, {}, "unknown device"),
        ("nonsense", 0, {}, "unknown device"),
    ],
)
def test_a_device_the_machine_lacks_is_a_device_error(monkeypatch, flag, gpus, env, message):
    if gpus:
        _fake_cuda(monkeypatch, count=gpus)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        resolve_training_device(flag)
    assert error.value.flag == "--device" and message in error.value.message


@pytest.mark.parametrize("command", ["train", "run"])
def test_train_on_a_missing_gpu_is_one_line_exit_2_and_writes_nothing(tiny_bert_dir, cls_dir, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    if command == "train":
        argv = ["train", str(tiny_bert_dir), "--task", "classification", "--data", str(cls_dir), "--out", str(out), "--layers", "last", "--num-layers", "1", "--max-steps", "2", "--device", "cuda", "--no-progress"]
    else:
        config = tmp_path / "c.yaml"
        config.write_text(json.dumps({"model": str(tiny_bert_dir), "task": "classification", "data": str(cls_dir), "out": str(out), "layers": "last", "num_layers": 1, "max_steps": 2, "device": "cuda:0"}))
        argv = ["run", "--config", str(config), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and "CUDA is not available" in err[0]
    assert not out.exists()


# ------------------------------------------------------------------- the selection's placement


class _Recorder:
    """Stands in for the accelerator: records placements and what the scorers saw."""

    def __init__(self, monkeypatch, target: torch.device):
        self.target = target
        self.placed: list[tuple[int, torch.device]] = []
        self.seen: list[tuple[str, bool, torch.dtype | None]] = []
        monkeypatch.setattr(device_module, "resolve_training_device", lambda flag: target)
        monkeypatch.setattr(device_module, "place_model", self.place)

    def place(self, model, device):
        self.placed.append((id(model), device))
        return model

    def spy(self, name: str, original):
        def wrapper(model, *args, **kwargs):
            on_target = any(model_id == id(model) or model_id == id(getattr(model, "base_model", None)) for model_id, placed in self.placed if placed == self.target)
            autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            self.seen.append((name, on_target, autocast))
            return original(model, *args, **kwargs)

        return wrapper


def test_similarity_selection_runs_on_the_training_device(tiny_bert_dir, cls_dir, tmp_path, monkeypatch):
    import lwlora.selection.pipeline as select_module

    recorder = _Recorder(monkeypatch, torch.device("cpu", 0))  # the "accelerator": the only device this test can run on
    monkeypatch.setattr(select_module, "capture_block_representations", recorder.spy("capture", select_module.capture_block_representations))
    result = train(_config(tiny_bert_dir, cls_dir, tmp_path / "run", device="cuda"))
    assert recorder.placed and recorder.placed[0][1] == recorder.target
    assert recorder.seen == [("capture", True, None)]
    saved = json.loads((result.run_dir / "selection.json").read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "float32"


def test_gradient_selection_runs_on_the_training_device_in_the_training_precision(tiny_bert_dir, cls_dir, tmp_path, monkeypatch):
    import lwlora.selection.gradients as gradient_module

    recorder = _Recorder(monkeypatch, torch.device("cpu", 0))
    monkeypatch.setattr(gradient_module, "block_gradient_scores", recorder.spy("gradients", gradient_module.block_gradient_scores))
    result = train(_config(tiny_bert_dir, cls_dir, tmp_path / "run", layers="fim", bf16=True))
    assert recorder.seen == [("gradients", True, torch.bfloat16)]
    saved = json.loads((result.run_dir / "selection.json").read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "bfloat16 (autocast over float32 weights)"


def test_importance_ranks_measure_on_the_training_device(tiny_bert_dir, cls_dir, tmp_path, monkeypatch):
    import lwlora.selection.pipeline as select_module

    recorder = _Recorder(monkeypatch, torch.device("cpu", 0))
    monkeypatch.setattr(select_module, "capture_block_representations", recorder.spy("capture", select_module.capture_block_representations))
    train(_config(tiny_bert_dir, cls_dir, tmp_path / "run", layers="all", num_layers=None, rank_allocation="importance"))
    assert recorder.seen == [("capture", True, None)]


def test_select_records_its_device(tiny_bert_dir, data_files, tmp_path):
    out = tmp_path / "sel"
    assert cli.main(["select", str(tiny_bert_dir), "--data", str(data_files.jsonl), "--out", str(out), "--num-samples", "8", "--device", "cpu", "--no-progress"]) == 0
    saved = json.loads((out / "selection.json").read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "float32"
