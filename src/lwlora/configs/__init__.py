"""Shipped ``lwlora run`` configs: ``demo`` (the embedded CPU default), ``paper/*`` (the paper's
setups) and ``small/*`` (real small models on ../shared/data). A config is a YAML mapping of
``TrainConfig`` fields; ``load_config`` takes a shipped name or a file path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lwlora.errors import ConfigError

CONFIG_DIR = Path(__file__).parent


def list_configs() -> list[str]:
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def load_config(name_or_path: str) -> tuple[dict[str, Any], str]:
    """(mapping, source) for a YAML file or a shipped config name."""
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        shipped = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
        if not shipped.is_file():
            raise ConfigError("--config", f"{name_or_path!r} is neither a file nor a shipped config (see lwlora run --list)")
        path = shipped
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path}: expected a mapping of options at the top level")
    return resolve_paths(data, path.parent), str(path)


#: the keys whose relative paths are read against the config file's folder
PATH_KEYS = ("data", "selection")


def resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``data`` with each relative path of :data:`PATH_KEYS` read against ``folder`` (the config
    file's) when it names something there, so a config runs from any working directory; a value
    that names nothing there (a Hub dataset such as ``nyu-mll/glue:rte``, or a path relative to the
    working directory) is kept as written. A ``DIR:split`` spec resolves its ``DIR``."""
    resolved = dict(data)
    for key in PATH_KEYS:
        value = resolved.get(key)
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        base, sep, split = value.partition(":") if ":" in value and not (folder / value).exists() else (value, "", "")
        candidate = folder / base
        if candidate.exists():
            resolved[key] = str(candidate.resolve()) + (sep + split if sep else "")
    return resolved
