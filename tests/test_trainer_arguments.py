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
