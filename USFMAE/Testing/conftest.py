"""pytest set-up for the Slicer module's Qt-free parts: make ``USFMAELib`` importable (as Slicer does by putting the
module's folder on ``sys.path``), quiet plotting, and shared fixtures: a real MRML scene from ``slicer-core`` and
tiny random models."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

MODULE_DIR = Path(__file__).resolve().parents[1]
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def _slicer():
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core): the "
                                 "module's logic needs a real MRML scene")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package has no MRML scene (install slicer-core)")
    return slicer


@pytest.fixture
def scene():
    """A fresh MRML scene, also set as ``slicer.mrmlScene`` (as in Slicer) for ``slicer.util`` helpers."""
    slicer = _slicer()
    s = slicer.vtkMRMLScene()
    if not s.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):  # as Slicer's Sequences module registers it
        s.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = s
    yield s
    s.Clear(1)
    if previous is None:
        del slicer.mrmlScene
    else:
        slicer.mrmlScene = previous


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A 3-class ViT classifier (head large enough for slices to differ) and an MAE, 32 px, random weights."""
    torch = pytest.importorskip("torch")
    from usfmae_core.checkpoints import make_checkpoint, save_checkpoint
    from usfmae_core.data import phantom
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.networks import USFMAEClassifier
    from usfmae_core.networks.presets import build_model, mae_config

    folder = tmp_path_factory.mktemp("models")
    prep = Preprocessing(image_size=32, in_channels=3).to_dict()
    torch.manual_seed(0)
    enc = {"in_channels": 3, "img_size": 32, "patch_size": 8, "spatial_dims": 2, "hidden_size": 48, "num_layers": 2,
           "num_heads": 3, "mlp_ratio": 4.0, "qkv_bias": True, "drop_path_rate": 0.0}
    model = USFMAEClassifier(num_classes=3, pool="avg", dropout=0.0, **enc)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.2)
        model.head.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    cfg = {**enc, "num_classes": 3, "pool": "avg", "dropout": 0.0, "preset": "vit_test",
           "classes": list(phantom.CLASSES), "preprocessing": prep}
    classifier = save_checkpoint(folder / "classifier.pt", make_checkpoint(model, "classifier", cfg))
    torch.manual_seed(1)
    mcfg = mae_config("vit_test", img_size=32, patch_size=8)
    mae = save_checkpoint(folder / "mae.pt", make_checkpoint(build_model("mae", mcfg), "mae",
                                                             {**mcfg, "preset": "vit_test", "preprocessing": prep}))
    return {"classifier": Path(classifier), "mae": Path(mae), "prep": prep}


def _run_job(logic, spec, timeout: float = 300.0):
    """Start ``spec``, poll as the widget's timer does, finish it; returns ``(outcome, job)``."""
    job = logic.start_job(spec)
    end = time.monotonic() + timeout
    while job.running and time.monotonic() < end:
        job.poll()
        time.sleep(0.05)
    assert not job.running, f"job still running after {timeout} s; log tail: {list(job.log)[-5:]}"
    return logic.finish_job(job), job


@pytest.fixture
def run_job():
    """``run_job(logic, spec, timeout=300) -> (outcome, job)``: a background job, polled to its end and finished."""
    return _run_job
