"""Human-facing views of a :class:`~lwlora.selection.LayerSelection`: a text table, ``scores.csv``,
``importance.png`` and the PEFT snippet that applies the selection."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lwlora.io import atomic_write, atomic_write_text
from lwlora.selection.artifact import LayerSelection


def _fmt(value: float | None, digits: int = 6) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_table(selection: LayerSelection) -> str:
    """A fixed-width table: block, similarity, importance, rank, selected, degenerate reason."""
    ranked = sorted((r for r in selection.layers if r.importance is not None), key=lambda r: -r.importance)
    rank = {r.index: position + 1 for position, r in enumerate(ranked)}
    name = selection.similarity_name
    lines = [f"{'block':>5}  {name:>10}  {'importance':>10}  {'rank':>4}  selected  note"]
    for record in selection.layers:
        note = record.reason or ""
        mark = "  *" if record.index in selection.selected else ""
        lines.append(
            f"{record.index:>5}  {_fmt(record.similarity):>10}  {_fmt(record.importance):>10}  {rank.get(record.index, '—')!s:>4}  {mark:<8}  {note}"
        )
    lines.append(f"selected {len(selection.selected)}/{selection.num_layers} blocks: {selection.selected}  (one-hot {selection.one_hot})")
    return "\n".join(lines)


def scores_csv(selection: LayerSelection) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "cka", "similarity", "importance", "degenerate", "selected", "reason"])
    for record in selection.layers:
        writer.writerow([
            record.index,
            "" if record.cka is None else repr(record.cka),
            "" if record.similarity is None else repr(record.similarity),
            "" if record.importance is None else repr(record.importance),
            str(record.degenerate).lower(),
            str(record.index in selection.selected).lower(),
            record.reason or "",
        ])
    return buffer.getvalue()


def _importance_label(selection: LayerSelection) -> str:
    if selection.scorer == "angular":
        return "importance (angular distance)"
    if selection.similarity_name in ("cka", "cosine"):
        return f"importance (1 − {selection.similarity_name})"
    return f"importance ({selection.scorer})"


def _block_ticks(ax, indices: list[int]) -> None:
    ax.set_xticks(indices if len(indices) <= 40 else indices[:: max(1, len(indices) // 20)])
    if len(indices) > 24:
        ax.tick_params(axis="x", labelsize=7)


def importance_figure(selection: LayerSelection) -> Any:
    """The ``importance.png`` figure (a matplotlib ``Figure``, no pyplot state).

    One bar per block (sub-layer selections: two per block, attention hatched ``////`` and MLP
    ``....``), filled :data:`~lwlora.selection.colors.SELECTED` when adapted and
    :data:`~lwlora.selection.colors.FROZEN` when not, the colours ``stability.png`` uses; a
    degenerate block (or unit) is a red ✕ at 0. A selection made by a rule (no scores) is drawn as
    a strip of its blocks."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from lwlora.selection import colors

    indices = [r.index for r in selection.layers]
    chosen = set(selection.selected)
    units = selection.units
    scored = units is not None or any(r.importance is not None or r.degenerate for r in selection.layers)
    width = max(6.4, (0.5 if units is not None else 0.3) * len(indices) + 3.2)
    fig = Figure(figsize=(width, 3.8 if scored else 2.4), dpi=120, layout="constrained")
    if scored:  # the bars, and under them a strip of what is adapted (a tiny bar's colour is lost)
        grid = fig.add_gridspec(2, 1, height_ratios=[14, 1])
        ax = fig.add_subplot(grid[0])
        strip = fig.add_subplot(grid[1], sharex=ax)
    else:
        ax = strip = fig.add_subplot()
    handles: list[Any] = []
    degenerate_x: list[float] = []
    if units is not None:
        offsets = {"attention": -0.2, "mlp": 0.2}
        parts = [part for part in offsets if any(u["part"] == part for u in units)]
        for part in parts:
            members = [u for u in units if u["part"] == part]
            xs = [int(u["block"]) + offsets[part] for u in members]
            heights = [u["importance"] if u.get("importance") is not None else 0.0 for u in members]
            fills = [colors.SELECTED if u.get("selected") else colors.FROZEN for u in members]
            ax.bar(xs, heights, width=0.4, color=fills, edgecolor=colors.EDGE, linewidth=0.4, hatch=colors.UNIT_HATCH[part])
            strip.bar(xs, [1.0] * len(xs), width=0.4, color=fills, edgecolor=colors.EDGE, linewidth=0.4, hatch=colors.UNIT_HATCH[part])
            degenerate_x += [x for x, u in zip(xs, members) if u.get("degenerate") or u.get("importance") is None]
        adapted = sum(1 for u in units if u.get("selected"))
        handles += colors.selected_handles(adapted, unit="unit", total=len(units))
        handles += [Patch(facecolor="white", edgecolor=colors.EDGE, linewidth=0.4, hatch=colors.UNIT_HATCH[part], label="MLP" if part == "mlp" else part) for part in parts]
    else:
        fills = [colors.SELECTED if i in chosen else colors.FROZEN for i in indices]
        if scored:
            values = [r.importance if r.importance is not None else 0.0 for r in selection.layers]
            ax.bar(indices, values, color=fills, edgecolor=colors.EDGE, linewidth=0.4)
            degenerate_x = [r.index for r in selection.layers if r.degenerate or r.importance is None]
        strip.bar(indices, [1.0] * len(indices), color=fills, edgecolor=colors.EDGE, linewidth=0.4)
        handles += colors.selected_handles(len(chosen), total=selection.num_layers)
    if degenerate_x:
        ax.plot(degenerate_x, [0.0] * len(degenerate_x), clip_on=False, zorder=5, **colors.DEGENERATE_MARKER)
        handles.append(colors.degenerate_handle())
    strip.set_yticks([])
    strip.set_ylim(0.0, 1.0)
    strip.set_xlabel("block")
    if scored:
        strip.set_ylabel("adapted", rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(axis="x", labelbottom=False)
        ax.set_ylabel(_importance_label(selection))
        ax.set_ylim(bottom=0.0)
        if not any(patch.get_height() for patch in ax.patches):
            ax.set_ylim(0.0, 1.0)
        ax.grid(True, axis="y", alpha=0.3, linewidth=0.6)
        ax.set_axisbelow(True)
    else:
        strip.set_ylabel("adapted", fontsize=8)
    ax.set_xlim(min(indices, default=0) - 0.6, max(indices, default=0) + 0.6)
    _block_ticks(strip, indices)
    name = Path(selection.model).name or selection.model
    if not scored:
        detail = f"blocks chosen by rule '{selection.scorer}' (no scores)"
    elif selection.pooling not in ("none", ""):
        detail = f"{selection.scorer}, {selection.pooling} pooling, n={selection.num_samples}"
    else:
        detail = f"{selection.scorer}, n={selection.num_samples}"
    if units is not None:
        detail += ", sub-layer units"
    ax.set_title(f"{name} · {detail}", fontsize=9)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def plot_importance(selection: LayerSelection, path: str | os.PathLike) -> Path:
    """Write ``importance.png`` (atomically; see :func:`importance_figure`) and return its path."""
    fig = importance_figure(selection)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def peft_snippet(selection_path: str) -> str:
    return (
        "from lwlora import LayerSelection, apply_selection, build_peft_config\n"
        f"selection = LayerSelection.load({selection_path!r})\n"
        "peft_model = apply_selection(model, selection, method=\"lora\", r=8, alpha=16)  # adapters on the selected blocks only, verified\n"
        "# or, for your own PEFT code: config = build_peft_config(selection, method=\"lora\", r=8, alpha=16)"
    )


def write_artifacts(selection: LayerSelection, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``selection.json``, ``scores.csv``, ``importance.png`` (and ``stability.png`` when the
    selection carries a bootstrap report) into ``out_dir``.

    Every file is rendered completely before any is moved into place, and each move is atomic,
    so a failure leaves no half-written file in ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"selection": out / "selection.json", "scores": out / "scores.csv", "plot": out / "importance.png"}
    csv_text = scores_csv(selection)
    plot_importance(selection, paths["plot"])
    stability = selection.diagnostics.get("stability")
    if stability is not None:
        from lwlora.selection.stability import StabilityReport, plot_stability

        paths["stability_plot"] = out / "stability.png"
        plot_stability(StabilityReport.from_json(stability), selection.importances, selection.selected, paths["stability_plot"])
    atomic_write_text(paths["scores"], csv_text)
    selection.save(paths["selection"])
    return paths
