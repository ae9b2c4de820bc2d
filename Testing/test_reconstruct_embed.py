"""``usfmae reconstruct`` and ``usfmae embed`` on tiny random-weight checkpoints and phantom files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from usfmae_core.checkpoints import load_model, make_checkpoint, save_checkpoint
from usfmae_core.cli import main
from usfmae_core.data import phantom
from usfmae_core.data.transforms import Preprocessing, frames_to_tensor
from usfmae_core.errors import UsfmaeError
from usfmae_core.networks.presets import build_model, mae_config
from usfmae_core.workflows.embed import embed, embed_frames
from usfmae_core.workflows.reconstruct import reconstruct_file, reconstruct_frames

PREP = Preprocessing(image_size=32, in_channels=3)
VOL_SHAPE = (6, 36, 44)
# a rotated, shifted, anisotropic geometry: a writer that dropped any of it would be caught
SPACING = (2.5, 0.4, 0.7)
ORIGIN = (-12.0, 30.5, 7.25)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    out = {}
    for name, dims, size in (("mae", 2, 32), ("mae3d", 3, 16)):
        cfg = mae_config("vit_test", img_size=size, patch_size=8, spatial_dims=dims)
        cfg.update(preset="vit_test", preprocessing=Preprocessing(size, 3).to_dict())
        out[name] = save_checkpoint(d / f"{name}.pt", make_checkpoint(build_model("mae", cfg), "mae", cfg))
    cfg = mae_config("vit_test", img_size=32, patch_size=8)
    cfg.update(num_classes=3, pool="avg", dropout=0.0, classes=list(phantom.CLASSES), preset="vit_test",
               preprocessing=PREP.to_dict())
    out["clf"] = save_checkpoint(d / "clf.pt", make_checkpoint(build_model("classifier", cfg), "classifier", cfg))
    rcfg = {"num_classes": 3, "in_channels": 3, "spatial_dims": 2, "depth": 10, "preprocessing": PREP.to_dict()}
    out["resnet"] = save_checkpoint(d / "resnet.pt", make_checkpoint(build_model("resnet", rcfg), "resnet", rcfg))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    vol = phantom.make_volume(1, VOL_SHAPE, rng=0)
    return {
        "png": phantom.write_image(d / "in" / "img.png", phantom.make_image(1, 40, rng=1)),
        "nii": phantom.write_volume(d / "in" / "vol.nii.gz", vol, SPACING, ORIGIN, DIRECTION),
        "nrrd": phantom.write_volume(d / "vol.nrrd", vol, SPACING, ORIGIN, DIRECTION),
    }


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


# ------------------------------------------------------------------------------------------------ reconstruct
def test_reconstruct_frames_shapes_and_mask(ckpts):
    mae, _ = load_model(ckpts["mae"], expect="mae")
    frames = phantom.make_volume(0, (3, 40, 56), rng=3).astype(np.float32) * 4.0  # unscaled, not square
    res = reconstruct_frames(mae, frames, PREP, mask_ratio=0.75, seed=1, batch_size=2)
    for key in ("input", "masked", "reconstruction", "mask"):
        assert res[key].shape == frames.shape and res[key].dtype == np.float32
        assert res[key].min() >= 0 and res[key].max() <= 1
    mask = res["mask"]
    assert set(np.unique(mask)) <= {0.0, 1.0} and abs(mask.mean() - 0.75) < 0.1
    np.testing.assert_allclose(res["masked"], res["input"] * (1 - mask))
    visible = mask == 0
    np.testing.assert_allclose(res["reconstruction"][visible], res["input"][visible])
    assert res["loss"] > 0 and np.isfinite(res["loss"])
    # the seed fixes the mask; another seed gives another
    again = reconstruct_frames(mae, frames, PREP, mask_ratio=0.75, seed=1)
    np.testing.assert_array_equal(again["mask"], mask)
    assert not np.array_equal(reconstruct_frames(mae, frames, PREP, seed=2)["mask"], mask)


@pytest.mark.parametrize("key", ["nii", "nrrd"])
def test_reconstruct_volume_keeps_geometry(ckpts, files, tmp_path, key):
    written = reconstruct_file(ckpts["mae"], files[key], tmp_path / "r", device="cpu", quiet=True)
    ref = sitk.ReadImage(str(files[key]))
    ext = ".nii.gz" if key == "nii" else ".nrrd"
    for name in ("masked", "reconstruction", "mask"):
        path = Path(written["volumes"][name])
        assert path.name == f"vol_{name}{ext}" and path.is_file()
        _same_geometry(sitk.ReadImage(str(path)), ref)
    rec = sitk.GetArrayFromImage(sitk.ReadImage(written["volumes"]["reconstruction"]))
    assert rec.shape == VOL_SHAPE and 0 <= rec.min() and rec.max() <= 1
    assert len(written["pictures"]) == VOL_SHAPE[0]
    assert json.loads(Path(written["summary"]).read_text())["kind"] == "volume"


def test_reconstruct_volume_other_axis_and_3d_mae(ckpts, files, tmp_path):
    ref = sitk.ReadImage(str(files["nii"]))
    w2 = reconstruct_file(ckpts["mae"], files["nii"], tmp_path / "ax2", axis=2, device="cpu", quiet=True)
    _same_geometry(sitk.ReadImage(w2["volumes"]["reconstruction"]), ref)
    assert len(w2["pictures"]) == min(VOL_SHAPE[2], 16)
    w3 = reconstruct_file(ckpts["mae3d"], files["nii"], tmp_path / "3d", device="cpu", quiet=True)
    out = sitk.ReadImage(w3["volumes"]["reconstruction"])
    _same_geometry(out, ref)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(w3["volumes"]["mask"]))
    assert 0.5 < mask.mean() < 0.95  # 75 % of the 8 patches of the 16^3 cube, resampled


def test_reconstruct_png_writes_png(ckpts, files, tmp_path):
    written = reconstruct_file(ckpts["mae"], files["png"], tmp_path / "r", device="cpu", quiet=True)
    assert "volumes" not in written and len(written["pictures"]) == 1
    with Image.open(written["pictures"][0]) as im:
        assert im.format == "PNG" and im.width > 2.5 * im.height  # input | masked | reconstruction


def test_reconstruct_user_errors(ckpts, files, tmp_path, capsys):
    with pytest.raises(UsfmaeError, match="mae"):
        reconstruct_file(ckpts["clf"], files["png"], tmp_path / "x", device="cpu")
    with pytest.raises(UsfmaeError, match="nothere.png"):
        reconstruct_file(ckpts["mae"], tmp_path / "nothere.png", tmp_path / "x", device="cpu")
    with pytest.raises(UsfmaeError, match="3D MAE"):
        reconstruct_file(ckpts["mae3d"], files["png"], tmp_path / "x", device="cpu")
    capsys.readouterr()
    assert main(["reconstruct", str(ckpts["clf"]), str(files["png"]), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("usfmae: error:") and str(ckpts["clf"]) in err[0]


# ------------------------------------------------------------------------------------------------------ embed
def test_embed_folder_n_by_d(ckpts, files, tmp_path):
    assert main(["embed", str(ckpts["mae"]), str(files["png"].parent), "--out", str(tmp_path / "e"),
                 "--device", "cpu"]) == 0
    emb = np.load(tmp_path / "e" / "embeddings.npy")
    assert emb.shape == (1 + VOL_SHAPE[0], 48) and emb.dtype == np.float32 and np.isfinite(emb).all()
    with open(tmp_path / "e" / "embeddings_index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["row"]) for r in rows] == list(range(len(emb)))
    assert sorted({Path(r["source"]).name for r in rows}) == ["img.png", "vol.nii.gz"]
    assert [int(r["index"]) for r in rows if r["source"].endswith("vol.nii.gz")] == list(range(VOL_SHAPE[0]))
    png_row = next(int(r["row"]) for r in rows if r["source"].endswith("img.png"))
    out = embed(ckpts["mae"], [files["png"]], tmp_path / "cls", pool="cls", device="cpu", quiet=True)
    cls = np.load(out / "embeddings.npy")
    assert cls.shape == (1, 48) and not np.allclose(cls[0], emb[png_row], atol=1e-3)


def test_embed_classifier_matches_forward_features(ckpts):
    model, _ = load_model(ckpts["clf"], expect="classifier")
    frames = phantom.make_volume(2, (4, 40, 40), rng=4).astype(np.float32)
    emb = embed_frames(model, frames, PREP, pool="avg", precision="fp32")
    with torch.no_grad():
        ref = model.eval().forward_features(frames_to_tensor(frames, PREP)).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def test_embed_refuses_cnn(ckpts, files, tmp_path):
    with pytest.raises(UsfmaeError, match="resnet"):
        embed(ckpts["resnet"], [files["png"]], tmp_path / "x", device="cpu", quiet=True)


def test_reconstruct_volume_format_images_and_clips_get_volumes_back(ckpts, tmp_path):
    """A one-slice NRRD (an image saved from Slicer) and a Slicer sequence (.seq.nrrd cine) get their masked input
    and reconstruction as volume files too, shaped as read, with the in-plane geometry."""
    img = phantom.make_image(0, 40, rng=2)
    one = phantom.write_volume(tmp_path / "one.nrrd", img[None], spacing=(1.0, 0.3, 0.4))
    written = reconstruct_file(ckpts["mae"], one, tmp_path / "r1", device="cpu", quiet=True)
    back = sitk.ReadImage(written["volumes"]["reconstruction"])
    assert sitk.GetArrayFromImage(back).shape == (40, 40)
    np.testing.assert_allclose(back.GetSpacing(), (0.4, 0.3), rtol=1e-6)
    clip = phantom.write_cine(tmp_path / "clip.seq.nrrd", phantom.make_cine(1, frames=4, size=32, rng=3))
    written = reconstruct_file(ckpts["mae"], clip, tmp_path / "r2", device="cpu", quiet=True)
    masked = sitk.GetArrayFromImage(sitk.ReadImage(written["volumes"]["masked"]))
    assert masked.shape == (4, 32, 32) and written["volumes"]["masked"].endswith("_masked.nrrd")
