"""``transformers.TrainerCallback``s that ``lwlora train`` adds to the Trainer.

- :class:`DivergenceGuard`: a loss that is no longer finite ends training, and the run fails
  instead of saving NaN weights as its result.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from lwlora.errors import ConfigError


class TrainingDiverged(ConfigError):
    """Training produced a non-finite loss or weights; the learning rate is the usual cause."""

    def __init__(self, message: str):
        super().__init__("--lr", message)


class DivergenceGuard(TrainerCallback):
    """Stops training at the first logged loss that is NaN or infinite.

    The Trainer logs the mean loss of each ``--logging-steps`` window; with its NaN filter off
    (``logging_nan_inf_filter=False``, set by lwlora) one non-finite step makes that mean
    non-finite, so a diverged step is seen at the next log. ``diverged`` then says where.
    """

    def __init__(self) -> None:
        self.diverged: str | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value) and self.diverged is None:
                self.diverged = f"the {'training' if key == 'loss' else 'evaluation'} loss became {value} by step {state.global_step}"
                control.should_training_stop = True


def check_finite(model: Any, guard: DivergenceGuard, train_loss: float | None) -> None:
    """Raise :class:`TrainingDiverged` if the guard saw a non-finite loss, the run's mean training
    loss is not finite, or a trainable weight is; otherwise do nothing. Called before anything of
    the result is written, so a diverged run leaves no adapter behind."""
    reason = guard.diverged
    if reason is None and train_loss is not None and not math.isfinite(train_loss):
        reason = f"the mean training loss is {train_loss}"
    if reason is None:
        bad = [name for name, param in model.named_parameters() if param.requires_grad and not param.detach().isfinite().all()]
        if bad:
            reason = f"{len(bad)} trainable tensor(s) hold NaN or infinite values (e.g. {bad[0]})"
    if reason is not None:
        raise TrainingDiverged(f"training diverged: {reason}; nothing was saved as the result. lower --lr (or lengthen --warmup) and run again with --overwrite")
