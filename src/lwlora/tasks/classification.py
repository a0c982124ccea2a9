"""Sequence classification / regression tasks: the GLUE presets and generic ``--data``.

Labels: names come from (in order) ``meta.json`` beside the data (``label_names``), a ``ClassLabel``
feature, the preset's names, or else the data itself (sorted unique string labels, or ``0..max``
for integer labels). String labels are mapped to their index in the names; integer labels must lie
in ``[0, K)``. Regression (``glue/stsb``) keeps float labels and ``num_labels=1``.

Subsets: ``max_train_samples`` draws a sorted random subset with ``seed`` (data are often sorted by
class or source); ``max_eval_samples`` keeps the first examples of each eval split, so eval sets do
not change with the seed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from lwlora.data import resolve_columns
from lwlora.errors import ConfigError
from lwlora.tasks.base import (
    PreparedTask,
    columns_of,
    load_eval_source,
    load_hub_dataset,
    load_source,
    read_meta,
    sample_selection,
    subset_indices,
    take,
)
from lwlora.tasks.presets import GLUE_HUB_NAME, GLUE_PRESETS


def _classlabel_names(records: Any, column: str) -> list[str] | None:
    features = getattr(records, "features", None)
    if features is None or column not in features:
        return None
    names = getattr(features[column], "names", None)
    return list(names) if names else None


def _as_int(value: Any) -> int | None:
    """An integer label value (ints, bools, integral floats, digit strings), else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _map_labels(raw: dict[str, list[Any]], names: list[str] | None, label_column: str, source: str) -> tuple[dict[str, list[int]], list[str]]:
    """Class ids per split, and the label names."""
    every = [(split, i, v) for split, values in raw.items() for i, v in enumerate(values)]
    for split, i, v in every:
        if v is None:
            raise ConfigError("--label-column", f"{split} example {i} of {source} has no label in {label_column!r}")
    if names is None:
        ints = [_as_int(v) for _, _, v in every]
        if all(isinstance(v, str) for _, _, v in every) and any(x is None for x in ints):
            names = sorted({str(v) for _, _, v in every})
        elif all(x is not None for x in ints):
            negative = next(((s, i, v) for s, i, v in every if _as_int(v) < 0), None)
            if negative is not None:
                s, i, v = negative
                raise ConfigError("--label-column", f"{s} example {i} of {source} has label {v!r}; labels must be >= 0 (unlabeled test split?)")
            names = [str(k) for k in range(max(ints) + 1)]
        else:
            bad = next(v for (_, _, v), x in zip(every, ints) if x is None)
            raise ConfigError("--label-column", f"{label_column!r} of {source} mixes label types (e.g. {bad!r}); use integer ids or class names")
        if len(names) < 2:
            raise ConfigError("--label-column", f"{label_column!r} of {source} has a single class {names}; classification needs at least 2")
    index = {name: k for k, name in enumerate(names)}
    k_count = len(names)
    mapped: dict[str, list[int]] = {}
    for split, values in raw.items():
        out = []
        for i, v in enumerate(values):
            if isinstance(v, str) and v in index:
                out.append(index[v])
                continue
            k = _as_int(v)
            if k is None:
                raise ConfigError("--label-column", f"{split} example {i} of {source}: label {v!r} is not one of {names} nor an id in [0, {k_count})")
            if not 0 <= k < k_count:
                raise ConfigError("--label-column", f"{split} example {i} of {source}: label {v!r} is outside [0, {k_count}) for label names {names}")
            out.append(k)
        mapped[split] = out
    return mapped, names


def _float_labels(values: list[Any], split: str, label_column: str, source: str) -> list[float]:
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            raise ConfigError("--label-column", f"{split} example {i} of {source}: regression label {v!r} is not a finite number")
        out.append(x)
    return out


def prepare_classification(
    name: str,
    tokenizer: Any,
    train_records: Any,
    eval_records: dict[str, Any],
    *,
    source: str,
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
    explicit_label_names: list[str] | None,
    fallback_label_names: list[str] | None,
    regression: bool,
    metric_names: list[str],
    max_length: int,
    max_train_samples: int | None,
    max_eval_samples: int | None,
    selection_samples: int,
    seed: int,
) -> PreparedTask:
    import datasets
    from transformers import DataCollatorWithPadding

    label_column = label_column or "label"
    splits = {"train": train_records, **eval_records}
    for split, records in splits.items():
        if len(records) == 0:
            raise ConfigError("--data", f"the {split} split of {source} is empty")
    columns = columns_of(train_records)
    text_column, text_pair_column, _ = resolve_columns(columns, text_column, text_pair_column, None)
    for split, records in splits.items():
        cols = columns_of(records)
        for flag, col in (("--text-column", text_column), ("--text-pair-column", text_pair_column), ("--label-column", label_column)):
            if col is not None and col not in cols:
                raise ConfigError(flag, f"column {col!r} not found in the {split} split of {source}; it has {cols}")

    train_ds = take(train_records, subset_indices(len(train_records), max_train_samples, seed))
    eval_ds = {s: take(r, subset_indices(len(r), max_eval_samples, None)) for s, r in eval_records.items()}
    parts = {"train": train_ds, **eval_ds}
    raw = {s: ds[label_column] for s, ds in parts.items()}

    if regression:
        labels: dict[str, list[Any]] = {s: _float_labels(v, s, label_column, source) for s, v in raw.items()}
        names, num_labels, kind, label_feature = None, 1, "regression", datasets.Value("float32")
    else:
        hint = explicit_label_names or _classlabel_names(train_records, label_column) or fallback_label_names
        labels, names = _map_labels(raw, list(hint) if hint else None, label_column, source)
        num_labels, kind, label_feature = len(names), "classification", datasets.Value("int64")

    def tokenize(split: str, ds: Any) -> Any:
        split_labels = labels[split]

        def fn(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
            texts = batch[text_column]
            pairs = batch[text_pair_column] if text_pair_column else None
            for j, t in enumerate(texts):
                if not isinstance(t, str):
                    raise ConfigError("--text-column", f"{split} example {indices[j]} of {source} has no text in {text_column!r} (got {t!r})")
                if pairs is not None and not isinstance(pairs[j], str):
                    raise ConfigError("--text-pair-column", f"{split} example {indices[j]} of {source} has no text in {text_pair_column!r} (got {pairs[j]!r})")
            enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
            out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            out["labels"] = [split_labels[i] for i in indices]
            return out

        tokenized = ds.map(fn, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenizing {name} {split}")
        return tokenized.cast_column("labels", label_feature)

    train = tokenize("train", train_ds)
    evals = {s: tokenize(s, ds) for s, ds in eval_ds.items()}
    texts = list(train_ds[text_column])
    pairs = list(train_ds[text_pair_column]) if text_pair_column else None
    selection = sample_selection(texts, pairs, selection_samples, seed, source=f"task:{name} {source}")
    return PreparedTask(
        name=name,
        kind=kind,
        train=train,
        eval=evals,
        eval_examples={},
        num_labels=num_labels,
        label_names=names,
        metric_names=list(metric_names),
        selection_texts=selection,
        data_collator=DataCollatorWithPadding(tokenizer),
        info={"source": source, "text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column},
    )


def load_glue(config: str, tokenizer: Any, *, data: str | None, text_column: str | None, text_pair_column: str | None, label_column: str | None, **common: Any) -> PreparedTask:
    preset = GLUE_PRESETS[config]
    name = f"glue/{config}"
    if data:
        train_records, evals = load_source(data, preset.eval_splits, first_only=False)
        if not evals:
            raise ConfigError("--data", f"{name} needs eval split(s) {', '.join(preset.eval_splits)} in {data} (directory of SPLIT.jsonl files)")
        source = data
    else:
        dd = load_hub_dataset(GLUE_HUB_NAME, name=config, what=f"for --task {name} (offline? pass --data DIR of local GLUE-like splits)")
        train_records = dd["train"]
        evals = {s: dd[s] for s in preset.eval_splits}
        source = f"{GLUE_HUB_NAME}:{config}"
    return prepare_classification(
        name,
        tokenizer,
        train_records,
        evals,
        source=source,
        text_column=text_column or preset.text_column,
        text_pair_column=text_pair_column or (preset.text_pair_column if text_column is None else None),
        label_column=label_column,
        explicit_label_names=None,
        fallback_label_names=list(preset.label_names) if preset.label_names else None,
        regression=preset.regression,
        metric_names=list(preset.metric_names),
        **common,
    )


def load_classification(tokenizer: Any, *, data: str | None, text_column: str | None, text_pair_column: str | None, label_column: str | None, eval_splits: tuple[str, ...] | None = None, **common: Any) -> PreparedTask:
    if not data:
        raise ConfigError("--data", "--task classification needs --data (a file, a directory of splits, or a Hub name)")
    train_records, evals = load_eval_source(data, eval_splits)
    meta_names = read_meta(data).get("label_names")
    if meta_names is not None and (not isinstance(meta_names, list) or not all(isinstance(n, str) for n in meta_names) or len(meta_names) < 2):
        raise ConfigError("--data", f"meta.json beside {data}: label_names must be a list of at least 2 strings, got {meta_names!r}")
    return prepare_classification(
        "classification",
        tokenizer,
        train_records,
        evals,
        source=data,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        explicit_label_names=meta_names,
        fallback_label_names=None,
        regression=False,
        metric_names=["accuracy"],
        **common,
    )
