"""Readers: phantom round trips for every writable format, real files under ../shared/data, corrupt inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from usfmae_core.data import phantom
from usfmae_core.data.readers import SUPPORTED_EXTENSIONS, is_supported, read_ultrasound
from usfmae_core.errors import UsfmaeError

SHARED = Path(os.environ.get("USFMAE_SHARED_DATA", Path(__file__).parents[1].parent / "shared" / "data"))
LOSSY = {"jpg", "mp4", "avi", "mov", "mpeg"}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


@pytest.mark.parametrize("fmt", ["png", "jpg", "bmp", "tif", "dcm", "nii.gz", "mha", "nrrd"])
def test_image_round_trip(tmp_path, fmt):
    img = phantom.make_image(1, 64, "sector", np.random.default_rng(0))
    path = phantom.write_image(tmp_path / f"x.{fmt}", img, spacing=(0.25, 0.5))
    u = read_ultrasound(path)
    assert u.kind == "image" and u.array.shape == img.shape and u.array.dtype == np.float32
    if fmt in LOSSY:
        assert _corr(u.array, img) > 0.95
    else:
        np.testing.assert_array_equal(u.array, img.astype(np.float32))  # source range kept, not rescaled
    if fmt in ("dcm", "nii.gz", "mha", "nrrd"):
        np.testing.assert_allclose(u.spacing, (0.25, 0.5), rtol=1e-5)
    assert u.meta["source_format"] and "colour" in u.meta


@pytest.mark.parametrize("fmt", ["nii.gz", "mha", "nrrd", "mhd"])
def test_volume_round_trip_keeps_geometry(tmp_path, fmt):
    vol = phantom.make_volume(2, (12, 20, 24), np.random.default_rng(1))
    direction = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    path = phantom.write_volume(tmp_path / f"v.{fmt}", vol, spacing=(2.0, 0.5, 0.75), origin=(1.0, -2.0, 3.0),
                                direction=direction)
    u = read_ultrasound(path)
    assert u.kind == "volume"
    np.testing.assert_array_equal(u.array, vol.astype(np.float32))
    np.testing.assert_allclose(u.spacing, (2.0, 0.5, 0.75), rtol=1e-5)
    np.testing.assert_allclose(u.meta["origin"], (1.0, -2.0, 3.0), atol=1e-5)
    np.testing.assert_allclose(u.meta["direction"], direction, atol=1e-6)


@pytest.mark.parametrize("fmt", ["mp4", "avi", "mov", "mpeg", "gif", "dcm", "seq.nrrd", "igs.mha"])
def test_cine_round_trip(tmp_path, fmt):
    clip = phantom.make_cine(0, frames=6, size=64, rng=np.random.default_rng(2))
    path = phantom.write_cine(tmp_path / f"c.{fmt}", clip, spacing=(0.04, 0.3, 0.3))
    u = read_ultrasound(path)
    assert u.kind == "cine" and u.array.shape == clip.shape
    if fmt in LOSSY:
        assert _corr(u.array, clip) > 0.9
    else:
        np.testing.assert_array_equal(u.array, clip.astype(np.float32))
    assert u.spacing[0] == pytest.approx(0.04, rel=1e-3)  # frame interval in s
    if fmt in ("dcm", "seq.nrrd", "igs.mha"):
        np.testing.assert_allclose(u.spacing[1:], (0.3, 0.3), rtol=1e-5)


def test_colour_to_luma_and_mask(tmp_path):
    from PIL import Image

    grey = phantom.make_image(0, 64, "linear", np.random.default_rng(3))
    rgb = np.repeat(grey[..., None], 3, -1)
    Image.fromarray(rgb).save(tmp_path / "grey_as_rgb.png")
    u = read_ultrasound(tmp_path / "grey_as_rgb.png")
    np.testing.assert_array_equal(u.array, grey.astype(np.float32))
    assert u.meta["colour"] == "grey-stored-as-rgb"
    rgb[10:20, 10:20] = (255, 0, 0)  # a red overlay box
    Image.fromarray(rgb).save(tmp_path / "overlay.png")
    u = read_ultrasound(tmp_path / "overlay.png")
    assert u.meta["colour"].startswith("rgb->luma")
    assert u.array[15, 15] == pytest.approx(0.299 * 255, abs=0.01)
    assert u.meta["colour_mask"][10:20, 10:20].all() and u.meta["colour_mask"].sum() == 100


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+s4.dcm"],
                         ids=["ybr_full_422", "ybr_full_jpeg"])
def test_ybr_dicom_reads_as_its_rgb_original(name):
    """YBR_FULL(_422) DICOM is converted to RGB before the luma rule, with pydicom 3 (which converts in pixel_array)
    and pydicom 2.4 (Slicer 5.10's, which does not): pydicom's test files hold one picture in many encodings."""
    import pydicom.data

    files = Path(pydicom.data.__file__).parent / "test_files"
    rgb = read_ultrasound(files / "SC_rgb_rle.dcm")  # the same 100x100 picture, lossless RGB
    ybr = read_ultrasound(files / name)
    assert ybr.meta["photometric"].startswith("YBR_FULL") and ybr.array.shape == rgb.array.shape
    # 8-bit YCbCr <-> RGB rounding (and JPEG for the second file) stays within 2 grey levels; unconverted YCbCr
    # taken as RGB would be off by tens
    assert np.abs(ybr.array - rgb.array).max() <= 2.0


def test_supported_extensions():
    for ext in (".png", ".dcm", ".nii.gz", ".seq.nrrd", ".igs.mha", ".mhd", ".mp4", ".gif", ".mpeg", ".tiff"):
        assert ext in SUPPORTED_EXTENSIONS or any(ext.endswith(e) for e in SUPPORTED_EXTENSIONS)
        assert is_supported(f"a/b/file{ext.upper()}")
    assert not is_supported("notes.txt") and not is_supported("data.raw")


# ---------------------------------------------------------------------------------------------- corrupt inputs
def make_corrupt_files(d: Path) -> dict[str, Path]:
    """One of each kind of bad input; used here and by the corpus tests."""
    import SimpleITK as sitk

    d.mkdir(parents=True, exist_ok=True)
    good = phantom.write_image(d / "good.png", phantom.make_image(0, 64, "sector", np.random.default_rng(4)))
    raw = good.read_bytes()
    files = {"truncated_png": d / "truncated.png", "zero_dicom": d / "empty.dcm", "nan_nifti": d / "nan.nii.gz",
             "tiny_image": d / "tiny.png", "four_d": d / "fourd.nii.gz", "unknown_ext": d / "scan.xyz",
             "constant": d / "constant.png", "garbage_video": d / "garbage.mp4"}
    files["truncated_png"].write_bytes(raw[: len(raw) // 3])
    files["zero_dicom"].write_bytes(b"")
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 16, 16), np.nan, np.float32)), str(files["nan_nifti"]))
    from PIL import Image

    Image.fromarray(np.array([[7]], np.uint8)).save(files["tiny_image"])
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(3, 4, 10, 12).astype(np.float32), isVector=False),
                    str(files["four_d"]))
    files["unknown_ext"].write_bytes(b"hello")
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(files["constant"])
    files["garbage_video"].write_bytes(os.urandom(2000))
    return files


def test_corrupt_files_raise_one_line_errors(tmp_path):
    files = make_corrupt_files(tmp_path)
    for name, path in files.items():
        with pytest.raises(UsfmaeError) as err:
            read_ultrasound(path)
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg and ";" in msg, (name, msg)


def test_missing_file_raises(tmp_path):
    with pytest.raises(UsfmaeError, match="does not exist"):
        read_ultrasound(tmp_path / "nope.png")


# ------------------------------------------------------------------------------------------------ shared data
def _shared_files() -> list:
    if not SHARED.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"shared data not found at {SHARED} "
                                                                 "(set USFMAE_SHARED_DATA)"))]
    files = sorted(p for p in SHARED.rglob("*") if p.is_file() and is_supported(p))
    return [pytest.param(p, marks=[pytest.mark.shared_data], id=p.relative_to(SHARED).as_posix()) for p in files]


@pytest.mark.shared_data
@pytest.mark.parametrize("path", _shared_files())
def test_every_shared_file_reads(path):
    u = read_ultrasound(path)
    a = u.array
    assert a.dtype == np.float32 and np.isfinite(a).all() and a.max() > a.min()
    assert len(u.spacing) == a.ndim and all(s > 0 for s in u.spacing)
    rel = path.relative_to(SHARED).as_posix()
    expected = ("cine" if rel.startswith(("sequences/", "pocus_lung/videos/")) or path.name == "examples_ybr_color.dcm"
                else "volume" if rel.startswith("volumes/") else "image")
    if rel.endswith(".gif") and a.ndim == 2:
        expected = "image"  # a one-frame GIF is a still
    assert u.kind == expected, (rel, u.kind, a.shape)
    if u.kind == "volume":
        assert "origin" in u.meta and len(u.meta["direction"]) == 9
    if path.name == "gdcm-US-ALOKA-16.dcm":  # 16-bit palette colour: ITK cannot, pydicom can
        assert a.max() > 255 and u.meta["photometric"] == "PALETTE COLOR"
    if rel.startswith("volumes/trus_prostate/"):
        assert a.shape == (44, 63, 47) and u.spacing == pytest.approx((1.5, 1.5, 1.5))
    if rel.startswith("busi_256/"):
        assert a.shape == (256, 256) and a.max() <= 255
