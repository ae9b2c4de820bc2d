"""One label per volume / clip: volume preprocessing (isotropic cube, bags of informative slices), ``finetune
--volume-model 3d|mil`` end to end on phantom volumes and clips in real formats, and the same models through
``evaluate``, ``predict`` (attention, aggregates) and ``embed``; one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from usfmae_core import cli
from usfmae_core.checkpoints import load_checkpoint, load_model, make_checkpoint, save_checkpoint
from usfmae_core.data import phantom
from usfmae_core.data.transforms import Preprocessing
from usfmae_core.data.volumes import (
    VolumeInput,
    bag_indices,
    collate_bags,
    volume_from_config,
    volume_to_bag,
    volume_to_cube,
)
from usfmae_core.networks.mae import USFMAE
from usfmae_core.networks.presets import mae_config
from usfmae_core.workflows.predict import aggregate_frames, normal_class_index

COMMON = ["--device", "cpu", "--precision", "fp32", "--no-tensorboard", "--warmup-epochs", "1"]
TINY = ["--preset", "vit_test", "--patch-size", "8", "--in-channels", "1", *COMMON]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of phantom volumes and clips in every volume format we read: NIfTI, NRRD, MetaImage volumes
    (anisotropic spacing), a DICOM series (a folder of slices), DICOM multi-frame and mp4 clips; 'lesion' holds a
    focal mass, 'none' nothing."""
    root = tmp_path_factory.mktemp("vol") / "volumes"
    rng = np.random.default_rng(0)
    fmts = ("nii.gz", "nrrd", "mha")
    for label, name in ((0, "none"), (2, "lesion")):
        for i in range(7):
            vol = phantom.make_volume(label, (16, 32, 32), rng)
            phantom.write_volume(root / name / f"{name}_{i}.{fmts[i % 3]}", vol, spacing=(1.0, 0.5, 0.5))
        phantom.write_dicom_series(root / name / f"{name}_series", phantom.make_volume(label, (12, 32, 32), rng),
                                   (1.2, 0.5, 0.5))
        phantom.write_cine(root / name / f"{name}_clip.dcm", phantom.make_cine(label, 6, 32, rng), (0.04, 0.5, 0.5))
        phantom.write_cine(root / name / f"{name}_clip.mp4", phantom.make_cine(label, 6, 32, rng), (0.04, 0.5, 0.5))
    return root


def _run(argv: list[str]) -> None:
    assert cli.main(argv) == 0


# ---------------------------------------------------------------------------------------------- preprocessing
def test_cube_keeps_physical_shape_and_fixed_grid() -> None:
    vol = np.zeros((16, 32, 32), np.float32)  # 32 mm deep (2 mm slices) x 16 x 16 mm (0.5 mm pixels)
    vol[4:12, 8:24, 8:24] = 1.0  # a 16 x 8 x 8 mm block in the middle
    cube, step = volume_to_cube(vol, (2.0, 0.5, 0.5), 16)
    assert cube.shape == (1, 16, 16, 16) and step == pytest.approx(2.0)  # 32 mm longest extent in 16 voxels
    inside = (cube[0] > 0.5).nonzero()
    extent = (inside.max(0).values - inside.min(0).values + 1).tolist()
    assert extent == [8, 4, 4]  # 16 x 8 x 8 mm at 2 mm per voxel: the block keeps its physical shape
    assert cube[0, :, :4].abs().max() == 0  # the 16 mm sides are centred in the 32 mm cube: zero padding
    # a fixed 1 mm grid: 32 x 16 x 16 voxels, centre-cropped to the 16-voxel cube along depth
    fixed, step = volume_to_cube(vol, (2.0, 0.5, 0.5), 16, grid_spacing=1.0)
    assert step == 1.0
    inside = (fixed[0] > 0.5).nonzero()
    assert (inside.max(0).values - inside.min(0).values + 1).tolist() == [16, 8, 8]
    # a cine's first axis is time: its frames fill the cube's depth, the in-plane aspect is kept
    clip, _ = volume_to_cube(np.random.rand(5, 32, 16).astype(np.float32), (0.04, 0.5, 0.5), 16, kind="cine")
    assert clip.shape == (1, 16, 16, 16) and clip[0, :, :, :4].abs().max() == 0 and clip[0, :, :, 6].min() > 0


def test_bag_leaves_out_empty_slices_and_training_draws_even_spacing() -> None:
    rng = np.random.default_rng(0)
    vol = np.zeros((12, 32, 32), np.float32)
    vol[2:10] = phantom.make_volume(0, (8, 32, 32), rng)
    prep = Preprocessing(image_size=16, in_channels=1, mean=(0.5,), std=(0.25,))
    bag, index = volume_to_bag(vol, "volume", prep)
    assert bag.shape == (8, 1, 16, 16) and index.tolist() == list(range(2, 10))
    img_bag, img_index = volume_to_bag(vol[5], "image", prep)  # a 2D image is a bag of one slice
    assert img_bag.shape == (1, 1, 16, 16) and img_index.tolist() == [0]
    idx = bag_indices(100, 10, np.random.RandomState(0))
    assert len(idx) == 10 and np.all(np.diff(idx) >= 9) and idx[-1] >= 90  # the whole stack, evenly
    assert bag_indices(100, 10).tolist() == bag_indices(100, 10).tolist()  # deterministic without an rng
    assert bag_indices(5, 10).tolist() == [0, 1, 2, 3, 4]
    batch = collate_bags([{"image": torch.ones(3, 1, 4, 4), "label": 1}, {"image": torch.ones(5, 1, 4, 4), "label": 0}])
    assert batch["image"].shape == (2, 5, 1, 4, 4) and batch["label"].tolist() == [1, 0]
    assert batch["mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch["image"][0, 3:].abs().max() == 0


@pytest.mark.parametrize("kind", ["3d", "mil"])
def test_training_augmentation_is_fixed_by_the_transforms_own_state(kind: str) -> None:
    """A transform's ``R`` state alone fixes what it draws next (what ``finetune --resume`` saves and restores), and
    a bag keeps its slices' common geometry and their order."""
    from usfmae_core.data.volumes import RandBagAugmentd, RandVolumeAugmentd

    make = (lambda: RandVolumeAugmentd("image")) if kind == "3d" else (lambda: RandBagAugmentd("image", 4))
    x = torch.randn(1, 12, 12, 12) if kind == "3d" else torch.randn(10, 1, 12, 12)
    t = make().set_random_state(3)
    first = t({"image": x})["image"]
    state = t.R.get_state()
    second = t({"image": x})["image"]
    again = make()
    again.R.set_state(state)
    assert torch.equal(again({"image": x})["image"], second) and not torch.equal(first, second)
    if kind == "mil":
        assert second.shape == (4, 1, 12, 12)


def test_dicom_series_is_one_volume_and_2d_dicom_folders_stay_images(tmp_path: Path) -> None:
    from usfmae_core.data.dicom_series import group_dicom_series
    from usfmae_core.data.readers import read_ultrasound
    from usfmae_core.workflows.predict import collect_inputs

    vol = phantom.make_volume(2, (10, 24, 28), 0)
    series = phantom.write_dicom_series(tmp_path / "scans" / "case1", vol, (2.0, 0.5, 0.4), origin=(5, 6, 7))
    img = read_ultrasound(series)
    assert img.kind == "volume" and np.array_equal(img.array, vol) and img.spacing == (2.0, 0.5, 0.4)
    assert img.meta["origin"] == (5.0, 6.0, 7.0)  # slices sorted by position although the file names are shuffled
    frames = tmp_path / "scans" / "frames"  # single 2D US frames without slice positions: images, not a volume
    for i in range(3):
        phantom.write_image(frames / f"f{i}.dcm", phantom.make_image(0, 32, rng=i))
    files, _ = collect_inputs([tmp_path / "scans"])
    assert sorted(p.name for p in files) == ["case1", "f0.dcm", "f1.dcm", "f2.dcm"]
    items = [{"image": str(p), "label": 1} for p in sorted(series.iterdir())]
    assert group_dicom_series(items) == [{"image": str(series), "label": 1}]


def test_aggregates_and_normal_class() -> None:
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.95, 0.05]])  # classes: none, lesion; a lesion on slice 2
    mean, rows = aggregate_frames(p, "mean")
    assert mean.argmax() == 0 and len(rows) == 4  # the lesion is outvoted
    most, rows = aggregate_frames(p, "max", normal=0)
    assert rows.tolist() == [2] and most.argmax() == 1  # any-lesion: the most abnormal slice decides
    top, rows = aggregate_frames(p, "topk", k=2, normal=0)
    assert rows.tolist() == [2, 1] and np.allclose(top, p[[2, 1]].mean(0))
    assert normal_class_index(["lesion", "None"]) == 1
    assert normal_class_index(["benign", "malignant"], "benign") == 0
    from usfmae_core.errors import UsfmaeError

    with pytest.raises(UsfmaeError, match="normal-class"):
        normal_class_index(["benign", "malignant"])
    with pytest.raises(UsfmaeError, match="not a class"):
        normal_class_index(["a", "b"], "c")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def mil_run(volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("mil") / "run"
    _run(["finetune", "--data", str(volumes), "--out", str(run), "--volume-model", "mil", "--image-size", "16",
          "--max-slices", "6", "--epochs", "2", "--batch-size", "4", *TINY])
    return run


def test_mil_finetune_evaluate_predict_embed(mil_run: Path, volumes: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(mil_run / "model.pt")
    assert ckpt["arch"] == "mil" and ckpt["config"]["volume"]["model"] == "mil"
    assert volume_from_config(ckpt["config"]) == VolumeInput("mil", 0, 6, None)
    m = json.loads((mil_run / "metrics.json").read_text())
    datalist = json.loads((mil_run / "datalist.json").read_text())
    n_items = sum(len(datalist[s]) for s in ("training", "validation", "test"))
    assert n_items == 20 and m["num_images"]["test"] == len(datalist["test"])  # one example per volume / clip
    names = [Path(it["image"]).name for s in ("training", "validation", "test") for it in datalist[s]]
    assert {n.split(".", 1)[1] for n in names if "." in n} == {"nii.gz", "nrrd", "mha", "dcm", "mp4"}
    assert sorted(n for n in names if "." not in n) == ["lesion_series", "none_series"]  # one item per series
    # evaluate reproduces the run's own test metrics (same preprocessing: every informative slice)
    _run(["evaluate", "--model", str(mil_run / "model.pt"), "--data", str(mil_run / "datalist.json"), "--out",
          str(tmp_path / "eval"), "--device", "cpu", "--bootstrap", "20", "--precision", "fp32"])
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert ev["n"] == m["test"]["n"] and ev["confusion_matrix"] == m["test"]["confusion_matrix"]
    assert ev["volume_model"] == "mil"
    # predict: one volume-level row per input plus the attention of every informative slice
    vol = min((volumes / "lesion").glob("*.nii.gz"))
    clip = volumes / "none" / "none_clip.dcm"
    _run(["predict", str(mil_run / "model.pt"), str(vol), str(clip), "--out", str(tmp_path / "pred"), "--device",
          "cpu", "--precision", "fp32", "--batch-size", "5"])
    report = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert report["volume_model"] == "mil" and [r["kind"] for r in report["results"]] == ["volume", "cine"]
    with open(tmp_path / "pred" / "attention.csv", newline="") as f:
        att = list(csv.DictReader(f))
    for r in report["results"]:
        rows = [a for a in att if a["source"] == r["source"]]
        assert len(rows) == r["n_slices"] and sum(float(a["attention"]) for a in rows) == pytest.approx(1, abs=1e-4)
        best = min(rows, key=lambda a: -float(a["attention"]))
        assert int(best["index"]) == r["top_slices"][0]
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    # the in-memory path gives the same attention as the model's own forward pass over the whole bag
    model, cfg = load_model(mil_run / "model.pt")
    from usfmae_core.data.readers import read_ultrasound
    from usfmae_core.workflows.predict import classify_array

    img = read_ultrasound(vol)
    res = classify_array(model, cfg["config"], img.array, img.kind, img.spacing, batch_size=3, precision="fp32")
    prep = Preprocessing.from_dict(cfg["config"]["preprocessing"])
    bag, index = volume_to_bag(img.array, "volume", prep)
    with torch.no_grad():
        logits, attention = model.eval().forward_with_attention(bag[None])
    assert np.allclose(res["attention"], attention[0].numpy(), atol=1e-5)
    assert np.allclose(res["aggregate"], torch.softmax(logits, -1)[0].numpy(), atol=1e-5)
    assert res["slice_index"].tolist() == index.tolist()
    # embed: one volume feature per input, the attention-pooled slices
    from usfmae_core.workflows.embed import embed

    emb = np.load(embed(mil_run / "model.pt", [vol, clip], tmp_path / "emb", device="cpu", precision="fp32",
                        quiet=True) / "embeddings.npy")
    assert emb.shape == (2, 48)
    with torch.no_grad():
        pooled, _ = model.attention(model.encode(bag)[None])
    assert np.allclose(emb[0], pooled[0].numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def mae3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny native-3D MAE checkpoint (16^3 cube, grey, its own normalisation), as pretrain --native-3d writes it."""
    torch.manual_seed(0)
    cfg = mae_config("vit_test", img_size=16, patch_size=8, in_channels=1, spatial_dims=3)
    prep = Preprocessing(image_size=16, in_channels=1, mean=(0.5,), std=(0.25,))
    path = tmp_path_factory.mktemp("mae3d") / "mae3d.pt"
    return save_checkpoint(path, make_checkpoint(USFMAE(**cfg), "mae", {**cfg, "preset": "vit_test",
                                                                       "preprocessing": prep.to_dict()}))


def test_3d_vit_from_3d_mae_then_predict_and_embed(volumes: Path, mae3d: Path, tmp_path: Path) -> None:
    run = tmp_path / "run3d"
    _run(["finetune", "--data", str(volumes), "--out", str(run), "--volume-model", "3d", "--init", str(mae3d),
          "--epochs", "2", "--batch-size", "4", *COMMON])
    ckpt = load_checkpoint(run / "model.pt")
    assert ckpt["arch"] == "classifier" and ckpt["config"]["spatial_dims"] == 3
    assert ckpt["config"]["preprocessing"]["mean"] == [0.5]  # the MAE's normalisation carries over
    mae = torch.load(mae3d, weights_only=True)["model"]
    # the encoder started from the MAE: with 2 tiny epochs its patch projection is still close to the MAE's
    key = "encoder.patch_embed.patch_embeddings.weight"
    w0, w1 = mae[key], ckpt["model"][key]
    assert torch.nn.functional.cosine_similarity(w0.flatten(), w1.flatten(), dim=0) > 0.9
    vol = min((volumes / "lesion").glob("*.nrrd"))
    _run(["predict", str(run / "model.pt"), str(vol), "--out", str(tmp_path / "pred"), "--device", "cpu"])
    report = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert report["volume_model"] == "3d" and report["results"][0]["n_frames"] == 1
    _run(["embed", str(run / "model.pt"), str(vol), "--out", str(tmp_path / "emb"), "--device", "cpu"])
    assert np.load(tmp_path / "emb" / "embeddings.npy").shape == (1, 48)


def test_3d_from_inflated_2d_mae_and_3d_resnet(volumes: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = mae_config("vit_test", img_size=16, patch_size=8, in_channels=1)
    mae2d = save_checkpoint(tmp_path / "mae2d.pt", make_checkpoint(USFMAE(**cfg), "mae", {**cfg, "preset": "vit_test"}))
    _run(["finetune", "--data", str(volumes), "--out", str(tmp_path / "inflated"), "--volume-model", "3d", "--init",
          str(mae2d), "--epochs", "1", "--volume-spacing", "1.0", *COMMON])
    model, ckpt = load_model(tmp_path / "inflated" / "model.pt")
    assert model.encoder.spatial_dims == 3 and ckpt["config"]["volume"]["spacing"] == 1.0
    assert model.encoder.patch_size == (8, 8, 8)
    _run(["finetune", "--data", str(volumes), "--out", str(tmp_path / "resnet"), "--volume-model", "3d", "--arch",
          "resnet", "--depth", "10", "--image-size", "16", "--in-channels", "1", "--epochs", "1", *COMMON])
    net, ckpt = load_model(tmp_path / "resnet" / "model.pt")
    assert ckpt["arch"] == "resnet" and ckpt["config"]["spatial_dims"] == 3
    assert net.eval()(torch.rand(2, 1, 16, 16, 16)).shape == (2, 2)
    # the 3D CNN through predict and evaluate on CPU (its 5D weights take the 3D channels-last layout)
    vol = min((volumes / "lesion").glob("*.nii.gz"))
    _run(["predict", str(tmp_path / "resnet" / "model.pt"), str(vol), "--out", str(tmp_path / "pred_resnet"),
          "--device", "cpu"])
    (row,) = json.loads((tmp_path / "pred_resnet" / "predictions.json").read_text())["results"]
    assert row["n_frames"] == 1 and abs(row["p_lesion"] + row["p_none"] - 1) < 1e-3
    _run(["evaluate", "--model", str(tmp_path / "resnet" / "model.pt"), "--data",
          str(tmp_path / "resnet" / "datalist.json"), "--out", str(tmp_path / "eval_resnet"), "--device", "cpu"])
    metrics = json.loads((tmp_path / "eval_resnet" / "metrics.json").read_text())
    assert metrics["n"] == len(json.loads((tmp_path / "resnet" / "datalist.json").read_text())["test"])


def test_volume_model_errors(volumes: Path, mae3d: Path, tmp_path: Path, cli_error) -> None:
    base = ["finetune", "--data", str(volumes), "--out", str(tmp_path / "x"), "--epochs", "1", *COMMON]
    cli_error([*base, "--volume-model", "mil", "--init", str(mae3d)], "3D MAE", "--volume-model 3d")
    cli_error([*base, "--init", str(mae3d)], "3D MAE", "--volume-model 3d")
    cli_error([*base, "--volume-model", "mil", "--arch", "resnet"], "mil", "ViT")
    images = phantom.write_labelled_folder(tmp_path / "images", 4, size=32, seed=0)
    cli_error(["finetune", "--data", str(images), "--out", str(tmp_path / "y"), "--volume-model", "3d", "--epochs",
               "1", "--image-size", "16", *TINY], "is a 2D image", "3D model")
    assert not (tmp_path / "x").exists()


@pytest.mark.shared_data
def test_real_clips_and_volumes_as_labelled_scans(shared_data: Path, tmp_path: Path) -> None:
    """Real files of ../shared/data as one-label scans: lung POCUS clips (mp4 / avi / mov / gif) of two classes and
    the TRUS volumes (NIfTI) go through MIL fine-tuning (every frame / slice read, bags built), then predict gives
    each a volume-level result with attention over its informative frames."""
    videos = shared_data / "pocus_lung" / "videos"
    root = tmp_path / "clips"
    for cls in ("covid", "regular"):
        (root / cls).mkdir(parents=True)
        for src in sorted((videos / cls).iterdir())[:3]:
            (root / cls / src.name).symlink_to(src)
    vols = sorted((shared_data / "volumes" / "trus_prostate").glob("*.nii.gz"))[:2]
    for i, src in enumerate(vols):
        (root / ("covid", "regular")[i] / src.name).symlink_to(src)
    run = tmp_path / "run"
    _run(["finetune", "--data", str(root), "--out", str(run), "--volume-model", "mil", "--image-size", "16",
          "--max-slices", "4", "--epochs", "1", "--batch-size", "2", "--val-fraction", "0.25", "--test-fraction",
          "0.25", *TINY])
    m = json.loads((run / "metrics.json").read_text())
    kinds = {k for s in ("training", "validation", "test") for k in (m["volume_data"].get(s) or {}).get("kinds", {})}
    assert kinds == {"cine", "volume"}
    clip = min((root / "covid").iterdir())
    _run(["predict", str(run / "model.pt"), str(clip), str(root / "regular" / vols[1].name), "--out",
          str(tmp_path / "pred"), "--device", "cpu"])
    report = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [r["kind"] for r in report["results"]] == ["cine", "volume"] and not report["skipped"]
    assert all(r["n_slices"] > 1 for r in report["results"])
