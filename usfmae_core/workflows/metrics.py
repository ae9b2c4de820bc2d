"""Classification metrics in pure NumPy, shared by ``usfmae finetune``, ``usfmae evaluate`` and the benchmarks.

Every function takes integer labels ``y_true`` of shape ``(N,)`` in ``[0, K)`` and class probabilities ``probs`` of
shape ``(N, K)`` (rows summing to 1; the prediction is the arg-max), and returns plain Python / NumPy values. The
definitions are scikit-learn's (``Testing/test_evaluate.py`` checks them against it on fixed predictions):

- ``accuracy``: ``accuracy_score``.
- ``balanced_accuracy``: ``balanced_accuracy_score``: the mean recall over the classes present in ``y_true``.
- ``precision`` / ``recall`` / ``f1`` per class and their unweighted (macro) means over all ``K`` classes:
  ``precision_recall_fscore_support(labels=range(K), zero_division=0)``; a class never predicted has precision 0.
- ``auc``: one-vs-rest ROC AUC per class (Mann-Whitney statistic with tied scores counted 1/2, which equals the
  trapezoidal area under the ROC curve), macro mean over the classes for which it is defined (present and absent
  in ``y_true``): ``roc_auc_score(multi_class="ovr", average="macro")``; for ``K == 2`` it equals
  ``roc_auc_score(y_true, probs[:, 1])``. Undefined values are NaN (JSON ``null``).
- ``confusion_matrix``: rows are true classes, columns predicted classes, as ``confusion_matrix(labels=range(K))``.

Bootstrap intervals (:func:`bootstrap_intervals`) resample the N cases with replacement (seeded) and take the
2.5th / 97.5th percentiles of each summary metric (the percentile method), skipping resamples where a metric is
undefined (e.g. a class missing from the resample for AUC). :func:`bootstrap_mean_difference` does the same for
the mean over several runs on the same test cases, optionally minus a paired reference's mean (resampling the cases
jointly, so paired differences stay paired).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "SUMMARY_KEYS",
    "binary_auc",
    "bootstrap_intervals",
    "bootstrap_mean_difference",
    "classification_metrics",
    "confusion_matrix",
    "ovr_auc",
    "roc_curve",
    "summary_metrics",
]

# The scalar metrics reported with intervals, in table order.
SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro")


def _check(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, K) with N = len(y_true) = {y.shape[0]}, got {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got [{y.min()}, {y.max()}]")
    return y, p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts; entry ``[i, j]`` is the number of cases of true class ``i`` predicted as ``j``."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) of ``x``, ties sharing the mean of their ranks (``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values, and the run each sorted element belongs to
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    run = np.repeat(np.arange(starts.size), ends - starts)
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = avg[run]
    return ranks


def binary_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a binary problem (``y_true`` in {0, 1}, higher ``score`` = more positive); NaN if one class is
    absent. Mann-Whitney U / (n_pos * n_neg), ties counted 1/2."""
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ovr_auc(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC per class ``(K,)`` (NaN where a class is absent from, or is all of, ``y_true``).

    For ``K == 2`` both entries are the AUC of column 1 (mathematically equal to column 0's; computing it once
    avoids rounding differences in ``1 - p``)."""
    y, p = _check(y_true, probs)
    if p.shape[1] == 2:
        return np.full(2, binary_auc(y == 1, p[:, 1]))
    return np.array([binary_auc(y == k, p[:, k]) for k in range(p.shape[1])])


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One binary ROC curve: false- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last index of each threshold
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else float("nan")


def summary_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The scalar metrics of :data:`SUMMARY_KEYS` (cheap: used per bootstrap resample and per epoch)."""
    y, p = _check(y_true, probs)
    k = p.shape[1]
    cm = confusion_matrix(y, p.argmax(1), k)
    precision, recall, f1, support = _per_class(cm)
    n = int(cm.sum())
    return {
        "accuracy": float(np.trace(cm) / n) if n else float("nan"),
        "balanced_accuracy": float(recall[support > 0].mean()) if n else float("nan"),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "auc_macro": _nanmean(ovr_auc(y, p)),
    }


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """All metrics of one set of predictions as a JSON-ready dict.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro",
        "per_class": {name: {"precision", "recall", "f1", "auc", "support"}}, "confusion_matrix": K x K list,
        "classes": names}``.
    """
    y, p = _check(y_true, probs)
    k = p.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} probability columns")
    cm = confusion_matrix(y, p.argmax(1), k)
    precision, recall, f1, support = _per_class(cm)
    auc = ovr_auc(y, p)
    out: dict[str, Any] = {"n": int(y.size), **summary_metrics(y, p)}
    out["per_class"] = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "auc": float(auc[i]), "support": int(support[i])}
        for i, name in enumerate(names)
    }
    out["confusion_matrix"] = cm.tolist()
    out["classes"] = names
    return out


def bootstrap_intervals(y_true: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals ``{metric: [low, high]}`` for each of :data:`SUMMARY_KEYS`.

    Args:
        n_boot: number of resamples (0 returns ``{}``).
        seed: seed of the resampling (``numpy.random.default_rng``), so intervals are reproducible.
        level: coverage, 0.95 for 2.5th-97.5th percentiles.
    """
    y, p = _check(y_true, probs)
    if n_boot <= 0 or y.size == 0:
        return {}
    rng = np.random.default_rng(seed)
    values = np.full((n_boot, len(SUMMARY_KEYS)), np.nan)
    for b in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        m = summary_metrics(y[idx], p[idx])
        values[b] = [m[key] for key in SUMMARY_KEYS]
    tail = 100 * (1 - level) / 2
    out: dict[str, list[float]] = {}
    for j, key in enumerate(SUMMARY_KEYS):
        col = values[:, j][~np.isnan(values[:, j])]
        out[key] = ([float(np.percentile(col, tail)), float(np.percentile(col, 100 - tail))] if col.size
                    else [float("nan"), float("nan")])
    return out


def bootstrap_mean_difference(runs: Sequence[tuple[np.ndarray, np.ndarray]],
                              ref_runs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None, n_boot: int = 1000,
                              seed: int = 0, keys: Sequence[str] = SUMMARY_KEYS) -> dict[str, dict[str, Any]]:
    """Mean over ``runs`` of each metric (minus the mean over the paired ``ref_runs`` when given) with a percentile
    bootstrap 95 % interval that resamples the shared test cases jointly for every run.

    Args:
        runs / ref_runs: per run ``(y_true (N,), probs (N, K))``, all on the same N cases in the same order.
        keys: metrics of :func:`summary_metrics` to report.

    Returns:
        ``{metric: {"n": len(runs), "mean": point value, "ci95": [low, high]}}`` (NaN bounds when undefined).
    """
    n = len(runs[0][0])
    if any(len(y) != n for y, _ in [*runs, *(ref_runs or [])]):
        raise ValueError("every run must score the same test cases (same length and order)")

    def mean_of(group: Sequence[tuple[np.ndarray, np.ndarray]], idx: np.ndarray | None) -> np.ndarray:
        vals = []
        for y, p in group:
            m = summary_metrics(y if idx is None else y[idx], p if idx is None else p[idx])
            vals.append([m[k] for k in keys])
        with warnings.catch_warnings():  # a metric undefined (NaN AUC) in every run of a resample stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.array(vals, dtype=np.float64), 0)

    def stat(idx: np.ndarray | None) -> np.ndarray:
        v = mean_of(runs, idx)
        return v - mean_of(ref_runs, idx) if ref_runs else v

    point = stat(None)
    rng = np.random.default_rng(seed)
    boots = np.array([stat(rng.integers(0, n, n)) for _ in range(max(n_boot, 0))]).reshape(-1, len(keys))
    out: dict[str, dict[str, Any]] = {}
    for j, key in enumerate(keys):
        col = boots[:, j][np.isfinite(boots[:, j])]
        ci = [float(np.percentile(col, 2.5)), float(np.percentile(col, 97.5))] if col.size else [math.nan, math.nan]
        out[key] = {"n": len(runs), "mean": float(point[j]), "ci95": ci}
    return out
