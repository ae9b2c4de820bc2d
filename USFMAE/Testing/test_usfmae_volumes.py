"""Volume classifiers in the module, on a real MRML scene (``slicer-core``): fine-tuning on scans loaded in the scene
with a label table (volume -> class), and classification by an attention-MIL model shown as the volume's result,
a chart of the attention along the slices and the attention as a volume with the input's geometry. Everything runs
as background jobs, as in Slicer."""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core): the "
                             "module's logic needs a real MRML scene")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML scene (install slicer-core)", allow_module_level=True)
torch = pytest.importorskip("torch")

from test_usfmae_logic import _column, _ijk_to_ras, _matrix, _sequence  # noqa: E402
from USFMAELib.logic import VOLUME_MODELS, USFMAEEngineLogic  # noqa: E402

from usfmae_core import UsfmaeError  # noqa: E402
from usfmae_core.checkpoints import load_checkpoint, load_model, make_checkpoint, save_checkpoint  # noqa: E402
from usfmae_core.data import phantom  # noqa: E402
from usfmae_core.data.transforms import Preprocessing  # noqa: E402
from usfmae_core.workflows.predict import classify_array  # noqa: E402

TINY = ["--image-size", "16", "--patch-size", "8", "--in-channels", "1", "--workers", "0", "--no-tensorboard",
        "--precision", "fp32", "--max-slices", "4", "--batch-size", "4"]


@pytest.fixture(scope="module")
def mil_model(tmp_path_factory):
    """A random attention-MIL classifier (2 classes, grey 16 px slices) whose slices get distinct attention."""
    from usfmae_core.networks import AttentionMILClassifier

    torch.manual_seed(0)
    enc = {"in_channels": 1, "img_size": 16, "patch_size": 8, "spatial_dims": 2, "hidden_size": 48, "num_layers": 2,
           "num_heads": 3, "mlp_ratio": 4.0, "qkv_bias": True, "drop_path_rate": 0.0}
    model = AttentionMILClassifier(2, attention_hidden=16, **enc)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5)
        model.attention.attention_w.weight.normal_(0.0, 2.0)
    cfg = {**enc, "num_classes": 2, "pool": "avg", "attention_hidden": 16, "classes": ["lesion", "none"],
           "volume": {"model": "mil", "axis": 0, "max_slices": 8, "spacing": None},
           "preprocessing": Preprocessing(16, 1, (0.5,), (0.25,)).to_dict()}
    path = tmp_path_factory.mktemp("mil") / "mil.pt"
    return save_checkpoint(path, make_checkpoint(model, "mil", cfg))


def test_classify_with_attention_mil_shows_volume_result_attention_chart_and_overlay(scene, mil_model, run_job):
    vol = phantom.make_volume(2, (7, 24, 28), rng=3).astype(np.float32)  # (K, J, I)
    vol[0] = 0.0  # an empty slice: left out, zero attention in the overlay
    node = slicer.util.addVolumeFromArray(vol, _ijk_to_ras(), name="scan")
    logic = USFMAEEngineLogic(scene)
    outcome, _ = run_job(logic, logic.classify_job(node, mil_model, device="cpu", precision="fp32"))
    assert outcome.ok, outcome.message

    model, ckpt = load_model(mil_model, expect="mil")
    ref = classify_array(model, ckpt["config"], vol, "volume", precision="fp32")
    table = outcome.nodes["table"]
    assert _column(table, "slice") == ["volume"] + [str(i) for i in range(1, 7)]
    np.testing.assert_allclose(_column(table, "attention")[1:], ref["attention"], atol=1e-5)
    assert sum(_column(table, "attention")[1:]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose([_column(table, "p_lesion")[0], _column(table, "p_none")[0]], ref["aggregate"],
                               atol=1e-5)
    assert _column(table, "label")[0] == ref["label"] == table.GetAttribute("USFMAE.label")
    assert json.loads(table.GetAttribute("USFMAE.topSlices")) == ref["top_slices"]
    assert "volume-level probability" in outcome.message and "attention" in outcome.message
    # the chart plots the attention along the slices
    chart = outcome.nodes["chart"]
    assert chart.GetNumberOfPlotSeriesNodes() == 1 and chart.GetNthPlotSeriesNode(0).GetYColumnName() == "attention"
    # the overlay: the input's geometry, each slice holding its attention relative to the largest
    overlay = outcome.nodes["attention_volume"]
    np.testing.assert_allclose(_matrix(overlay), _matrix(node))
    arr = slicer.util.arrayFromVolume(overlay)
    assert arr.shape == vol.shape
    expected = np.concatenate([[0.0], ref["attention"] / ref["attention"].max()])
    np.testing.assert_allclose(arr[:, 5, 7], expected, atol=1e-5)
    assert np.ptp(arr[3]) == 0 and arr.max() == pytest.approx(1.0)
    # results sit in the subject hierarchy beside the input
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(overlay))
    assert sh.GetItemName(folder) == "USF-MAE scan"

    # a sequence (clip): attention per frame in the table and chart, no overlay volume
    frames = np.stack([phantom.make_image(i % 3, 24, rng=i) for i in range(5)]).astype(np.float32)
    _, _, proxy = _sequence(scene, frames)
    clip, _ = run_job(logic, logic.classify_job(proxy, mil_model, device="cpu", precision="fp32"))
    assert clip.ok, clip.message
    assert "attention_volume" not in clip.nodes
    assert _column(clip.nodes["table"], "frame") == ["volume", "0", "1", "2", "3", "4"]


def test_finetune_on_scene_scans_labelled_in_a_table(scene, tmp_path, run_job):
    rng = np.random.default_rng(0)
    logic = USFMAEEngineLogic(scene)
    labels = {}
    for i in range(4):
        for label, name in ((2, "lesion"), (0, "none")):
            vol = phantom.make_volume(label, (6, 24, 24), rng).astype(np.float32)
            node = slicer.util.addVolumeFromArray(vol, _ijk_to_ras(spacing=(0.5, 0.5, 1.2)), name=f"{name} {i}")
            labels[node.GetName()] = name
    frames = np.stack([phantom.make_image(0, 24, rng=i) for i in range(4)]).astype(np.float32)
    seq, _, _ = _sequence(scene, frames, name="clip")
    labels["clip"] = "none"
    table = logic.label_table_for_scene()
    names = _column(table, "volume")
    assert sorted(names) == sorted(labels)  # every scan of the scene, the sequence once (not its proxy)
    classes = table.GetTable().GetColumnByName("class")
    for r, name in enumerate(names):
        classes.SetValue(r, labels[name])
    classes.Modified()

    out = tmp_path / "scene run"
    spec = logic.finetune_scene_job(table, out, epochs=1, device="cpu", preset="vit_test",
                                    volume_model=list(VOLUME_MODELS)[1], extra_args=TINY)
    assert "--volume-model" in spec.steps[0]["argv"] and "mil" in spec.steps[0]["argv"]
    data = out / "scene_data"
    assert sorted(p.name for p in data.iterdir()) == ["lesion", "none"]
    assert len(list((data / "lesion").glob("*.nrrd"))) == 4 and len(list((data / "none").glob("*.seq.nrrd"))) == 1
    outcome, job = run_job(logic, spec, timeout=600)
    assert outcome.ok, list(job.log)[-10:]
    ckpt = load_checkpoint(outcome.parameters["classifierPath"])
    assert ckpt["arch"] == "mil" and ckpt["config"]["classes"] == ["lesion", "none"]
    datalist = json.loads((out / "datalist.json").read_text())
    assert sum(len(datalist[s]) for s in ("training", "validation", "test")) == 9  # one item per scan

    # bad tables: one line each, nothing written
    classes.SetValue(0, "")
    for r in range(1, len(names)):
        classes.SetValue(r, "none")
    with pytest.raises(UsfmaeError, match="at least 2 classes"):
        logic.finetune_scene_job(table, tmp_path / "bad", epochs=1)
    assert not (tmp_path / "bad").exists()
    volumes = table.GetTable().GetColumnByName("volume")
    volumes.SetValue(1, "no such scan")
    classes.SetValue(1, "lesion")
    with pytest.raises(UsfmaeError, match="no such scan"):
        logic.label_table_entries(table)
    with pytest.raises(UsfmaeError, match="label table"):
        logic.label_table_entries(None)
    with pytest.raises(UsfmaeError, match="unknown volume model"):
        logic.finetune_plan(tmp_path, tmp_path / "x", volume_model="4d")
    assert "--volume-model" not in logic.finetune_plan(tmp_path, tmp_path / "x",
                                                       volume_model=next(iter(VOLUME_MODELS)))[0]["argv"]
    assert seq.GetNumberOfDataNodes() == 4
