"""Segmentation masks and annotation files among scans: found, so that they are never trained on as scans.

Public ultrasound datasets ship masks beside their scans (BUSI: ``benign (1).png`` + ``benign (1)_mask.png`` and
``benign (1)_mask_1.png``; others use ``masks/``, ``labels/`` or ``gt/`` folders next to ``images/``). Taken as
scans they become a label shortcut (a class without lesions has no masks) and a large share of a corpus. One
implementation, used by ``usfmae prepare``, the labelled loaders (``finetune`` / ``evaluate`` / the bundle) and the
folder walk of ``predict``:

* **by name** (:func:`match_name`): a file stem ending in a mask word (``_mask``, ``_seg``, ``_gt``, ``_label`` ...,
  optionally numbered: ``_mask_1``, ``-mask(2)``), a file inside a mask folder (``masks/``, ``labels/``, ``gt/``,
  ``annotations/`` ...), or a user glob (``--mask-pattern``);
* **by content** (:func:`label_like`): an image or volume with only a few grey levels (a label map), or almost all
  pixels at its two extremes (a binary mask saved as JPEG), *and* a companion scan beside it
  (:func:`companion_scan`) - an ultrasound frame is never few-valued, and requiring the companion keeps odd scans
  (a posterised GIF) in.

Each mask found is a :class:`MaskMatch`: the file, its companion scan when there is one (a labelled datalist keeps
it as the scan's segmentation target, ``"mask": path``) and the reason, which the console summary and the run's
report show.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_MASK_FOLDERS",
    "DEFAULT_MASK_WORDS",
    "MaskMatch",
    "MaskRules",
    "ScanIndex",
    "companion_scan",
    "label_like",
    "match_name",
    "split_masks",
    "stem_of",
]

DEFAULT_MASK_WORDS: tuple[str, ...] = ("mask", "masks", "seg", "segmentation", "label", "labels", "gt",
                                       "groundtruth", "annotation", "anno")
DEFAULT_MASK_FOLDERS: tuple[str, ...] = ("mask", "masks", "label", "labels", "gt", "groundtruth", "ground_truth",
                                         "ground truth", "annotation", "annotations", "segmentation",
                                         "segmentations", "seg")
_MULTI_EXT = (".nii.gz", ".seq.nrrd", ".igs.mha", ".igs.mhd")
MAX_LABELS = 32  # a label map has at most this many grey levels; an ultrasound frame has hundreds
BINARY_FRACTION = 0.98  # ... or this share of its pixels within 10 % of its darkest / brightest value (JPEG masks)


def stem_of(path: str | os.PathLike) -> str:
    """File name without its (possibly double) extension: ``a/b.nii.gz`` -> ``b``."""
    name = Path(path).name
    low = name.lower()
    for ext in _MULTI_EXT:
        if low.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


@dataclass(frozen=True)
class MaskRules:
    """Which files are masks. ``words``: a stem ending in ``<sep><word>`` (``sep`` one of ``_ - space .``), optionally
    followed by a number; ``folders``: a file with one of these folder names among its parents (below ``root``);
    ``patterns``: extra case-insensitive globs matched against the path below ``root`` and against the file name;
    ``content``: also detect few-valued images / volumes that have a companion scan."""

    words: tuple[str, ...] = DEFAULT_MASK_WORDS
    folders: tuple[str, ...] = DEFAULT_MASK_FOLDERS
    patterns: tuple[str, ...] = ()
    content: bool = True

    @classmethod
    def with_patterns(cls, patterns: Iterable[str] | None = None) -> MaskRules:
        """The default rules plus user globs (``--mask-pattern``)."""
        return cls(patterns=tuple(str(p) for p in (patterns or ()) if str(p).strip()))

    def stem_regex(self) -> re.Pattern[str]:
        words = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        # 'case (1)_mask', 'case (1)_mask_1', 'img-gt', 'x_seg(2)', 'x.label' -> base stem + mask word
        return re.compile(rf"^(?P<base>.+?)[ _.\-](?:{words})(?:[ _\-]?\(?\d+\)?)?$", re.IGNORECASE)


@dataclass
class MaskMatch:
    """A mask / annotation file: ``path``, its companion ``scan`` (or None) and the ``reason`` it was recognised."""

    path: str
    scan: str | None
    reason: str
    kept: bool = False  # True when --include-masks kept it as a scan

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"path": self.path, "scan": self.scan, "reason": self.reason}
        if self.kept:
            d["kept"] = True
        return d


def _relative_parts(path: Path, root: Path | None) -> tuple[str, ...]:
    if root is not None:
        try:
            return path.relative_to(root).parts
        except ValueError:
            pass
    return path.parts


def match_name(path: str | os.PathLike, rules: MaskRules | None = None, root: str | os.PathLike | None = None
               ) -> tuple[str, str] | None:
    """``(reason, base stem)`` when ``path``'s name or folders say it is a mask, else None.

    The base stem is the stem of the scan the mask belongs to (``case (1)_mask_1`` -> ``case (1)``; a file in a mask
    folder keeps its stem unless it also carries a mask word).
    """
    rules = rules or MaskRules()
    p = Path(path)
    stem = stem_of(p)
    m = rules.stem_regex().match(stem)
    parts = _relative_parts(p, Path(root) if root is not None else None)
    rel = "/".join(parts)
    for pat in rules.patterns:
        if fnmatch.fnmatch(rel.lower(), pat.lower()) or fnmatch.fnmatch(p.name.lower(), pat.lower()):
            return f"matches --mask-pattern '{pat}'", (m.group("base") if m else stem)
    if m:
        return f"name ends in '{stem[len(m.group('base')):]}'", m.group("base")
    folders = {f.lower() for f in rules.folders}
    for part in parts[:-1]:
        if part.lower() in folders:
            return f"inside a '{part}/' folder", stem
    return None


class ScanIndex:
    """Files indexed by folder and stem, to find the scan a mask belongs to (:func:`companion_scan`)."""

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        self.by_dir_stem: dict[tuple[str, str], str] = {}
        self.by_stem: dict[str, list[str]] = defaultdict(list)
        self.by_dir: dict[str, list[str]] = defaultdict(list)
        for p in paths:
            p = Path(p)
            key = (str(p.parent), stem_of(p).lower())
            self.by_dir_stem.setdefault(key, str(p))
            self.by_stem[key[1]].append(str(p))
            self.by_dir[key[0]].append(str(p))


def companion_scan(path: str | os.PathLike, index: ScanIndex, base: str | None = None,
                   exclude: set[str] | frozenset[str] = frozenset(), prefix: bool = False) -> str | None:
    """The scan a mask at ``path`` belongs to, among the files of ``index`` (never ``path`` itself nor ``exclude``).

    Looked for, in order: ``base`` (default: the mask's own stem) in the mask's folder; in the parent folder; at the
    same place under a sibling folder up to three levels up (``masks/x.png`` -> ``images/x.png``,
    ``masks/benign/x.png`` -> ``images/benign/x.png``); with ``prefix``, a file of the same folder whose stem starts
    the mask's stem followed by a separator (``x.png`` for ``x_m.png``).
    """
    p = Path(path)
    me = str(p)
    stem = (base or stem_of(p)).lower()

    def ok(q: str | None) -> bool:
        return q is not None and q != me and q not in exclude

    q = index.by_dir_stem.get((str(p.parent), stem))
    if ok(q):
        return q
    same_stem = [q for q in index.by_stem.get(stem, []) if ok(q)]
    for q in same_stem:  # in the parent folder (x.png beside masks/x.png)
        if Path(q).parent == p.parent.parent:
            return q
    for level in (1, 2, 3):  # the same place under a sibling folder: masks/x -> images/x, masks/a/x -> images/a/x
        for q in same_stem:
            qp = Path(q)
            if (len(qp.parts) == len(p.parts) > level + 1 and qp.parents[level] == p.parents[level]
                    and qp.parents[level - 1] != p.parents[level - 1] and qp.parts[-level:-1] == p.parts[-level:-1]):
                return q
    if prefix:
        own = stem_of(p).lower()
        for q in sorted(index.by_dir.get(str(p.parent), []), key=lambda s: -len(stem_of(s))):
            s = stem_of(q).lower()
            if ok(q) and len(own) > len(s) and own.startswith(s) and own[len(s)] in " _-.(":
                return q
    return None


def label_like(array: np.ndarray) -> str | None:
    """Why ``array`` (a 2D image or 3D volume, any range) looks like a label map / binary mask, or None.

    Few grey levels (at most :data:`MAX_LABELS`), or :data:`BINARY_FRACTION` of the pixels within 10 % of the
    range from its darkest or brightest value (a binary mask saved as JPEG, whose edges ring).
    """
    a = np.asarray(array)
    flat = a.reshape(-1)
    # a cheap look at ~8k pixels first: an ultrasound frame has hundreds of levels and mid-grey speckle, so almost
    # every scan is decided here (this runs on every file of `usfmae prepare`)
    probe = flat[:: max(1, flat.size // 8192)]
    lo, hi = float(probe.min()), float(probe.max())
    if hi <= lo:
        return None
    pv = (probe - lo) / (hi - lo)
    if np.unique(probe).size > MAX_LABELS and float(((pv < 0.1) | (pv > 0.9)).mean()) < 0.9:
        return None
    if flat.size > 4_000_000:  # a large volume: a regular subsample says the same
        flat = flat[:: flat.size // 4_000_000 + 1]
    lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return None  # constant: the reader refuses it anyway
    if np.all(flat == np.round(flat)):
        n = np.unique(flat).size
        if n <= MAX_LABELS:
            return f"{n} grey levels (a label map)"
    v = (flat - lo) / (hi - lo)
    share = float(((v < 0.1) | (v > 0.9)).mean())
    if share >= BINARY_FRACTION:
        return f"{share:.1%} of pixels at two levels (a binary mask)"
    return None


def split_masks(paths: Sequence[str | os.PathLike], rules: MaskRules | None = None,
                root: str | os.PathLike | None = None, index: ScanIndex | None = None
                ) -> tuple[list[str], list[MaskMatch]]:
    """Separate the files that are masks by name / folder / pattern from the others: ``(others, masks)``.

    ``index`` (default: built from ``paths``) is where companion scans are looked for. Content-based detection needs
    the decoded pixels and is done by the callers that read the files (:func:`label_like` + :func:`companion_scan`).
    """
    rules = rules or MaskRules()
    index = index or ScanIndex(paths)
    named: dict[str, tuple[str, str]] = {}
    for p in paths:
        hit = match_name(p, rules, root)
        if hit is not None:
            named[str(p)] = hit
    masks = [MaskMatch(str(p), companion_scan(p, index, base, exclude=named.keys()), reason)
             for p, (reason, base) in named.items()]
    return [str(p) for p in paths if str(p) not in named], masks
