"""Synthetic B-mode ultrasound phantom: images, volumes and cine for tests and the built-in demo.

Physics-flavoured, not a simulator: tissue echogenicity is built in beam space (rows = depth, columns = scan
lines), multiplied by Rayleigh speckle (magnitude of a complex Gaussian field blurred by an anisotropic point
spread function: fine axially, coarse laterally), attenuated with depth (partly compensated, like TGC),
shadowed or enhanced along the scan lines behind lesions, log-compressed and, for ``geometry="sector"``,
scan-converted into a fan on a black background.

Classes (:data:`CLASSES`): ``normal`` (layered tissue only), ``cyst`` (round / oval anechoic lesion with a sharp
wall and posterior enhancement), ``mass`` (irregular, lobulated hypoechoic lesion with a posterior shadow).
Size, position, contrast, shadow strength and the background layers are random, so the classes are learnable
but not trivially separable (a weak cyst and a faint mass without shadow look alike).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CLASSES",
    "make_cine",
    "make_image",
    "make_image_with_mask",
    "make_volume",
    "screen_capture",
    "write_cine",
    "write_dicom_series",
    "write_distributed_dataset",
    "write_image",
    "write_labelled_folder",
    "write_unlabelled_corpus_sources",
    "write_volume",
]

CLASSES: tuple[str, ...] = ("normal", "cyst", "mass")


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-3)) ** 2)
    return k / k.sum()


def _blur(x: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Separable Gaussian blur of a 2D or 3D array (sigma per axis, in pixels) with torch convolutions."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    conv = F.conv2d if x.ndim == 2 else F.conv3d
    for ax, s in enumerate(sigmas):
        if s <= 0:
            continue
        k = _gauss_kernel(s)
        shape = [1, 1] + [1] * x.ndim
        shape[2 + ax] = k.numel()
        pad = [0] * (2 * x.ndim)
        pad[2 * (x.ndim - 1 - ax)] = pad[2 * (x.ndim - 1 - ax) + 1] = k.numel() // 2
        t = conv(F.pad(t, pad, mode="replicate"), k.view(shape))
    return t[0, 0].numpy()


def _speckle(shape: Sequence[int], rng: np.random.Generator, psf: Sequence[float], noise=None) -> np.ndarray:
    """Rayleigh-distributed speckle with mean 1: |blurred complex Gaussian|."""
    if noise is None:
        noise = rng.standard_normal((2, *shape)).astype(np.float32)
    re, im = _blur(noise[0], psf), _blur(noise[1], psf)
    mag = np.sqrt(re * re + im * im)
    return mag / (mag.mean() + 1e-8)


def _lesion_params(label: int, rng: np.random.Generator) -> dict:
    """Random lesion geometry / contrast in normalised beam coordinates (depth y and lateral x in [0, 1])."""
    p = {
        "label": int(label),
        "cy": rng.uniform(0.35, 0.7),
        "cx": rng.uniform(0.3, 0.7),
        "r": rng.uniform(0.06, 0.15),
        "aspect": rng.uniform(0.7, 1.3),
        "harm": rng.uniform(0.12, 0.3, 4) * rng.choice([-1, 1], 4),
        "phase": rng.uniform(0, 2 * math.pi, 4),
        "level": rng.uniform(0.03, 0.25) if label == 1 else rng.uniform(0.25, 0.6),
        "shadow": rng.uniform(0.1, 0.5) if rng.random() < 0.75 else 0.0,  # not every mass shadows
        "enhance": rng.uniform(1.05, 1.4),
        # an anechoic tube (vessel / duct) in any class, so 'dark structure' alone does not give the label
        "vessel": (rng.uniform(0.2, 0.85), rng.uniform(0.012, 0.03), rng.uniform(-0.15, 0.15))
        if rng.random() < 0.4 else None,
    }
    return p


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Layered soft tissue echogenicity (skin, fat, muscle-like bands) with smooth random variation."""
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    e = np.full((h, w), rng.uniform(0.45, 0.65), np.float32)
    depth = 0.0
    for _ in range(rng.integers(2, 5)):
        depth += rng.uniform(0.08, 0.3)
        wav = depth + 0.03 * np.sin(2 * math.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0, 1)))
        e = np.where(y > wav, rng.uniform(0.35, 0.8), e).astype(np.float32)
    e *= 1 + 0.25 * _blur(rng.standard_normal((h, w)).astype(np.float32), (h / 10, w / 10)) * 8
    return np.clip(e, 0.1, 1.2)


def _lesion_radius(p: dict, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Normalised distance from the lesion centre (< 1 inside the lesion outline)."""
    dy, dx = (yy - p["cy"]) / (p["r"] * p["aspect"]), (xx - p["cx"]) / p["r"]
    rad = np.sqrt(dy * dy + dx * dx)
    if p["label"] == 2:  # lobulated, spiculated outline
        ang = np.arctan2(dy, dx)
        harmonics = enumerate(zip(p["harm"], p["phase"], strict=True))
        rad = rad / (1 + sum(h * np.sin((k + 2) * ang + ph) for k, (h, ph) in harmonics))
    return rad


def _apply_lesion(e: np.ndarray, p: dict, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Insert the lesion into echogenicity ``e`` (beam space, last axis lateral, depth axis ``-2``)."""
    if p.get("vessel") is not None:
        vy, vr, slope = p["vessel"]
        e = e * np.where(np.abs(yy - (vy + slope * (xx - 0.5))) < vr, 0.15, 1.0).astype(np.float32)
    if p["label"] == 0:
        return e
    rad = _lesion_radius(p, yy, xx)
    inside = rad < 1.0
    # along each scan line, everything deeper than the lesion is shadowed (mass) or enhanced (cyst)
    below = np.cumsum(inside, axis=-2) > 0
    behind = below & ~inside
    soft = np.clip(1.5 - rad, 0, 1) if p["label"] == 1 else np.clip((1.2 - rad) / 0.4, 0, 1)
    e = e * (1 - soft * (1 - p["level"]))
    e = np.where(behind, e * (p["enhance"] if p["label"] == 1 else (1 - p["shadow"])), e)
    return e.astype(np.float32)


def _to_bmode(amp: np.ndarray, depth01: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Depth attenuation (partly TGC-compensated) + log compression -> [0, 1]."""
    att = np.exp(-rng.uniform(1.0, 2.5) * depth01)
    a = amp * att
    db = 20 * np.log10(a / (np.percentile(a, 99.5) + 1e-8) + 1e-6)
    dr = rng.uniform(40, 55)  # display dynamic range in dB
    return np.clip(1 + db / dr, 0, 1)


def _scan_convert(beam: np.ndarray, size: int, half_angle: float, r0: float) -> np.ndarray:
    """Beam space ``(..., depth, lines)`` -> Cartesian fan ``(..., size, size)``, black outside the sector."""
    t = torch.from_numpy(np.ascontiguousarray(beam, dtype=np.float32))
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, *t.shape[-2:])
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    # apex above the image at -r0 (convex probe), depth r in [r0, 1 + r0] maps to rows
    yy = ys + r0
    xx = xs * (1 + r0) * math.sin(half_angle)
    r = torch.sqrt(xx * xx + yy * yy)
    th = torch.atan2(xx, yy)
    gy = (r - r0) * 2 - 1  # depth -> [-1, 1]
    gx = th / half_angle
    valid = (gy.abs() <= 1) & (gx.abs() <= 1)
    grid = torch.stack([gx, gy], -1)[None].expand(t.shape[0], -1, -1, -1)
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0] * valid
    return out.reshape(*lead, size, size).numpy()


def _frame(label: int, size: int, geometry: str, rng: np.random.Generator, p: dict | None = None,
           bg: np.ndarray | None = None, noise: np.ndarray | None = None, shift: float = 0.0,
           depth_att: np.random.Generator | None = None) -> np.ndarray:
    h = w = size
    p = p or _lesion_params(label, rng)
    bg = _background(h, w, rng) if bg is None else bg
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None] + 0 * np.zeros((1, w), np.float32)
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, :] + 0 * np.zeros((h, 1), np.float32)
    e = _apply_lesion(np.roll(bg, int(shift * h), axis=0), {**p, "cy": p["cy"] + shift}, yy, xx)
    amp = e * _speckle((h, w), rng, (0.7, 1.2), noise)
    img = _to_bmode(amp, yy, depth_att or rng)
    if geometry == "sector":
        img = _scan_convert(img, size, half_angle=math.radians(35), r0=0.25)
    elif geometry == "linear":
        m = max(1, size // 16)  # black side borders, as a linear probe shows on screen
        img[:, :m] = 0
        img[:, -m:] = 0
    else:
        raise ValueError(f"geometry must be 'sector' or 'linear', got {geometry!r}")
    return img


def make_image(label: int, size: int = 128, geometry: str = "sector", rng: np.random.Generator | int | None = None
               ) -> np.ndarray:
    """One synthetic B-mode image ``(size, size)`` uint8 of class ``CLASSES[label]``."""
    rng = _rng(rng)
    return (_frame(int(label), size, geometry, rng) * 255 + 0.5).astype(np.uint8)


def make_cine(label: int, frames: int = 16, size: int = 128, rng: np.random.Generator | int | None = None,
              geometry: str = "sector") -> np.ndarray:
    """A ``(T, size, size)`` uint8 clip: the tissue breathes up and down and the speckle decorrelates slowly."""
    rng = _rng(rng)
    p = _lesion_params(int(label), rng)
    bg = _background(size, size, rng)
    seed = int(rng.integers(2**31))
    noise = rng.standard_normal((2, size, size)).astype(np.float32)
    out = np.empty((frames, size, size), np.uint8)
    for t in range(frames):
        noise = 0.9 * noise + math.sqrt(1 - 0.81) * rng.standard_normal(noise.shape).astype(np.float32)
        shift = 0.03 * math.sin(2 * math.pi * t / max(frames, 2))
        f = _frame(int(label), size, geometry, rng, p, bg, noise, shift, np.random.default_rng(seed))
        out[t] = (f * 255 + 0.5).astype(np.uint8)
    return out


def make_volume(label: int, shape: tuple[int, int, int] = (48, 64, 64), rng: np.random.Generator | int | None = None,
                lesion_scale: float = 1.0) -> np.ndarray:
    """A ``(D, H, W)`` uint8 volume (linear-array sweep): depth is axis 1, lesion is a 3D ellipsoid / lobulated blob.
    ``lesion_scale`` multiplies the lesion's radius (in every axis; the random draws are the same)."""
    rng = _rng(rng)
    d, h, w = shape
    p = _lesion_params(int(label), rng)
    p["r"] *= float(lesion_scale)
    p["cz"] = rng.uniform(0.35, 0.65)
    zz, yy, xx = np.meshgrid(np.linspace(0, 1, d, dtype=np.float32), np.linspace(0, 1, h, dtype=np.float32),
                             np.linspace(0, 1, w, dtype=np.float32), indexing="ij")
    bg = np.repeat(_background(h, w, rng)[None], d, 0)
    e = bg.copy()
    if p["label"]:
        dz = (zz - p["cz"]) / p["r"]
        # reuse the 2D lesion model slice by slice with the radius shrinking away from the lesion centre
        for k in range(d):
            s = 1 - float(dz[k, 0, 0]) ** 2
            if s > 0.05:
                q = {**p, "r": p["r"] * math.sqrt(s)}
                e[k] = _apply_lesion(bg[k], q, yy[k], xx[k])
    amp = e * _speckle((d, h, w), rng, (1.2, 0.6, 1.6))
    vol = _to_bmode(amp, yy, rng)
    return (vol * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------- writers
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in (".seq.nrrd", ".igs.mha", ".nii.gz"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _save_dicom(ds: Any, path: Path) -> None:
    """Write a DICOM file with its file meta (pydicom 3: ``enforce_file_format``; pydicom 2.x, which 3D Slicer 5.10
    bundles: the same under its old name ``write_like_original=False``)."""
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:
        ds.save_as(path, write_like_original=False)


def _write_dicom(path: Path, array: np.ndarray, spacing: Sequence[float], rgb: bool = False,
                 frame_time_ms: float | None = None) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    multi = array.ndim == (4 if rgb else 3)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1" if multi else "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName, ds.PatientID = "Phantom^USFMAE", "PHANTOM"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    shape = array.shape[1:] if multi else array.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    bits = 16 if array.dtype == np.uint16 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelSpacing = [f"{float(spacing[-2]):.6g}", f"{float(spacing[-1]):.6g}"]
    if multi:
        ds.NumberOfFrames = int(array.shape[0])
        ds.FrameTime = f"{frame_time_ms or 40.0:.6g}"
        ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)
    ds.PixelData = np.ascontiguousarray(array).tobytes()
    _save_dicom(ds, path)


def _write_seq_nrrd(path: Path, frames: np.ndarray, spacing: Sequence[float]) -> None:
    """A Slicer-style 2D+t sequence: 4D NRRD, first axis kind 'list' (time), single-slice frames."""
    t, h, w = frames.shape
    dt, sy, sx = (float(s) for s in spacing)
    dtype = {np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short"}[frames.dtype]
    hdr = (
        "NRRD0004\n"
        f"type: {dtype}\ndimension: 4\nspace: left-posterior-superior\n"
        f"sizes: {t} {w} {h} 1\n"
        f"space directions: none ({sx:g},0,0) (0,{sy:g},0) (0,0,1)\n"
        "kinds: list domain domain domain\nendian: little\nencoding: gzip\nspace origin: (0,0,0)\n"
        "measurement frame: (1,0,0) (0,1,0) (0,0,1)\n"
        "axis 0 index type:=numeric\n"
        f"axis 0 index values:={' '.join(f'{i * dt:g}' for i in range(t))}\n"
        "axis 0 quantity:=time\naxis 0 unit:=s\n\n"
    )
    data = np.ascontiguousarray(np.transpose(frames, (1, 2, 0)))  # NRRD's first (time) axis is the fastest
    path.write_bytes(hdr.encode() + gzip.compress(data.tobytes(), compresslevel=1))


def _sitk_image(array: np.ndarray, spacing: Sequence[float]):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    return img


def write_image(path: str | Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> Path:
    """Write a 2D grey image (png, jpg, bmp, tif, dcm, nii(.gz), mha, mhd, nrrd) ``(H, W)`` uint8 / uint16."""
    import SimpleITK as sitk
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = _suffix(path)
    if ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        Image.fromarray(array).save(path, **({"quality": 95} if ext in (".jpg", ".jpeg") else {}))
    elif ext in (".dcm", ".dicom"):
        _write_dicom(path, array, spacing, rgb=array.ndim == 3)
    elif ext in (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd"):
        sitk.WriteImage(_sitk_image(array, spacing), str(path), True)
    else:
        raise ValueError(f"cannot write a 2D image as {ext}")
    return path


def write_volume(path: str | Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 origin: Sequence[float] | None = None, direction: Sequence[float] | None = None) -> Path:
    """Write a ``(D, H, W)`` volume with ITK (nii, nii.gz, mha, mhd, nrrd); ``spacing`` in array-axis order."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _sitk_image(array, spacing)
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in direction))
    sitk.WriteImage(img, str(path), True)
    return path


def write_dicom_series(folder: str | Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                       origin: Sequence[float] = (0.0, 0.0, 0.0)) -> Path:
    """Write a ``(D, H, W)`` uint8 / uint16 volume as a DICOM series: one file per slice in ``folder`` (shuffled
    file names, as exports often are), sharing a SeriesInstanceUID, with ImagePositionPatient along the slice
    normal every ``spacing[0]`` mm; returns ``folder``."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    bits = 16 if array.dtype == np.uint16 else 8
    order = np.random.default_rng(len(array)).permutation(len(array))
    for k, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture: any modality may use it
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "US", "Phantom^USFMAE", "PHANTOM"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = int(z) + 1
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [f"{float(origin[0]):g}", f"{float(origin[1]):g}",
                                   f"{float(origin[2]) + float(z) * float(spacing[0]):g}"]
        ds.SliceThickness = f"{float(spacing[0]):g}"
        ds.PixelSpacing = [f"{float(spacing[1]):g}", f"{float(spacing[2]):g}"]
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
        ds.PixelData = np.ascontiguousarray(array[z]).tobytes()
        _save_dicom(ds, folder / f"IM{k:04d}.dcm")
    return folder


def write_cine(path: str | Path, frames: np.ndarray, spacing: Sequence[float] = (0.04, 1.0, 1.0)) -> Path:
    """Write a ``(T, H, W)`` uint8 clip: mp4 / avi / mov / mpeg / gif / dcm (multi-frame) / .seq.nrrd / .igs.mha."""
    import imageio.v3 as iio
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = _suffix(path)
    fps = 1.0 / spacing[0] if spacing[0] > 0 else 25.0
    if ext == ".gif":
        from PIL import Image  # grey 'L' frames keep an exact 256-level palette (no quantisation)

        ims = [Image.fromarray(f, "L") for f in frames]
        ims[0].save(path, save_all=True, append_images=ims[1:], duration=round(1000 / fps), loop=0,
                    optimize=False, disposal=1)
    elif ext in (".mp4", ".avi", ".mov", ".mpeg", ".mpg"):
        codec = {".avi": "mpeg4", ".mpeg": "mpeg2video", ".mpg": "mpeg2video"}.get(ext, "libx264")
        rgb = np.repeat(frames[..., None], 3, -1)  # yuv420p needs even sides, phantom sizes are even
        iio.imwrite(path, rgb, plugin="pyav", codec=codec, fps=round(fps))
    elif ext in (".dcm", ".dicom"):
        _write_dicom(path, frames, spacing, frame_time_ms=spacing[0] * 1000)
    elif ext == ".seq.nrrd":
        _write_seq_nrrd(path, frames, spacing)
    elif ext in (".igs.mha", ".mha", ".mhd"):
        img = _sitk_image(frames, (1.0, *spacing[1:]))
        for i in range(frames.shape[0]):  # PLUS per-frame fields, so the reader can tell a sequence from a volume
            img.SetMetaData(f"Seq_Frame{i:04d}_Timestamp", f"{i * spacing[0]:.6f}")
        sitk.WriteImage(img, str(path), True)
    else:
        raise ValueError(f"cannot write a cine as {ext}")
    return path


def write_labelled_folder(out: Path, n_per_class: int, size: int = 128, seed: int = 0, fmt: str = "png",
                          geometry: str = "mixed") -> Path:
    """Class-per-folder tree ``out/<class>/<class>_<i>.<fmt>`` of phantom images; returns ``out``.

    ``geometry="mixed"`` alternates sector and linear images so geometry carries no label information.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        for i in range(n_per_class):
            geo = ("sector", "linear")[i % 2] if geometry == "mixed" else geometry
            write_image(out / name / f"{name}_{i:04d}.{fmt.lstrip('.')}", make_image(label, size, geo, rng))
    return out


def write_unlabelled_corpus_sources(out: Path, n_images: int = 8, n_volumes: int = 2, n_cines: int = 2,
                                    seed: int = 0, size: int = 128) -> Path:
    """A mixed-format source tree for ``usfmae prepare``: images (png, jpg, bmp, tif, dcm, nii.gz, mha, nrrd),
    volumes (nii.gz, mha, nrrd with anisotropic spacing) and cines (mp4, gif, dcm, avi, mov, seq.nrrd, igs.mha)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    img_fmts = ("png", "dcm", "jpg", "nii.gz", "bmp", "mha", "tif", "nrrd")
    vol_fmts = ("nii.gz", "mha", "nrrd")
    cine_fmts = ("mp4", "gif", "dcm", "seq.nrrd", "avi", "igs.mha", "mov", "mpeg")
    for i in range(n_images):
        geo = ("sector", "linear")[i % 2]
        write_image(out / "images" / f"img_{i:04d}.{img_fmts[i % len(img_fmts)]}",
                    make_image(int(rng.integers(3)), size, geo, rng), spacing=(0.2, 0.2))
    for i in range(n_volumes):
        vol = make_volume(int(rng.integers(3)), (max(16, size // 4), size // 2, size // 2), rng)
        write_volume(out / "volumes" / f"vol_{i:04d}.{vol_fmts[i % len(vol_fmts)]}", vol, spacing=(1.0, 0.5, 0.5))
    for i in range(n_cines):
        clip = make_cine(int(rng.integers(3)), frames=8, size=size, rng=rng)
        write_cine(out / "cines" / f"cine_{i:04d}.{cine_fmts[i % len(cine_fmts)]}", clip, spacing=(0.04, 0.3, 0.3))
    return out


# ------------------------------------------------------------------------------ datasets as they are distributed
def make_image_with_mask(label: int, size: int = 128, geometry: str = "sector",
                         rng: np.random.Generator | int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode image ``(size, size)`` uint8 and its lesion mask ``(size, size)`` uint8 (0 / 255; all 0 for
    ``normal``), as segmentation datasets ship them."""
    rng = _rng(rng)
    p = _lesion_params(int(label), rng)
    img = (_frame(int(label), size, geometry, rng, p) * 255 + 0.5).astype(np.uint8)
    if int(label) == 0:
        return img, np.zeros_like(img)
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None] + np.zeros((1, size), np.float32)
    xx = np.linspace(0, 1, size, dtype=np.float32)[None, :] + np.zeros((size, 1), np.float32)
    inside = (_lesion_radius(p, yy, xx) < 1.0).astype(np.float32)
    if geometry == "sector":
        inside = _scan_convert(inside, size, half_angle=math.radians(35), r0=0.25)
    return img, np.where(inside > 0.5, 255, 0).astype(np.uint8)


def screen_capture(image: np.ndarray, aspect: float = 1.8, colour: bool = True,
                   rng: np.random.Generator | int | None = None) -> np.ndarray:
    """An exported scanner screen ``(H, round(H * aspect), 3)`` uint8 RGB around a grey B-mode ``image`` ``(H, H)``:
    black margins, a grey side panel with white text-like marks and, with ``colour``, a colour-Doppler box (red / blue
    flow) over part of the image and a yellow caliper, as public datasets of screen exports look."""
    rng = _rng(rng)
    h = image.shape[0]
    w = round(h * aspect)
    out = np.zeros((h, w, 3), np.uint8)
    x0 = (w - image.shape[1]) // 2
    out[:, x0:x0 + image.shape[1]] = image[..., None]
    panel = max(4, w // 10)
    out[:, :panel] = 40
    for k in range(3, h - 6, max(6, h // 8)):  # white 'text' lines in the panel
        out[k:k + 2, 2:panel - 2 - int(rng.integers(0, panel // 3))] = 235
    if colour:
        by, bx = h // 3, x0 + image.shape[1] // 3
        bh, bw = max(4, h // 5), max(4, image.shape[1] // 4)
        flow = rng.random((bh, bw)) < 0.5
        box = out[by:by + bh, bx:bx + bw]
        box[flow] = (200, 30, 30)
        box[~flow & (rng.random((bh, bw)) < 0.5)] = (30, 60, 210)
        out[h - 4:h - 2, x0 + 4:x0 + 4 + image.shape[1] // 3] = (240, 220, 30)
    return out


def write_distributed_dataset(out: Path, n_per_class: int = 6, size: int = 64, seed: int = 0,
                              masks: str = "suffix", flips: int = 2, rotations: int = 1, second_masks: int = 1,
                              screens: int = 0) -> dict[str, list[str]]:
    """A labelled tree laid out as public segmentation / classification datasets ship it; returns what is what.

    ``out/<class>/<class> (<i>).png`` scans (classes :data:`CLASSES`; ``normal`` has no lesion and, as in the
    datasets this imitates, no masks) and, for the lesion classes:

    * ``masks="suffix"``: ``<class> (<i>)_mask.png`` beside the scan (and ``_mask_1`` for the first
      ``second_masks`` scans); ``masks="folders"``: ``out/<class>/images/<name>.png`` +
      ``out/<class>/masks/<name>.png``; ``masks="none"``: no masks;
    * ``flips`` scans per class with a vertically flipped copy ``<name>_vflip.png``, ``rotations`` with a copy turned
      by 15 degrees ``<name>_rot15.png``;
    * ``screens`` scans per class written instead as non-square (1.8:1) colour screen exports
      (:func:`screen_capture`) in JPEG, ``<class> (<i>).jpg``.

    Returns ``{"scans", "masks", "copies", "screens"}``: lists of absolute paths (``copies``: the flipped / rotated
    files; ``scans`` excludes them).
    """
    from PIL import Image

    out = Path(out).absolute()
    rng = np.random.default_rng(seed)
    made: dict[str, list[str]] = {"scans": [], "masks": [], "copies": [], "screens": []}
    for label, name in enumerate(CLASSES):
        for i in range(1, n_per_class + 1):
            geo = ("sector", "linear")[i % 2]
            img, mask = make_image_with_mask(label, size, geo, rng)
            stem = f"{name} ({i})"
            folder = out / name / "images" if masks == "folders" and label else out / name
            if i <= screens:
                path = folder / f"{stem}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(screen_capture(img, rng=rng)).save(path, quality=92)
                made["screens"].append(str(path))
            else:
                path = write_image(folder / f"{stem}.png", img)
            made["scans"].append(str(path))
            if label and masks == "suffix":
                made["masks"].append(str(write_image(folder / f"{stem}_mask.png", mask)))
                if i <= second_masks:
                    made["masks"].append(str(write_image(folder / f"{stem}_mask_1.png", np.flipud(mask))))
            elif label and masks == "folders":
                made["masks"].append(str(write_image(out / name / "masks" / f"{stem}.png", mask)))
            if i <= flips and i > screens:
                made["copies"].append(str(write_image(folder / f"{stem}_vflip.png", np.ascontiguousarray(img[::-1]))))
            if flips < i <= flips + rotations and i > screens:
                turned = Image.fromarray(img).rotate(15, resample=Image.BILINEAR)
                made["copies"].append(str(write_image(folder / f"{stem}_rot15.png", np.array(turned))))
    return made
