"""One selection for every process of a distributed launch.

Under ``torchrun`` / ``accelerate launch`` each process measures the selection itself (same
samples, same weights, its own GPU). Kernels that are not bitwise deterministic can still break a
near tie differently on two processes, and then they would adapt different blocks: DDP checks only
that parameter *shapes* agree, so same-shaped adapters on different blocks would train with each
other's gradients, silently. So rank 0's selection and rank plan are broadcast and adopted by all
processes before any adapter is made; a process whose own measurement differed says so.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lwlora.selection.artifact import LayerSelection

logger = logging.getLogger("lwlora")


def _choice(selection: LayerSelection, plan: dict[str, Any]) -> tuple[Any, ...]:
    """What must agree across processes: the adapted blocks (and units) and the ranks."""
    ranks = plan.get("ranks")
    return (list(selection.selected), selection.selected_units, plan.get("r"), plan.get("alpha"), sorted(ranks.items()) if ranks else None)


def rank_zero_choice(selection: LayerSelection, plan: dict[str, Any]) -> tuple[LayerSelection, dict[str, Any]]:
    """``(selection, plan)`` of rank 0 on every process of a distributed launch (``WORLD_SIZE`` > 1;
    the launcher's process group is made here through accelerate's ``PartialState``, as the Trainer
    would make it); unchanged in a single process. A process whose own choice differed logs a
    warning naming both."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return selection, plan
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()  # joins the process group the launcher set up (a no-op once joined)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return selection, plan
    rank = dist.get_rank()
    payload: list[Any] = [selection.to_json(), plan] if rank == 0 else [None, None]
    dist.broadcast_object_list(payload, src=0)
    chosen, chosen_plan = LayerSelection.from_json(payload[0]), payload[1]
    if rank != 0 and _choice(selection, plan) != _choice(chosen, chosen_plan):
        logger.warning(f"process {rank} measured blocks {selection.selected}, process 0 blocks {chosen.selected} (or other ranks): every process trains process 0's choice")
    return chosen, chosen_plan
