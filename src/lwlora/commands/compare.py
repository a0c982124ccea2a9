"""``lwlora compare``: run several layer-selection methods on one model and one data set, and
compare what they select (Jaccard overlap, cost), optionally by training each selection.

Python API::

    result = compare_selections("model-dir", "data.jsonl", ["cka", "bi", "fim", "last"], num_layers=4)
    result.selections["cka"].selected, result.jaccard["cka"]["bi"], result.costs["last"]
    write_comparison(result, "out/")          # comparison.json, comparison.md, comparison.png
    train_comparison(result, "out/", seeds=[0, 1, 2], max_steps=100)   # adds result.training

The bare model is loaded once for the similarity scorers and the rules; the gradient scorers
(``fim``, ``gradnorm``) load the model with its task head themselves, as ``lwlora select`` does.

Output directory::

    DIR/comparison.json        selections (one-hot), Jaccard matrix, costs, training summary
    DIR/comparison.md          the same as markdown tables
    DIR/comparison.png         methods x blocks grid (filled = selected) and the Jaccard heatmap
    DIR/selections/<m>.json    each method's selection.json
    DIR/runs/<m>-seed<k>/      with --train: one training run per method and seed
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lwlora.errors import ConfigError
from lwlora.fields import coerce_fields, init_holding, option
from lwlora.io import atomic_write, atomic_write_json, atomic_write_text
from lwlora.selection.artifact import LayerSelection
from lwlora.selection.options import SelectOptions

DEFAULT_METHODS = ("cka", "cka-debiased", "fim", "bi", "angular", "random", "last")
#: evaluation bookkeeping that the markdown training table leaves out (kept in comparison.json)
_THROUGHPUT_KEYS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "num_input_tokens_seen")


def valid_methods() -> tuple[str, ...]:
    from lwlora.selection.options import ALL_SCORERS

    return tuple(ALL_SCORERS)


def parse_methods(methods: str | list[str] | tuple[str, ...]) -> list[str]:
    """Validate a method list (``"cka,bi"`` or a list): known, non-empty, no duplicates."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = [m for m in names if m]
    valid = valid_methods()
    if not names:
        raise ConfigError("--methods", f"is empty; give a comma-separated list of {', '.join(valid)}")
    unknown = [m for m in names if m not in valid]
    if unknown:
        raise ConfigError("--methods", f"unknown method(s) {', '.join(repr(m) for m in unknown)}; choose from {', '.join(valid)}")
    duplicated = sorted({m for m in names if names.count(m) > 1})
    if duplicated:
        raise ConfigError("--methods", f"method(s) given more than once: {', '.join(duplicated)}")
    return names


def parse_seeds(seeds: str | list[int] | tuple[int, ...]) -> list[int]:
    """Validate ``--seeds``: comma-separated integers, at least one, no duplicates."""
    if isinstance(seeds, str):
        parts = [p.strip() for p in seeds.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError("--seeds", f"expected comma-separated integers like 0,1,2, got {seeds!r}") from None
    else:
        values = list(seeds)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError("--seeds", f"expected integers, got {values!r}")
    if not values:
        raise ConfigError("--seeds", "expected at least one seed")
    if len(set(values)) != len(values):
        raise ConfigError("--seeds", f"seeds given more than once: {values}")
    return values


def jaccard(a: list[int] | set[int], b: list[int] | set[int]) -> float:
    """|A ∩ B| / |A ∪ B|; 1.0 for two empty sets."""
    a, b = set(a), set(b)
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def jaccard_matrix(selections: dict[str, LayerSelection]) -> dict[str, dict[str, float]]:
    return {m: {n: round(jaccard(s.selected, t.selected), 6) for n, t in selections.items()} for m, s in selections.items()}


def selection_cost(selection: LayerSelection) -> dict[str, Any]:
    """Lowest adapted block, number of selected blocks, and the backward depth (blocks the
    backward pass runs through: num_layers - lowest; 0 when nothing is selected)."""
    lowest = min(selection.selected) if selection.selected else None
    return {
        "lowest_block": lowest,
        "num_selected": len(selection.selected),
        "num_layers": selection.num_layers,
        "backward_depth": 0 if lowest is None else selection.num_layers - lowest,
    }


@dataclass
class ComparisonResult:
    model: str
    data: str
    methods: list[str]
    selections: dict[str, LayerSelection]
    jaccard: dict[str, dict[str, float]]
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: filled by :func:`train_comparison`: {"seeds", "settings", "runs", "summary"}
    training: dict[str, Any] | None = None
    created: str | None = None

    @property
    def num_layers(self) -> int:
        return next(iter(self.selections.values())).num_layers if self.selections else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "methods": list(self.methods),
            "num_layers": self.num_layers,
            "settings": self.settings,
            "selections": {
                m: {"scorer": s.scorer, "selected": s.selected, "one_hot": s.one_hot, "importances": s.importances, "warnings": s.warnings}
                for m, s in self.selections.items()
            },
            "costs": self.costs,
            "jaccard": self.jaccard,
            "timings": self.timings,
            "training": self.training,
            "created": self.created,
        }


def compare_selections(
    model: str,
    data: str,
    methods: list[str] | str = DEFAULT_METHODS,
    *,
    options: Any = None,
    device: str = "auto",
    dtype: str = "auto",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    task: str | None = None,
    progress: bool = True,
    **option_values: Any,
) -> ComparisonResult:
    """Select blocks with every method in ``methods`` and compare the selections.

    ``options``: the :class:`~lwlora.selection.options.SelectOptions` every method shares (its
    scorer/rule is each method's); its fields may instead be given flat (``ratio=0.5``,
    ``num_samples=64``, ``seed=0``, ...)."""
    from lwlora.commands.select import SelectConfig, select_layers
    from lwlora.selection.gradients import GRADIENT_SCORERS
    from lwlora.selection.options import SelectOptions

    methods = parse_methods(methods)
    options = dataclasses.replace(options, **option_values) if options is not None else SelectOptions(**option_values)
    ratio, num_layers, num_samples, seed, pooling = options.ratio, options.num_layers, options.num_samples, options.seed, options.pooling
    # every config first: bad options fail before any model is loaded
    configs = {
        m: SelectConfig(model, data, options=options.with_method(m), task=task, label_column=label_column, device=device, dtype=dtype,
                        text_column=text_column, text_pair_column=text_pair_column, progress=progress)
        for m in methods
    }
    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded = None
    if any(m not in GRADIENT_SCORERS for m in methods):
        from lwlora.models import load_model

        tick = time.perf_counter()
        loaded = load_model(model, dtype=dtype, device=device)
        timings["load_model_s"] = round(time.perf_counter() - tick, 4)
    selections: dict[str, LayerSelection] = {}
    for m in methods:
        tick = time.perf_counter()
        if m in GRADIENT_SCORERS:
            selections[m] = select_layers(configs[m])
        else:
            selections[m] = select_layers(configs[m], model=loaded.model, tokenizer=loaded.tokenizer, model_kind=loaded.kind)
        timings[f"{m}_s"] = round(time.perf_counter() - tick, 4)
    counts = {s.num_layers for s in selections.values()}
    if len(counts) > 1:  # cannot happen for one model, but a mixed comparison would be meaningless
        raise ValueError(f"methods saw different block counts: {counts}")
    timings["total_s"] = round(time.perf_counter() - started, 4)
    return ComparisonResult(
        model=model,
        data=data,
        methods=methods,
        selections=selections,
        jaccard=jaccard_matrix(selections),
        costs={m: selection_cost(s) for m, s in selections.items()},
        settings={"ratio": ratio, "num_layers": num_layers, "num_samples": num_samples, "seed": seed, "pooling": pooling, "task": task,
                  "model_kind": loaded.kind if loaded is not None else next(iter(selections.values())).model_kind},
        timings=timings,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


# ------------------------------------------------------------------------------------------------
# training each selection
# ------------------------------------------------------------------------------------------------


def save_selections(result: ComparisonResult, out: str | Path) -> dict[str, Path]:
    """DIR/selections/<method>.json for every method."""
    directory = Path(out) / "selections"
    return {m: s.save(directory / f"{m}.json") for m, s in result.selections.items()}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            if isinstance(value, (np.floating, np.integer)):
                value = value.item()
            else:
                return None
        except ImportError:  # pragma: no cover
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean ± population std over seeds of every final metric of every eval split,
    trainable parameters and train time. ``runs``: [{"method", "seed", "final", "params", "runtime_s"}]."""
    summary: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        metrics: dict[str, dict[str, list[float]]] = {}
        for r in mine:
            for split, values in (r["final"] or {}).items():
                if not isinstance(values, dict):
                    continue
                for name, value in values.items():
                    number = _number(value)
                    if number is not None:
                        metrics.setdefault(split, {}).setdefault(name, []).append(number)
        trainable = [float(r["params"]["trainable"]) for r in mine if r.get("params")]
        runtime = [float(r["runtime_s"]) for r in mine if r.get("runtime_s") is not None]
        summary[method] = {
            "seeds": [r["seed"] for r in mine],
            "num_seeds": len(mine),
            "final": {split: {name: _mean_std(v) for name, v in names.items()} for split, names in metrics.items()},
            "trainable_params": _mean_std(trainable) if trainable else None,
            "train_runtime_s": _mean_std(runtime) if runtime else None,
        }
    return summary


def train_comparison(
    result: ComparisonResult,
    out: str | Path,
    *,
    seeds: list[int] | str = (0, 1, 2),
    task: str | None = None,
    epochs: float = 3.0,
    max_steps: int | None = None,
    lr: float = 2e-4,
    r: int = 8,
    alpha: float | None = None,
    method: str = "lora",
    train_batch_size: int = 16,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    target_modules: str = "auto",
    max_length: int = 512,
    device: str = "auto",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every method's selection with every seed under identical hyperparameters, into
    DIR/runs/<method>-seed<k>; sets and returns ``result.training``."""
    from lwlora.training.config import TrainConfig
    from lwlora.training.trainer import train

    seeds = parse_seeds(seeds)
    task = task or ("classification" if result.settings.get("model_kind") == "encoder" else "instruction")
    out = Path(out)
    common = {
        "model": result.model, "task": task, "data": result.data, "layers": "cka", "epochs": epochs, "max_steps": max_steps, "lr": lr, "r": r, "alpha": alpha,
        "method": method, "batch_size": train_batch_size, "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples,
        "target_modules": target_modules, "max_length": max_length, "device": device, "text_column": text_column,
        "text_pair_column": text_pair_column, "label_column": label_column, "overwrite": overwrite, "progress": progress,
    }
    paths = {m: out / "selections" / f"{m}.json" for m in result.selections}
    # validate every config (TrainConfig checks its flags) before any run starts
    configs = [
        (m, seed, TrainConfig(out=str(out / "runs" / f"{m}-seed{seed}"), selection=str(paths[m]), seed=seed, **common))
        for m in result.selections
        for seed in seeds
    ]
    empty = [m for m, s in result.selections.items() if not s.selected]
    if empty:
        raise ConfigError("--methods", f"method(s) {', '.join(empty)} selected no blocks: nothing to train")
    save_selections(result, out)
    runs = []
    for m, seed, config in configs:
        trained = train(config)
        metrics = trained.metrics
        runs.append({
            "method": m,
            "seed": seed,
            "run_dir": str(trained.run_dir),
            "final": metrics.get("final", {}),
            "params": metrics.get("params"),
            "runtime_s": metrics.get("train", {}).get("runtime_s"),
        })
    settings = {k: v for k, v in common.items() if k not in ("model", "data", "layers", "overwrite", "progress")}
    result.training = {"seeds": seeds, "settings": settings, "runs": runs, "summary": summarise_runs(runs)}
    return result.training


# ------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", *("| " + " | ".join(row) + " |" for row in rows)]


def _fmt_ms(stat: dict[str, float] | None, digits: int = 4) -> str:
    if stat is None:
        return "—"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_comparison(result: ComparisonResult) -> str:
    """Markdown: the selection table, the Jaccard matrix and (after training) the mean ± std table."""
    lines = [f"# Layer selection comparison: {result.model}", "", f"data: `{result.data}` · {result.num_layers} blocks", "", "## Selections", ""]
    rows = []
    for m in result.methods:
        s, cost = result.selections[m], result.costs[m]
        lowest = "—" if cost["lowest_block"] is None else str(cost["lowest_block"])
        rows.append([m, ", ".join(map(str, s.selected)) or "—", f"`{s.one_hot}`", lowest, str(cost["num_selected"]), str(cost["backward_depth"])])
    lines += _md_table(["method", "selected blocks", "one-hot", "lowest block", "count", "backward depth"], rows)
    lines += ["", "## Jaccard overlap", ""]
    lines += _md_table(["", *result.methods], [[m, *(f"{result.jaccard[m][n]:.2f}" for n in result.methods)] for m in result.methods])
    if result.training:
        summary = result.training["summary"]
        columns = sorted({(split, name) for stats in summary.values() for split, names in stats["final"].items() for name in names if name not in _THROUGHPUT_KEYS})
        lines += ["", f"## Training (mean ± std over seeds {', '.join(map(str, result.training['seeds']))})", ""]
        header = ["method", "seeds", *(f"{split} {name}" for split, name in columns), "trainable params", "train time (s)"]
        rows = []
        for m, stats in summary.items():
            row = [m, str(stats["num_seeds"])]
            row += [_fmt_ms(stats["final"].get(split, {}).get(name)) for split, name in columns]
            row += [_fmt_ms(stats["trainable_params"], 0), _fmt_ms(stats["train_runtime_s"], 2)]
            rows.append(row)
        lines += _md_table(header, rows)
    return "\n".join(lines) + "\n"


def plot_comparison(result: ComparisonResult, path: str | Path) -> None:
    """Left: methods × blocks, a filled cell is a selected block. Right: the Jaccard heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods, n = result.methods, result.num_layers
    grid = np.zeros((len(methods), n))
    for i, m in enumerate(methods):
        for b in result.selections[m].selected:
            grid[i, b] = 1.0
    overlap = np.array([[result.jaccard[m][k] for k in methods] for m in methods])
    height = max(2.8, 0.4 * len(methods) + 1.6)
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(5.0, 0.25 * n + 2.5) + max(3.5, 0.5 * len(methods) + 2), height), dpi=120,
                                      gridspec_kw={"width_ratios": [max(5.0, 0.25 * n + 2.5), max(3.5, 0.5 * len(methods) + 2)]})
    left.imshow(grid, cmap="Blues", vmin=0, vmax=1.25, aspect="auto", interpolation="nearest")
    left.set_yticks(range(len(methods)), methods, fontsize=8)
    ticks = list(range(n)) if n <= 40 else list(range(0, n, max(1, n // 20)))
    left.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    left.set_xticks(np.arange(-0.5, n, 1), minor=True)
    left.set_yticks(np.arange(-0.5, len(methods), 1), minor=True)
    left.grid(which="minor", color="#999999", linewidth=0.4)
    left.tick_params(which="minor", length=0)
    left.set_xlabel("block")
    left.set_title(f"selected blocks ({Path(result.model).name or result.model})", fontsize=9)
    image = right.imshow(overlap, cmap="viridis", vmin=0, vmax=1)
    right.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
    right.set_yticks(range(len(methods)), methods, fontsize=8)
    if len(methods) <= 12:
        for i in range(len(methods)):
            for j in range(len(methods)):
                right.text(j, i, f"{overlap[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if overlap[i, j] < 0.6 else "black")
    right.set_title("Jaccard overlap", fontsize=9)
    fig.colorbar(image, ax=right, fraction=0.046, pad=0.04)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def write_comparison(result: ComparisonResult, out: str | Path) -> dict[str, Path]:
    """DIR/comparison.json, DIR/comparison.md, DIR/comparison.png and DIR/selections/<m>.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "comparison.json", "markdown": out / "comparison.md", "plot": out / "comparison.png"}
    markdown = format_comparison(result)
    plot_comparison(result, paths["plot"])
    save_selections(result, out)
    atomic_write_text(paths["markdown"], markdown)
    atomic_write_json(paths["json"], _json_safe(result.to_json()))
    return paths


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    number = _number(value) if not isinstance(value, (str, int, type(None))) else None
    return number if number is not None else value


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class CompareConfig:
    """What ``lwlora compare`` takes (each field a flag of the same name; ``options``' fields too)."""

    model: str = option(help="Hub id, local directory, or builtin:minilm / builtin:smollm2")
    data: str = option(help="data spec, as for lwlora select (labels needed for fim/gradnorm and --train)")
    out: str = option(help="output directory")
    methods: str = option(",".join(DEFAULT_METHODS), "comma-separated methods: scorers (cka, cka-debiased, bi, angular, fim, gradnorm) and rules (all, first, last, random)")
    task: str | None = option(None, "task for fim/gradnorm and --train (default: classification for encoders, instruction for decoders)")
    text_column: str | None = option(None, "column holding the text (default: detected)")
    text_pair_column: str | None = option(None, "second text column for sentence pairs")
    label_column: str | None = option(None, "classification: the label column")
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps")
    dtype: str = option("auto", "auto, float32, bfloat16, float16")
    progress: bool = option(True, "show progress bars")
    # --train
    train: bool = option(False, "train every selection with every seed and tabulate mean ± std")
    seeds: str = option("0,1,2", "comma-separated training seeds")
    epochs: float = option(3.0, "training epochs")
    max_steps: int | None = option(None, "stop each run after this many steps")
    lr: float = option(2e-4, "learning rate")
    alpha: float | None = option(None, "LoRA alpha (default 2 r)")
    method: str = option("lora", "adapter method (lora, pissa, dora, rslora, olora, eva)")
    train_batch_size: int = option(16, "training batch per device")
    max_train_samples: int | None = option(None, "use at most this many training examples")
    max_eval_samples: int | None = option(None, "evaluate on at most this many examples")
    overwrite: bool = option(False, "replace existing runs under DIR/runs")
    options: SelectOptions = option(SelectOptions(), "what every method shares", cli=False)

    def __init__(self, model: str, data: str, out: str, **values: Any) -> None:
        init_holding(self, {"model": model, "data": data, "out": out, **values}, nested="options", nested_type=SelectOptions)

    def __post_init__(self) -> None:
        coerce_fields(self, skip=("options",))
        parse_methods(self.methods)


def run(config: CompareConfig) -> int:
    """``lwlora compare``: check DIR and the training flags, select with every method, train each
    selection for every seed (``--train``), write comparison.json / .md / .png."""
    from lwlora.io import check_output_dir

    out = check_output_dir(config.out, "--out")  # before the selections: an unwritable --out fails now
    methods = parse_methods(config.methods)
    options = config.options
    seeds = parse_seeds(config.seeds) if config.train else None
    training = dict(epochs=config.epochs, max_steps=config.max_steps, lr=config.lr, r=options.r, alpha=config.alpha, method=config.method, train_batch_size=config.train_batch_size,
                    max_train_samples=config.max_train_samples, max_eval_samples=config.max_eval_samples, target_modules=options.target_modules, max_length=options.max_length)
    if config.train:
        from lwlora.training.config import TrainConfig

        # check the training flags before the (slow) selections
        TrainConfig(model=config.model, task=config.task or "classification", out=str(out / "runs" / "check"), data=config.data, selection=str(out / "selections" / "check.json"),
                    **{("batch_size" if k == "train_batch_size" else k): v for k, v in training.items()})
    result = compare_selections(config.model, config.data, methods, options=options, device=config.device, dtype=config.dtype, text_column=config.text_column,
                                text_pair_column=config.text_pair_column, label_column=config.label_column, task=config.task, progress=config.progress)
    if config.train:
        train_comparison(result, out, seeds=seeds, task=config.task, device=config.device, text_column=config.text_column, text_pair_column=config.text_pair_column,
                         label_column=config.label_column, overwrite=config.overwrite, progress=config.progress, **training)
    paths = write_comparison(result, out)
    print(format_comparison(result), end="")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0
