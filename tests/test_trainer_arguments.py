"""What lwlora hands the HF Trainer (TrainingArguments) for a TrainConfig."""

from __future__ import annotations

import torch

from lwlora.training.config import TrainConfig
from lwlora.training.trainer import _training_arguments


def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{"model": "m", "task": "instruction", "out": "-", "batch_size": 8, "eval_batch_size": 64, **overrides})


def test_causal_lm_evaluation_keeps_no_logits_and_uses_the_training_batch(tmp_path):
    """The Trainer would otherwise gather every eval batch's (batch, tokens, vocab) logits."""
    args = _training_arguments(_config(), tmp_path, has_eval=True, device=torch.device("cpu"), causal_lm=True)
    assert args.prediction_loss_only is True
    assert args.per_device_eval_batch_size == 8


def test_classification_evaluation_keeps_predictions_at_the_eval_batch(tmp_path):
    args = _training_arguments(_config(task="classification"), tmp_path, has_eval=True, device=torch.device("cpu"), causal_lm=False)
    assert args.prediction_loss_only is False
    assert args.per_device_eval_batch_size == 64


def test_the_trainer_options_a_user_of_the_hf_trainer_expects_pass_through(tmp_path):
    args = _training_arguments(_config(report_to="tensorboard", optim="adafactor", max_grad_norm=0.5), tmp_path, has_eval=False, device=torch.device("cpu"))
    assert args.report_to == ["tensorboard"] and args.optim == "adafactor" and args.max_grad_norm == 0.5
    assert _training_arguments(_config(), tmp_path, has_eval=False, device=torch.device("cpu")).report_to in ([], "none", ["none"])


def test_callbacks_from_python_reach_the_trainer(tiny_bert_dir, tmp_path):
    from conftest import write_jsonl
    from transformers import TrainerCallback

    from lwlora.training.trainer import train

    data = tmp_path / "cls"
    data.mkdir()
    rows = [{"text": f"sample {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(16)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:4])
    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    train(TrainConfig(model=str(tiny_bert_dir), task="classification", data=str(data), out=str(tmp_path / "run"), layers="last", num_layers=1, max_steps=3, batch_size=8, max_length=24, device="cpu", progress=False), callbacks=[Count()])
    assert steps == [1, 2, 3]


def test_liger_reaches_the_trainer_and_is_off_by_default(tmp_path, monkeypatch):
    """--liger is TrainingArguments.use_liger_kernel (the Trainer patches the model and skips eval logits)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    assert _training_arguments(_config(), tmp_path, has_eval=True, device=torch.device("cpu"), causal_lm=True).use_liger_kernel is False
    assert _training_arguments(_config(liger=True), tmp_path, has_eval=True, device=torch.device("cpu"), causal_lm=True).use_liger_kernel is True


def test_liger_without_its_package_is_a_one_line_liger_error(monkeypatch):
    import importlib.util

    import pytest

    from lwlora.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install liger-kernel") as caught:
        _config(liger=True)
    assert caught.value.flag == "--liger"


def test_liger_on_the_cpu_fails_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import importlib.util

    from lwlora import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    out = tmp_path / "run"
    code = cli.main(["train", "m", "--task", "instruction", "--data", str(tmp_path), "--out", str(out), "--device", "cpu", "--liger"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "--liger" in err[0] and "CUDA" in err[0], err
    assert not out.exists()
