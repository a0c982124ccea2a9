"""The colours and markers ``importance.png`` and ``stability.png`` share, so that a block reads the
same in both: selected blocks in blue, frozen ones in grey, degenerate ones marked with a red ✕.

A module of its own: :mod:`lwlora.selection.report` imports :mod:`lwlora.selection.stability`
(for ``stability.png``), so the constants cannot live in either without an import circle.
"""

from __future__ import annotations

from typing import Any

#: fill of a selected (adapted) block's bar
SELECTED = "#1f77b4"
#: fill of a frozen block's bar
FROZEN = "#c7c7c7"
#: bar outlines (and the hatching of sub-layer unit bars)
EDGE = "#333333"
#: the ✕ of a degenerate block (no score)
DEGENERATE = "#d62728"
#: the bootstrap interval's whiskers
INTERVAL = "#222222"
#: the bootstrap selection frequency and its unstable band
FREQUENCY = "#ff7f0e"
#: sub-layer units: the hatch of each half of a block
UNIT_HATCH = {"attention": "////", "mlp": "...."}

#: the marker drawn at height 0 for a degenerate block
DEGENERATE_MARKER: dict[str, Any] = {"marker": "x", "color": DEGENERATE, "markersize": 8, "markeredgewidth": 2.0, "linestyle": "none"}


def selected_handles(num_selected: int | None = None, *, unit: str = "block", total: int | None = None) -> list[Any]:
    """Legend patches of the two bar colours (``selected (k of n units)``, ``frozen``)."""
    from matplotlib.patches import Patch

    if num_selected is None:
        label = "selected"
    elif total is None:
        label = f"selected ({num_selected})"
    else:
        label = f"selected ({num_selected} of {total} {unit}s)"
    return [Patch(facecolor=SELECTED, edgecolor=EDGE, linewidth=0.4, label=label), Patch(facecolor=FROZEN, edgecolor=EDGE, linewidth=0.4, label="frozen")]


def degenerate_handle(label: str = "degenerate (no score)") -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], label=label, **DEGENERATE_MARKER)
