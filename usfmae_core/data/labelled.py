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
           "load_datalist", "validate_datalist", "check_items", "datalist_images", "subsample_fraction",
           "labelled_source_to_datalist", "image_fingerprint"]

_PATH_COLUMNS = ("path", "image", "file", "filename", "filepath")
_LABEL_COLUMNS = ("label", "class", "target", "diagnosis")
_GROUP_COLUMNS = ("group", "patient", "patient_id", "patientid", "subject", "case")


def scan_class_folders(root: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """``root/<class>/**/<file>`` -> (items ``{image, label, group}``, sorted class names). Image paths are absolute,
    so a datalist written from them works from any folder (relative paths in a datalist are read relative to it)."""
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
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise UsfmaeError(f"{csv_path} is not a readable CSV file ({str(err).splitlines()[0][:100]})",
                          "save it as UTF-8 CSV with a header path,label[,group]") from None
    if not rows:
        raise UsfmaeError(f"{csv_path} has no rows", "expected a header with path,label[,group] and one row per image")
    cols = {c.lower().strip(): c for c in rows[0].keys() if c}
    pick = lambda names: next((cols[n] for n in names if n in cols), None)  # noqa: E731
    pc, lc, gc = pick(_PATH_COLUMNS), pick(_LABEL_COLUMNS), pick(_GROUP_COLUMNS)
    if pc is None or lc is None:
        raise UsfmaeError(f"{csv_path} needs a 'path' (or 'image') and a 'label' column, has {list(rows[0])}",
                          "rename the columns")
    raw = [(r.get(lc) or "").strip() for r in rows]
    empty = [i for i, r in enumerate(rows) if not (r.get(pc) or "").strip() or not raw[i]]
    if empty:
        raise UsfmaeError(f"{len(empty)} row(s) of {csv_path} lack a path or a label (first: data row {empty[0] + 1})",
                          "fill in both columns on every row")
    if all(v.lstrip("-").isdigit() for v in raw):
        ints = [int(v) for v in raw]
        classes = [str(i) for i in range(max(ints) + 1)]
        labels = ints
    else:
        classes = sorted(set(raw))
        labels = [classes.index(v) for v in raw]
    items = []
    for r, lab in zip(rows, labels):
        p = Path((r.get(pc) or "").strip())
        p = p if p.is_absolute() else base / p
        g = r[gc].strip() if gc and r.get(gc) else None
        items.append({"image": str(p), "label": int(lab), "group": g or None})
    check_items(items, classes, csv_path)
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
    from usfmae_core.fileio import write_json

    return write_json(path, datalist, indent=1)


SPLIT_KEYS = ("training", "validation", "test")


def check_items(items: Sequence[dict], classes: Sequence[str], source: str | os.PathLike,
                check_files: bool = True) -> None:
    """The one check of labelled items, shared by CSV manifests and datalist JSONs (and so by every command and the
    bundle): integer labels within ``classes``, and image files that exist, are files and have a type usfmae reads.

    Raises:
        UsfmaeError: naming how many items are affected and the first one.
    """
    from usfmae_core.data.readers import is_supported

    k = len(classes)
    bad_label = [it for it in items if not isinstance(it.get("label"), int) or isinstance(it.get("label"), bool)
                 or not 0 <= it["label"] < k]
    if bad_label:
        it = bad_label[0]
        raise UsfmaeError(f"{len(bad_label)} item(s) of {source} have a label outside the {k} class(es) "
                          f"{list(classes)} (first: {it.get('image')} with label {it.get('label')!r})",
                          f"use labels 0..{k - 1} or class names, or list every class under \"classes\"")
    if not check_files:
        return
    missing = [it["image"] for it in items if not os.path.lexists(it["image"])]
    if missing:
        raise UsfmaeError(f"{len(missing)} image(s) listed in {source} do not exist (first: {missing[0]})",
                          "fix the paths (relative paths are read from the list's own folder)")
    not_files = [it["image"] for it in items if not Path(it["image"]).is_file()]
    if not_files:
        raise UsfmaeError(f"{len(not_files)} image(s) listed in {source} are not files (broken links, folders or "
                          f"special files; first: {not_files[0]})", "list image files only")
    unsupported = [it["image"] for it in items if not is_supported(it["image"])]
    if unsupported:
        raise UsfmaeError(f"{len(unsupported)} file(s) listed in {source} are not of a type usfmae reads (first: "
                          f"{unsupported[0]})",
                          "list ultrasound images, clips or volumes (png/jpg/dcm/nii/nrrd/mha/mp4...)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsfmaeError(f"datalist {path} does not exist", "check the path") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsfmaeError(f"cannot read datalist {path} ({str(err).splitlines()[0][:100]})",
                          "pass a valid JSON datalist (e.g. RUN/datalist.json written by usfmae finetune)") from None


def _resolve_image(value: Any, base: Path) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def validate_datalist(data: Any, source: str | os.PathLike, base: str | os.PathLike | None = None,
                      check_files: bool = True) -> dict:
    """Check a labelled datalist (MONAI decathlon style) and return it normalised; the one entry for datalist JSONs.

    Accepted: ``{"classes": [names], "training": [{"image": path, "label": int | class name, "group": ...}, ...],
    "validation": [...], "test": [...], "folds": [[...], ...]}``; other keys are kept as they are. Relative image
    paths are resolved against ``base`` (the JSON's folder) as MONAI's ``load_decathlon_datalist`` does. String labels
    are mapped to ``classes`` by name (or, without ``classes``, to the sorted names, as for CSV manifests); integer
    labels index ``classes`` (without ``classes``: named ``"0" .. "K-1"``). Files are checked by :func:`check_items`.

    Raises:
        UsfmaeError: not a JSON object, no split, an item that is not ``{"image", "label"}``, labels of mixed kinds,
            an unknown class name, a label out of range, missing or unreadable files (one line naming the first).
    """
    base = Path(base) if base is not None else Path(".")
    fix = 'expected {"classes": [...], "training": [{"image": "path", "label": 0}, ...], "validation": [...], ' \
          '"test": [...]}'
    if not isinstance(data, dict):
        raise UsfmaeError(f"{source} is not a labelled datalist (a JSON {type(data).__name__}, not an object)", fix)
    sections = {k: data[k] for k in SPLIT_KEYS if k in data}
    if not sections or not any(isinstance(v, list) and v for v in sections.values()):
        raise UsfmaeError(f"{source} has no images under 'training', 'validation' or 'test'", fix)
    folds = data.get("folds")
    lists: list[tuple[str, list]] = []
    for key, items in sections.items():
        if not isinstance(items, list):
            raise UsfmaeError(f"'{key}' in {source} is a {type(items).__name__}, not a list of items", fix)
        lists.append((key, items))
    if folds is not None:
        if not isinstance(folds, list) or not all(isinstance(f, list) for f in folds):
            raise UsfmaeError(f"'folds' in {source} is not a list of lists of items", fix)
        lists += [(f"folds[{i}]", f) for i, f in enumerate(folds)]
    raw_labels = []
    for key, items in lists:
        for i, it in enumerate(items):
            if not isinstance(it, dict) or "image" not in it or "label" not in it:
                raise UsfmaeError(f"item {i} of '{key}' in {source} is not {{\"image\": ..., \"label\": ...}} "
                                  f"({str(it)[:80]})", fix)
            if _resolve_image(it["image"], base) is None:
                raise UsfmaeError(f"item {i} of '{key}' in {source} has no image path ({it['image']!r})", fix)
            raw_labels.append(it["label"])
    is_int = [isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, float) and float(v).is_integer())
              for v in raw_labels]
    is_str = [isinstance(v, str) for v in raw_labels]
    classes = data.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes
                                or len({str(c) for c in classes}) != len(classes)):
        raise UsfmaeError(f"'classes' in {source} must be a non-empty list of distinct names, got {classes!r}"[:200],
                          fix)
    if all(is_int):
        if classes is None:
            n = 1 + max((int(v) for v in raw_labels), default=-1)
            classes = [str(i) for i in range(max(n, 0))]
        to_index = lambda v: int(v)  # noqa: E731
    elif all(is_str):
        if classes is None:
            classes = sorted({str(v) for v in raw_labels})
        names = {str(c): i for i, c in enumerate(classes)}
        unknown = sorted({v for v in raw_labels if v not in names})
        if unknown:
            raise UsfmaeError(f"labels {unknown[:5]} in {source} are not among its classes {list(classes)}",
                              "use the names listed under \"classes\" (or integer labels)")
        to_index = names.__getitem__
    else:
        odd = next(v for v, a, b in zip(raw_labels, is_int, is_str) if not a and not b) if not all(
            a or b for a, b in zip(is_int, is_str)) else None
        what = f"a label {odd!r} that is neither an integer nor a class name" if odd is not None else \
            "integer labels mixed with class names"
        raise UsfmaeError(f"{source} has {what}", "use integer labels (0..K-1) or class names throughout")
    out = dict(data)
    out["classes"] = [str(c) for c in classes]
    all_items: list[dict] = []
    for key, items in lists:
        fixed = [{**it, "image": _resolve_image(it["image"], base), "label": to_index(it["label"])} for it in items]
        all_items += fixed
        if key.startswith("folds["):
            out.setdefault("_folds", []).append(fixed)
        else:
            out[key] = fixed
    if "_folds" in out:
        out["folds"] = out.pop("_folds")
    check_items(all_items, out["classes"], source, check_files)
    return out


def load_datalist(path: str | os.PathLike, check_files: bool = True) -> dict:
    """Load and check a labelled datalist JSON (:func:`validate_datalist`); relative image paths resolve against the
    JSON's folder."""
    path = Path(path)
    return validate_datalist(_read_json(path), path, path.parent.absolute(), check_files)


def datalist_images(path: str | os.PathLike) -> list[Path]:
    """The image paths of a datalist JSON for inference (labels not needed): MONAI style sections of
    ``{"image": ...}`` items, or a plain list of items / paths; relative paths resolve against the JSON's folder.

    Raises:
        UsfmaeError: not JSON, or no image path in it.
    """
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict):
        sections = [v for k, v in data.items() if isinstance(v, list) and k not in ("classes", "folds")]
    elif isinstance(data, list):
        sections = [data]
    else:
        sections = []
    out: list[Path] = []
    for items in sections:
        for item in items:
            image = item.get("image") if isinstance(item, dict) else item
            for p in image if isinstance(image, list) else [image]:
                resolved = _resolve_image(p, path.parent.absolute())
                if resolved is not None:
                    out.append(Path(resolved))
    if not out:
        raise UsfmaeError(f"datalist {path} lists no images",
                          "expected {\"test\": [{\"image\": \"path\"}, ...]} or a list of paths")
    return out


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
