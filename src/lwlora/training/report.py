"""Training history → ``metrics.json`` sections and ``loss_curve.png``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lwlora.io import atomic_write


def summarise_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Split the Trainer's ``log_history`` into the training-loss curve and the evaluations."""
    losses = [{"step": h["step"], "epoch": h.get("epoch"), "loss": h["loss"], "learning_rate": h.get("learning_rate")} for h in history if "loss" in h]
    evaluations = [{k.removeprefix("eval_"): v for k, v in h.items()} for h in history if any(k.startswith("eval_") for k in h)]
    return {"loss_history": losses, "eval_history": evaluations}


def plot_loss_curve(history: list[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evaluation = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    if train:
        ax.plot(*zip(*train), marker="." if len(train) < 30 else None, label="train loss")
    if evaluation:
        ax.plot(*zip(*evaluation), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    if train or evaluation:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss logged (increase steps or lower --logging-steps)", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
