"""Files a reader can trust: atomic writes with the permissions the umask gives, and output paths
checked for writability before any compute starts."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lwlora.errors import ConfigError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (reading it means setting it, so briefly, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory tree) the permissions a plain ``open``/``mkdir``
    would: ``mkstemp`` and some writers (safetensors) create 0600 files, which other users of a
    shared cluster cannot read."""
    mask = current_umask()
    path = Path(path)
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in targets:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place
    (with the umask's permissions, not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _probe(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory`` (None if it can): a real attempt, since
    ``os.access`` says yes to root on a read-only filesystem."""
    try:
        fd, name = tempfile.mkstemp(prefix=".lwlora-write-check-", dir=directory)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(name)
    return None


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` can be (or become) a directory lwlora writes into; else a ``flag`` ConfigError.

    Checked before any compute: ``path`` exists and is not a directory, a component above it is a
    file, or the nearest existing directory refuses a new file (read-only, no permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(flag, f"{path} exists and is not a directory")
    base = _first_existing(path)
    if not base.is_dir():
        raise ConfigError(flag, f"{path} cannot be created: {base} is a file, not a directory")
    reason = _probe(base)
    if reason is not None:
        raise ConfigError(flag, f"{path} cannot be written: {base}: {reason}")
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` can be (or become) a file lwlora writes; else a ``flag`` ConfigError (a directory,
    a file above it, an unwritable directory)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(flag, f"{path} is a directory; give a file path such as {path / 'eval.json'}")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag)
    return path
