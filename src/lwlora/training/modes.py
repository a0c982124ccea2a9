"""Named training modes: ``--preset recommended`` (``lwlora train``, ``lwlora run``'s YAML).

``recommended`` is the half budget lwlora's own benchmark supports (docs/benchmarks.md, section
3c: four cases where the budget binds, each method at its own validated learning rate, 3-9
seeds): **every block gets an adapter, at the rank whose adapter parameters equal those of
floor(ratio × L) blocks at ``--r``** (``ratio`` 0.5 unless ``--ratio``
says otherwise). It is the same run as

    lwlora train MODEL --layers all --budget-from-ratio RATIO

and is expanded into exactly those fields before the config is checked, so ``train_config.json``
records what ran. At half of all-layer LoRA's parameters it lost the least quality of every half
budget measured (2.2 +/- 0.6 points below all-layer LoRA on average; the next two, EVA's ranks and
warm-up-then-prune, 0.4 +/- 0.6 and 0.8 +/- 0.7 points more, about one standard error; the paper's
CKA half 2.0 more), so the mode chooses no blocks; it does not reach the benchmark's goal (within
0.5 points of all-layer LoRA on average). The numbers, and the command that judges them
(``benchmarks/goal.py``), are in docs/benchmarks.md.

The module imports no torch (a ``TrainConfig`` is built without it).
"""

from __future__ import annotations

from typing import Any

from lwlora.errors import ConfigError

RECOMMENDED = "recommended"
#: the share of the blocks whose adapter parameters the recommended mode spends, unless --ratio is given
RECOMMENDED_RATIO = 0.5

#: fields the recommended mode sets itself, with what a user would give instead
_FIXED_BY_RECOMMENDED: dict[str, str] = {
    "layers": "it adapts every block",
    "num_layers": "give --ratio for the budget",
    "param_budget": "give --ratio for the budget",
    "budget_from_ratio": "give --ratio for the budget",
    "auto": "it adapts every block",
    "include": "it adapts every block",
    "exclude": "it adapts every block",
    "selection": "it adapts every block",
    "prune_at": "it trains every block throughout",
    "dynamic_blocks": "it trains every block throughout",
}


def recommended_flags(ratio: float = RECOMMENDED_RATIO) -> tuple[str, ...]:
    """The ``lwlora train`` flags ``--preset recommended [--ratio ratio]`` stands for."""
    return ("--layers", "all", "--budget-from-ratio", str(ratio))


def expand_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (``TrainConfig``'s keywords, flat as the CLI and YAML give them) with a training
    preset replaced by the fields it stands for; other presets (``paper``, a selection preset)
    and no preset pass through unchanged.

    ``preset=recommended`` → ``layers="all"``, ``budget_from_ratio=ratio`` (default 0.5) and no
    ``ratio``. A field the mode sets itself, given as well, is a ``ConfigError`` naming its flag;
    so are ``--rank-allocation importance``, ``--granularity sublayer`` and ``--method full``."""
    if values.get("preset") != RECOMMENDED:
        return values
    given = {k: v for k, v in values.items() if k != "preset"}
    for name, instead in _FIXED_BY_RECOMMENDED.items():
        value = given.get(name)
        if value is not None and value is not False and value != () and not (name == "layers" and str(value) == "all"):
            raise ConfigError(f"--{name.replace('_', '-')}", f"does not combine with --preset recommended ({instead})")
    for name, refused, why in (("rank_allocation", "importance", "it gives every block the same rank"),
                               ("granularity", "sublayer", "it adapts whole blocks"),
                               ("method", "full", "it trains adapters")):
        if given.get(name) == refused:
            raise ConfigError(f"--{name.replace('_', '-')}", f"{refused} does not combine with --preset recommended ({why})")
    ratio = given.pop("ratio", None)
    ratio = RECOMMENDED_RATIO if ratio is None else ratio
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError("--ratio", f"must be a number in (0, 1], got {ratio!r}") from None
    if not 0 < ratio <= 1:
        raise ConfigError("--ratio", f"with --preset recommended, the share of the blocks' parameters to spend: must be in (0, 1], got {ratio}")
    given.update(layers="all", budget_from_ratio=ratio)
    return given
