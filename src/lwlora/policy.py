"""Selection policies: which blocks get adapters, given one importance score per block.

Rules (``SelectionPolicy``):

- ``num_layers=k`` takes the k most important blocks; ``ratio=r`` takes floor(r × L) (the paper's
  rule, default r = 0.5); ``layers=[...]`` is an explicit list that ignores scores.
- ``include`` blocks are always selected (they count towards k); ``exclude`` blocks never are.
- Blocks with a valid score are ranked by importance, highest first; ties go to the lower index
  (``tie_break="lower-index"``) or, as the reference scripts do, to the higher one.
- Degenerate blocks (importance ``None``) rank after every scored block, so a 0/0 never ranks a
  block first; if one has to be taken to reach k, a warning says so.

The ``paper`` preset reproduces the reference scripts: encoders never select block 0 (their CLS at
the embedding output is constant, so the scripts drop the top-ranked block, which is block 0);
decoders exclude nothing; ties go to the higher index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lwlora.errors import ConfigError

TieBreak = Literal["lower-index", "higher-index"]


@dataclass(frozen=True)
class SelectionPolicy:
    """How many and which blocks to select. Exactly one of ``num_layers``, ``ratio``, ``layers``
    decides the count; with none of them, ``ratio=0.5``."""

    num_layers: int | None = None
    ratio: float | None = None
    layers: tuple[int, ...] | None = None
    include: tuple[int, ...] = ()
    exclude: tuple[int, ...] = ()
    tie_break: TieBreak = "lower-index"
    preset: str | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        given = [name for name, value in (("--num-layers", self.num_layers), ("--ratio", self.ratio), ("--layers", self.layers)) if value is not None]
        if len(given) > 1:
            raise ConfigError(given[1], f"give only one of --num-layers, --ratio and --layers (got {' and '.join(given)})")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise ConfigError("--ratio", f"must be in (0, 1], got {self.ratio}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError("--num-layers", f"must be at least 1, got {self.num_layers}")
        if self.layers is not None and len(self.layers) == 0:
            raise ConfigError("--layers", "must name at least one block")
        if self.tie_break not in ("lower-index", "higher-index"):
            raise ConfigError("--tie-break", f"must be 'lower-index' or 'higher-index', got {self.tie_break!r}")
        overlap = sorted(set(self.include) & set(self.exclude))
        if overlap:
            raise ConfigError("--exclude", f"blocks {overlap} are also in --include")

    def target_count(self, num_layers: int) -> int:
        """Number of blocks to select out of ``num_layers``."""
        if self.layers is not None:
            return len(set(self.layers))
        if self.num_layers is not None:
            if self.num_layers > num_layers:
                raise ConfigError("--num-layers", f"{self.num_layers} exceeds the model's {num_layers} blocks")
            return self.num_layers
        ratio = 0.5 if self.ratio is None else self.ratio
        count = math.floor(ratio * num_layers)
        if count < 1:
            raise ConfigError("--ratio", f"{ratio} × {num_layers} blocks rounds down to 0 blocks; use a larger ratio or --num-layers")
        return count

    def to_json(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "ratio": self.ratio,
            "layers": list(self.layers) if self.layers is not None else None,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "tie_break": self.tie_break,
            "preset": self.preset,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: dict) -> "SelectionPolicy":
        return cls(
            num_layers=data.get("num_layers"),
            ratio=data.get("ratio"),
            layers=tuple(data["layers"]) if data.get("layers") is not None else None,
            include=tuple(data.get("include", ())),
            exclude=tuple(data.get("exclude", ())),
            tie_break=data.get("tie_break", "lower-index"),
            preset=data.get("preset"),
            notes=tuple(data.get("notes", ())),
        )


def paper_policy(model_kind: str, *, ratio: float | None = None, num_layers: int | None = None) -> SelectionPolicy:
    """The reference scripts' rule (see module docstring) for an ``encoder`` or ``decoder``."""
    if model_kind == "encoder":
        return SelectionPolicy(
            ratio=ratio if num_layers is None else None,
            num_layers=num_layers,
            exclude=(0,),
            tie_break="higher-index",
            preset="paper",
            notes=("encoder: block 0 is never selected (the reference drops the top-ranked block, block 0)",),
        )
    return SelectionPolicy(
        ratio=ratio if num_layers is None else None,
        num_layers=num_layers,
        tie_break="higher-index",
        preset="paper",
        notes=("decoder: no block excluded",),
    )


def _check_indices(flag: str, indices: Sequence[int], num_layers: int) -> None:
    bad = sorted(i for i in indices if not 0 <= i < num_layers)
    if bad:
        raise ConfigError(flag, f"blocks {bad} are out of range; the model has blocks 0..{num_layers - 1}")


def rank_blocks(importances: Sequence[float | None], tie_break: TieBreak = "lower-index") -> list[int]:
    """Block indices ordered from most to least important; ``None`` (degenerate) last, by index."""
    sign = 1 if tie_break == "lower-index" else -1
    scored = sorted((i for i, v in enumerate(importances) if v is not None), key=lambda i: (-importances[i], sign * i))
    degenerate = [i for i, v in enumerate(importances) if v is None]
    return scored + degenerate


def select_blocks(importances: Sequence[float | None], policy: SelectionPolicy) -> tuple[list[int], list[str]]:
    """Apply ``policy`` to per-block importances.

    Returns:
        (sorted selected block indices, warnings)
    """
    num_layers = len(importances)
    _check_indices("--include", policy.include, num_layers)
    _check_indices("--exclude", policy.exclude, num_layers)
    if policy.layers is not None:
        _check_indices("--layers", policy.layers, num_layers)
        return sorted(set(policy.layers)), []

    count = policy.target_count(num_layers)
    if len(policy.include) > count:
        raise ConfigError("--include", f"{len(policy.include)} included blocks exceed the {count} blocks to select")
    available = num_layers - len(set(policy.exclude))
    if count > available:
        count_flag = "--num-layers" if policy.num_layers is not None else "--ratio"
        if policy.preset is not None:
            raise ConfigError(
                count_flag,
                f"asks for {count} of {num_layers} blocks, but --preset {policy.preset} excludes blocks "
                f"{sorted(set(policy.exclude))}; at most {available} can be selected",
            )
        raise ConfigError(
            "--exclude" if policy.exclude else count_flag,
            f"cannot select {count} blocks when {len(set(policy.exclude))} of {num_layers} are excluded",
        )
    chosen = list(dict.fromkeys(policy.include))
    for index in rank_blocks(importances, policy.tie_break):
        if len(chosen) == count:
            break
        if index in policy.exclude or index in chosen:
            continue
        chosen.append(index)
    warnings = []
    forced = sorted(i for i in chosen if importances[i] is None and i not in policy.include)
    if forced:
        warnings.append(
            f"blocks {forced} have no valid score (degenerate) but were selected to reach {count} blocks; "
            "try --pooling mean or fewer layers"
        )
    return sorted(chosen), warnings


#: Selections made by a rule rather than by scores (``lwlora select --scorer NAME``,
#: ``lwlora train --layers NAME``): the paper's all-layer baseline and the obvious controls.
RULES = ("all", "first", "last", "random")


def rule_blocks(rule: str, num_layers: int, policy: SelectionPolicy, *, seed: int = 0) -> list[int]:
    """``all`` blocks; the k ``first`` / ``last`` blocks; k blocks drawn at ``random`` with
    ``random.Random(seed)`` — k from ``policy`` (floor(ratio × L) or num_layers)."""
    import random

    if rule == "all":
        return list(range(num_layers))
    count = policy.target_count(num_layers)
    if rule == "first":
        return list(range(count))
    if rule == "last":
        return list(range(num_layers - count, num_layers))
    if rule == "random":
        return sorted(random.Random(seed).sample(range(num_layers), count))
    raise ConfigError("--layers", f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
