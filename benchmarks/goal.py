"""Does a selection method keep all-layer LoRA's quality at half the cost? The verdict over the
binding cases, from the quality benchmark's results.

The goal (the selection-science issue): over the four cases where the budget binds, with 3 seeds
per method, one method is

- on average within ``0.5`` points of all-layer LoRA:  mean_c (q̄_m,c − q̄_all,c) ≥ −0.5,
- at ≤ 0.5x all-layer LoRA's adapter parameters in every case, or, where it trains as many
  parameters, at ≤ 0.75x its step time and ≤ 0.8x its peak memory on the 7B cost case
  (``train_cost.py --case llama7b``),
- and on average ≥ 1 point above both random-50% and the equal-budget baseline:
  mean_c (q̄_m,c − q̄_b,c) ≥ 1 for b in {random-50, equal-budget},

where q̄_m,c is method m's test score in % on case c, averaged over its seeds, each method at its
own learning rate chosen on validation (only ``--protocol tuned`` results count: at one shared
rate the comparison favours the method the rate was tuned for).

Results of one case may come from several files (a search's final seeds on one machine, more
seeds on another): the final test runs of every ``--results`` file are pooled by (case, method,
seed); a run found in two files must report the same score, and the seeds of one method must
share one learning rate. A method is judged once every binding case has 3 seeds of it and of the
three baselines; until then its numbers are shown as provisional, over the cases it has.

    python benchmarks/goal.py --results benchmarks/results/quality-gpu-qwen05.json \\
        benchmarks/results/quality-cpu-minilm-rte-tuned.json --cost benchmarks/results/train-cost-gpu.json \\
        --out benchmarks/results/goal

Every Δ comes with its standard error over seeds (:func:`standard_error`); a criterion within 2
of them of its threshold is listed in ``within_noise`` (≈ in the table): more seeds could turn it.
A search widened in a later file replaces the final runs made at its old rate (:func:`superseded`).
``--cost`` takes several train_cost.py files (:func:`read_cost`); a warm-up-then-prune method's
7B step is its whole run's mean (:func:`whole_run_step`).

The mode lwlora ships, ``--preset recommended`` (``lwlora.training.modes``), is judged as the
method ``recommended``: on its own runs where a file has them, else on the runs of the method
whose recorded ``lwlora train`` flags are the ones the preset stands for (equal-budget's today;
the table says whose runs they are: :func:`add_recommended`).

Writes ``OUT.json`` (every pooled cell, the per-method averages and verdicts), ``OUT.md`` (one
table per case, then the verdicts) and ``OUT.png`` (per case: test score against adapter
parameters and against step time, both as multiples of all-layer LoRA's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

BINDING_CASES = ("qwen05/math_gsm_symbolic", "mpnet/nli_vitaminc", "minilm/rte_epistemic", "minilm/nli_vitaminc")
REFERENCE = "all-layer"
BASELINES = ("random-50", "equal-budget")
NOT_CANDIDATES = ("all-layer", "untuned", *BASELINES)
SEEDS_NEEDED = 3
MAX_GAP_TO_ALL = 0.5  # points
MAX_PARAM_FRACTION = 0.5
METRIC_MAX = 100.0  # every case's test metric is a share in %
MAX_STEP_RATIO = 0.75  # on the 7B cost case
MAX_PEAK_RATIO = 0.8
MIN_GAIN_OVER_BASELINES = 1.0  # points
#: quality.py's method -> train_cost.py's row of the 7B case (methods without a row have none)
COST_ROWS = {"all-layer": "all", "cka-50": "cka50", "equal-budget": "equal-budget", "units-50": "units50", "dynamic-50": "dynamic50", "importance-ranks": "importance-ranks", "eva-budget": "eva-budget",
             "prune-50": "prune50", "prune-rel-50": "prune50", "prune-rel-50-late": "prune50"}
#: train_cost.py's rows whose step is a pruned phase's (a run's mean step also has the warm-up: :func:`whole_run_step`)
PRUNED_ROWS = ("prune50",)


class InputError(Exception):
    """Bad input: ``flag`` and what is wrong (printed as one line, exit 2)."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")


@dataclass
class Cell:
    """One method on one case: its test scores in % by seed, and its cost as its runs measured it."""

    case: str
    method: str
    metric: str
    lr: float | None
    scores: dict[int, float] = field(default_factory=dict)
    adapter_params: list[float] = field(default_factory=list)
    step_of: dict[int, float] = field(default_factory=dict)  # seed -> its run's step time (s); its file is sources[seed]
    peak_gib: list[float] = field(default_factory=list)
    sharing: list[float] = field(default_factory=list)  # per run: other runs on its GPU (its file's summary)
    sources: dict[int, str] = field(default_factory=dict)
    flags: tuple[str, ...] | None = None  # its `lwlora train` flags, as its file records them (OUT.json "methods")
    runs_of: str | None = None  # the method whose runs these are, when they stand in for another's (add_recommended)

    @property
    def step_s(self) -> list[float]:
        """Step times (s) of the runs that measured one, in pooling order."""
        return list(self.step_of.values())

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores.values())

    @property
    def std(self) -> float:  # population std over seeds, as quality.py reports it
        return statistics.pstdev(self.scores.values()) if len(self.scores) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case, "method": self.method, "metric": self.metric, "lr": self.lr,
            "scores": {str(s): v for s, v in sorted(self.scores.items())}, "mean": self.mean, "std": self.std, "num_seeds": len(self.scores),
            "adapter_params": _mean(self.adapter_params), "step_s": _mean(self.step_s), "peak_memory_gib": _mean(self.peak_gib), "gpu_sharing": _mean(self.sharing),
            "sources": sorted(set(self.sources.values())), **({"runs_of": self.runs_of} if self.runs_of else {}),
        }


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _searched(data: dict[str, Any], case: str, method: str) -> dict[str, float]:
    """The validation scores of one search in a quality.py result: grid multiple -> score (scored points only)."""
    entry = ((data.get("tuning") or {}).get(case) or {}).get(method) or {}
    return {str(k): float(v) for k, v in (entry.get("scores") or {}).items() if v is not None}


def superseded(files: dict[Path, dict[str, Any]]) -> dict[tuple[Path, str, str], Path]:
    """(file, case, method) -> the file whose search continues it. A search widened or continued
    later (``quality.py --tuning-from``) keeps every point scored before, with the same scores,
    and scores more; where its choice moved (its final runs are at another rate), its final runs
    replace those at the old rate. Final runs at the same rate are pooled as usual."""
    rates: dict[tuple[str, str], dict[Path, set[float | None]]] = {}  # (case, method) -> file -> its final runs' rates
    for path, data in files.items():
        for run in data["runs"]:
            if run.get("phase") == "final" and not run.get("error"):
                rates.setdefault((run["case"], run["method"]), {}).setdefault(path, set()).add(run.get("lr"))
    replaced: dict[tuple[Path, str, str], Path] = {}
    for (case, method), by_file in rates.items():
        for old in by_file:
            before = _searched(files[old], case, method)
            for new in by_file:
                after = _searched(files[new], case, method)
                continued = before and len(after) > len(before) and all(abs(after.get(k, -1.0) - v) < 1e-12 for k, v in before.items())
                if new != old and continued and by_file[new] != by_file[old]:
                    replaced[(old, case, method)] = new
    return replaced


def pool_results(paths: list[Path]) -> tuple[dict[tuple[str, str], Cell], list[dict[str, str]]]:
    """Every finished final test run of the ``paths`` (quality.py OUT.json files of ``--protocol
    tuned``), pooled into (case, method) -> Cell, and the final runs left out because a later
    search continued theirs (``superseded``: [{case, method, file, by}]). InputError on a file that
    is unreadable, not tuned, or disagrees with another about the same run, and on one method's
    seeds at two rates."""
    files: dict[Path, dict[str, Any]] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError("--results", f"cannot read {path}: {error}") from None
        if not isinstance(data, dict) or "runs" not in data:
            raise InputError("--results", f"{path} is not a quality.py result (no 'runs')")
        if data.get("protocol") != "tuned":
            raise InputError("--results", f"{path} was made with --protocol {data.get('protocol')}: only runs at each method's own validated learning rate (--protocol tuned) count")
        files[path] = data
    replaced = superseded(files)
    cells: dict[tuple[str, str], Cell] = {}
    for path, data in files.items():
        recipes = data.get("recipes", {})
        for run in data["runs"]:
            if run.get("phase") != "final" or run.get("error"):
                continue
            case, method, seed = run["case"], run["method"], int(run["seed"])
            if (path, case, method) in replaced:
                continue
            metric = recipes.get(case, {}).get("metric", "accuracy")
            value = ((run.get("final") or {}).get("test") or {}).get(metric)
            if value is None:
                continue
            score = 100 * float(value)
            cell = cells.get((case, method))
            if cell is None:
                flags = (data.get("methods") or {}).get(method)
                cell = cells[(case, method)] = Cell(case, method, metric, run.get("lr"), flags=None if flags is None else tuple(flags))
            if cell.metric != metric:
                raise InputError("--results", f"{case}: {path} scores {metric}, {cell.sources[next(iter(cell.sources))]} scores {cell.metric}")
            if seed in cell.scores:
                if abs(cell.scores[seed] - score) > 1e-9:
                    raise InputError("--results", f"{cell.sources[seed]} and {path} disagree on {case} {method} seed {seed} ({cell.scores[seed]:.2f} vs {score:.2f}%)")
                continue
            if run.get("lr") != cell.lr:
                raise InputError("--results", f"{case} {method}: seeds at two learning rates ({cell.lr} in {cell.sources[next(iter(cell.sources))]}, {run.get('lr')} in {path}); pool the runs of one search only")
            cell.scores[seed] = score
            cell.sources[seed] = str(path)
            adapter = (run.get("params") or {}).get("adapter")
            if adapter is not None:
                cell.adapter_params.append(float(adapter))
            if run.get("step_s") is not None:
                cell.step_of[seed] = float(run["step_s"])
            if run.get("peak_memory_gib") is not None:
                cell.peak_gib.append(float(run["peak_memory_gib"]))
            shared = (((data.get("summary") or {}).get(case) or {}).get(method) or {}).get("gpu_sharing")
            if shared:
                cell.sharing.append(float(shared["mean"]))
    left_out = [{"case": c, "method": m, "file": str(old), "by": str(new)} for (old, c, m), new in sorted(replaced.items(), key=lambda kv: (kv[0][1], kv[0][2], str(kv[0][0])))]
    return cells, left_out


def add_recommended(cells: dict[tuple[str, str], Cell]) -> dict[tuple[str, str], Cell]:
    """``cells`` with a ``recommended`` cell in every case that has none of its own but has the
    runs of a method whose recorded flags are the ones ``--preset recommended`` stands for
    (``lwlora.training.modes.recommended_flags``): the same `lwlora train` run, so the same runs,
    marked ``runs_of`` that method."""
    from lwlora.training.modes import RECOMMENDED, recommended_flags

    wanted = recommended_flags()
    added = dict(cells)
    for (case, method), cell in cells.items():
        if method != RECOMMENDED and cell.flags == wanted and (case, RECOMMENDED) not in cells:
            added[(case, RECOMMENDED)] = dataclasses.replace(cell, method=RECOMMENDED, runs_of=method, scores=dict(cell.scores), sources=dict(cell.sources))
    return added


def read_cost(paths: list[Path] | None, prune_at: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """The 7B cost case's ratios to all-layer LoRA: quality.py method -> {"step": ..., "peak": ...},
    from one or more train_cost.py ``--case llama7b`` files (each row's ratios divide by its own
    file's all-layer row); a row found in several files is taken from the first. A pruned row
    (``PRUNED_ROWS``) also gives "pruned_step", its pruned phase's ratio; where ``prune_at`` has the
    method's warm-up share (its ``--prune-at``, :func:`prune_shares`), "step" is the whole run's mean
    (:func:`whole_run_step`) and "prune_at" that share, else the pruned phase's."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths or []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError("--cost", f"cannot read {path}: {error}") from None
        if not isinstance(data, dict) or (data.get("case") or {}).get("name") != "llama7b":
            raise InputError("--cost", f"{path} is not train_cost.py's llama7b case (run: python benchmarks/train_cost.py --case llama7b --device cuda)")
        for row in data.get("results", []):
            rows.setdefault(row["selection"], row)
    cost = {}
    for method, name in COST_ROWS.items():
        if name in rows:
            cost[method] = {"step": rows[name]["step_time_ratio_to_all"], "peak": rows[name]["peak_memory_ratio_to_all"]}
            if name in PRUNED_ROWS:
                cost[method]["pruned_step"] = rows[name]["step_time_ratio_to_all"]
                if method in (prune_at or {}):
                    cost[method]["step"] = whole_run_step(cost[method]["pruned_step"], prune_at[method])
                    cost[method]["prune_at"] = prune_at[method]
    return cost


def whole_run_step(pruned_step: float, warmup_share: float) -> float:
    """A warm-up-then-prune run's mean step as a multiple of all-layer LoRA's: its first
    ``warmup_share`` of the steps train every block (ratio 1), the rest the pruned model,
    s̄ = p·1 + (1 − p)·s_pruned (``--prune-at p``)."""
    return warmup_share + (1.0 - warmup_share) * pruned_step


def prune_share(flags: tuple[str, ...] | None) -> float | None:
    """The ``--prune-at`` share in a run's recorded ``lwlora train`` flags (None without one)."""
    flags = tuple(flags or ())
    if "--prune-at" in flags[:-1]:
        return float(flags[flags.index("--prune-at") + 1])
    return None


def prune_shares(cells: dict[tuple[str, str], Cell]) -> dict[str, float]:
    """method -> its ``--prune-at`` share, for the methods whose recorded flags have one."""
    return {cell.method: share for cell in cells.values() if (share := prune_share(cell.flags)) is not None}


def _filled_means(method: str, cells: dict[tuple[str, str], Cell], cases: list[str], fill: float) -> dict[str, float] | None:
    """Per case, ``method``'s mean score were every seed it still lacks (of ``SEEDS_NEEDED``) to
    score ``fill``: q̄_c(s) = (Σ known_c + k_c·s) / 3 (its own mean where it has them all). None
    while a reference or baseline lacks seeds somewhere (nothing fixed to compare with)."""
    for case in cases:
        for name in (REFERENCE, *BASELINES):
            if (case, name) not in cells or len(cells[(case, name)].scores) < SEEDS_NEEDED:
                return None
    means = {}
    for case in cases:
        known = list(cells[(case, method)].scores.values()) if (case, method) in cells else []
        means[case] = statistics.fmean(known) if len(known) >= SEEDS_NEEDED else (sum(known) + (SEEDS_NEEDED - len(known)) * fill) / SEEDS_NEEDED
    return means


def _criteria(means: dict[str, float], cells: dict[tuple[str, str], Cell], cases: list[str]) -> tuple[float, dict[str, float]]:
    """(mean_c (q̄_c − q̄_all,c), {b: mean_c (q̄_c − q̄_b,c)}) for per-case means ``means``."""
    gap = statistics.fmean(means[c] - cells[(c, REFERENCE)].mean for c in cases)
    return gap, {b: statistics.fmean(means[c] - cells[(c, b)].mean for c in cases) for b in BASELINES}


def best_case(method: str, cells: dict[tuple[str, str], Cell], cases: list[str]) -> tuple[float, dict[str, float]] | None:
    """The best averages ``method`` can still reach over ``cases``: every seed it still lacks
    scored at ``METRIC_MAX`` (:func:`_filled_means`). Returns (gap to all-layer, {baseline:
    gain}), or None while a reference or baseline lacks seeds."""
    means = _filled_means(method, cells, cases, METRIC_MAX)
    return None if means is None else _criteria(means, cells, cases)


def needed_mean(method: str, cells: dict[tuple[str, str], Cell], cases: list[str]) -> float | None:
    """The score (in %) that every seed ``method`` still lacks would have to reach, on average, for
    its averages to meet the three quality criteria; None while a reference or baseline lacks
    seeds, or when no seed is missing. Each criterion f(s) = mean_c (q̄_c(s) − x̄_c) is linear in
    the missing seeds' score s (:func:`_filled_means`), rising by Σ_c k_c / (3n) per point, so
    f(s) ≥ t iff s ≥ (t − f(0)) / slope; the largest such bound over the criteria."""
    low, high = _filled_means(method, cells, cases, 0.0), _filled_means(method, cells, cases, METRIC_MAX)
    if low is None or high == low:
        return None
    (gap0, gains0), (gap1, _) = _criteria(low, cells, cases), _criteria(high, cells, cases)
    slope = (gap1 - gap0) / METRIC_MAX  # the same for every criterion: they differ by constants
    return max([(-MAX_GAP_TO_ALL - gap0) / slope] + [(MIN_GAIN_OVER_BASELINES - gains0[b]) / slope for b in BASELINES])


def standard_error(method: str, other: str, cells: dict[tuple[str, str], Cell], cases: list[str]) -> float | None:
    """The standard error of mean_c (q̄_m,c − q̄_o,c). Runs with the same seed share their data order
    and initialisation (common random numbers), so two methods' cell means co-vary through their
    shared seeds:

        SE = √(Σ_c v_c) / C,   v_c = s²_m,c / n_m,c + s²_o,c / n_o,c − 2 · k_c · s_mo,c / (n_m,c · n_o,c)

    with s² the sample variance over a cell's seeds (ddof 1), k_c the number of seeds both cells
    have, s_mo,c the sample covariance of their scores over those k_c seeds (ddof 1; 0 when
    k_c < 2) and C the number of cases. With the same seeds in both cells v_c is the paired
    var(q_m − q_o) / n; with none shared, the independent seeds' sum. A v_c estimated below 0
    (possible only when few seeds are shared) falls back to the independent term. A case where the
    method's runs are ``other``'s (``Cell.runs_of``) adds nothing. None where a cell has fewer
    than 2 seeds."""
    total = 0.0
    for case in cases:
        if cells[(case, method)].runs_of == other:  # the same runs: the difference is exactly 0
            continue
        mine, theirs = cells[(case, method)].scores, cells[(case, other)].scores
        if len(mine) < 2 or len(theirs) < 2:
            return None
        independent = statistics.variance(mine.values()) / len(mine) + statistics.variance(theirs.values()) / len(theirs)
        shared = sorted(set(mine) & set(theirs))
        together = 0.0
        if len(shared) >= 2:
            together = 2 * len(shared) * statistics.covariance([mine[k] for k in shared], [theirs[k] for k in shared]) / (len(mine) * len(theirs))
        total += independent - together if independent - together >= 0 else independent
    return total ** 0.5 / len(cases)


def unresolved(value: float, threshold: float, se: float | None) -> bool:
    """Whether seeds' noise could move a criterion's side: ``value`` within 2 standard errors of ``threshold``."""
    return se is not None and abs(value - threshold) < 2 * se


def judge(method: str, cells: dict[tuple[str, str], Cell], cases: list[str], cost: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Method's averages over ``cases`` and its verdict: "meets", "misses" (with the criteria it
    misses), "out of reach" (runs are missing, but even at 100% on every one of them it would miss
    a quality criterion: :func:`best_case`; or its measured parameters and 7B cost already miss the
    cost criterion) or "incomplete" (with what is missing; the averages are then over the cases
    that have every needed cell, and provisional)."""
    missing = []
    for case in cases:
        for name in (method, REFERENCE, *BASELINES):
            have = len(cells[(case, name)].scores) if (case, name) in cells else 0
            if have < SEEDS_NEEDED:
                missing.append(f"{case} {name}: {have} of {SEEDS_NEEDED} seeds")
    usable = [c for c in cases if all((c, n) in cells for n in (method, REFERENCE, *BASELINES))]
    entry: dict[str, Any] = {"method": method, "cases": usable, "missing": missing}
    if not usable:
        return {**entry, "verdict": "incomplete", "gap_to_all_layer": None, "gain_over": {b: None for b in BASELINES}, "standard_error": {}, "within_noise": [], "param_fraction_max": None, "cost_7b": cost.get(method), "misses": [], "unreachable": [], "needed_missing_mean": needed_mean(method, cells, cases)}
    gap = statistics.fmean(cells[(c, method)].mean - cells[(c, REFERENCE)].mean for c in usable)
    gains = {b: statistics.fmean(cells[(c, method)].mean - cells[(c, b)].mean for c in usable) for b in BASELINES}
    se = {name: standard_error(method, name, cells, usable) for name in (REFERENCE, *BASELINES)}
    close = [name for name, value, threshold in [(REFERENCE, gap, -MAX_GAP_TO_ALL)] + [(b, gains[b], MIN_GAIN_OVER_BASELINES) for b in BASELINES] if unresolved(value, threshold, se[name])]
    fractions = []
    for c in usable:
        mine, full = _mean(cells[(c, method)].adapter_params), _mean(cells[(c, REFERENCE)].adapter_params)
        fractions.append(None if mine is None or not full else mine / full)
    fraction = None if any(f is None for f in fractions) else max(fractions)
    misses = []
    if gap < -MAX_GAP_TO_ALL:
        misses.append(f"{gap:+.1f} points against all-layer (needs ≥ {-MAX_GAP_TO_ALL:+.1f})")
    for b, gain in gains.items():
        if gain < MIN_GAIN_OVER_BASELINES:
            misses.append(f"{gain:+.1f} over {b} (needs ≥ +{MIN_GAIN_OVER_BASELINES:.1f})")
    cheap_params = fraction is not None and fraction <= MAX_PARAM_FRACTION + 1e-9
    ratios = cost.get(method)
    cheap_steps = ratios is not None and ratios["step"] <= MAX_STEP_RATIO and ratios["peak"] <= MAX_PEAK_RATIO
    if not (cheap_params or cheap_steps):
        params = "unknown" if fraction is None else f"{fraction:.2f}x"
        steps = "no 7B cost row" if ratios is None else f"7B step {ratios['step']:.2f}x, peak {ratios['peak']:.2f}x"
        misses.append(f"cost: adapter parameters {params} (needs ≤ {MAX_PARAM_FRACTION}x) and {steps} (needs ≤ {MAX_STEP_RATIO}x and ≤ {MAX_PEAK_RATIO}x)")
    verdict = "incomplete" if missing else ("misses" if misses else "meets")
    unreachable: list[str] = []
    if missing:
        bound = best_case(method, cells, cases)
        if bound is not None:
            best_gap, best_gains = bound
            if best_gap < -MAX_GAP_TO_ALL:
                unreachable.append(f"at best {best_gap:+.1f} points against all-layer (needs ≥ {-MAX_GAP_TO_ALL:+.1f})")
            unreachable += [f"at best {g:+.1f} over {b} (needs ≥ +{MIN_GAIN_OVER_BASELINES:.1f})" for b, g in best_gains.items() if g < MIN_GAIN_OVER_BASELINES]
        over_params = any(f is not None and f > MAX_PARAM_FRACTION + 1e-9 for f in fractions)
        if over_params and ratios is not None and not cheap_steps:
            unreachable.append(f"its measured cost misses: adapter parameters {max(f for f in fractions if f is not None):.2f}x (needs ≤ {MAX_PARAM_FRACTION}x) and 7B step {ratios['step']:.2f}x, peak {ratios['peak']:.2f}x (needs ≤ {MAX_STEP_RATIO}x and ≤ {MAX_PEAK_RATIO}x)")
        if unreachable:
            verdict = "out of reach"
    needed = needed_mean(method, cells, cases) if missing else None
    return {**entry, "verdict": verdict, "gap_to_all_layer": gap, "gain_over": gains, "standard_error": se, "within_noise": close, "param_fraction_max": fraction, "cost_7b": ratios, "misses": misses, "unreachable": unreachable, "needed_missing_mean": needed}


def same_waves(cell: Cell, reference: Cell) -> bool:
    """Whether ``cell``'s runs come from the result files of ``reference``'s runs: step times
    depend on what else shared the machine, so they are compared only within one session's runs."""
    return set(cell.sources.values()) <= set(reference.sources.values())


def reference_step(cell: Cell, reference: Cell) -> float | None:
    """The mean step time of ``reference``'s runs from ``cell``'s own result files (None if
    there are none): the denominator of ``cell``'s step-time ratio, so that runs ``reference``
    gained in later sessions (other machines, other neighbours) do not move a ratio measured
    within one session."""
    files = set(cell.sources.values())
    steps = [step for seed, step in reference.step_of.items() if reference.sources.get(seed) in files]
    return _mean(steps)


def markdown(cells: dict[tuple[str, str], Cell], verdicts: list[dict[str, Any]], cases: list[str], command: str, left_out: list[dict[str, str]] = ()) -> str:
    lines = ["Issue 12's goal over the binding cases: test score in %, mean ± std over seeds, each method at its own validated learning rate.", ""]
    for case in cases:
        here = [cell for (c, _), cell in cells.items() if c == case]
        lines += [f"### {case}", ""]
        if not here:
            lines += ["No tuned final runs yet.", ""]
            continue
        full = cells.get((case, REFERENCE))
        full_params = _mean(full.adapter_params) if full else None
        lines += [f"| method | lr | seeds | test {here[0].metric} (%) | adapter params (x all-layer) | step (s, as the runs measured it) | other runs on the GPU | from |", "|---|---|---|---|---|---|---|---|"]
        for cell in sorted(here, key=lambda x: -x.mean):
            params, step = _mean(cell.adapter_params), _mean(cell.step_s)
            fraction = f"{params / full_params:.2f}" if params is not None and full_params else "—"
            full_step = reference_step(cell, full) if full is not None and same_waves(cell, full) else None
            step_text = "—" if step is None else f"{step:.3f}" + (f" ({step / full_step:.2f}x)" if full_step else " ³")
            sources = ", ".join(Path(s).name for s in sorted(set(cell.sources.values())))
            lr = f"{cell.lr:g}" if cell.lr else "—"
            shared = "—" if not cell.sharing else f"{_mean(cell.sharing):.1f}"
            name = cell.method if cell.runs_of is None else f"{cell.method} (= {cell.runs_of}'s runs: the same flags)"
            lines.append(f"| {name} | {lr} | {len(cell.scores)} | {cell.mean:.1f} ± {cell.std:.1f} | {fraction} | {step_text} | {shared} | {sources} |")
        lines += ["", "Step times are comparable only between runs that shared their GPU (or CPU) about as much: the ratio to all-layer is given only for runs from the same result files as all-layer's, and divides by all-layer's runs from those files alone (³: other sessions, not comparable). The isolated cost is the 7B case's (`train_cost.py`).", ""]
    lines += ["### Verdicts", "",
              f"Goal: Δ all-layer ≥ {-MAX_GAP_TO_ALL:+.1f}, Δ random-50 and Δ equal-budget ≥ +{MIN_GAIN_OVER_BASELINES:.1f} (points, mean over the cases), adapter parameters ≤ {MAX_PARAM_FRACTION}x in every case or 7B step ≤ {MAX_STEP_RATIO}x and peak ≤ {MAX_PEAK_RATIO}x; {SEEDS_NEEDED} seeds on each of {len(cases)} cases. Provisional (incomplete) rows average over the cases listed; **out of reach**: runs are missing, but the method misses even if every missing run scored 100%. ± the standard error of the mean difference over seeds, a seed's runs paired (√(Σ_c s²_m,c/n_m,c + s²_b,c/n_b,c − 2·k_c·s_mb,c/(n_m,c·n_b,c)) / C, k_c the seeds both cells have, s_mb,c their scores' covariance); ≈: within 2 standard errors of its threshold, so more seeds could turn that criterion either way.", "",
              "| method | cases | Δ all-layer | Δ random-50 | Δ equal-budget | adapter params (max x) | 7B step / peak (x) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        def pts(x, name):
            if x is None:
                return "—"
            error = v["standard_error"].get(name)
            return f"{x:+.1f}" + ("" if error is None else f" ± {error:.1f}") + (" ≈" if name in v["within_noise"] else "")
        cost = "—" if not v["cost_7b"] else f"{v['cost_7b']['step']:.2f} / {v['cost_7b']['peak']:.2f}" + (" ⁴" if "prune_at" in v["cost_7b"] else "")
        fraction = "—" if v["param_fraction_max"] is None else f"{v['param_fraction_max']:.2f}"
        short = f"{len(v['missing'])} {'cell' if len(v['missing']) == 1 else 'cells'} short"
        if v["verdict"] == "misses":
            why = "; ".join(v["misses"])
        elif v["verdict"] == "out of reach":
            bounds = [u for u in v["unreachable"] if u.startswith("at best")]
            costs = [u for u in v["unreachable"] if not u.startswith("at best")]
            why = f"{short}, but " + "; ".join(([f"even at 100% on every missing seed: {'; '.join(bounds)}"] if bounds else []) + costs)
        elif v["verdict"] == "incomplete":
            why = short + (f"; its missing seeds must average ≥ {v['needed_missing_mean']:.1f}% to meet the quality criteria" if v.get("needed_missing_mean") is not None else "") + (f" (so far it would miss: {'; '.join(v['misses'])})" if v["misses"] else "")
        else:
            why = ""
        lines.append(f"| {v['method']} | {len(v['cases'])} of {len(cases)} | {pts(v['gap_to_all_layer'], REFERENCE)} | {pts(v['gain_over']['random-50'], 'random-50')} | {pts(v['gain_over']['equal-budget'], 'equal-budget')} | {fraction} | {cost} | **{v['verdict']}**{': ' + why if why else ''} |")
    pruned = sorted({(v["method"], v["cost_7b"]["prune_at"], v["cost_7b"]["pruned_step"]) for v in verdicts if v["cost_7b"] and "prune_at" in v["cost_7b"]})
    if pruned:
        lines += ["", "⁴ Warm-up then prune: every block trains for the first share p of the steps (all-layer LoRA's step and peak), then half of them; the step is the run's mean, p + (1 − p)·(pruned step): "
                  + "; ".join(f"{m} p = {p:g}, pruned step {s:.2f}x" for m, p, s in pruned) + "."]
    if left_out:
        lines += ["", "Left out, because a later search continued theirs and chose another rate (its final runs count instead):", ""]
        lines += [f"- {x['case']} {x['method']}: the final runs of {Path(x['file']).name} (searched on in {Path(x['by']).name})" for x in left_out]
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plot(cells: dict[tuple[str, str], Cell], cases: list[str], path: Path) -> bool:
    """Per case (a column): test score against adapter parameters (top) and against the runs'
    step time (bottom), both as multiples of all-layer LoRA's; whiskers: std over seeds. The
    step-time panel shows only the methods timed in the same sessions as all-layer
    (:func:`same_waves`)."""
    shown = [c for c in cases if (c, REFERENCE) in cells]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for (c, m) in cells if c in shown})
    palette = plt.get_cmap("tab20").colors
    others = [palette[i] for i in range(0, 20, 2) if i != 6] + [palette[i] for i in range(1, 20, 2) if i != 7]  # tab20's reds (6, 7) are CKA's alone
    colors = {m: others[i % len(others)] for i, m in enumerate(m for m in methods if not m.startswith("cka"))}
    colors.update({m: "#c44e52" for m in methods if m.startswith("cka")})
    markers = {m: "osD^v<>ph*"[i % 10] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2, len(shown), figsize=(3.6 * len(shown), 6.4), squeeze=False)
    for column, case in enumerate(shown):
        full = cells[(case, REFERENCE)]
        for row, (values_of, label) in enumerate(((lambda cell: cell.adapter_params, "adapter parameters (x all-layer)"), (lambda cell: cell.step_s, "step time (x all-layer)"))):
            ax = axes[row][column]
            for method in methods:
                cell = cells.get((case, method))
                value = None if cell is None else _mean(values_of(cell))
                base = _mean(values_of(full)) if row == 0 or cell is None else reference_step(cell, full)
                if cell is None or value is None or not base or (row == 1 and not same_waves(cell, full)):
                    continue
                hollow = {"mfc": "none", "markersize": 11} if cell.runs_of else {}  # a stand-in: the method it stands in for shows through
                ax.errorbar(value / base, cell.mean, yerr=cell.std, fmt=markers[method], color=colors[method], label=method if cell.runs_of is None else f"{method} (= {cell.runs_of})", capsize=3, **hollow)
            ax.set_xlabel(label)
            ax.set_ylabel(f"test {full.metric} (%)")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(case, fontsize=9)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", required=True, type=Path, help="quality.py OUT.json files (--protocol tuned)")
    parser.add_argument("--cost", nargs="+", type=Path, help="train_cost.py's llama7b OUT.json files (the step-time and memory criterion; a row in several is taken from the first)")
    parser.add_argument("--cases", default=",".join(BINDING_CASES), help=f"comma-separated cases to judge over (default: {','.join(BINDING_CASES)})")
    parser.add_argument("--out", required=True, type=Path, help="writes OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    try:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        if not cases:
            raise InputError("--cases", "give at least one case, e.g. " + BINDING_CASES[0])
        cells, left_out = pool_results(args.results)
        cells = add_recommended(cells)
        cost = read_cost(args.cost, prune_shares(cells))
        for cell in cells.values():  # a stand-in costs what the runs it stands in for cost
            if cell.runs_of in cost:
                cost.setdefault(cell.method, cost[cell.runs_of])
        unknown = [c for c in cases if not any(case == c for case, _ in cells)]
        if len(unknown) == len(cases):
            raise InputError("--cases", f"none of {', '.join(cases)} has final runs in --results (they have: {', '.join(sorted({c for c, _ in cells})) or 'none'})")
    except InputError as error:
        print(f"goal.py: error: {error}", file=sys.stderr)
        return 2
    candidates = sorted({m for (c, m) in cells if c in cases and m not in NOT_CANDIDATES})
    verdicts = [judge(m, cells, cases, cost) for m in candidates]
    command = "python benchmarks/goal.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "cases": cases, "goal": {"max_gap_to_all_layer": MAX_GAP_TO_ALL, "min_gain_over_baselines": MIN_GAIN_OVER_BASELINES, "max_param_fraction": MAX_PARAM_FRACTION,
              "max_step_ratio_7b": MAX_STEP_RATIO, "max_peak_ratio_7b": MAX_PEAK_RATIO, "seeds": SEEDS_NEEDED},
              "cells": [cell.to_json() for (c, _), cell in sorted(cells.items()) if c in cases], "cost_7b": cost, "verdicts": verdicts, "superseded": left_out}
    from lwlora.io import atomic_write_json, atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    text = markdown(cells, verdicts, cases, command, left_out)
    atomic_write_text(args.out.with_suffix(".md"), text)
    plot(cells, cases, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
