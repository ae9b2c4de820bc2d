"""DICOM series: a folder of single-slice DICOM files that together form one 3D volume.

A folder holds a series when at least two of its DICOM files share a ``SeriesInstanceUID`` and carry 3D slice
positions (``ImagePositionPatient`` and ``ImageOrientationPatient``, the Image Plane module) at distinct places along
the slice normal. Ordinary 2D ultrasound exports (a folder of single frames) have no such positions and stay 2D
images. The series is read with ITK's GDCM series reader (slices sorted by position, spacing between slices from
the positions, origin and direction kept), as :func:`~usfmae_core.data.readers.read_ultrasound` reads a NIfTI.

:func:`group_dicom_series` turns the file lists of labelled folders, CSVs and ``predict``'s folder walk into items
where a series folder is one volume.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["dicom_series_files", "group_dicom_series", "is_dicom_series", "read_dicom_series"]


def _dicom_files(folder: Path) -> list[Path]:
    from usfmae_core.data.readers import file_format, is_supported

    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and is_supported(p) and file_format(p) in (None, "dicom"):
            out.append(p)
    return out


def dicom_series_files(folder: str | os.PathLike) -> list[Path] | None:
    """The files of the largest positioned DICOM series directly in ``folder`` (sorted along the slice normal),
    or None when the folder holds no such series (fewer than 2 positioned slices)."""
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = _dicom_files(folder)
    if len(files) < 2:
        return None
    series: dict[str, list[tuple[float, Path]]] = defaultdict(list)
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # noqa: BLE001, S112 - not a readable DICOM header: not part of a series
            continue
        pos, ori = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if pos is None or ori is None or len(pos) != 3 or len(ori) != 6 or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            continue
        normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
        series[str(ds.get("SeriesInstanceUID", ""))].append((float(np.dot(normal, np.asarray(pos, float))), p))
    best = max(series.values(), key=len, default=[])
    if len(best) < 2 or len({round(d, 4) for d, _ in best}) < 2:
        return None
    return [p for _, p in sorted(best, key=lambda t: t[0])]


def is_dicom_series(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a positioned DICOM series (:func:`dicom_series_files`)."""
    return dicom_series_files(folder) is not None


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...], str, dict[str, Any]]:
    """Read the series in ``folder`` as ``(array (D, H, W), spacing, "volume", meta)`` (reader backend contract of
    :mod:`usfmae_core.data.readers`; colour slices become luma by its documented rule).

    Raises:
        ValueError: no positioned series in the folder.
    """
    import SimpleITK as sitk

    from usfmae_core.data.readers import _finish_colour

    files = dicom_series_files(folder)
    if files is None:
        raise ValueError("the folder holds no DICOM series with slice positions (ImagePositionPatient)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img)  # (D, H, W[, C])
    meta: dict[str, Any] = {"source_format": "dicom-series", "n_files": len(files)}
    grey = _finish_colour(arr, meta, img.GetNumberOfComponentsPerPixel() >= 3)
    meta.update(origin=tuple(float(o) for o in img.GetOrigin()),
                direction=tuple(float(d) for d in img.GetDirection()))
    return grey, tuple(float(s) for s in reversed(img.GetSpacing())), "volume", meta


def group_dicom_series(items: list[dict[str, Any]], key: str = "image") -> list[dict[str, Any]]:
    """Replace the files of each positioned DICOM series in ``items`` by one item whose ``key`` is the series
    folder (the first item's other fields are kept); everything else passes unchanged, in order."""
    by_dir: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        p = Path(str(it[key]))
        if p.is_file():
            by_dir[str(p.parent)].append(i)
    replace: dict[int, dict[str, Any]] = {}
    drop: set[int] = set()
    for folder, idx in by_dir.items():
        if len(idx) < 2:
            continue
        files = dicom_series_files(folder)
        if files is None:
            continue
        members = {str(p) for p in files}
        inside = [i for i in idx if str(Path(str(items[i][key]))) in members]
        if len(inside) < 2:
            continue
        replace[inside[0]] = {**items[inside[0]], key: folder}
        drop.update(inside[1:])
    return [replace.get(i, it) for i, it in enumerate(items) if i not in drop]
