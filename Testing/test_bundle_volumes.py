"""The MONAI bundle with volume classifiers: ``configs/volume_mil.json`` / ``configs/volume_3d.json`` layered over
``train.json``, ``evaluate.json`` and ``inference.json`` with ``python -m monai.bundle run`` in subprocesses (as users
run it), on phantom volumes and clips with one label each; ``verify_net_in_out``; and the bundle's inference giving
what ``usfmae predict`` gives for the same weights (one engine)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from Testing.test_bundle import _bundle_args, _copy_bundle, _monai_bundle

pytest.importorskip("ignite", reason="MONAI's engines (SupervisedTrainer / SupervisedEvaluator) need pytorch-ignite")

NET = {"network_def#hidden_size": "48", "network_def#num_layers": "2", "network_def#num_heads": "3",
       "network_def#patch_size": "8", "network_def#attention_hidden": "16"}
SMALL = ["--image_size", "16", "--in_channels", "1", "--num_workers", "0", "--precision", "fp32",
         "--intensity_mean", "[0.5]", "--intensity_std", "[0.25]"]


def _net(volume: str) -> list[str]:
    return [a for k, v in NET.items() if volume == "mil" or "attention" not in k for a in (f"--{k}", v)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from usfmae_core.data import phantom

    root = tmp_path_factory.mktemp("bundle_volumes")
    rng = np.random.default_rng(0)
    for label, name in ((2, "lesion"), (0, "none")):
        for i in range(5):
            phantom.write_volume(root / "labelled" / name / f"{name}_{i}.nii.gz",
                                 phantom.make_volume(label, (10, 24, 24), rng), spacing=(1.5, 0.5, 0.5))
        phantom.write_cine(root / "labelled" / name / f"{name}_clip.dcm", phantom.make_cine(label, 5, 24, rng),
                           (0.04, 0.5, 0.5))
    infer = root / "infer"
    infer.mkdir()
    shutil.copy(root / "labelled" / "lesion" / "lesion_0.nii.gz", infer / "vol.nii.gz")
    shutil.copy(root / "labelled" / "none" / "none_clip.dcm", infer / "clip.dcm")
    return {"labelled": root / "labelled", "infer": infer}


@pytest.mark.parametrize("volume", ["mil", "3d"])
def test_volume_bundle_train_evaluate_inference(volume: str, data: dict[str, Path], tmp_path: Path) -> None:
    from usfmae_core.bundle_support import load_weights
    from usfmae_core.checkpoints import make_checkpoint, save_checkpoint
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.data.volumes import VolumeInput
    from usfmae_core.networks import AttentionMILClassifier, USFMAEClassifier
    from usfmae_core.networks.mae import USFMAE
    from usfmae_core.networks.presets import mae_config
    from usfmae_core.workflows.predict import classify_file

    bundle = _copy_bundle(tmp_path / "usf_mae")
    overlay = f"volume_{volume}"
    extra: list[str] = []
    if volume == "3d":  # start the 3D ViT from a 2D MAE: its patch projection is inflated over depth
        torch.manual_seed(0)
        cfg = mae_config("vit_test", img_size=16, patch_size=8, in_channels=1)
        mae = save_checkpoint(tmp_path / "mae2d.pt", make_checkpoint(USFMAE(**cfg), "mae", {**cfg, "preset": "t"}))
        extra = ["--pretrained_mae", str(mae)]
    _monai_bundle("run", *_bundle_args(bundle, ["train", overlay]), "--dataset_dir", str(data["labelled"]), *SMALL,
                  *_net(volume), *extra, "--batch_size", "2", "--train#trainer#max_epochs", "2", cwd=bundle)
    assert (bundle / "models" / "model.pt").is_file()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == ([16] * (3 if volume == "3d" else 2)) and image["num_channels"] == 1
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == ["lesion", "none"]
    datalist = json.loads((bundle / "eval" / "datalist.json").read_text())
    assert sum(len(datalist[s]) for s in ("training", "validation", "test")) == 12  # one item per volume / clip

    # evaluate.json on the test split: per-volume rows, metrics with intervals
    _monai_bundle("run", *_bundle_args(bundle, ["train", overlay, "evaluate"]), "--dataset_dir",
                  str(data["labelled"]), *SMALL, *_net(volume), "--output_dir", str(tmp_path / "eval"), cwd=bundle)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == len(datalist["test"]) and "f1_macro" in metrics["intervals"]

    # inference.json: one row per file, the probabilities usfmae predict gives with the same weights
    _monai_bundle("run", *_bundle_args(bundle, ["inference", overlay]), "--dataset_dir", str(data["infer"]),
                  *_net(volume), "--output_dir", str(tmp_path / "infer"), "--precision", "fp32",
                  "--intensity_mean", "[0.5]", "--intensity_std", "[0.25]", cwd=bundle)
    with open(tmp_path / "infer" / "predictions.csv", newline="") as f:
        rows = {Path(r["source"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == {"vol.nii.gz", "clip.dcm"}
    kw = {"in_channels": 1, "img_size": 16, "patch_size": 8, "hidden_size": 48, "num_layers": 2, "num_heads": 3}
    if volume == "mil":
        net = AttentionMILClassifier(2, attention_hidden=16, **kw)
        vin = VolumeInput("mil", 0, 32)
    else:
        net = USFMAEClassifier(2, spatial_dims=3, **kw)
        vin = VolumeInput("3d")
    load_weights(net, bundle / "models" / "model.pt")
    config = {"classes": ["lesion", "none"], "volume": vin.to_dict(), "spatial_dims": 3 if volume == "3d" else 2,
              "preprocessing": Preprocessing(16, 1, (0.5,), (0.25,)).to_dict()}
    for name, row in rows.items():
        res = classify_file(net.eval(), config, data["infer"] / name, precision="fp32")
        assert np.allclose([float(row["p_lesion"]), float(row["p_none"])], res["aggregate"], atol=1e-4), name
        assert int(row["n_frames"]) == (res["attention"].size if volume == "mil" else 1)

    # MONAI's own check of the network against network_data_format
    proc = _monai_bundle("verify_net_in_out", "--net_id", "network_def", "--meta_file",
                         str(bundle / "configs" / "metadata.json"), "--config_file",
                         "[" + ",".join(f"'{bundle / 'configs' / n}.json'" for n in ("inference", overlay)) + "]",
                         "--bundle_root", str(bundle), *_net(volume), "--device", "cpu", cwd=bundle)
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr
