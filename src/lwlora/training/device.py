"""Where ``lwlora train`` computes: one device per process, the one the Trainer will train on.

The selection inside ``train`` (``--layers cka|fim|...``) must run where training runs, or a GPU
job scores its blocks on the CPU (81x slower on a 0.5B decoder). The Trainer (through accelerate)
puts a single process's model on the current CUDA device and a distributed launch's process on
``cuda:LOCAL_RANK``; :func:`resolve_training_device` answers the same, checks that the device
exists, and :func:`place_model` moves the model there before the selection, so the Trainer later
finds it in place and moves nothing.

``--bf16`` / ``--fp16`` train under autocast with the weights in their loaded dtype;
:func:`compute_context` gives the selection the same autocast, so it sees the numerics training will.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from lwlora.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def distributed_local_rank() -> int | None:
    """This process's local rank under ``torchrun`` / ``accelerate launch``, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


def parse_device(device: str) -> torch.device | None:
    """``--device`` as a ``torch.device`` (None for ``auto``); a syntax error is a ConfigError."""
    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("--device", f"unknown device {device!r}; use {DEVICE_CHOICES}") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError("--device", f"unsupported device {device!r}; use {DEVICE_CHOICES}")
    return parsed


def resolve_training_device(device: str) -> torch.device:
    """The device training will use for ``--device``, checked to exist.

    - ``auto``: the GPU (``cuda:LOCAL_RANK`` in a distributed launch, else the current CUDA
      device), else Apple's ``mps``, else the CPU — what the Trainer picks;
    - ``cpu``; ``cuda`` (as ``auto``, but a GPU is required); ``cuda:N`` (that GPU; in a
      distributed launch each process owns its local GPU, so only ``cuda:LOCAL_RANK`` agrees);
      ``mps``.

    A device this machine lacks is a ``--device`` ConfigError, never a silent CPU run.
    """
    parsed = parse_device(device)
    rank = distributed_local_rank()
    if parsed is None:
        if torch.cuda.is_available():
            return torch.device("cuda", rank if rank is not None else torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "mps":
        if not _mps_available():
            raise ConfigError("--device", "mps requested but this machine has no Apple GPU (MPS) available")
        return parsed
    if not torch.cuda.is_available():
        raise ConfigError("--device", f"{device} requested but CUDA is not available on this machine; use --device cpu or auto")
    count = torch.cuda.device_count()
    index = parsed.index
    if index is None:
        return torch.device("cuda", rank if rank is not None else torch.cuda.current_device())
    if index >= count:
        raise ConfigError("--device", f"{device} requested but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    if rank is not None and index != rank:
        raise ConfigError("--device", f"{device} under a distributed launch: process {rank} trains on cuda:{rank}; drop --device (or use CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` (in place, dtype unchanged). For ``cuda:N`` the current CUDA
    device becomes N too: accelerate's single-process state trains on the current device."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    return model.to(device)


def compute_context(device: torch.device, *, bf16: bool, fp16: bool) -> Any:
    """The autocast training runs under (``--bf16`` / ``--fp16``), for the selection's forward and
    backward passes; a no-op context for full-precision training."""
    if not (bf16 or fp16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if bf16 else torch.float16)

