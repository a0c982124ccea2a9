"""Training history → ``metrics.json`` sections and ``loss_curve.png``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lwlora.io import atomic_write

#: the Trainer logs a named eval set's loss as ``eval_<split>_loss`` and ``trainer.evaluate(...,
#: metric_key_prefix="eval")`` as ``eval_loss``
_EVAL_LOSS = re.compile(r"^eval_(?:(?P<split>.+)_)?loss$")
#: with at most this many points a curve is drawn with markers (a short run is still a visible line)
MARKER_POINTS = 60

TRAIN_COLOUR = "#1f77b4"
EVAL_COLOURS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def summarise_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Split the Trainer's ``log_history`` into the training-loss curve and the evaluations."""
    losses = [{"step": h["step"], "epoch": h.get("epoch"), "loss": h["loss"], "learning_rate": h.get("learning_rate")} for h in history if "loss" in h]
    evaluations = [{k.removeprefix("eval_"): v for k, v in h.items()} for h in history if any(k.startswith("eval_") for k in h)]
    return {"loss_history": losses, "eval_history": evaluations}


def eval_loss_series(history: list[dict[str, Any]]) -> dict[str | None, list[tuple[int, float]]]:
    """Eval losses by split (``None``: an unnamed ``eval_loss``), as (step, loss) in log order.

    The run's final ``trainer.evaluate`` logs an unnamed ``eval_loss`` per eval set at the last
    step; where a named split already has a point at that step (the Trainer evaluated there) the
    unnamed point is the same evaluation again and is dropped; with a single named split the
    remaining unnamed points are that split's."""
    named: dict[str | None, list[tuple[int, float]]] = {}
    unnamed: list[tuple[int, float]] = []
    for h in history:
        for key, value in h.items():
            match = _EVAL_LOSS.match(key)
            if match is None or not isinstance(value, (int, float)) or "step" not in h:
                continue
            if match["split"] is None:
                unnamed.append((h["step"], float(value)))
            else:
                named.setdefault(match["split"], []).append((h["step"], float(value)))
    if not named:
        return {None: unnamed} if unnamed else {}
    covered = {step for points in named.values() for step, _ in points}
    rest = [(step, value) for step, value in unnamed if step not in covered]
    if rest and len(named) == 1:
        (points,) = named.values()
        points.extend(rest)
        points.sort(key=lambda p: p[0])
    elif rest:
        named[None] = rest
    return named


def loss_curve_figure(history: list[dict[str, Any]], *, title: str = "") -> Any:
    """The ``loss_curve.png`` figure (a matplotlib ``Figure``, no pyplot state): the logged train
    loss per optimizer step and each eval set's loss, on integer step ticks."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = [(h["step"], float(h["loss"])) for h in history if "loss" in h and "step" in h and isinstance(h["loss"], (int, float))]
    evaluation = eval_loss_series(history)
    fig = Figure(figsize=(6.4, 3.6), dpi=120)
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        few = len(train) <= MARKER_POINTS
        ax.plot(steps, losses, color=TRAIN_COLOUR, linewidth=1.6, marker="o" if few else None, markersize=4 if len(train) > 1 else 6, label="train loss")
    for colour, (split, points) in zip(EVAL_COLOURS * 4, evaluation.items()):
        if not points:
            continue
        steps, losses = zip(*points)
        label = "eval loss" if split is None else f"eval loss ({split})"
        ax.plot(steps, losses, color=colour, linewidth=1.4, linestyle="--", marker="s", markersize=5, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    all_steps = [s for s, _ in train] + [s for points in evaluation.values() for s, _ in points]
    if all_steps:
        first, last = min(all_steps), max(all_steps)
        # a short run spans only its steps (ticks 1, 2, 3); a long one starts at 0
        ax.set_xlim(0 if last > 20 else first - 0.5, last + max(0.5, 0.03 * last))
        ax.legend(fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no loss logged (increase steps or lower --logging-steps)", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_loss_curve(history: list[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Write ``loss_curve.png`` (atomically) and return its path."""
    fig = loss_curve_figure(history, title=title)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
