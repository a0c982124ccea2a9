"""``LayerSelection``: the result of layer selection, and its versioned JSON form ``selection.json``.

Schema (version 1)::

    {
      "schema_version": 1,
      "model": "<hub id or path>", "gguf_file": null | "<file>", "model_kind": "encoder" | "decoder",
      "layers_path": "encoder.layer", "tower": "language", "num_layers": 6,
      "block_linear_modules": ["attention.self.query", ...],
      "scorer": "cka", "similarity_name": "cka", "pooling": "cls", "feature_norm": "none",
      "num_samples": 128, "data": "<data spec>", "data_fingerprint": "sha256:…",
      "policy": {...},
      "layers": [{"index": 0, "cka": null, "similarity": null, "importance": null,
                  "degenerate": true, "reason": "...", "fallback": null}, ...],
      "selected": [1, 3, 5], "one_hot": "010101",
      "warnings": [...], "diagnostics": {...}, "cost": {...},
      "device": "cuda:0" | "cpu" | null, "dtype": "float32" | "bfloat16 (autocast over float32 weights)" | null,
      "versions": {...}, "timings": {...}, "created": "<ISO 8601>"
    }

``cka`` holds the CKA value for the CKA scorers and ``null`` for the cosine scorers, whose raw
value is in ``similarity``. ``one_hot`` is the reference scripts' string: character i is ``1`` when
block i is selected.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lwlora.io import atomic_write_json

SCHEMA_VERSION = 1
#: written when the selection is made of sub-layer units (``units``): a reader that knows only
#: version 1 would put adapters on every module of a selected block, so it must refuse the file
UNITS_SCHEMA_VERSION = 2
READABLE_VERSIONS = (SCHEMA_VERSION, UNITS_SCHEMA_VERSION)


@dataclass(frozen=True)
class LayerRecord:
    index: int
    cka: float | None
    similarity: float | None
    importance: float | None
    degenerate: bool
    reason: str | None = None
    #: set when the block was scored another way than configured, e.g. "mean" pooling
    fallback: str | None = None


@dataclass
class LayerSelection:
    """Which blocks of which model get adapters, and the evidence for it."""

    model: str
    layers_path: str
    num_layers: int
    layers: list[LayerRecord]
    selected: list[int]
    scorer: str = "cka"
    similarity_name: str = "cka"
    pooling: str = "cls"
    num_samples: int = 0
    data: str | None = None
    data_fingerprint: str | None = None
    model_kind: str = "decoder"
    tower: str = "language"
    gguf_file: str | None = None
    block_linear_modules: list[str] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: extra evidence: near-identity ties, the selection under the other feature normalisation, ...
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: lwlora.selection.cost.SelectionCost of the selection (at the adapter rank/targets it assumed)
    cost: dict[str, Any] = field(default_factory=dict)
    feature_norm: str = "none"
    #: where the scores were computed ("cuda:0"; "cpu"; several devices comma-separated) and in
    #: which dtype ("bfloat16 (autocast over float32 weights)"); None for rule-made selections
    device: str | None = None
    dtype: str | None = None
    #: ``--granularity sublayer``: one record per unit (block i's attention and MLP halves) with
    #: its score, its LoRA parameters and whether it is adapted; ``selected`` then lists the blocks
    #: with an adapted unit. None for block selections.
    units: list[dict[str, Any]] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    created: str | None = None

    def __post_init__(self) -> None:
        if len(self.layers) != self.num_layers:
            raise ValueError(f"selection has {len(self.layers)} layer records for {self.num_layers} blocks")
        if self.units is not None:
            blocks = sorted({int(u["block"]) for u in self.units if u.get("selected")})
            if blocks != sorted(set(self.selected)):
                raise ValueError(f"selection is inconsistent: blocks with an adapted unit {blocks} differ from selected {sorted(set(self.selected))}")
        self.selected = sorted(set(self.selected))
        bad = [i for i in self.selected if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"selected blocks {bad} are outside 0..{self.num_layers - 1}")

    @property
    def one_hot(self) -> str:
        chosen = set(self.selected)
        return "".join("1" if i in chosen else "0" for i in range(self.num_layers))

    @property
    def selected_units(self) -> dict[int, list[str]] | None:
        """Block -> its adapted parts (``attention``, ``mlp``), or None for a block selection."""
        if self.units is None:
            return None
        chosen: dict[int, list[str]] = {}
        for unit in self.units:
            if unit.get("selected"):
                chosen.setdefault(int(unit["block"]), []).append(unit["part"])
        return chosen

    @property
    def importances(self) -> list[float | None]:
        return [record.importance for record in self.layers]

    @property
    def degenerate_blocks(self) -> list[int]:
        return [record.index for record in self.layers if record.degenerate]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        units = {"units": data["units"]} if self.units is not None else {}
        return {
            "schema_version": UNITS_SCHEMA_VERSION if self.units is not None else SCHEMA_VERSION,
            "model": data["model"],
            "gguf_file": data["gguf_file"],
            "model_kind": data["model_kind"],
            "layers_path": data["layers_path"],
            "tower": data["tower"],
            "num_layers": data["num_layers"],
            "block_linear_modules": data["block_linear_modules"],
            "scorer": data["scorer"],
            "similarity_name": data["similarity_name"],
            "pooling": data["pooling"],
            "feature_norm": data["feature_norm"],
            "num_samples": data["num_samples"],
            "data": data["data"],
            "data_fingerprint": data["data_fingerprint"],
            "policy": data["policy"],
            "layers": data["layers"],
            "selected": data["selected"],
            "one_hot": self.one_hot,
            **units,
            "warnings": data["warnings"],
            "diagnostics": data["diagnostics"],
            "cost": data["cost"],
            "device": data["device"],
            "dtype": data["dtype"],
            "versions": data["versions"],
            "timings": data["timings"],
            "created": data["created"],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerSelection":
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported selection schema_version {version!r}; this lwlora reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        fields = dict(data)
        fields.pop("schema_version")
        one_hot = fields.pop("one_hot", None)
        fields["layers"] = [LayerRecord(**record) for record in fields["layers"]]
        selection = cls(**fields)
        if one_hot is not None and one_hot != selection.one_hot:
            raise ValueError(f"selection.json is inconsistent: one_hot {one_hot!r} does not match selected {selection.selected}")
        return selection

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``selection.json`` atomically; a directory path gets ``selection.json`` inside."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "selection.json"
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerSelection":
        path = Path(path)
        if path.is_dir():
            path = path / "selection.json"
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def library_versions() -> dict[str, str]:
    """The versions a selection was made with (lwlora, Python, torch, transformers, peft)."""
    import torch

    import lwlora

    versions = {"lwlora": lwlora.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def model_fields(stack: Any, *, model_label: str, gguf_file: str | None, model_kind: str) -> dict[str, Any]:
    """The :class:`LayerSelection` fields that describe the model and its block stack (every
    selection, scored or by rule, records them the same way)."""
    return {
        "model": model_label,
        "gguf_file": gguf_file,
        "model_kind": model_kind,
        "layers_path": stack.path,
        "tower": stack.tower,
        "num_layers": stack.num_layers,
        "block_linear_modules": stack.block_linear_modules(),
    }


def rule_selection(options: Any, stack: Any, model_kind: str, selected: list[int], rule: str, *, model_label: str, gguf_file: str | None = None) -> LayerSelection:
    """A selection made by a rule rather than by scores (every importance ``None``): ``all``,
    ``first``, ``last``, ``random``, ``explicit`` blocks. ``options``: the SelectOptions (its
    ratio, count, seed and the adapter the cost assumes)."""
    from lwlora.selection.cost import adapter_targets, selection_cost

    suffixes, exact = adapter_targets(stack, options.target_modules)
    return LayerSelection(
        **model_fields(stack, model_label=model_label, gguf_file=gguf_file, model_kind=model_kind),
        scorer=rule,
        similarity_name="none",
        pooling="none",
        layers=[LayerRecord(index=i, cka=None, similarity=None, importance=None, degenerate=False) for i in range(stack.num_layers)],
        selected=selected,
        policy={"rule": rule, "ratio": options.ratio, "num_layers": options.num_layers, "seed": options.seed},
        cost=selection_cost(stack, selected, suffixes, options.r, exact=exact, seq_len=options.max_length).to_json(),
        versions=library_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
