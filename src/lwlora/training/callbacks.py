"""``transformers.TrainerCallback``s that ``lwlora train`` adds to the Trainer.

- :class:`DivergenceGuard`: a loss that is no longer finite ends training, and the run fails
  instead of saving NaN weights as its result.
- :class:`RunLoss`: the mean training loss of the whole run, kept in the checkpoints, so a
  resumed run reports all of its steps and not only those after the resume.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

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


class RunLoss(TrainerCallback, ExportableState):
    """The mean training loss of the whole run, across ``--resume``.

    The Trainer's ``training_loss`` covers only the steps of the current ``train()`` call, so a
    resumed run reported the loss of its last stretch. This callback keeps the sum of every
    optimizer step's loss (each process adds its micro-batch losses, as the Trainer's own
    ``tr_loss`` does; at each step end the processes' sums are averaged, which is the loss the
    Trainer logs) and, as an ``ExportableState``, is saved in every checkpoint's
    ``trainer_state.json``; :meth:`restore` reads it back from the checkpoint a run resumes.
    ``mean`` = sum / steps. ``add`` is called by lwlora's Trainer after each ``training_step``.
    """

    def __init__(self, total: float = 0.0, steps: int = 0) -> None:
        self.total = total
        self.steps = steps
        self._pending: Any = None  # this process's losses since the last step end (a device tensor)

    def add(self, loss: Any) -> None:
        self._pending = loss.detach() if self._pending is None else self._pending + loss.detach()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch
        import torch.distributed as dist

        pending = self._pending if self._pending is not None else torch.zeros((), device=args.device)
        self._pending = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # every process reaches every step end
            pending = pending.clone().float()
            dist.all_reduce(pending)
            pending /= dist.get_world_size()
        self.total += float(pending)
        self.steps = state.global_step

    @property
    def mean(self) -> float | None:
        return self.total / self.steps if self.steps else None

    def state(self) -> dict[str, Any]:
        return {"args": {"total": self.total, "steps": self.steps}, "attributes": {}}

    @classmethod
    def restore(cls, trainer_state: dict[str, Any] | None) -> "RunLoss":
        """The tracker as saved in a checkpoint's ``trainer_state.json`` (a fresh one if absent:
        a checkpoint written before lwlora tracked the run's loss)."""
        saved = ((trainer_state or {}).get("stateful_callbacks") or {}).get(cls.__name__)
        if isinstance(saved, dict) and isinstance(saved.get("args"), dict):
            return cls(**saved["args"])
        return cls()
