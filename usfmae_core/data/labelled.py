"""Labelled data: class folders and CSV manifests -> deduplicated, group-aware, stratified datalists.

What :func:`labelled_source_to_datalist` does to a class-folder tree or CSV, in order, and where the datalist says so:

1. **masks** (:mod:`usfmae_core.data.masks`): segmentation masks / annotation files beside the scans, by name
   (``_mask``, ``_mask_1``, ``masks/``, ``labels/``, ``gt/`` ...) and by content (few grey levels with a companion
   scan), are not trained on as scans (``include_masks`` keeps them). A mask whose scan is a labelled item becomes that
   item's segmentation target, ``"mask": path`` (a list when a scan has several); every mask is listed under
   ``masks`` (path, scan, reason). A class left without images (a ``masks/`` class folder) is dropped and listed in
   ``dropped_classes``.
2. **unreadable** files are listed with the reason under ``unreadable``; files that are not in any class folder under
   ``ignored``.
3. **exact duplicates** (SHA-1 of the decoded array) keep the first copy; when the copies carry *different* labels
   (BUSI: ``malignant (145).png == benign (433).png``) every copy is removed, since the label is unknowable. Listed
   under ``removed``.
4. **near-duplicates and augmented copies** are kept but share one ``group``, so a split never separates them:
   a 32x32 thumbnail of the intensity-scaled image within ``near_threshold`` mean absolute difference of another's,
   under any of the 8 flips / quarter turns (a ``_vflip`` or ``_rot90`` copy is the same scan), or a file named as an
   augmented copy of another in its folder (``x_vflip.png``, ``x_hflip``, ``x_rot15``, ``x_aug2`` -> ``x.png``,
   whatever the rotation angle). Listed under ``grouped``.

Splits (:func:`make_splits`) assign whole groups (patient / near-duplicate cluster; an item without a group is its
own group) to test / validation / training class by class (stratified by each group's majority label), with a
seeded RNG; ``n_folds`` adds k group-aware folds over training + validation. Everything is written to a MONAI
decathlon-style datalist JSON so a run is reproducible from the file alone; :func:`datalist_summary` turns it into
the console summary that ``finetune``, ``evaluate`` and the bundle print. Datalists written before these keys existed
(one ``removed_duplicates`` list) are read as well (:func:`load_datalist` splits it into the new keys).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from usfmae_core.errors import UsfmaeError

__all__ = [
    "REPORT_KEYS",
    "Fingerprint",
    "augmented_base",
    "check_items",
    "datalist_images",
    "datalist_summary",
    "deduplicate",
    "image_fingerprint",
    "labelled_source_to_datalist",
    "load_datalist",
    "make_splits",
    "preprocessing_notes",
    "read_csv_manifest",
    "read_fingerprint",
    "save_datalist",
    "scan_class_folders",
    "subsample_fraction",
    "upgrade_report_keys",
    "validate_datalist",
]

_PATH_COLUMNS = ("path", "image", "file", "filename", "filepath")
_LABEL_COLUMNS = ("label", "class", "target", "diagnosis")
_GROUP_COLUMNS = ("group", "patient", "patient_id", "patientid", "subject", "case")
REPORT_KEYS = ("removed", "grouped", "unreadable", "masks", "ignored")  # what a datalist reports besides its splits
# augmented copies named after their scan: x_vflip, x_hflip, x_flip, x_flipped, x_mirror, x_rot90, x_rotated_15,
# x_rotate-10, x_aug3, x_augmented (the angle or number is free)
_AUG_RE = re.compile(r"^(?P<base>.+?)[ _.\-](?:[hv]flip(?:ped)?|flip(?:ped)?(?:[ _\-]?[hv])?|mirror(?:ed)?"
                     r"|rot(?:ated?|ate)?(?:[ _\-]?-?\d+)?|aug(?:mented)?(?:[ _\-]?\d+)?)$", re.IGNORECASE)


def _class_folder_files(root: Path, rules: Any = None) -> tuple[list[dict], list[str], list[str]]:
    """``root/<class>/**/<file>`` -> (items, class names, supported files outside any class folder). A sub-folder
    holding a positioned DICOM series is one item (:func:`~usfmae_core.data.dicom_series.group_dicom_series`).

    A top level made of one image folder beside mask folders (``root/images/<class>/`` + ``root/masks/<class>/``,
    a common distribution layout) is read with ``root/images`` as the class root; the mask folders' files are then
    among the outside files (they are masks, found by :func:`labelled_source_to_datalist`).
    """
    from usfmae_core.data.masks import MaskRules
    from usfmae_core.data.readers import is_supported
    from usfmae_core.runs import RUN_FILE, run_folder_command

    rules = rules or MaskRules()
    mask_folders = {f.lower() for f in rules.folders}
    # run folders written inside the data (``finetune --out DATA/run1``): their outputs are not images of a class
    run_dirs = {d: c for d in sorted({m.parent for m in root.rglob(RUN_FILE)} - {root})
                if (c := run_folder_command(d)) is not None}

    def files_under(d: Path) -> list[Path]:
        return [p for p in sorted(d.rglob("*")) if p.is_file() and not p.name.startswith(".") and is_supported(p)
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
                and not (run_dirs and any(q in run_dirs for q in p.parents))]

    tops = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d not in run_dirs)
    outside = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".") and is_supported(p)]
    others = [d for d in tops if d.name.lower() not in mask_folders]
    class_root = root
    if len(others) == 1 and len(tops) > 1 and any(d.is_dir() for d in others[0].iterdir()):
        class_root = others[0]
        outside += [p for d in tops if d is not others[0] for p in files_under(d)]
        outside += [p for p in sorted(class_root.iterdir()) if p.is_file() and is_supported(p)]
    classes = sorted(d.name for d in class_root.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and d not in run_dirs)
    items = [{"image": str(p), "label": k, "group": None}
             for k, name in enumerate(classes) for p in files_under(class_root / name)]
    from usfmae_core.data.dicom_series import group_dicom_series

    items = group_dicom_series(items)  # a folder of positioned DICOM slices is one volume
    present = sorted({Path(it["image"]).relative_to(class_root).parts[0] for it in items})
    index = {n: i for i, n in enumerate(present)}  # classes without any file are not classes
    for it in items:
        it["label"] = index[Path(it["image"]).relative_to(class_root).parts[0]]
    return items, present, [str(p) for p in outside], {str(d): c for d, c in run_dirs.items()}


def scan_class_folders(root: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """``root/<class>/**/<file>`` -> (items ``{image, label, group}``, sorted class names). Image paths are absolute,
    so a datalist written from them works from any folder (relative paths in a datalist are read relative to it).
    A sub-folder holding a positioned DICOM series is one item
    (:func:`~usfmae_core.data.dicom_series.group_dicom_series`).

    Every supported file is listed (masks included: :func:`labelled_source_to_datalist` sorts them out)."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise UsfmaeError(f"{root} is not a folder", "give a folder with one sub-folder per class")
    items, names, _, _ = _class_folder_files(root)
    if not items:
        raise UsfmaeError(f"no images found in class folders under {root}",
                          "expected ROOT/<class name>/<image files>")
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
    cols = {c.lower().strip(): c for c in rows[0] if c}
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
    for r, lab in zip(rows, labels, strict=True):
        p = Path((r.get(pc) or "").strip())
        p = p if p.is_absolute() else base / p
        g = r[gc].strip() if gc and r.get(gc) else None
        items.append({"image": str(p), "label": int(lab), "group": g or None})
    check_items(items, classes, csv_path)
    return items, classes


# ------------------------------------------------------------------------------------------------- reading once
@dataclass
class Fingerprint:
    """What one read of a labelled file tells: ``sha1`` of the decoded pixels, a ``thumb x thumb`` float32 thumbnail in
    [0, 1] (middle frame / slice), ``label_like`` (why it looks like a mask, or None), ``colour`` (the file carries
    colour pixels), ``kind`` and ``shape`` of the decoded array."""

    sha1: str
    thumb: np.ndarray
    label_like: str | None
    colour: bool
    kind: str
    shape: tuple[int, ...]


def read_fingerprint(path: str, thumb: int = 32) -> Fingerprint:
    """Read ``path`` once and fingerprint it (:class:`Fingerprint`); raises ``UsfmaeError`` when unreadable."""
    from usfmae_core.data.masks import label_like
    from usfmae_core.data.readers import read_ultrasound
    from usfmae_core.data.transforms import resize_frames, scale_intensity

    img = read_ultrasound(path)
    a = img.array if img.kind == "image" else img.array[img.array.shape[0] // 2]
    sha = hashlib.sha1(np.ascontiguousarray(img.array).tobytes() + str(img.array.shape).encode()).hexdigest()
    small = resize_frames(scale_intensity(a)[None], thumb)[0].numpy()
    return Fingerprint(sha, small, label_like(img.array) if img.kind != "cine" else None,
                       float(img.meta.get("colour_fraction") or 0.0) > 0, img.kind, tuple(img.array.shape))


def image_fingerprint(path: str, thumb: int = 32) -> tuple[str, np.ndarray]:
    """(SHA-1 of the decoded pixels, ``thumb x thumb`` float32 thumbnail in [0, 1]) of one file."""
    fp = read_fingerprint(path, thumb)
    return fp.sha1, fp.thumb


def _read_all(items: Sequence[dict], thumb: int) -> tuple[list[Fingerprint | None], list[dict]]:
    fps: list[Fingerprint | None] = []
    unreadable: list[dict] = []
    for it in items:
        try:
            fps.append(read_fingerprint(it["image"], thumb))
        except UsfmaeError as err:
            fps.append(None)
            unreadable.append({"path": it["image"], "reason": err.cause})
    return fps, unreadable


# ------------------------------------------------------------------------------------------ duplicates and copies
def augmented_base(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(base stem, augmentation word)`` when ``path`` is named as an augmented copy (``x_vflip.png`` -> ``x``)."""
    from usfmae_core.data.masks import stem_of

    stem = stem_of(path)
    m = _AUG_RE.match(stem)
    return (m.group("base"), stem[len(m.group("base")) + 1:]) if m else None


def _dihedral(thumbs: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / quarter turns of square thumbnails ``(N, t, t)``, each flattened to ``(N, t*t)``."""
    out = []
    for k in range(4):
        r = np.rot90(thumbs, k, axes=(1, 2))
        out += [r, r[:, :, ::-1]]
    return [np.ascontiguousarray(v).reshape(len(thumbs), -1) for v in out]


def _near_pairs(thumbs: np.ndarray, threshold: float) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, variant)`` with ``i < j`` whose thumbnails differ by a mean absolute difference below
    ``threshold`` under one of the 8 flips / quarter turns of ``j`` (variant 0 = as is).

    A matrix product gives every pair's mean *squared* difference first (fast); since the thumbnails lie in [0, 1],
    MSE <= MAD, so only pairs with MSE below the threshold can qualify and only those are checked exactly.
    """
    import torch

    n, d = len(thumbs), thumbs[0].size
    a = torch.from_numpy(thumbs.reshape(n, -1).astype(np.float32))
    sq = (a * a).sum(1)
    variants = [torch.from_numpy(v) for v in _dihedral(thumbs.astype(np.float32))]
    best: dict[tuple[int, int], int] = {}
    for g, b in enumerate(variants):
        for s in range(0, n, 1024):
            mse = (sq[s:s + 1024, None] + sq[None, :] - 2 * a[s:s + 1024] @ b.T) / d  # rows i, columns variant of j
            ii, jj = torch.nonzero(mse < threshold + 1e-6, as_tuple=True)
            for i, j in zip((ii + s).tolist(), jj.tolist(), strict=True):
                if i == j or (min(i, j), max(i, j)) in best:
                    continue
                if float(np.abs(thumbs[i].reshape(-1) - b[j].numpy()).mean()) < threshold:
                    best[(min(i, j), max(i, j))] = g
    return sorted((i, j, g) for (i, j), g in best.items())


_VARIANT = ("near-duplicate", "near-duplicate, mirrored left-right", "near-duplicate, turned 90 degrees",
            "near-duplicate, transposed", "near-duplicate, turned 180 degrees", "near-duplicate, mirrored top-bottom",
            "near-duplicate, turned 270 degrees", "near-duplicate, anti-transposed")  # order of _dihedral


def deduplicate(items: Sequence[dict], near_threshold: float = 0.02, thumb: int = 32,
                fingerprints: Sequence[Fingerprint | None] | None = None) -> tuple[list[dict], dict[str, list[dict]]]:
    """Remove exact duplicates, group near-duplicates and augmented copies; returns (kept items, report).

    The report holds ``removed`` (exact duplicates: ``{path, duplicate_of, reason}``), ``grouped`` (near-duplicates
    and augmented copies kept in one group: ``{path, duplicate_of, group, reason}``) and ``unreadable``
    (``{path, reason}``). Kept items of one cluster share a ``group`` (their existing group if any, else
    ``near-dup-<n>``). ``fingerprints`` (one per item, None for an unreadable one) saves reading the files again.
    """
    if fingerprints is None:
        fps, unreadable = _read_all(items, thumb)
    else:
        fps = list(fingerprints)
        unreadable = [{"path": it["image"], "reason": "unreadable"} for it, fp in zip(items, fps, strict=True)
                      if fp is None]
    removed: list[dict] = []
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, fp in enumerate(fps):
        if fp is not None:
            by_sha[fp.sha1].append(i)
    keep: list[int] = []
    for idx in by_sha.values():
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
    grouped: list[dict] = []
    if len(kept) > 1:
        links: list[tuple[int, int, str]] = []  # (a, b, why): b is grouped with a
        thumbs = np.stack([fps[i].thumb for i in keep]).astype(np.float32)
        links += [(a, b, _VARIANT[g]) for a, b, g in _near_pairs(thumbs, near_threshold)]
        by_stem: dict[tuple[str, str], int] = {}
        from usfmae_core.data.masks import stem_of

        for k, it in enumerate(kept):
            by_stem.setdefault((str(Path(it["image"]).parent), stem_of(it["image"]).lower()), k)
        for k, it in enumerate(kept):
            aug = augmented_base(it["image"])
            if aug is not None:
                a = by_stem.get((str(Path(it["image"]).parent), aug[0].lower()))
                if a is not None and a != k:
                    links.append((min(a, k), max(a, k), f"augmented copy by name ('{aug[1]}')"))
        parent = list(range(len(kept)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        pairs = [(a, b) for a, b, _ in links]
        by_group: dict[str, int] = {}  # existing groups (patients) are clusters too
        for k, it in enumerate(kept):
            if it.get("group") is not None:
                if it["group"] in by_group:
                    pairs.append((by_group[it["group"]], k))
                else:
                    by_group[it["group"]] = k
        for a, b in pairs:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
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
        seen: set[tuple[int, int]] = set()
        for a, b, why in sorted(links):
            if (a, b) in seen:
                continue
            seen.add((a, b))
            grouped.append({"path": kept[b]["image"], "duplicate_of": kept[a]["image"], "group": kept[b]["group"],
                            "reason": f"{why} (grouped, kept)"})
    return kept, {"removed": removed, "grouped": grouped, "unreadable": unreadable}


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
    from usfmae_core.data.dicom_series import is_dicom_series
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
    # a folder holding one DICOM series is one volume (finetune lists it so in its datalist.json)
    series = {str(it["image"]) for it in items if Path(it["image"]).is_dir() and is_dicom_series(it["image"])}
    not_files = [it["image"] for it in items if not Path(it["image"]).is_file() and str(it["image"]) not in series]
    if not_files:
        raise UsfmaeError(f"{len(not_files)} image(s) listed in {source} are not files (broken links, folders or "
                          f"special files; first: {not_files[0]})",
                          "list image files only (or folders that hold one DICOM series)")
    unsupported = [it["image"] for it in items if str(it["image"]) not in series and not is_supported(it["image"])]
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


def _resolve_masks(value: Any, base: Path) -> Any:
    """A segmentation target (``"mask"``: a path or a list of paths) resolved like the image; other values kept."""
    if isinstance(value, str):
        return _resolve_image(value, base) or value
    if isinstance(value, list):
        return [_resolve_image(m, base) or m if isinstance(m, str) else m for m in value]
    return value


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
        fixed = [{**it, "image": _resolve_image(it["image"], base), "label": to_index(it["label"]),
                  **({"mask": _resolve_masks(it["mask"], base)} if it.get("mask") is not None else {})}
                 for it in items]
        all_items += fixed
        if key.startswith("folds["):
            out.setdefault("_folds", []).append(fixed)
        else:
            out[key] = fixed
    if "_folds" in out:
        out["folds"] = out.pop("_folds")
    check_items(all_items, out["classes"], source, check_files)
    return out


def upgrade_report_keys(d: dict) -> dict:
    """Replace an old datalist's ``removed_duplicates`` (exact duplicates, grouped near-duplicates and unreadable files
    in one list) by ``removed``, ``grouped`` and ``unreadable``, in place; returns ``d``."""
    old = d.pop("removed_duplicates", None)
    if old is None:
        return d
    for key in ("removed", "grouped", "unreadable"):
        d.setdefault(key, [])
    for r in old:
        reason = str(r.get("reason", ""))
        if reason.startswith("unreadable"):
            d["unreadable"].append({"path": r["path"], "reason": reason.split(":", 1)[-1].strip()})
        elif reason.startswith("near-duplicate"):
            d["grouped"].append(dict(r))
        else:
            d["removed"].append(dict(r))
    return d


def load_datalist(path: str | os.PathLike, check_files: bool = True) -> dict:
    """Load and check a labelled datalist JSON (:func:`validate_datalist`); relative image (and mask) paths resolve
    against the JSON's folder. A datalist written before the report keys existed has its ``removed_duplicates``
    split into ``removed`` / ``grouped`` / ``unreadable`` (:func:`upgrade_report_keys`)."""
    path = Path(path)
    return upgrade_report_keys(validate_datalist(_read_json(path), path, path.parent.absolute(), check_files))


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
        n = max(1, round(fraction * len(lst)))
        idx = np.sort(rng.choice(len(lst), size=n, replace=False))
        out += [lst[i] for i in idx]
    return out


def _attach_masks(items: Sequence[dict], masks: Sequence[Any]) -> None:
    """Give each item the masks whose companion scan it is (``"mask"``: a path, or a list of several)."""
    by_image: dict[str, list[str]] = defaultdict(list)
    for m in masks:
        if m.scan is not None and not m.kept:
            by_image[m.scan].append(m.path)
    for it in items:
        found = sorted(by_image.get(it["image"], []))
        if found:
            it["mask"] = found[0] if len(found) == 1 else found


def labelled_source_to_datalist(path: str | os.PathLike, out_json: str | os.PathLike | None = None, seed: int = 0,
                                val_fraction: float = 0.15, test_fraction: float = 0.15, n_folds: int = 0,
                                deduplicate_items: bool = True, include_masks: bool = False,
                                mask_patterns: Iterable[str] | None = None) -> dict:
    """The one entry for finetune / evaluate / bundle: a class-folder tree, a CSV manifest or a datalist JSON.

    Folders and CSVs go through the steps of the module docstring (masks, unreadable files, exact duplicates,
    near-duplicates and augmented copies) and are split (seeded); the datalist records what each step did under
    ``masks``, ``unreadable``, ``ignored``, ``removed`` and ``grouped``, plus ``colour`` (files with colour pixels),
    ``non_square`` (how many frames are not square, of how many, and the largest aspect ratio), ``dropped_classes``
    and ``source``, and is saved to ``out_json`` when given. A JSON datalist is loaded as is.

    Args:
        include_masks: keep mask / annotation files as images (they are still listed under ``masks``, ``kept``).
        mask_patterns: extra globs naming mask files (``--mask-pattern``), besides the built-in names.
    """
    from usfmae_core.data.masks import MaskMatch, MaskRules, ScanIndex, companion_scan, split_masks

    p = Path(path)
    if p.suffix.lower() == ".json":
        d = load_datalist(p)
        if out_json is not None:
            save_datalist(d, out_json)
        return d
    outside: list[str] = []
    run_dirs: dict[str, str] = {}
    rules = MaskRules.with_patterns(mask_patterns)
    if p.is_dir():
        root = p.absolute()
        items, classes, outside, run_dirs = _class_folder_files(root, rules)
        if not items:
            raise UsfmaeError(f"no images found in class folders under {root}",
                              "expected ROOT/<class name>/<image files>")
    elif p.suffix.lower() in (".csv", ".tsv"):
        root = None
        items, classes = read_csv_manifest(p)
    else:
        raise UsfmaeError(f"{p} is not a folder, .csv or .json datalist",
                          "give ROOT/<class>/<images>, a CSV with path,label[,group] or a datalist JSON")
    # 1. masks by name / folder / pattern (among the items and the files outside the class folders)
    index = ScanIndex([it["image"] for it in items] + outside)
    _, masks = split_masks([it["image"] for it in items] + outside, rules, root, index)
    named = {m.path for m in masks}
    ignored = [{"path": f, "reason": "not inside a class folder"} for f in outside if f not in named]
    from usfmae_core.runs import RUN_FOLDER_SKIPPED

    ignored += [{"path": d, "reason": RUN_FOLDER_SKIPPED.format(command=c)} for d, c in run_dirs.items()]
    if include_masks:
        for m in masks:
            m.kept = True
    else:
        items = [it for it in items if it["image"] not in named]
    # 2. read every item once: unreadable files, content masks (few grey levels beside a scan), colour
    fps, unreadable = _read_all(items, 32)
    content_index = ScanIndex([it["image"] for it, fp in zip(items, fps, strict=True)
                               if fp is not None and fp.label_like is None])
    keep_rows = []
    for it, fp in zip(items, fps, strict=True):
        if fp is not None and fp.label_like is not None and rules.content and it["image"] not in named:
            scan = companion_scan(it["image"], content_index, prefix=True)
            if scan is not None:
                masks.append(MaskMatch(it["image"], scan, f"content: {fp.label_like}, beside a scan",
                                       kept=include_masks))
                if not include_masks:
                    continue
        keep_rows.append((it, fp))
    items, fps = [r[0] for r in keep_rows], [r[1] for r in keep_rows]
    colour = sorted(it["image"] for it, fp in zip(items, fps, strict=True) if fp is not None and fp.colour)
    aspects = [max(fp.shape[-2:]) / min(fp.shape[-2:]) for fp in fps if fp is not None]
    non_square = {"count": sum(1 for a in aspects if a > 1.02), "of": len(aspects),
                  "max_aspect": round(max(aspects, default=1.0), 2)}
    # 3-4. exact duplicates, near-duplicates and augmented copies
    report: dict[str, list[dict]] = {"removed": [], "grouped": []}
    if deduplicate_items:
        items, report = deduplicate(items, fingerprints=fps)
    else:
        items = [it for it, fp in zip(items, fps, strict=True) if fp is not None]
    report["unreadable"] = unreadable
    _attach_masks(items, masks)
    # a class left without images (a 'masks/' class folder, or all its files unreadable) is not a class
    present = sorted({int(it["label"]) for it in items})
    dropped = [classes[k] for k in range(len(classes)) if k not in present]
    if dropped:
        remap = {k: i for i, k in enumerate(present)}
        classes = [classes[k] for k in present]
        for it in items:
            it["label"] = remap[int(it["label"])]
    d = make_splits(items, classes, val_fraction, test_fraction, n_folds, seed)
    d.update(removed=report["removed"], grouped=report["grouped"], unreadable=report["unreadable"],
             masks=[m.to_dict() for m in sorted(masks, key=lambda m: m.path)], ignored=ignored, colour=colour,
             non_square=non_square, dropped_classes=dropped, source=str(p))
    if out_json is not None:
        save_datalist(d, out_json)
    return d


def _examples(paths: Sequence[str], k: int = 3) -> str:
    names = [Path(x).name for x in paths[:k]]
    return ", ".join(names) + (f", ... ({len(paths) - k} more)" if len(paths) > k else "")


def preprocessing_notes(d: dict, prep: Any, volume: Any = None) -> list[str]:
    """Console lines saying what a model's preprocessing (:class:`~usfmae_core.data.transforms.Preprocessing`) does to
    this data: the rule, how many non-square frames are letterboxed or squashed (2D models; a ``volume`` model's
    geometry is summarised by its own transform), how many colour files keep or lose their colour (said here once)."""
    from usfmae_core.data.transforms import loads_colour

    lines = [f"preprocessing: {prep.describe()}" if volume is None else
             f"preprocessing: {volume.model} volume model, grey, {prep.image_size} voxels / pixels a side"]
    ns = d.get("non_square") or {}
    if ns.get("count") and volume is None:
        how = ("letterboxed: aspect ratio kept, padded with black" if prep.resize == "letterbox"
               else "squashed to a square (--resize squash): anatomy is stretched")
        lines.append(f"  non-square: {ns['count']} of {ns['of']} files (aspect up to "
                     f"{float(ns['max_aspect']):.1f}:1), {how}")
    if d.get("colour"):
        if loads_colour(prep, volume):
            how = "given to the model as colour (RGB)"
        else:
            why = ("volume models read grey" if volume is not None else "the model has 1 input channel"
                   if int(prep.in_channels) == 1 else "the checkpoint was trained on grey")
            how = f"converted to grey (BT.601 luma): {why}"
        lines.append(f"  colour: {len(d['colour'])} file(s) carry colour pixels (Doppler, overlays), {how}")
    return lines


def datalist_summary(d: dict, name: str | None = None, colour: bool = True) -> list[str]:
    """The console summary of a labelled datalist: files found, per-class counts per split, what was removed, grouped,
    excluded as masks, unreadable, ignored, and (``colour``) the colour count; callers that print
    :func:`preprocessing_notes`, which says what becomes of the colour, pass ``colour=False`` so it is said once.
    One string per line (no trailing newline)."""
    upgrade_report_keys(d)
    classes = [str(c) for c in d.get("classes") or []]
    splits = {s: list(d.get(s) or []) for s in ("training", "validation", "test")}
    kept = sum(len(v) for v in splits.values())
    removed, grouped = d.get("removed") or [], d.get("grouped") or []
    unreadable, masks, ignored = d.get("unreadable") or [], d.get("masks") or [], d.get("ignored") or []
    excluded_masks = [m for m in masks if not m.get("kept")]
    found = kept + len(removed) + len(unreadable) + len(excluded_masks)
    src = name or d.get("source") or "the datalist"
    runs = [i for i in ignored if "usfmae" in str(i.get("reason", "")) and " run " in str(i.get("reason", ""))]
    files = len(ignored) - len(runs)
    lines = [f"data: {src}: {found} files found" + (f", {files} outside the class folders ignored" if files else "")
             + (f", {len(runs)} usfmae run folder(s) inside it ignored ({_examples([r['path'] for r in runs])})"
                if runs else "") + f"; {kept} used"]
    width = max([len(c) for c in classes] + [5])
    lines.append(f"  {'class':<{width}}  {'train':>6} {'val':>6} {'test':>6} {'total':>6}")
    for k, c in enumerate(classes):
        n = [sum(1 for it in splits[s] if int(it["label"]) == k) for s in splits]
        lines.append(f"  {c:<{width}}  {n[0]:>6} {n[1]:>6} {n[2]:>6} {sum(n):>6}")
    lines.append(f"  {'all':<{width}}  {len(splits['training']):>6} {len(splits['validation']):>6} "
                 f"{len(splits['test']):>6} {kept:>6}")
    if d.get("dropped_classes"):
        lines.append(f"  classes without images, dropped: {', '.join(d['dropped_classes'])}")
    if excluded_masks:
        with_scan = sum(1 for m in excluded_masks if m.get("scan"))
        lines.append(f"  masks excluded: {len(excluded_masks)} ({with_scan} kept as the segmentation target "
                     f"'mask' of their scan; e.g. {_examples([m['path'] for m in excluded_masks])})")
    kept_masks = [m for m in masks if m.get("kept")]
    if kept_masks:
        lines.append(f"  masks kept as images (--include-masks): {len(kept_masks)} "
                     f"(e.g. {_examples([m['path'] for m in kept_masks])})")
    conflicting = [r for r in removed if "conflicting" in str(r.get("reason"))]
    lines.append(f"  exact duplicates removed: {len(removed)}"
                 + (f" ({len(conflicting)} copies with conflicting labels: all removed)" if conflicting else "")
                 + (f" (e.g. {_examples([r['path'] for r in removed])})" if removed else ""))
    items = [it for v in splits.values() for it in v]
    near_groups = Counter(str(it["group"]) for it in items if str(it.get("group") or "").startswith("near-dup"))
    aug = sum(1 for r in grouped if not str(r.get("reason")).startswith("near-duplicate (grouped"))
    lines.append(f"  near-duplicates grouped: {len(grouped)} pair(s) in {len(near_groups)} group(s) of "
                 f"{sum(near_groups.values())} images" + (f"; {aug} flipped / rotated / augmented copies" if aug
                                                          else "") + " (a group never spans two splits)")
    lines.append(f"  unreadable: {len(unreadable)}" + (f" ({_examples([r['path'] for r in unreadable])})"
                                                       if unreadable else ""))
    if colour and d.get("colour"):
        lines.append(f"  colour: {len(d['colour'])} file(s) carry colour pixels (Doppler, overlays)")
    return lines
