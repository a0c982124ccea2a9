"""The run directory ``RUN`` of ``lwlora train``: what it holds and when it may be reused.

Layout::

    RUN/train_config.json   the resolved TrainConfig (written first: marks the directory as a run)
    RUN/selection.json      which blocks carry adapters, and why
    RUN/adapter/            the PEFT adapter (``PeftModel.from_pretrained(base, RUN/adapter)``)
    RUN/model/              full fine-tuning only: the whole model
    RUN/merged/             with --merge: base + adapter merged into plain weights
    RUN/checkpoints/        Trainer checkpoints, for --resume
    RUN/metrics.json        evaluation history, final evaluation, parameter counts, cost
    RUN/loss_curve.png      training (and evaluation) loss per step

A directory that already holds a run is refused unless ``--resume`` (same run: identity fields
must match) or ``--overwrite`` (its run files are removed first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lwlora.errors import ConfigError
from lwlora.io import atomic_write_json

CONFIG_FILE = "train_config.json"
RUN_ENTRIES = (CONFIG_FILE, "selection.json", "adapter", "model", "merged", "checkpoints", "metrics.json", "loss_curve.png", "eval.json", ".adapter.tmp", ".model.tmp", ".merged.tmp")


def prepare_run_dir(out: str, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> Path:
    """Validate ``out`` for a new run (or a resumed one) before anything expensive happens."""
    run = Path(out)
    if run.exists() and not run.is_dir():
        raise ConfigError("--out", f"{run} exists and is not a directory")
    existing = run / CONFIG_FILE
    occupied = run.exists() and any(run.iterdir())
    if resume:
        if not existing.is_file():
            raise ConfigError("--resume", f"{run} holds no run to resume ({CONFIG_FILE} missing)")
        previous = json.loads(existing.read_text(encoding="utf-8"))
        changed = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ConfigError("--resume", f"{run} holds a different run ({detail}); use another --out or --overwrite")
        for stale in run.glob(".*.tmp"):  # staging left by an interrupted save
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        return run
    if occupied:
        if not overwrite:
            what = "a run" if existing.is_file() else "files"
            raise ConfigError("--out", f"{run} already holds {what}; pass --resume to continue it or --overwrite to replace it")
        for name in RUN_ENTRIES:
            path = run / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return run


def write_config(run: Path, config_json: dict[str, Any]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / CONFIG_FILE, config_json)


def publish_directory(run: Path, name: str, staging: Path) -> Path:
    """Move a fully written ``staging`` directory to ``run/name`` (replacing an old one) by renames,
    so ``run/name`` is never half-written."""
    final = run / name
    if final.exists():
        old = run / f".{name}.old"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
    return final


def last_checkpoint(run: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    directory = run / "checkpoints"
    return get_last_checkpoint(str(directory)) if directory.is_dir() else None
