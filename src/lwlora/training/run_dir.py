"""The run directory ``RUN`` of ``lwlora train``: what it holds, when it may be reused, and how a
finished run is never lost to a failed one.

Layout::

    RUN/train_config.json   the TrainConfig as given (written first: marks the directory as a run)
    RUN/selection.json      which blocks carry adapters, and why
    RUN/adapter/            the PEFT adapter (``PeftModel.from_pretrained(base, RUN/adapter)``)
    RUN/model/              full fine-tuning only: the whole model
    RUN/merged/             with --merge: base + adapter merged into plain weights
    RUN/checkpoints/        Trainer checkpoints, for --resume
    RUN/metrics.json        evaluation history, final evaluation, parameter counts, cost
    RUN/loss_curve.png      training (and evaluation) loss per step

A directory that already holds a run is refused unless ``--resume`` (same run: identity fields
must match) or ``--overwrite``. An overwriting run is written beside the old one, in
``.RUN.overwrite/``, and replaces it by renames only once it has finished: a run that fails (bad
input found late, a crash, a kill) leaves the old run as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwlora.errors import ConfigError
from lwlora.io import apply_umask, atomic_write_json, check_output_dir

logger = logging.getLogger("lwlora")

CONFIG_FILE = "train_config.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class RunPlace:
    """Where a run goes: ``target`` is RUN; ``work`` is where this run writes (RUN itself, or a
    sibling staging directory that replaces RUN when the run has finished)."""

    target: Path
    work: Path

    @property
    def staged(self) -> bool:
        return self.work != self.target


def staging_path(target: Path) -> Path:
    """The sibling directory an overwriting run is written into (the same on every process of a
    distributed launch, which all derive it from --out)."""
    return target.parent / f".{target.name}.overwrite"


def _holds_run(run: Path) -> bool:
    return run.is_dir() and any(run.iterdir())


def plan_run_dir(out: str, *, overwrite: bool) -> RunPlace:
    """Where a run with ``--out out`` writes; pure (no checks, nothing created), so that every
    process of a distributed launch computes the same place."""
    target = Path(out)
    if overwrite and _holds_run(target):
        return RunPlace(target=target, work=staging_path(target))
    return RunPlace(target=target, work=target)


def prepare_run_dir(out: str, identity: dict[str, Any], *, resume: bool, overwrite: bool, optional: tuple[str, ...] = ()) -> RunPlace:
    """Check ``out`` for a new, resumed or overwriting run before anything expensive happens;
    nothing of an existing run is touched here (a stale staging directory of an earlier,
    failed overwrite is cleared). ``--resume`` needs every ``identity`` value to equal the run's
    recorded one; ``optional`` names those compared only where the record has them (fields an
    earlier version did not record)."""
    run = check_output_dir(out, "--out")
    existing = run / CONFIG_FILE
    if resume:
        if not existing.is_file():
            raise ConfigError("--resume", f"{run} holds no run to resume ({CONFIG_FILE} missing)")
        previous = json.loads(existing.read_text(encoding="utf-8"))
        recorded = {k: v for k, v in identity.items() if k in previous or k not in optional}
        changed = {k: (previous.get(k), v) for k, v in recorded.items() if previous.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ConfigError("--resume", f"{run} holds a different run ({detail}); use another --out or --overwrite")
        for stale in run.glob(".*.tmp"):  # staging left by an interrupted save
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        return RunPlace(target=run, work=run)
    if _holds_run(run) and not overwrite:
        what = "a run" if existing.is_file() else "files"
        raise ConfigError("--out", f"{run} already holds {what}; pass --resume to continue it or --overwrite to replace it")
    place = plan_run_dir(out, overwrite=overwrite)
    if place.staged and place.work.exists():
        shutil.rmtree(place.work)
    return place


def lock_path(target: Path) -> Path:
    """The lock file of the run at ``target``: beside it, so that it survives the renames of an
    overwrite and is never one of the run's own files."""
    return target.parent / f".{target.name}.lock"


def _lock_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        return f"pid {int(holder['pid'])}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold_run(out: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Hold the exclusive lock of the run at ``out`` for the ``with`` block; a ``flag``
    ConfigError when another process (or another ``with`` in this one) holds it.

    The lock is ``flock(LOCK_EX | LOCK_NB)`` on :func:`lock_path`, which records the holder's pid.
    On release the lock file is removed; a process that opened the file just before then finds
    (after locking) that the path no longer names its file and starts over, so two holders can
    never each lock a different file of the same name. Directories created for the lock file are
    removed again when the block leaves nothing in them (a run refused for bad input leaves no
    empty folders). Without ``fcntl`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield Path(out)
        return
    target = check_output_dir(out, flag)
    created: list[Path] = []
    parent = target.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(target)
    try:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(flag, f"{target} is being written by another lwlora run ({_lock_holder(path)}); wait for it to finish, or use another {flag}") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file as we opened it: lock the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode())
            yield target
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)
    finally:
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()


def finish_run(place: RunPlace) -> Path:
    """Make the finished run in ``place.work`` the run at ``place.target``. When staged, the old
    run is renamed aside, the new one renamed into place, then the old one removed: at every
    moment one complete run is at RUN or about to be (the rename window)."""
    apply_umask(place.work)
    if not place.staged:
        return place.target
    old = place.target.parent / f".{place.target.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    place.target.rename(old)
    place.work.rename(place.target)
    shutil.rmtree(old)
    return place.target


def write_config(run: Path, config_json: dict[str, Any]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / CONFIG_FILE, config_json)


def publish_directory(run: Path, name: str, staging: Path) -> Path:
    """Move a fully written ``staging`` directory to ``run/name`` (replacing an old one) by renames,
    so ``run/name`` is never half-written; its files get the umask's permissions."""
    apply_umask(staging)
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


def read_trainer_state(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's ``trainer_state.json``, or None when it is missing or cut short. The
    Trainer writes that file last (after weights, optimizer, scheduler and RNG state), so its
    presence, parseable and naming the checkpoint's own step, marks a complete checkpoint."""
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    match = _CHECKPOINT.match(checkpoint.name)
    if not isinstance(state, dict) or match is None or state.get("global_step") != int(match.group(1)):
        return None
    return state


def last_checkpoint(run: Path, *, remove_incomplete: bool = True) -> str | None:
    """The newest complete checkpoint in ``run/checkpoints``. Newer incomplete ones (a kill while
    the Trainer was saving) are removed (``remove_incomplete``: by the main process only; the
    others skip them all the same), with a warning saying which checkpoint the run resumes from
    instead: transformers would pick the newest and fail on it."""
    directory = run / "checkpoints"
    if not directory.is_dir():
        return None
    found = sorted(((int(m.group(1)), path) for path in directory.iterdir() if path.is_dir() and (m := _CHECKPOINT.match(path.name))), reverse=True)
    incomplete = []
    chosen = None
    for _, path in found:
        if read_trainer_state(path) is not None:
            chosen = path
            break
        incomplete.append(path)
    if incomplete and remove_incomplete:
        names = ", ".join(p.name for p in incomplete)
        then = f"resuming from {chosen.name}" if chosen is not None else "no complete checkpoint is left: training starts from the beginning"
        logger.warning(f"{names} in {directory} {'is' if len(incomplete) == 1 else 'are'} incomplete (interrupted while saving) and removed; {then}")
        for stale in incomplete:
            shutil.rmtree(stale, ignore_errors=True)
    return str(chosen) if chosen is not None else None
