"""The few lines ``lwlora train`` / ``lwlora run`` print at the end of a run, from its
``metrics.json`` dict: plain aligned text (no colour, no terminal control), so it reads the same in
a terminal and in a job's log.

Example::

    adapted blocks [2]: 1 of 3 (lora)
      trainable parameters  3,650 of 35,394 (10.31%)
      adapter               3,584 (33.3% of all-layer LoRA: 10,752)
      head                  66
      train time            0.4 s (845 tokens/s)
      steps                 3 (1 epoch)
      peak memory           0.31 GiB (host RSS)
      train loss            0.6927
      validation            n=6
        accuracy            50.0% (untuned 41.7%)
        loss                0.6932
"""

from __future__ import annotations

import math
import numbers
from typing import Any

#: metrics that are fractions in [0, 1] and read best as percentages
PERCENT_METRICS = frozenset({"accuracy", "exact_match", "pass@1", "f1", "macro_f1"})
#: the Trainer's bookkeeping in an evaluation, not a score
SKIPPED_METRICS = frozenset({"n", "runtime", "model_preparation_time", "samples_per_second", "steps_per_second", "epoch", "num_input_tokens_seen", "total_flos"})
#: how each kind of peak memory figure is named
MEMORY_KINDS = {"cuda_allocated": "GPU allocated", "host_max_rss": "host RSS"}

_INDENT = "  "
_GAP = "  "


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _count(value: Any) -> str:
    return f"{int(value):,}" if _is_number(value) else "—"


def format_metric(name: str, value: Any) -> str:
    """One metric value: percentages for accuracy-like fractions, 4 decimals otherwise."""
    if value is None:
        return "—"
    if not _is_number(value):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    value = float(value)
    if math.isnan(value):
        return "nan"
    if name in PERCENT_METRICS:
        return f"{100 * value:.1f}%"
    return f"{value:.4f}"


def format_duration(seconds: Any) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if not _is_number(seconds):
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(count: Any) -> str:
    if not _is_number(count):
        return "—"
    return f"{count / 2**30:.2f} GiB"


def _plural(count: float, word: str) -> str:
    text = f"{count:g}" if isinstance(count, float) else f"{count}"
    return f"{text} {word}" if count == 1 else f"{text} {word}s"


def _metric_order(names: list[str]) -> list[str]:
    """Task metrics first (in the order given), the loss last."""
    return [n for n in names if n != "loss"] + [n for n in names if n == "loss"]


def _split_rows(split: str, scores: dict[str, Any], untuned: dict[str, Any] | None) -> list[tuple[int, str, str]]:
    scores = scores or {}
    untuned = untuned or {}
    count = scores.get("n", untuned.get("n"))
    rows = [(1, split, f"n={count:,}" if _is_number(count) else "")]
    names = [n for n in scores if n not in SKIPPED_METRICS and (_is_number(scores[n]) or scores[n] is None)]
    names += [n for n in untuned if n not in scores and n not in SKIPPED_METRICS and (_is_number(untuned[n]) or untuned[n] is None)]
    for name in _metric_order(names):
        if name in scores:
            text = format_metric(name, scores[name])
            if name in untuned:
                text += f" (untuned {format_metric(name, untuned[name])})"
        else:
            text = f"— (untuned {format_metric(name, untuned[name])})"
        rows.append((2, name, text))
    return rows


def format_summary(metrics: dict[str, Any]) -> str:
    """The end-of-run summary of a ``metrics.json`` dict (see the module docstring), one string of
    lines without a trailing newline. Missing sections are left out rather than failing."""
    selected = list(metrics.get("selected") or [])
    num_layers = metrics.get("num_layers")
    method = metrics.get("method") or "?"
    params = metrics.get("params") or {}
    cost = metrics.get("cost") or {}
    train = metrics.get("train") or {}
    of = f"{len(selected)} of {num_layers}" if num_layers is not None else f"{len(selected)}"
    lines = [f"adapted blocks {selected}: {of} ({method})"]

    rows: list[tuple[int, str, str]] = []
    if cost.get("units"):
        rows.append((1, "units", f"{len(cost['units'])}: {', '.join(cost['units'])}"))
    if params:
        trainable, total = params.get("trainable"), params.get("total")
        share = f" ({100 * trainable / total:.2f}%)" if _is_number(trainable) and _is_number(total) and total else ""
        rows.append((1, "trainable parameters", f"{_count(trainable)} of {_count(total)}{share}"))
        if cost.get("full_fine_tuning"):
            rows.append((1, "adapter", "none (full fine-tuning)"))
        else:
            adapter = _count(params.get("adapter"))
            fraction, everything = cost.get("adapter_fraction"), cost.get("all_layer_adapter_params")
            if _is_number(fraction) and _is_number(everything):
                adapter += f" ({100 * fraction:.1f}% of all-layer LoRA: {_count(everything)})"
            rows.append((1, "adapter", adapter))
        rows.append((1, "head", _count(params.get("head"))))
    if train:
        speed = train.get("tokens_per_s")
        rows.append((1, "train time", format_duration(train.get("runtime_s")) + (f" ({speed:,.0f} tokens/s)" if _is_number(speed) and speed else "")))
        steps = _count(train.get("global_step"))
        epochs = train.get("epochs")
        if _is_number(epochs) and epochs:
            steps += f" ({_plural(round(float(epochs), 2), 'epoch')})"
        rows.append((1, "steps", steps))
        if train.get("resumed_from"):
            rows.append((1, "resumed from", str(train["resumed_from"])))
        if "peak_memory_bytes" in train:
            kind = train.get("peak_memory_kind")
            rows.append((1, "peak memory", f"{format_bytes(train['peak_memory_bytes'])} ({MEMORY_KINDS.get(kind, kind or 'unknown kind')})"))
        rows.append((1, "train loss", format_metric("loss", train.get("train_loss"))))

    final = metrics.get("final") or {}
    untuned = metrics.get("untuned") or {}
    if not final and not untuned:
        rows.append((1, "evaluation", "none (no evaluation split)"))
    for split in list(final) + [s for s in untuned if s not in final]:
        rows += _split_rows(split, final.get(split, {}), untuned.get(split))

    width = max((len(_INDENT * depth + label) for depth, label, _ in rows), default=0)
    for depth, label, value in rows:
        lines.append(f"{_INDENT * depth + label:<{width}}{_GAP}{value}".rstrip())
    return "\n".join(lines)
