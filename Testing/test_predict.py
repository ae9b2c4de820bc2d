"""``usfmae predict`` and its in-memory API (classify_frames / classify_array / classify_file / predict) on tiny
random-weight checkpoints and phantom files in real formats (PNG, NIfTI, GIF cine, NRRD)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from usfmae_core.checkpoints import make_checkpoint, save_checkpoint
from usfmae_core.cli import main
from usfmae_core.data import phantom
from usfmae_core.data.readers import read_ultrasound
from usfmae_core.data.transforms import Preprocessing
from usfmae_core.errors import UsfmaeError
from usfmae_core.networks.presets import build_model, mae_config
from usfmae_core.workflows.predict import (
    classify_array,
    classify_file,
    classify_frames,
    collect_inputs,
    inference_dtype,
    predict,
    to_inference_model,
)

CLASSES = list(phantom.CLASSES)
VOL_SHAPE = (7, 40, 48)


def _classifier_config(size: int = 32, dims: int = 2, arch: str = "classifier") -> dict:
    prep = Preprocessing(image_size=size, in_channels=3).to_dict()
    cfg = mae_config("vit_test", img_size=size, patch_size=8, spatial_dims=dims)
    cfg.update(num_classes=len(CLASSES), pool="avg", dropout=0.0, preset="vit_test", classes=CLASSES,
               preprocessing=prep)
    if arch != "classifier":
        cfg = {"num_classes": len(CLASSES), "in_channels": 3, "spatial_dims": dims, "depth": 10, "classes": CLASSES,
               "preprocessing": prep, "preset": arch}
    return cfg


def _save(path: Path, arch: str, cfg: dict) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, cfg)
    if arch == "classifier":  # the near-zero head of a fresh classifier gives ~uniform output: make it decisive
        torch.nn.init.normal_(model.head.weight, std=0.5)
    return save_checkpoint(path, make_checkpoint(model, arch, cfg))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    mae_cfg = mae_config("vit_test", img_size=32, patch_size=8)
    mae_cfg.update(preset="vit_test", preprocessing=Preprocessing(32, 3).to_dict())
    return {
        "clf2d": _save(d / "clf2d.pt", "classifier", _classifier_config()),
        "clf3d": _save(d / "clf3d.pt", "classifier", _classifier_config(16, 3)),
        "resnet": _save(d / "resnet.pt", "resnet", _classifier_config(32, 2, "resnet")),
        "mae": _save(d / "mae.pt", "mae", mae_cfg),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "png": phantom.write_image(d / "folder" / "img.png", phantom.make_image(1, 48, rng=1)),
        "vol": phantom.write_volume(d / "folder" / "sub" / "vol.nii.gz", phantom.make_volume(2, VOL_SHAPE, rng=2),
                                    spacing=(2.0, 0.5, 0.6)),
        "gif": phantom.write_cine(d / "clip.gif", phantom.make_cine(0, frames=5, size=40, rng=3)),
        "nrrd": phantom.write_volume(d / "vol2.nrrd", phantom.make_volume(0, (9, 33, 35), rng=4)),
    }


def _load(path: Path, expect=("classifier", "resnet", "densenet")):
    from usfmae_core.checkpoints import load_model

    return load_model(path, expect=expect)


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


# ------------------------------------------------------------------------------------------------ in memory
def test_classify_frames_softmax_batched(ckpts):
    model, ckpt = _load(ckpts["clf2d"])
    prep = Preprocessing.from_dict(ckpt["config"]["preprocessing"])
    frames = phantom.make_volume(1, (5, 40, 30), rng=0).astype(np.float32) * 3.0 + 7.0  # unscaled grey
    p = classify_frames(model, frames, prep, batch_size=2, precision="fp32")
    assert p.shape == (5, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    # batching does not change results: one frame at a time gives the same probabilities
    single = np.concatenate([classify_frames(model, f, prep, batch_size=1, precision="fp32") for f in frames])
    np.testing.assert_allclose(p, single, atol=1e-5)
    # auto precision (bf16 on CPUs with native bf16) stays close to fp32
    np.testing.assert_allclose(classify_frames(model, frames, prep, precision="auto"), p, atol=0.05)


def test_classify_array_volume_cine_image(ckpts):
    model, ckpt = _load(ckpts["clf2d"])
    cfg = ckpt["config"]
    vol = phantom.make_volume(2, VOL_SHAPE, rng=5).astype(np.float32)
    res = classify_array(model, cfg, vol, top_k=3)
    assert res["classes"] == CLASSES and res["kind"] == "volume" and res["n_frames"] == VOL_SHAPE[0]
    assert res["per_frame"].shape == (VOL_SHAPE[0], 3)
    np.testing.assert_allclose(res["aggregate"], res["per_frame"].mean(0), atol=1e-6)
    assert res["label"] == CLASSES[int(res["aggregate"].argmax())]
    li = CLASSES.index(res["label"])
    top = res["top_slices"]
    assert len(top) == 3 and res["per_frame"][top[0], li] == res["per_frame"][:, li].max()
    assert list(res["per_frame"][top, li]) == sorted(res["per_frame"][top, li], reverse=True)
    # slicing along another axis gives one row per slice of that axis
    assert classify_array(model, cfg, vol, axis=2)["n_frames"] == VOL_SHAPE[2]
    # a 3D array given as a cine: one row per frame; a 2D array: one row
    assert classify_array(model, cfg, vol, kind="cine")["n_frames"] == VOL_SHAPE[0]
    img = classify_array(model, cfg, vol[3])
    assert img["kind"] == "image" and img["per_frame"].shape == (1, 3) and img["top_slices"] == [0]
    with pytest.raises(UsfmaeError, match="image must be 2D"):
        classify_array(model, cfg, vol, kind="image")


def test_classify_array_3d_model_one_row(ckpts):
    model, ckpt = _load(ckpts["clf3d"])
    res = classify_array(model, ckpt["config"], phantom.make_volume(1, VOL_SHAPE, rng=6).astype(np.float32))
    assert res["per_frame"].shape == (1, 3) and res["scope"] == "volume" and res["top_slices"] == []
    np.testing.assert_allclose(res["aggregate"].sum(), 1.0, atol=1e-5)
    with pytest.raises(UsfmaeError, match="3D"):
        classify_array(model, ckpt["config"], np.random.rand(40, 40).astype(np.float32))


def test_classify_file_matches_array(ckpts, files):
    model, ckpt = _load(ckpts["clf2d"])
    res = classify_file(model, ckpt["config"], files["gif"])
    assert res["kind"] == "cine" and res["n_frames"] == 5 and res["source"] == str(files["gif"])
    arr = classify_array(model, ckpt["config"], read_ultrasound(files["gif"]).array, kind="cine")
    np.testing.assert_allclose(res["per_frame"], arr["per_frame"], atol=1e-6)


def test_bf16_inference_model_close_to_fp32(ckpts):
    model, ckpt = _load(ckpts["clf2d"])
    prep = Preprocessing.from_dict(ckpt["config"]["preprocessing"])
    frames = phantom.make_volume(0, (4, 40, 40), rng=7).astype(np.float32)
    ref = classify_frames(model, frames, prep, precision="fp32")
    fast = to_inference_model(model, "cpu", "bf16")
    assert next(fast.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone (a copy is cast)
    np.testing.assert_allclose(classify_frames(fast, frames, prep), ref, atol=0.05)
    assert to_inference_model(model, "cpu", "fp32") is model


def test_inference_dtype_rules():
    assert inference_dtype(torch.device("cpu"), "fp32") is None
    assert inference_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    assert inference_dtype(torch.device("cpu"), "auto") in (None, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ files
def test_predict_volume_rows_equal_slices(ckpts, files, tmp_path):
    out = predict(ckpts["clf2d"], [files["vol"]], tmp_path / "p", device="cpu", quiet=True)
    cols, rows = _read_csv(out / "predictions.csv")
    assert cols == ["source", "index", "kind", "p_normal", "p_cyst", "p_mass", "pred"]
    assert len(rows) == VOL_SHAPE[0] and [int(r["index"]) for r in rows] == list(range(VOL_SHAPE[0]))
    for r in rows:
        p = np.array([float(r[f"p_{c}"]) for c in CLASSES])
        assert abs(p.sum() - 1) < 1e-4 and r["pred"] == CLASSES[int(p.argmax())] and r["kind"] == "volume"
    scols, srows = _read_csv(out / "summary.csv")
    assert scols == ["source", "kind", "n_frames", "n_excluded", "label", "p_normal", "p_cyst", "p_mass",
                     "top_slices"]
    assert len(srows) == 1 and int(srows[0]["n_frames"]) == VOL_SHAPE[0] and srows[0]["n_excluded"] == "0"
    # the aggregate is the mean of the slice rows
    mean = np.mean([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows], axis=0)
    np.testing.assert_allclose([float(srows[0][f"p_{c}"]) for c in CLASSES], mean, atol=1e-5)
    report = json.loads((out / "predictions.json").read_text())
    assert report["classes"] == CLASSES and report["skipped"] == []
    (res,) = report["results"]
    assert set(res) == {"source", "kind", "n_frames", "n_excluded", "label", "p_normal", "p_cyst", "p_mass",
                        "top_slices"}
    assert res["label"] == srows[0]["label"] and len(res["top_slices"]) == 3
    assert (out / "config.json").is_file()


def test_predict_png_one_row_and_cnn_baseline(ckpts, files, tmp_path):
    for name in ("clf2d", "resnet"):
        out = predict(ckpts[name], [files["png"]], tmp_path / name, device="cpu", quiet=True)
        _, rows = _read_csv(out / "predictions.csv")
        assert len(rows) == 1 and rows[0]["kind"] == "image" and rows[0]["source"] == str(files["png"])
        assert abs(sum(float(rows[0][f"p_{c}"]) for c in CLASSES) - 1) < 1e-4


def test_predict_folder_with_unreadable_file(ckpts, files, tmp_path):
    folder = files["png"].parent
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "notes.txt").write_text("ignored: not an image")
    try:
        code = main(["predict", str(ckpts["clf2d"]), str(folder), "--out", str(tmp_path / "p"), "--device", "cpu"])
    finally:
        bad.unlink()
    assert code == 0
    report = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert sorted(Path(r["source"]).name for r in report["results"]) == ["img.png", "vol.nii.gz"]
    assert len(report["skipped"]) == 1 and report["skipped"][0]["source"] == str(bad)
    assert "broken.png" in report["skipped"][0]["reason"]
    _, rows = _read_csv(tmp_path / "p" / "predictions.csv")
    assert len(rows) == 1 + VOL_SHAPE[0]


def test_predict_datalist_and_3d_model(ckpts, files, tmp_path):
    dl = files["nrrd"].parent / "datalist.json"
    dl.write_text(json.dumps({"classes": CLASSES, "test": [{"image": files["nrrd"].name, "label": 0},
                                                           {"image": str(files["vol"]), "label": 2}]}))
    found, skipped = collect_inputs([dl])
    assert [p.name for p in found] == ["vol2.nrrd", "vol.nii.gz"] and skipped == []
    out = predict(ckpts["clf3d"], [dl], tmp_path / "p3", device="cpu", quiet=True)
    _, rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 2  # one row per volume for a 3D model


def test_predict_user_errors(ckpts, files, tmp_path, capsys):
    with pytest.raises(UsfmaeError, match="mae"):
        predict(ckpts["mae"], [files["png"]], tmp_path / "x", device="cpu", quiet=True)
    with pytest.raises(UsfmaeError, match="missing.png"):
        predict(ckpts["clf2d"], [tmp_path / "missing.png"], tmp_path / "x", device="cpu", quiet=True)
    bad = tmp_path / "only.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(UsfmaeError, match="only.nii.gz"):
        predict(ckpts["clf2d"], [bad], tmp_path / "x", device="cpu", quiet=True)
    capsys.readouterr()
    assert main(["predict", str(ckpts["mae"]), str(files["png"]), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("usfmae: error:") and str(ckpts["mae"]) in err[0]


# ---------------------------------------------------------------------------------------- empty slices / frames
def _padded_volume() -> tuple[np.ndarray, np.ndarray]:
    """A phantom volume inside zero padding, with a constant slice and a near-empty one (a few bright pixels):
    ``(volume (14, 40, 48) uint8, informative slice mask)``."""
    core = phantom.make_volume(2, VOL_SHAPE, rng=11)
    vol = np.zeros((14, 40, 48), np.uint8)
    vol[4:11] = core
    vol[2] = 90  # constant slice (a bright blank frame)
    vol[12, :2, :3] = 255  # speckle of burned-in text on a blank slice: under 5 % of the slice
    return vol, np.isin(np.arange(14), np.arange(4, 11))


def test_empty_and_constant_slices_left_out_of_the_aggregate(ckpts, tmp_path):
    from usfmae_core.data.transforms import informative_frames

    model, ckpt = _load(ckpts["clf2d"])
    vol, informative = _padded_volume()
    np.testing.assert_array_equal(informative_frames(vol), informative)
    res = classify_array(model, ckpt["config"], vol.astype(np.float32), top_k=2)
    assert res["n_frames"] == 7 and res["n_excluded"] == 7 and list(res["frame_index"]) == list(range(4, 11))
    assert set(res["top_slices"]) <= set(range(4, 11))
    ref = classify_array(model, ckpt["config"], vol[4:11].astype(np.float32))  # the same slices, no padding
    np.testing.assert_allclose(res["per_frame"], ref["per_frame"], atol=1e-6)
    np.testing.assert_allclose(res["aggregate"], ref["aggregate"], atol=1e-6)
    # through the files: rows carry the slice numbers of the input, the summary counts what was left out
    path = phantom.write_volume(tmp_path / "padded.nii.gz", vol, spacing=(1.0, 0.5, 0.5))
    out = predict(ckpts["clf2d"], [path], tmp_path / "p", device="cpu", quiet=True)
    _, rows = _read_csv(out / "predictions.csv")
    assert [int(r["index"]) for r in rows] == list(range(4, 11))
    _, srows = _read_csv(out / "summary.csv")
    assert srows[0]["n_frames"] == "7" and srows[0]["n_excluded"] == "7"
    # a cine with blank frames: same rule
    clip = np.concatenate([np.zeros((3, 40, 40), np.uint8), phantom.make_cine(1, frames=4, size=40, rng=12)])
    res = classify_array(model, ckpt["config"], clip.astype(np.float32), kind="cine")
    assert res["n_frames"] == 4 and res["n_excluded"] == 3 and list(res["frame_index"]) == [3, 4, 5, 6]


def test_no_informative_slice_is_a_one_line_error(ckpts, tmp_path, capsys):
    vol = np.zeros((6, 40, 40), np.uint8)
    vol[:, :3, :3] = 200  # a marker in the corner of every slice, nothing else: not constant, not an image
    path = phantom.write_volume(tmp_path / "blank.nii.gz", vol)
    model, ckpt = _load(ckpts["clf2d"])
    with pytest.raises(UsfmaeError, match="blank.nii.gz has no informative slice: all 6"):
        classify_file(model, ckpt["config"], path)
    capsys.readouterr()
    assert main(["predict", str(ckpts["clf2d"]), str(path), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bar and the 'skipped' line)
    assert last.startswith("usfmae: error:") and "blank.nii.gz has no informative slice" in last


def test_kind_reads_a_clip_stored_as_a_3d_nrrd_as_cine(ckpts, tmp_path, capsys):
    """``--kind cine``: a 2D+t clip saved as a plain 3D NRRD (as the Slicer module hands a sequence over) gives one
    row per frame as a cine; ``--kind image`` on it is a one-line reason in the skip list."""
    clip = phantom.make_cine(1, frames=5, size=40, rng=7)
    path = phantom.write_volume(tmp_path / "clip.nrrd", clip)
    assert read_ultrasound(path).kind == "volume"  # what the file alone says
    assert main(["predict", str(ckpts["clf2d"]), str(path), "--out", str(tmp_path / "p"), "--device", "cpu",
                 "--kind", "cine", "--precision", "fp32"]) == 0
    (res,) = json.loads((tmp_path / "p" / "predictions.json").read_text())["results"]
    assert res["kind"] == "cine" and res["n_frames"] == 5
    _, rows = _read_csv(tmp_path / "p" / "predictions.csv")
    assert [r["kind"] for r in rows] == ["cine"] * 5
    ref = classify_array(_load(ckpts["clf2d"])[0], _load(ckpts["clf2d"])[1]["config"], clip.astype(np.float32),
                         kind="cine", precision="fp32")
    np.testing.assert_allclose([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows], ref["per_frame"], atol=1e-5)
    capsys.readouterr()
    assert main(["predict", str(ckpts["clf2d"]), str(path), "--out", str(tmp_path / "q"), "--kind", "image"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("usfmae: error:")]
    assert len(errors) == 1 and "not one image" in errors[0]
