"""Labelled data: class folders and CSV manifests -> deduplicated, group-aware, stratified datalists.

Deduplication (:func:`deduplicate`) works on decoded pixels, not file bytes:

* exact duplicates (SHA-1 of the decoded array) keep the first copy; when the copies carry *different* labels
  (BUSI: ``malignant (145).png == benign (433).png``) every copy is removed, since the label is unknowable;
* near-duplicates (a 32x32 thumbnail of the intensity-scaled image, mean absolute difference below
  ``near_threshold``) are kept but share one ``group``, so a split never separates them.

Splits (:func:`make_splits`) assign whole groups (patient / near-duplicate cluster; an item without a group is its
own group) to test / validation / training class by class (stratified by each group's majority label), with a
seeded RNG; ``n_folds`` adds k group-aware folds over training + validation. Everything is written to a MONAI
decathlon-style datalist JSON so a run is reproducible from the file alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from usfmae_core.errors import UsfmaeError

__all__ = ["scan_class_folders", "read_csv_manifest", "deduplicate", "make_splits", "save_datalist",
           "load_datalist", "subsample_fraction", "labelled_source_to_datalist", "image_fingerprint"]

_PATH_COLUMNS = ("path", "image", "file", "filename", "filepath")
_LABEL_COLUMNS = ("label", "class", "target", "diagnosis")
_GROUP_COLUMNS = ("group", "patient", "patient_id", "patientid", "subject", "case")


def scan_class_folders(root: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """``root/<class>/**/<file>`` -> (items ``{image, label, group}``, sorted class names). Image paths are absolute,
    so a datalist written from them works from any folder (relative paths in a datalist are read relative to it).
    A sub-folder holding a positioned DICOM series is one item (:func:`~usfmae_core.data.dicom_series.group_dicom_series`)."""
    from usfmae_core.data.readers import is_supported

    root = Path(root).absolute()
    if not root.is_dir():
        raise UsfmaeError(f"{root} is not a folder", "give a folder with one sub-folder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.is_file() and not p.name.startswith(".") and is_supported(p):
                items.append({"image": str(p), "label": label, "group": None})
    from usfmae_core.data.dicom_series import group_dicom_series

    items = group_dicom_series(items)  # a folder of positioned DICOM slices is one volume
    classes = [c for i, c in enumerate(classes) if any(it["label"] == i for it in items)] if items else classes
    if not items:
        raise UsfmaeError(f"no images found in class folders under {root}",
                          "expected ROOT/<class name>/<image files>")
    # re-index labels if empty class folders were dropped
    names = sorted({Path(it["image"]).relative_to(root).parts[0] for it in items})
    index = {n: i for i, n in enumerate(names)}
    for it in items:
        it["label"] = index[Path(it["image"]).relative_to(root).parts[0]]
    return items, names


def read_csv_manifest(csv_path: str | os.PathLike, root: str | os.PathLike | None = None
                      ) -> tuple[list[dict], list[str]]:
    """CSV with columns path|image, label and optionally group|patient -> (items, classes).

    Relative paths resolve against ``root`` (default: the CSV's folder). String labels become indices into the
    sorted class names; integer labels are kept and named ``"0", "1", ...``.
    """
    csv_path = Path(csv_path)
    base = (Path(root) if root is not None else csv_path.parent).absolute()  # absolute: see scan_class_folders
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UsfmaeError(f"{csv_path} has no rows", "expected a header with path,label[,group] and one row per image")
    cols = {c.lower().strip(): c for c in rows[0].keys() if c}
    pick = lambda names: next((cols[n] for n in names if n in cols), None)  # noqa: E731
    pc, lc, gc = pick(_PATH_COLUMNS), pick(_LABEL_COLUMNS), pick(_GROUP_COLUMNS)
    if pc is None or lc is None:
        raise UsfmaeError(f"{csv_path} needs a 'path' (or 'image') and a 'label' column, has {list(rows[0])}",
                          "rename the columns")
    raw = [r[lc].strip() for r in rows]
    if all(v.lstrip("-").isdigit() for v in raw):
        ints = [int(v) for v in raw]
        classes = [str(i) for i in range(max(ints) + 1)]
        labels = ints
    else:
        classes = sorted(set(raw))
        labels = [classes.index(v) for v in raw]
    items = []
    for r, lab in zip(rows, labels):
        p = Path(r[pc].strip())
        p = p if p.is_absolute() else base / p
        g = r[gc].strip() if gc and r.get(gc) else None
        items.append({"image": str(p), "label": int(lab), "group": g or None})
    missing = [it["image"] for it in items if not Path(it["image"]).exists()]
    if missing:
        raise UsfmaeError(f"{len(missing)} files listed in {csv_path} do not exist (first: {missing[0]})",
                          "fix the paths or pass root= / the folder they are relative to")
    return items, classes


def image_fingerprint(path: str, thumb: int = 32) -> tuple[str, np.ndarray]:
    """(SHA-1 of the decoded pixels, ``thumb x thumb`` float32 thumbnail in [0, 1]) of one file."""
    from usfmae_core.data.readers import read_ultrasound
    from usfmae_core.data.transforms import resize_frames, scale_intensity

    img = read_ultrasound(path)
    a = img.array if img.kind == "image" else img.array[img.array.shape[0] // 2]
    sha = hashlib.sha1(np.ascontiguousarray(img.array).tobytes() + str(img.array.shape).encode()).hexdigest()
    return sha, resize_frames(scale_intensity(a)[None], thumb)[0].numpy()


def deduplicate(items: Sequence[dict], near_threshold: float = 0.02, thumb: int = 32
                ) -> tuple[list[dict], list[dict]]:
    """Remove exact duplicates and group near-duplicates; returns (kept items, removed ``{path, duplicate_of, reason}``).

    Removed entries also include unreadable files (reason starts with ``unreadable``). Kept near-duplicates get a
    shared ``group`` (their existing group if any, else ``near-dup-<n>``) and ``near_duplicate_of`` is noted in the
    report entries with ``reason == "near-duplicate (grouped, kept)"``.
    """
    removed: list[dict] = []
    fps: list[tuple[str, np.ndarray] | None] = []
    for i, it in enumerate(items):
        try:
            fps.append(image_fingerprint(it["image"], thumb))
        except UsfmaeError as err:
            fps.append(None)
            removed.append({"path": it["image"], "duplicate_of": None, "reason": f"unreadable: {err.cause}"})
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, fp in enumerate(fps):
        if fp is not None:
            by_sha[fp[0]].append(i)
    keep: list[int] = []
    for sha, idx in by_sha.items():
        labels = {items[i]["label"] for i in idx}
        if len(idx) > 1 and len(labels) > 1:
            for i in idx:
                removed.append({"path": items[i]["image"], "duplicate_of": [items[j]["image"] for j in idx if j != i],
                                "reason": "exact duplicate with conflicting labels (all copies removed)"})
            continue
        keep.append(idx[0])
        for i in idx[1:]:
            removed.append({"path": items[i]["image"], "duplicate_of": items[idx[0]]["image"],
                            "reason": "exact duplicate (same decoded pixels)"})
    keep.sort()
    kept = [dict(items[i]) for i in keep]
    # near-duplicates: union-find over pairs with a small thumbnail distance (chunked O(n^2), vectorised)
    if len(kept) > 1:
        th = np.stack([fps[i][1].reshape(-1) for i in keep]).astype(np.float32)
        parent = list(range(len(kept)))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        pairs = []
        for s in range(0, len(th), 256):
            d = np.abs(th[s:s + 256, None, :] - th[None, :, :]).mean(-1)
            ii, jj = np.nonzero(d < near_threshold)
            pairs += [(int(a + s), int(b)) for a, b in zip(ii, jj) if a + s < b]
        # existing groups (patients) are clusters too
        by_group: dict[str, int] = {}
        for k, it in enumerate(kept):
            if it.get("group") is not None:
                if it["group"] in by_group:
                    pairs.append((by_group[it["group"]], k))
                else:
                    by_group[it["group"]] = k
        near_pairs = set()
        for a, b in pairs:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        for a, b in pairs:
            if kept[a].get("group") is None or kept[a].get("group") != kept[b].get("group"):
                near_pairs.add((a, b))
        clusters: dict[int, list[int]] = defaultdict(list)
        for k in range(len(kept)):
            clusters[find(k)].append(k)
        n = 0
        for members in clusters.values():
            if len(members) < 2:
                continue
            existing = sorted({kept[m]["group"] for m in members if kept[m].get("group") is not None})
            gid = existing[0] if existing else f"near-dup-{n}"
            n += 0 if existing else 1
            for m in members:
                kept[m]["group"] = gid
        for a, b in sorted(near_pairs):
            removed.append({"path": kept[b]["image"], "duplicate_of": kept[a]["image"],
                            "reason": "near-duplicate (grouped, kept)"})
    return kept, removed


def _group_of(it: dict) -> str:
    return it["group"] if it.get("group") is not None else f"item:{it['image']}"


def make_splits(items: Sequence[dict], classes: Sequence[str], val_fraction: float = 0.15,
                test_fraction: float = 0.15, n_folds: int = 0, seed: int = 0) -> dict[str, Any]:
    """Group-aware, stratified train / validation / test split (+ optional k folds) as a datalist dict."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise UsfmaeError(f"bad split fractions val={val_fraction} test={test_fraction}",
                          "use fractions >= 0 that sum to less than 1")
    rng = np.random.default_rng(int(seed))
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        groups[_group_of(it)].append(dict(it))
    by_class: dict[int, list[str]] = defaultdict(list)
    for g in sorted(groups):
        labels = [it["label"] for it in groups[g]]
        by_class[int(np.bincount(labels).argmax())].append(g)
    split = {"training": [], "validation": [], "test": []}
    for c in sorted(by_class):
        gs = list(by_class[c])
        rng.shuffle(gs)
        total = sum(len(groups[g]) for g in gs)
        n_test, n_val = test_fraction * total, val_fraction * total
        n_te = n_va = 0
        for g in gs:  # greedy by item count: test first, then validation, the rest trains
            k = len(groups[g])
            if n_te + k / 2 <= n_test:
                split["test"] += groups[g]
                n_te += k
            elif n_va + k / 2 <= n_val:
                split["validation"] += groups[g]
                n_va += k
            else:
                split["training"] += groups[g]
    out: dict[str, Any] = {"classes": list(classes), **split, "seed": int(seed)}
    if n_folds and n_folds > 1:
        pool = split["training"] + split["validation"]
        pg: dict[str, list[dict]] = defaultdict(list)
        for it in pool:
            pg[_group_of(it)].append(it)
        folds: list[list[dict]] = [[] for _ in range(n_folds)]
        counts = np.zeros((n_folds, max(1, len(classes))))
        order = sorted(pg)
        rng.shuffle(order)
        order.sort(key=lambda g: -len(pg[g]))  # largest groups first, then greedy balance per class
        for g in order:
            c = int(np.bincount([it["label"] for it in pg[g]]).argmax())
            k = int(np.lexsort((counts.sum(1), counts[:, c]))[0])
            folds[k] += pg[g]
            counts[k, c] += len(pg[g])
        out["folds"] = folds
    return out


def save_datalist(datalist: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(datalist, indent=1))
    os.replace(tmp, path)
    return path


def load_datalist(path: str | os.PathLike) -> dict:
    """Load a datalist JSON; relative image paths resolve against the JSON's folder."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsfmaeError(f"cannot read datalist {path} ({err})", "give a JSON written by usfmae") from None
    if "training" not in d:
        raise UsfmaeError(f"{path} has no 'training' list", "expected a MONAI-style datalist")
    for key in ("training", "validation", "test"):
        for it in d.get(key, []):
            p = Path(it["image"])
            if not p.is_absolute():
                it["image"] = str(path.parent / p)
    if "classes" not in d:
        n = 1 + max(int(it["label"]) for it in d["training"])
        d["classes"] = [str(i) for i in range(n)]
    return d


def subsample_fraction(items: Sequence[dict], fraction: float, seed: int = 0) -> list[dict]:
    """A stratified random ``fraction`` of ``items`` (at least one per class present), group-blind."""
    if not 0 < fraction <= 1:
        raise UsfmaeError(f"fraction {fraction} is not in (0, 1]", "use e.g. 0.1 for 10 %")
    rng = np.random.default_rng(int(seed))
    by: dict[int, list[dict]] = defaultdict(list)
    for it in items:
        by[int(it["label"])].append(it)
    out = []
    for c in sorted(by):
        lst = by[c]
        n = max(1, int(round(fraction * len(lst))))
        idx = np.sort(rng.choice(len(lst), size=n, replace=False))
        out += [lst[i] for i in idx]
    return out


def labelled_source_to_datalist(path: str | os.PathLike, out_json: str | os.PathLike | None = None, seed: int = 0,
                                val_fraction: float = 0.15, test_fraction: float = 0.15, n_folds: int = 0,
                                deduplicate_items: bool = True) -> dict:
    """The one entry for finetune / evaluate / bundle: a class-folder tree, a CSV manifest or a datalist JSON.

    Folders and CSVs are deduplicated and split (seeded); the result (with ``removed_duplicates``) is saved to
    ``out_json`` when given. A JSON datalist is loaded as is.
    """
    p = Path(path)
    if p.suffix.lower() == ".json":
        d = load_datalist(p)
        if out_json is not None:
            save_datalist(d, out_json)
        return d
    if p.is_dir():
        items, classes = scan_class_folders(p)
    elif p.suffix.lower() in (".csv", ".tsv"):
        items, classes = read_csv_manifest(p)
    else:
        raise UsfmaeError(f"{p} is not a folder, .csv or .json datalist",
                          "give ROOT/<class>/<images>, a CSV with path,label[,group] or a datalist JSON")
    removed: list[dict] = []
    if deduplicate_items:
        items, removed = deduplicate(items)
    d = make_splits(items, classes, val_fraction, test_fraction, n_folds, seed)
    d["removed_duplicates"] = removed
    d["source"] = str(p)
    if out_json is not None:
        save_datalist(d, out_json)
    return d
