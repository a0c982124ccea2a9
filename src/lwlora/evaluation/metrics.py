"""GLUE-style classification and regression metrics, in numpy only (no scipy / sklearn).

Conventions (matching the GLUE benchmark / ``evaluate``'s ``glue`` metric, except where noted):

* ``accuracy``: fraction of exact matches.
* ``f1``: binary F1 of the positive label ``1`` (MRPC, QQP). If there are no true positives the
  F1 is 0.0 (also when precision/recall are undefined, as sklearn's ``zero_division=0``).
* ``macro_f1``: unweighted mean of per-label F1 over the union of labels seen in references and
  predictions.
* ``mcc``: Matthews correlation coefficient; for more than two classes Gorodkin's R_K
  generalisation (what sklearn computes). When it is undefined (a zero denominator: all
  references or all predictions fall in one class) it is 0.0, like sklearn.
* ``pearson`` / ``spearman``: correlation coefficients (Spearman = Pearson of the average ranks,
  so ties get the mean of the ranks they span). When one input is constant the coefficient is
  undefined and ``nan`` is returned (as scipy does).

All functions raise :class:`ValueError` for empty inputs or inputs of different lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "GLUE_METRICS",
    "METRIC_FUNCTIONS",
    "accuracy",
    "compute_metrics",
    "f1_score",
    "macro_f1",
    "matthews_corrcoef",
    "pearson",
    "rankdata",
    "spearman",
]

#: Metrics reported for each GLUE task (the official ones).
GLUE_METRICS: dict[str, list[str]] = {
    "cola": ["mcc"],
    "sst2": ["accuracy"],
    "mrpc": ["accuracy", "f1"],
    "qqp": ["accuracy", "f1"],
    "stsb": ["pearson", "spearman"],
    "mnli": ["accuracy"],
    "mnli_matched": ["accuracy"],
    "mnli_mismatched": ["accuracy"],
    "qnli": ["accuracy"],
    "rte": ["accuracy"],
    "wnli": ["accuracy"],
}

_REGRESSION_METRICS = frozenset({"pearson", "spearman"})


def _as_arrays(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if preds.ndim == 0 or refs.ndim == 0:
        raise ValueError("predictions and references must be sequences, not scalars")
    if len(preds) != len(refs):
        raise ValueError(
            f"predictions and references have different lengths: {len(preds)} != {len(refs)}"
        )
    if len(refs) == 0:
        raise ValueError(
            "predictions and references are empty; cannot compute a metric"
        )
    return preds, refs


def _as_labels(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    preds, refs = _as_arrays(predictions, references)
    if preds.ndim != 1 or refs.ndim != 1:
        raise ValueError(
            f"label metrics need 1-D label sequences, got shapes {preds.shape} and {refs.shape}"
        )
    return preds, refs


def _as_floats(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    preds, refs = _as_arrays(predictions, references)
    preds = preds.astype(np.float64).reshape(len(preds), -1)
    refs = refs.astype(np.float64).reshape(len(refs), -1)
    if preds.shape[1] != 1 or refs.shape[1] != 1:
        raise ValueError("correlation metrics need one scalar per example")
    return preds[:, 0], refs[:, 0]


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Fraction of predictions equal to their reference."""
    preds, refs = _as_labels(predictions, references)
    return float(np.mean(preds == refs))


def _f1_of(preds: np.ndarray, refs: np.ndarray, label: Any) -> float:
    pred_pos = preds == label
    ref_pos = refs == label
    tp = int(np.sum(pred_pos & ref_pos))
    fp = int(np.sum(pred_pos & ~ref_pos))
    fn = int(np.sum(~pred_pos & ref_pos))
    if tp == 0:
        return 0.0
    # F1 = 2PR/(P+R) = 2TP / (2TP + FP + FN)
    return 2.0 * tp / (2.0 * tp + fp + fn)


def f1_score(
    predictions: Sequence[Any], references: Sequence[Any], pos_label: Any = 1
) -> float:
    """Binary F1 of ``pos_label`` (default 1); 0.0 when there is no true positive."""
    preds, refs = _as_labels(predictions, references)
    return _f1_of(preds, refs, pos_label)


def macro_f1(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Unweighted mean of per-label F1 over every label present in references or predictions."""
    preds, refs = _as_labels(predictions, references)
    labels = np.unique(np.concatenate([refs, preds]))
    return float(np.mean([_f1_of(preds, refs, label) for label in labels]))


def matthews_corrcoef(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Matthews correlation; Gorodkin's R_K for K > 2 classes; 0.0 when undefined.

    With the confusion matrix C (rows: reference, columns: prediction), s = sum(C),
    c = trace(C), t_k = row sums, p_k = column sums:
    ``R_K = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))``,
    which reduces to ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))`` for two classes.
    """
    preds, refs = _as_labels(predictions, references)
    labels, inverse = np.unique(np.concatenate([refs, preds]), return_inverse=True)
    n = len(refs)
    ref_idx, pred_idx = inverse[:n], inverse[n:]
    k = len(labels)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (ref_idx, pred_idx), 1.0)
    s = conf.sum()
    c = np.trace(conf)
    t = conf.sum(axis=1)
    p = conf.sum(axis=0)
    cov_ytyp = c * s - float(np.dot(t, p))
    cov_ypyp = s * s - float(np.dot(p, p))
    cov_ytyt = s * s - float(np.dot(t, t))
    if cov_ypyp == 0.0 or cov_ytyt == 0.0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def _pearson_of(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    yc = y - y.mean()
    denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    if denom == 0.0:
        return float("nan")
    r = float(np.dot(xc, yc) / denom)
    return max(-1.0, min(1.0, r))


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation coefficient; ``nan`` when either input is constant."""
    preds, refs = _as_floats(predictions, references)
    return _pearson_of(preds, refs)


def rankdata(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they occupy (scipy's ``method='average'``)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(arr, kind="mergesort")
    sorted_vals = arr[order]
    ranks = np.empty(len(arr), dtype=np.float64)
    i = 0
    while i < len(arr):
        j = i
        while j + 1 < len(arr) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0  # mean of ranks i+1 .. j+1
        i = j + 1
    return ranks


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); ``nan`` when an input is constant."""
    preds, refs = _as_floats(predictions, references)
    return _pearson_of(rankdata(preds), rankdata(refs))


METRIC_FUNCTIONS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy,
    "f1": f1_score,
    "macro_f1": macro_f1,
    "mcc": matthews_corrcoef,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def _normalise_task(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("glue/", "")


def _metric_names(task_or_names: str | Sequence[str]) -> list[str]:
    if isinstance(task_or_names, str):
        if task_or_names in METRIC_FUNCTIONS:
            return [task_or_names]
        task = _normalise_task(task_or_names)
        if task not in GLUE_METRICS:
            raise ValueError(
                f"unknown task or metric {task_or_names!r}; tasks: {sorted(GLUE_METRICS)}, "
                f"metrics: {sorted(METRIC_FUNCTIONS)}"
            )
        return list(GLUE_METRICS[task])
    names = list(task_or_names)
    if not names:
        raise ValueError("no metric names given")
    unknown = [n for n in names if n not in METRIC_FUNCTIONS]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {unknown}; known: {sorted(METRIC_FUNCTIONS)}"
        )
    return names


def compute_metrics(
    task_or_names: str | Sequence[str], predictions: Any, references: Any
) -> dict[str, float]:
    """Compute the metrics of a GLUE task (e.g. ``"mrpc"``) or of explicit metric names.

    ``task_or_names`` is a task name (case-insensitive, ``sst-2``/``sts-b`` spellings accepted),
    a single metric name, or a list of metric names. For label metrics, 2-D ``predictions``
    (``[n, num_classes]`` logits/probabilities) are reduced with ``argmax``; for correlation
    metrics, ``[n, 1]`` predictions are flattened.
    """
    names = _metric_names(task_or_names)
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    # validate lengths/emptiness up front, with the same messages as the metric functions
    _as_arrays(preds, refs)
    label_preds = preds
    if preds.ndim == 2 and any(n not in _REGRESSION_METRICS for n in names):
        label_preds = preds.argmax(axis=-1) if preds.shape[1] > 1 else preds[:, 0]
    out: dict[str, float] = {}
    for name in names:
        fn = METRIC_FUNCTIONS[name]
        out[name] = fn(preds if name in _REGRESSION_METRICS else label_preds, refs)
    return out


def predictions_from_logits(logits: Any, kind: str) -> np.ndarray:
    """Model outputs (n, num_labels) → predictions: the (n,) scores for ``regression``, else argmax."""
    logits = np.asarray(logits)
    return np.squeeze(logits, axis=-1) if kind == "regression" else np.argmax(logits, axis=-1)
