"""``usfmae evaluate``: metrics of a trained classifier on labelled data, with bootstrap intervals and pictures.

Usage::

    usfmae evaluate --model RUN/model.pt --data RUN/datalist.json --out EVAL              # the run's test split
    usfmae evaluate --model RUN/model.pt --data OTHER_FOLDER --split all --out EVAL      # an external test set

``--data`` is read like ``usfmae finetune --data`` (class folders, CSV manifest or datalist JSON, split with the same
seeded rule); ``--split`` picks ``test`` (default), ``validation``, ``training`` or ``all``. The data's class names
must be the model's (any order: labels are mapped by name). For a 2D model, cines and volumes contribute their middle
frame / slice, as in fine-tuning; a volume model (``finetune --volume-model``) classifies each volume / clip whole,
one row per scan.

Writes into ``EVAL`` (each file atomically, and only after every prediction is made):

- ``metrics.json``: accuracy, balanced accuracy, precision / recall / F1 (macro and per class), one-vs-rest AUC,
  the confusion matrix, and percentile-bootstrap 95% intervals of the summary metrics (``--bootstrap N`` resamples,
  seeded by ``--seed``); definitions in :mod:`usfmae_core.workflows.metrics`;
- ``predictions.csv``: one row per image (path, true class, predicted class, probability per class);
- ``metrics.csv``: the metrics table (metric, class, value, 95% interval);
- ``confusion_matrix.png`` and ``roc.png`` (one-vs-rest ROC curves with their AUC);
- ``datalist.json``: the data evaluated (for folders / CSVs also what was left out: masks, duplicates, unreadable);
- ``config.json``: the arguments.

A summary of the data (files found, per-class counts per split, masks excluded, duplicates, near-duplicate groups,
unreadable files) is printed first (:func:`usfmae_core.data.labelled.datalist_summary`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from usfmae_core.device import resolve_device
from usfmae_core.errors import UsfmaeError
from usfmae_core.precision import precision_name, resolve_precision
from usfmae_core.workflows import metrics as M
from usfmae_core.workflows.common import Progress, write_csv, write_json
from usfmae_core.workflows.finetune import (
    SPLITS,
    jsonable,
    load_labelled,
    make_datasets,
    make_loader,
    predict_probs,
    probe_input_shape,
)
from usfmae_core.workflows.pictures import save_figure

__all__ = [
    "evaluate",
    "evaluate_predictions",
    "map_labels",
    "save_confusion_matrix",
    "save_roc",
    "select_items",
    "write_evaluation",
]

MODEL_ARCHS = ("classifier", "mil", "resnet", "densenet")


def select_items(datalist: dict[str, Any], split: str, source: str | Path) -> list[dict[str, Any]]:
    """The items of ``split`` (``training`` | ``validation`` | ``test`` | ``all``), refusing an empty one."""
    if split == "all":
        items = [it for s in SPLITS for it in (datalist.get(s) or [])]
    elif split in SPLITS:
        items = list(datalist.get(split) or [])
    else:
        raise UsfmaeError(f"unknown --split '{split}'", "choose test, validation, training or all")
    if not items:
        raise UsfmaeError(f"the {split} split of {source} is empty",
                          "use --split all to evaluate on every image of an external test set")
    return items


def map_labels(data_classes: Sequence[str], model_classes: Sequence[str], source: str | Path,
               model_path: str | Path) -> np.ndarray:
    """Index array mapping the data's label ``i`` to the model's class index (classes matched by name)."""
    data_classes, model_classes = [str(c) for c in data_classes], [str(c) for c in model_classes]
    if set(data_classes) != set(model_classes):
        extra = sorted(set(data_classes) - set(model_classes))
        missing = sorted(set(model_classes) - set(data_classes))
        detail = "; ".join(x for x in (f"not in the model: {', '.join(extra)}" if extra else "",
                                       f"missing from the data: {', '.join(missing)}" if missing else "") if x)
        raise UsfmaeError(f"the classes of {source} ({', '.join(data_classes)}) do not match those of {model_path} "
                          f"({', '.join(model_classes)}): {detail}",
                          "evaluate on data with the model's classes (one folder / CSV label per class)")
    index = {c: i for i, c in enumerate(model_classes)}
    return np.array([index[c] for c in data_classes], dtype=np.int64)


def evaluate_predictions(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], bootstrap: int = 1000,
                         seed: int = 0) -> dict[str, Any]:
    """:func:`~usfmae_core.workflows.metrics.classification_metrics` plus ``intervals`` (bootstrap 95%)."""
    out = M.classification_metrics(y_true, probs, classes)
    out["intervals"] = M.bootstrap_intervals(y_true, probs, bootstrap, seed)
    out["bootstrap"] = {"resamples": int(bootstrap), "seed": int(seed), "level": 0.95, "method": "percentile"}
    return out


def save_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Confusion matrix PNG: counts, with each cell shaded by its row (true class) fraction."""
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    k = len(classes)
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 2.2 + 0.6 * k
    fig = Figure(figsize=(size + 1, size), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    return save_figure(fig, path)


def save_roc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """One-vs-rest ROC curves PNG, one per class present (the legend gives each AUC)."""
    from matplotlib.figure import Figure

    y = np.asarray(y_true)
    auc = M.ovr_auc(y, probs)
    fig = Figure(figsize=(5.2, 4.6), dpi=110)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    for k, name in enumerate(classes):
        if not np.isfinite(auc[k]):
            continue
        fpr, tpr = M.roc_curve(y == k, probs[:, k])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc[k]:.3f})")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title("one-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_evaluation(out: str | Path, images: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                     classes: Sequence[str], result: dict[str, Any]) -> dict[str, Path]:
    """Write ``predictions.csv``, ``metrics.csv``, the two PNGs and ``metrics.json`` (last) into ``out``."""
    out = Path(out)
    pred = probs.argmax(1)
    files = {}
    files["predictions"] = write_csv(
        out / "predictions.csv", ["image", "true", "predicted", "correct", *[f"prob_{c}" for c in classes]],
        [[img, classes[t], classes[p], int(t == p), *[float(v) for v in pr]]
         for img, t, p, pr in zip(images, y_true, pred, probs)])
    ci = result.get("intervals", {})
    rows = [[key, "", result[key], *(ci.get(key) or [float("nan"), float("nan")])] for key in M.SUMMARY_KEYS]
    for name, pc in result["per_class"].items():
        rows += [[key, name, float(pc[key]), float("nan"), float("nan")]
                 for key in ("precision", "recall", "f1", "auc")]
        rows.append(["support", name, int(pc["support"]), float("nan"), float("nan")])
    files["metrics_csv"] = write_csv(out / "metrics.csv", ["metric", "class", "value", "ci95_low", "ci95_high"], rows)
    files["confusion_matrix"] = save_confusion_matrix(np.array(result["confusion_matrix"]), classes,
                                                      out / "confusion_matrix.png")
    files["roc"] = save_roc(y_true, probs, classes, out / "roc.png")
    files["metrics"] = write_json(out / "metrics.json", jsonable(result))
    return files


def load_predictions(out: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Read back an evaluation's ``predictions.csv``: (image paths, labels ``(N,)``, probabilities ``(N, K)``,
    class names)."""
    import csv

    path = Path(out) / "predictions.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UsfmaeError(f"{path}: no predictions; re-run `usfmae evaluate`")
    classes = [c[len("prob_"):] for c in rows[0] if c.startswith("prob_")]
    y = np.array([classes.index(r["true"]) for r in rows], dtype=np.int64)
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows], dtype=np.float64)
    return [r["image"] for r in rows], y, p, classes


def evaluate(model_path: str | Path, data: str | Path, out: str | Path, split: str = "test", bootstrap: int = 1000,
             seed: int = 0, device: str = "auto", batch_size: int | None = None, workers: int = 0,
             precision: str = "auto", val_fraction: float = 0.15, test_fraction: float = 0.15,
             run_config: dict[str, Any] | None = None, quiet: bool = False, include_masks: bool = False,
             mask_patterns: Sequence[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate the classifier in ``model_path`` on ``split`` of ``data`` and write the results into ``out`` (locked
    while it is written; earlier results there are refused unless ``overwrite``, see :mod:`usfmae_core.runs`).

    Args:
        model_path: a checkpoint from ``usfmae finetune`` (arch classifier / mil / resnet / densenet).
        data: class folders, CSV manifest or datalist JSON (``RUN/datalist.json`` gives the run's own splits).
        split: ``test`` | ``validation`` | ``training`` | ``all``.
        val_fraction / test_fraction: how folders / CSVs are split (as given to ``usfmae finetune``).
        include_masks / mask_patterns: mask files in folders / CSVs (as given to ``usfmae finetune``).
        quiet: no progress bar and no data summary on the console.
        bootstrap: resamples for the 95% intervals (0: none); ``seed`` seeds them and the data split.
        batch_size: images per batch (default 64), or volumes for a volume model (default 2).

    Returns:
        The contents of ``metrics.json``.
    """
    from usfmae_core.checkpoints import load_model
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.data.volumes import volume_from_config
    from usfmae_core.runs import RunFolder, check_run

    check_run(out, "evaluate", overwrite=overwrite)
    dev = resolve_device(device)
    model, ckpt = load_model(model_path, expect=MODEL_ARCHS, device=dev)
    cfg = ckpt["config"]
    classes = [str(c) for c in cfg.get("classes") or [str(i) for i in range(int(cfg["num_classes"]))]]
    prep = Preprocessing.from_dict(cfg.get("preprocessing"))
    datalist = load_labelled(data, seed, val_fraction, test_fraction, include_masks, mask_patterns)
    if not quiet:
        from usfmae_core.data.labelled import datalist_summary, preprocessing_notes

        print("\n".join(datalist_summary(datalist, str(data), colour=False)), flush=True)
        print("\n".join(preprocessing_notes(datalist, prep, volume_from_config(cfg))), flush=True)
    mapping = map_labels(datalist["classes"], classes, data, model_path)
    items = [{**it, "label": int(mapping[int(it["label"])])} for it in select_items(datalist, split, data)]

    volume = volume_from_config(cfg)
    config_used = run_config if run_config is not None else {
        "model": str(model_path), "data": str(data), "split": split, "bootstrap": bootstrap, "seed": seed,
        "device": device, "batch_size": batch_size, "precision": precision}
    with RunFolder(out, "evaluate", overwrite=overwrite, config=config_used) as run:
        dataset = make_datasets({"test": items}, prep, ("test",), cache=False, augment=False, volume=volume)["test"]
        loader = make_loader(dataset, batch_size or (2 if volume is not None else 64), train=False, workers=workers,
                             volume=volume)
        dtype = resolve_precision(precision, dev, model, probe_input_shape(loader.batch_size, prep, volume),
                                  train=False, log=None if quiet else print)
        with Progress(len(loader), "evaluate", disable=quiet) as progress:
            probs, labels, _ = predict_probs(model, loader, dev, dtype, progress)
        result = evaluate_predictions(labels, probs, classes, bootstrap, seed)
        result.update(model=str(model_path), data=str(data), split=split, arch=ckpt["arch"],
                      volume_model=None if volume is None else volume.model, autocast=precision_name(dtype))
        write_evaluation(run.path, [it["image"] for it in items], labels, probs, classes, result)
        write_json(run.path / "datalist.json", datalist)  # what was evaluated, and what was left out and why
        run.finish()
    return result
