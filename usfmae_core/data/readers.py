"""Read any ultrasound file into a grey-intensity array with spacing and a kind (image / cine / volume).

Backends, chosen per format because each is the one that decodes that format fully:

* DICOM -> pydicom (+ pylibjpeg / openjpeg for JPEG and JPEG 2000). ITK cannot decode 16-bit palette colour
  (``gdcm-US-ALOKA-16``), and pydicom applies palette LUTs and YBR -> RGB itself.
* NIfTI, NRRD (incl. Slicer ``.seq.nrrd``), MetaImage (incl. PLUS ``.igs.mha`` / ``.mhd``) -> ITK via SimpleITK,
  which keeps the array in ITK order ``(D, H, W)`` with LPS origin / direction, so results can be written back
  with the input geometry. (MONAI's ``ITKReader`` re-orders axes to RAS and ``x, y, z``, which is the opposite of
  the convention this layer promises; MONAI transforms are used downstream instead, see ``transforms.py``.)
* 2D images -> Pillow; video clips -> imageio (PyAV plugin, Pillow for GIF).

Colour (documented choice): colour pixels are converted to luma with ITU-R BT.601 weights
(``0.299 R + 0.587 G + 0.114 B``), which equals the stored value for grey-stored-as-RGB files and equals the Y
channel of YBR DICOM. Colour Doppler boxes and coloured overlays are therefore kept as their brightness, never
silently dropped; the reader records how much of the image was coloured (``meta["colour_fraction"]``) and, when
any pixel is coloured, a boolean ``meta["colour_mask"]`` so that ``prepare --remove-text`` can inpaint them
deliberately (:mod:`usfmae_core.data.sector`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from usfmae_core.errors import UsfmaeError

__all__ = [
    "COLOUR_RULE",
    "SUPPORTED_EXTENSIONS",
    "UltrasoundImage",
    "file_format",
    "is_supported",
    "luma",
    "read_ultrasound",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mpeg", ".mpg", ".m4v", ".gif", ".webm", ".mkv", ".wmv")
DICOM_EXTENSIONS = (".dcm", ".dicom")
ITK_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".seq.nrrd", ".mha", ".mhd")
SUPPORTED_EXTENSIONS: tuple[str, ...] = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS + DICOM_EXTENSIONS + ITK_EXTENSIONS

COLOUR_RULE = "rgb->luma(BT.601)"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CHROMA_THRESHOLD = 24  # |channel difference| above which a uint8 pixel counts as coloured (JPEG noise is < ~10)
MAX_ELEMENTS = 1_500_000_000  # ~6 GB as float32: larger is a mistake or needs streaming, not a training frame
MIN_SIDE = 8  # an ultrasound frame smaller than this is not an image (e.g. a 1x1 placeholder)


@dataclass
class UltrasoundImage:
    """A decoded ultrasound file.

    Attributes:
        array: float32 grey intensity in the source range (not rescaled). Shape ``(H, W)`` for kind ``"image"``,
            ``(T, H, W)`` for ``"cine"``, ``(D, H, W)`` for ``"volume"`` (slowest axis first, as
            ``SimpleITK.GetArrayFromImage``).
        spacing: one entry per array axis, same order (mm; for a cine the first entry is the frame interval in s,
            1.0 when unknown).
        kind: ``"image"``, ``"cine"`` or ``"volume"``.
        path: the file read.
        meta: at least ``source_format`` and ``colour``; volumes also ``origin`` and ``direction`` (ITK / LPS,
            as SimpleITK gives them).
        rgb: with ``read_ultrasound(..., keep_colour=True)`` and a file that carries colour pixels: the colour as
            decoded, ``array``'s shape plus a last axis of 3 (source dtype and range); else None.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    kind: str
    path: str
    meta: dict[str, Any] = field(default_factory=dict)
    rgb: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return 1 if self.kind == "image" else int(self.array.shape[0])


def _lower_name(path: str | os.PathLike) -> str:
    return Path(path).name.lower()


def file_format(path: str | os.PathLike) -> str | None:
    """Format family of ``path`` from its name: ``image``, ``video``, ``dicom``, ``itk`` or None (unsupported)."""
    name = _lower_name(path)
    if name.endswith(ITK_EXTENSIONS):
        return "itk"
    if name.endswith(DICOM_EXTENSIONS):
        return "dicom"
    if name.endswith(VIDEO_EXTENSIONS):
        return "video"
    if name.endswith(IMAGE_EXTENSIONS):
        return "image"
    return None


def is_supported(path: str | os.PathLike) -> bool:
    """True when ``path`` has an extension this reader handles (DICOM without extension is sniffed by content)."""
    if file_format(path) is not None:
        return True
    p = Path(path)
    if p.suffix == "" and p.is_file():  # DICOM files are often extensionless: check the 'DICM' preamble
        try:
            with open(p, "rb") as f:
                f.seek(128)
                return f.read(4) == b"DICM"
        except OSError:
            return False
    return False


# ----------------------------------------------------------------------------------------------- colour handling
def _to_grey(arr: np.ndarray, channel_axis_last: bool = True) -> tuple[np.ndarray, str, float, np.ndarray | None]:
    """Convert ``(..., 3|4)`` colour to float32 luma; returns (grey, rule, colour_fraction, colour_mask or None)."""
    rgb = arr[..., :3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(r, g) and np.array_equal(g, b):  # grey stored as RGB (BUSI): exact, no rounding
        return r.astype(np.float32), "grey-stored-as-rgb", 0.0, None
    grey = rgb.astype(np.float32) @ _LUMA
    # chroma threshold scaled to the bit depth so 16-bit colour is judged like 8-bit
    thr = _CHROMA_THRESHOLD * (257 if rgb.dtype.itemsize >= 2 else 1)
    ri, gi, bi = (c.astype(np.int32) for c in (r, g, b))
    mask = (np.abs(ri - gi) > thr) | (np.abs(gi - bi) > thr) | (np.abs(ri - bi) > thr)
    frac = float(mask.mean())
    return grey, COLOUR_RULE, frac, (mask if frac > 0 else None)


def luma(rgb: np.ndarray) -> np.ndarray:
    """Grey float32 ``(...)`` of colour ``(..., 3|4)`` pixels by this module's rule (ITU-R BT.601 weights), the
    conversion :func:`read_ultrasound` applies, for callers holding the colour (``keep_colour=True``)."""
    return np.asarray(rgb)[..., :3].astype(np.float32) @ _LUMA


def _finish_colour(arr: np.ndarray, meta: dict, colour_last: bool) -> np.ndarray:
    if colour_last:
        grey, rule, frac, mask = _to_grey(arr)
        meta["colour"] = rule
        meta["colour_fraction"] = frac
        if mask is not None:
            meta["colour_mask"] = mask
            meta["rgb"] = arr[..., :3]  # kept only when the caller asks (read_ultrasound(keep_colour=True))
        return grey
    meta["colour"] = "none"
    meta["colour_fraction"] = 0.0
    return arr.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------------ backends
def _read_pil(path: Path) -> tuple[np.ndarray, tuple[float, ...], str, dict]:
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        n = getattr(im, "n_frames", 1)
        frames = [im] if n == 1 else ImageSequence.Iterator(im)  # lazy: each step seeks the same object
        arrays = []
        colour = False
        for fr in frames:
            mode = fr.mode
            if mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                fr = fr.convert("RGB")
            elif mode in ("LA",) or mode == "1":
                fr = fr.convert("L")
            a = np.array(fr)  # copy now, before the iterator seeks to the next frame
            colour = colour or a.ndim == 3
            arrays.append(a)
        dpi = im.info.get("dpi")
        duration_ms = float(im.info.get("duration") or 0)
    arr = arrays[0] if n == 1 else np.stack(arrays)
    meta: dict[str, Any] = {"source_format": Path(path).suffix.lower().lstrip(".")}
    grey = _finish_colour(arr, meta, arr.ndim == (4 if n > 1 else 3))
    sp = 1.0
    if dpi and isinstance(dpi, tuple) and dpi[0] and float(dpi[0]) > 1:
        meta["dpi"] = float(dpi[0])  # print resolution, not anatomy: recorded but spacing stays 1 (unknown)
    if n > 1:
        return grey, (duration_ms / 1000.0 if duration_ms > 0 else 1.0, sp, sp), "cine", meta
    return grey, (sp, sp), "image", meta


def _decode_video(path: Path) -> tuple[np.ndarray, float, bool]:
    """Decode all frames as RGB with PyAV; returns (frames (T, H, W, 3) uint8, fps, truncated)."""
    try:
        import av
    except ImportError:  # imageio-ffmpeg fallback (slower, no partial decode)
        import imageio.v3 as iio

        frames = iio.imread(path, plugin="FFMPEG")
        return frames, float(iio.immeta(path, plugin="FFMPEG").get("fps") or 0.0), False
    # PyAV directly: imageio's pyav plugin was measured 10-40x slower once torch is imported
    frames, truncated = [], False
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        try:
            for fr in container.decode(stream):
                frames.append(fr.to_ndarray(format="rgb24"))
        except (av.error.InvalidDataError, av.error.EOFError, ValueError):
            truncated = True  # keep what decoded before the damage
    if not frames:
        raise ValueError("no decodable video frames")
    return np.stack(frames), fps, truncated


def _read_video(path: Path) -> tuple[np.ndarray, tuple[float, ...], str, dict]:
    name = _lower_name(path)
    meta: dict[str, Any] = {"source_format": Path(path).suffix.lower().lstrip(".")}
    if name.endswith(".gif"):
        return _read_pil(path)
    frames, fps, truncated = _decode_video(path)
    if truncated:
        meta["truncated"] = True
    grey = _finish_colour(frames, meta, True)
    dt = 1.0 / fps if fps > 0 else 1.0
    meta["fps"] = fps
    if grey.shape[0] == 1:
        return grey[0], (1.0, 1.0), "image", meta
    return grey, (dt, 1.0, 1.0), "cine", meta


def _dicom_spacing(ds) -> tuple[float, float]:
    """In-plane (row, column) spacing in mm: PixelSpacing, else the US region calibration (cm -> mm), else 1."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(key)
        if v is not None and len(v) == 2 and float(v[0]) > 0:
            return float(v[0]), float(v[1])
    regions = ds.get("SequenceOfUltrasoundRegions")
    if regions:
        for reg in regions:
            # PhysicalUnits 3 = cm; the first calibrated 2D region is the B-mode image
            if reg.get("PhysicalUnitsXDirection") == 3 and reg.get("PhysicalUnitsYDirection") == 3:
                dx, dy = float(reg.get("PhysicalDeltaX", 0)), float(reg.get("PhysicalDeltaY", 0))
                if dx > 0 and dy > 0:
                    return abs(dy) * 10.0, abs(dx) * 10.0
    return 1.0, 1.0


def _read_dicom(path: Path) -> tuple[np.ndarray, tuple[float, ...], str, dict]:
    import pydicom

    try:
        from pydicom.pixels import apply_color_lut, convert_color_space
    except ImportError:  # pydicom 2.x (3D Slicer 5.10 bundles 2.4.4)
        from pydicom.pixel_data_handlers.util import apply_color_lut, convert_color_space

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("DICOM file has no pixel data")
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric in ("YBR_FULL", "YBR_FULL_422") and int(pydicom.__version__.split(".")[0]) < 3:
        # pydicom 3 converts YBR_FULL(_422) to RGB in pixel_array, 2.x returns the stored values (JPEG 2000
        # YBR_RCT / YBR_ICT come out of the decoder as RGB in both)
        arr = convert_color_space(arr, photometric, "RGB")
    spp = int(ds.get("SamplesPerPixel", 1))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    meta: dict[str, Any] = {
        "source_format": "dicom",
        "photometric": photometric,
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
        "bits_allocated": int(ds.get("BitsAllocated", 8)),
    }
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)  # works for 16-bit LUTs, unlike ITK / GDCM's palette path
        if arr.dtype == np.uint16 and meta["bits_allocated"] == 8:
            arr = (arr >> 8).astype(np.uint8)  # 8-bit indices into a 16-bit LUT: keep the 8-bit source range
        spp = 3
    grey = _finish_colour(arr, meta, spp >= 3)
    if photometric == "MONOCHROME1":  # inverted grey: make bright = echogenic, as everywhere else
        grey = grey.max() + grey.min() - grey
        meta["colour"] = "monochrome1-inverted"
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        grey = grey * slope + intercept
    sy, sx = _dicom_spacing(ds)
    if n_frames > 1 and grey.ndim == 3:
        ft = ds.get("FrameTime")
        dt = float(ft) / 1000.0 if ft else 1.0
        if ds.get("SOPClassUID", "") == "1.2.840.10008.5.1.4.1.1.6.2":  # Enhanced US Volume: frames are slices
            return grey, (1.0, sy, sx), "volume", {**meta, "origin": (0.0, 0.0, 0.0),
                                                    "direction": tuple(np.eye(3).ravel().tolist())}
        return grey, (dt, sy, sx), "cine", meta
    return grey, (sy, sx), "image", meta


def _read_itk(path: Path) -> tuple[np.ndarray, tuple[float, ...], str, dict]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    keys = set(reader.GetMetaDataKeys())
    img = reader.Execute()
    name = _lower_name(path)
    fmt = "nifti" if ".nii" in name else "nrrd" if ".nrrd" in name or name.endswith(".nhdr") else "metaimage"
    meta: dict[str, Any] = {"source_format": fmt}
    arr = sitk.GetArrayFromImage(img)  # (D, H, W[, C]) ITK order, slowest axis first
    if fmt == "nifti" and arr.dtype.kind == "f":
        # ITK silently turns NaN (and NaN scaling) into 0; take the values from nibabel, the geometry from ITK
        import nibabel as nib

        vals = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
        vals = vals.transpose(tuple(range(vals.ndim))[::-1])
        if vals.size == arr.size:
            arr = vals.reshape(arr.shape)
    ncomp = img.GetNumberOfComponentsPerPixel()
    spacing = tuple(float(s) for s in reversed(img.GetSpacing()))
    origin = tuple(float(o) for o in img.GetOrigin())
    direction = tuple(float(d) for d in img.GetDirection())

    # Slicer sequence (.seq.nrrd): the 'list' axis (time) is read by ITK as pixel components.
    is_nrrd_sequence = ncomp > 1 and ("NRRD_kinds[pixel]" in keys and reader.GetMetaData("NRRD_kinds[pixel]") == "list"
                                      or name.endswith(".seq.nrrd"))
    # PLUS tracked sequence (.igs.mha / .mhd): frames stacked along the 3rd ITK axis with per-frame fields.
    # (reconstructed PLUS volumes also carry a stray Seq_Frame field, so ask for per-frame timestamps)
    is_plus_sequence = ".igs." in name or sum(k.startswith("Seq_Frame") and k.endswith("_Timestamp") for k in keys) > 1

    if img.GetDimension() == 4 and "NRRD_kinds[3]" in keys and reader.GetMetaData("NRRD_kinds[3]") == "list":
        # Slicer sequence of colour frames (.seq.nrrd of vector volumes, e.g. a recorded video stream): the colour
        # is the pixel components, time the 4th ITK axis (the slowest array axis)
        grey = _finish_colour(arr, meta, ncomp >= 3)
        times = reader.GetMetaData("axis 3 index values").split() if "axis 3 index values" in keys else []
        dt = float(times[1]) - float(times[0]) if len(times) > 1 else 1.0
        meta["sequence"] = "slicer-seq-nrrd"
        if grey.shape[1] == 1:  # single-slice frames: a 2D+t cine
            if meta.get("colour_mask") is not None:
                meta["colour_mask"] = meta["colour_mask"][:, 0]
            return grey[:, 0], (dt if dt > 0 else 1.0, *spacing[2:]), "cine", meta
        meta.update(origin=origin[:3], direction=tuple(np.asarray(direction).reshape(4, 4)[:3, :3].ravel()),
                    sequence_items=int(grey.shape[0]))
        return grey[0], spacing[1:], "volume", meta  # a sequence of 3D volumes: the first, as for grey ones
    if is_nrrd_sequence:
        arr = np.moveaxis(arr, -1, 0)  # (T, D, H, W)
        meta["colour"] = "none"
        meta["colour_fraction"] = 0.0
        arr = arr.astype(np.float32)
        times = reader.GetMetaData("axis 0 index values").split() if "axis 0 index values" in keys else []
        dt = float(times[1]) - float(times[0]) if len(times) > 1 else 1.0
        meta["sequence"] = "slicer-seq-nrrd"
        spatial = arr.shape[1:]
        if img.GetDimension() == 3 and 1 in spatial:  # single-slice frames: a 2D+t cine
            ax = spatial.index(1)
            sp2 = tuple(s for i, s in enumerate(spacing) if i != ax)
            return np.squeeze(arr, axis=1 + ax), (dt if dt > 0 else 1.0, *sp2), "cine", meta
        if img.GetDimension() == 2:
            return arr, (dt if dt > 0 else 1.0, *spacing), "cine", meta
        # a sequence of 3D volumes: use the first, say so (this layer's kinds stop at 3D)
        meta.update(origin=origin, direction=direction, sequence_items=int(arr.shape[0]))
        return arr[0], spacing, "volume", meta

    grey = _finish_colour(arr, meta, ncomp >= 3)
    if ncomp == 2 or (ncomp > 3):
        raise ValueError(f"{ncomp}-component pixels are not an ultrasound image")
    if img.GetDimension() == 4:
        keep = [i for i, n in enumerate(grey.shape) if n != 1]
        if len(keep) > 3:
            raise ValueError(f"4D image of shape {tuple(grey.shape)} (only 2D, 2D+t and 3D are supported)")
        grey = grey.reshape([grey.shape[i] for i in keep])
        spacing = tuple(spacing[i] for i in keep)
        if grey.ndim == 3:
            meta.update(origin=origin[:3], direction=tuple(np.asarray(direction).reshape(4, 4)[:3, :3].ravel()))
            return grey, spacing, "volume", meta
    if grey.ndim == 3 and is_plus_sequence:
        ts = [reader.GetMetaData(f"Seq_Frame{i:04d}_Timestamp") for i in range(2)
              if f"Seq_Frame{i:04d}_Timestamp" in keys]
        dt = float(ts[1]) - float(ts[0]) if len(ts) == 2 else 0.0
        meta["sequence"] = "plus-igs"
        meta["origin"], meta["direction"] = origin, direction
        return grey, (dt if dt > 0 else 1.0, *spacing[1:]), "cine", meta
    if grey.ndim == 3 and grey.shape[0] == 1:  # 2D image stored as one-slice volume
        return grey[0], spacing[1:], "image", {**meta, "origin": origin, "direction": direction}
    if grey.ndim == 2:
        return grey, spacing, "image", {**meta, "origin": origin, "direction": direction}
    meta["origin"], meta["direction"] = origin, direction
    return grey, spacing, "volume", meta


# ------------------------------------------------------------------------------------------------------- checks
def _validate(arr: np.ndarray, kind: str, path: str) -> np.ndarray:
    fix = "check or remove the file"
    if arr.size == 0:
        raise UsfmaeError(f"{path} is empty (no pixels)", fix)
    expected = {"image": 2, "cine": 3, "volume": 3}[kind]
    if arr.ndim != expected:
        raise UsfmaeError(f"{path} has an unsupported shape {tuple(arr.shape)} for a {kind}",
                          "only 2D images, 2D+t cine and 3D volumes are supported")
    spatial = arr.shape[-2:] if kind != "volume" else arr.shape
    if min(spatial) < MIN_SIDE and not (kind == "volume" and sorted(spatial)[1] >= MIN_SIDE):
        raise UsfmaeError(f"{path} has an absurd shape {tuple(arr.shape)} (a side below {MIN_SIDE} pixels)", fix)
    if arr.size > MAX_ELEMENTS:
        raise UsfmaeError(f"{path} is too large ({arr.size} elements)", "crop or split it before preparing")
    finite = np.isfinite(arr)
    if not finite.all():
        if finite.mean() < 0.5:
            raise UsfmaeError(f"{path} is mostly NaN / infinite", fix)
        arr = np.where(finite, arr, np.min(arr[finite])).astype(np.float32)  # few NaNs: background, not data
    if float(arr.max()) == float(arr.min()):
        raise UsfmaeError(f"{path} is constant (every pixel is {float(arr.min()):g})", fix)
    return arr


def read_ultrasound(path: str | os.PathLike, keep_colour: bool = False) -> UltrasoundImage:
    """Read an ultrasound file (2D image, DICOM, NIfTI, NRRD, MetaImage, video) as grey intensity.

    Args:
        path: the file, or a folder holding a DICOM series (:mod:`usfmae_core.data.dicom_series`: one volume).
        keep_colour: also keep the decoded colour in ``rgb`` when the file carries colour pixels (grey stored as RGB
            has none): for models that receive colour (:attr:`usfmae_core.data.transforms.Preprocessing.colour`).

    Returns:
        :class:`UltrasoundImage` with ``array`` float32 ``(H, W)`` / ``(T, H, W)`` / ``(D, H, W)``.

    Raises:
        UsfmaeError: the file is missing, of unknown type, unreadable, truncated, empty, constant, NaN-filled or
            of an absurd shape (the message names the file and what to do).
    """
    p = Path(path)
    if p.is_dir():  # a folder of positioned DICOM slices is one volume
        from usfmae_core.data.dicom_series import read_dicom_series

        try:
            arr, spacing, kind, meta = read_dicom_series(p)
        except Exception as err:  # noqa: BLE001 - any failure is one line naming the folder
            msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise UsfmaeError(f"cannot read {p} as a DICOM series ({msg})",
                              "give a folder of DICOM slices of one series, or a file") from None
        arr = _validate(np.asarray(arr, dtype=np.float32), kind, str(p))
        meta.pop("rgb", None)
        return UltrasoundImage(array=np.ascontiguousarray(arr), spacing=spacing, kind=kind, path=str(p), meta=meta)
    if not p.is_file():
        raise UsfmaeError(f"{p} does not exist or is not a file", "check the path")
    if p.stat().st_size == 0:
        raise UsfmaeError(f"{p} is an empty (zero-byte) file", "check or remove the file")
    fam = file_format(p)
    if fam is None and is_supported(p):
        fam = "dicom"
    if fam is None:
        raise UsfmaeError(f"{p} has an unsupported file type '{p.suffix}'",
                          f"convert it to one of {', '.join(SUPPORTED_EXTENSIONS)}")
    reader = {"image": _read_pil, "video": _read_video, "dicom": _read_dicom, "itk": _read_itk}[fam]
    try:
        arr, spacing, kind, meta = reader(p)
    except UsfmaeError:
        raise
    except MemoryError:
        raise UsfmaeError(f"{p} is too large to decode in memory", "crop or split it before preparing") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file for the user, reported in one line
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UsfmaeError(f"cannot read {p} ({msg})",
                          "the file is corrupt, truncated or needs a codec (pylibjpeg for compressed DICOM)") from None
    arr = _validate(np.asarray(arr, dtype=np.float32), kind, str(p))
    if len(spacing) != arr.ndim:
        spacing = (1.0,) * arr.ndim
    spacing = tuple(float(s) if s and np.isfinite(s) and s > 0 else 1.0 for s in spacing)
    meta.setdefault("colour", "none")
    rgb = meta.pop("rgb", None)
    if rgb is not None and (not keep_colour or rgb.size != arr.size * 3):
        rgb = None  # not asked for, or its geometry was changed after decoding (not the colour of `array`)
    elif rgb is not None:
        rgb = np.ascontiguousarray(rgb.reshape(*arr.shape, 3))
    return UltrasoundImage(array=np.ascontiguousarray(arr), spacing=spacing, kind=kind, path=str(p), meta=meta,
                           rgb=rgb)
