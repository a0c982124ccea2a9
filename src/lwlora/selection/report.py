"""Human-facing views of a :class:`~lwlora.selection.LayerSelection`: a text table, ``scores.csv``,
``importance.png`` and the PEFT snippet that applies the selection."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

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


def plot_importance(selection: LayerSelection, path: str | os.PathLike) -> None:
    """Bar chart of importance per block; selected bars filled, degenerate blocks marked ✕."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = [r.index for r in selection.layers]
    values = [r.importance if r.importance is not None else 0.0 for r in selection.layers]
    chosen = set(selection.selected)
    colours = ["#1f77b4" if i in chosen else "#c7c7c7" for i in indices]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(indices) + 2), 3.6), dpi=120)
    ax.bar(indices, values, color=colours, edgecolor="#333333", linewidth=0.4)
    top = max(values) if any(values) else 1.0
    for record in selection.layers:
        if record.degenerate:
            ax.text(record.index, top * 0.02, "✕", ha="center", va="bottom", color="#d62728", fontsize=10, fontweight="bold")
    ax.set_xlabel("block")
    ax.set_ylabel(f"importance (1 − {selection.similarity_name})" if selection.scorer != "angular" else "importance (angular distance)")
    ax.set_title(f"{Path(selection.model).name or selection.model} · {selection.scorer}, {selection.pooling} pooling, n={selection.num_samples}", fontsize=9)
    ax.set_xticks(indices if len(indices) <= 40 else indices[:: max(1, len(indices) // 20)])
    from matplotlib.patches import Patch

    handles = [Patch(color="#1f77b4", label=f"selected ({len(chosen)})"), Patch(color="#c7c7c7", label="frozen")]
    if selection.degenerate_blocks:
        handles.append(Patch(color="#d62728", label="✕ degenerate (no score)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


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
