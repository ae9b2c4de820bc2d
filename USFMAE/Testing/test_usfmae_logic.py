"""The module's logic on a real MRML scene from the ``slicer-core`` package (no Slicer application, no fake module).

Classification of a 3D volume, a single-slice 2D volume and a sequence into table + chart nodes, reconstruction
volumes with the input's geometry, the model cache, job plans checked against the engine's CLI parser, and errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core): the "
                             "module's logic needs a real MRML scene")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML scene (install slicer-core)", allow_module_level=True)
torch = pytest.importorskip("torch")

import vtk  # noqa: E402  (slicer-core brings it)

from USFMAELib.logic import USFMAEEngineLogic  # noqa: E402
from usfmae_core import UsfmaeError  # noqa: E402
from usfmae_core.checkpoints import make_checkpoint, save_checkpoint  # noqa: E402
from usfmae_core.data import phantom  # noqa: E402
from usfmae_core.data.transforms import Preprocessing  # noqa: E402
from usfmae_core.networks import USFMAEClassifier  # noqa: E402
from usfmae_core.networks.presets import build_model, mae_config  # noqa: E402
from usfmae_core.workflows.predict import classify_array  # noqa: E402
from usfmae_core.workflows.reconstruct import reconstruct_frames  # noqa: E402

CLASSES = list(phantom.CLASSES)
PREP = Preprocessing(image_size=32, in_channels=3).to_dict()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    """A tiny random ViT classifier (3 classes, 32 px) whose head is large enough for slices to differ."""
    torch.manual_seed(0)
    enc = dict(in_channels=3, img_size=32, patch_size=8, spatial_dims=2, hidden_size=48, num_layers=2, num_heads=3,
               mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0)
    model = USFMAEClassifier(num_classes=3, pool="avg", dropout=0.0, **enc)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.2)
        model.head.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    cfg = {**enc, "num_classes": 3, "pool": "avg", "dropout": 0.0, "preset": "vit_test", "classes": CLASSES,
           "preprocessing": PREP}
    path = tmp_path_factory.mktemp("models") / "classifier.pt"
    save_checkpoint(path, make_checkpoint(model, "classifier", cfg))
    return path


@pytest.fixture(scope="module")
def mae_path(tmp_path_factory):
    torch.manual_seed(1)
    cfg = mae_config("vit_test", img_size=32, patch_size=8)
    model = build_model("mae", cfg)
    path = tmp_path_factory.mktemp("models") / "mae.pt"
    save_checkpoint(path, make_checkpoint(model, "mae", {**cfg, "preset": "vit_test", "preprocessing": PREP}))
    return path


@pytest.fixture
def scene():
    """A fresh MRML scene, also set as ``slicer.mrmlScene`` (as in Slicer) for ``slicer.util`` helpers."""
    s = slicer.vtkMRMLScene()
    if not s.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):
        s.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = s
    yield s
    s.Clear(1)
    if previous is None:
        del slicer.mrmlScene
    else:
        slicer.mrmlScene = previous


def _ijk_to_ras(spacing=(0.4, 0.5, 1.5), origin=(12.0, -30.0, 7.5)) -> np.ndarray:
    """An oblique, axis-permuted IJK-to-RAS (columns: I, J, K directions times spacing) that no default matches."""
    c, s = np.cos(0.3), np.sin(0.3)
    directions = np.array([[c, 0.0, -s], [0.0, -1.0, 0.0], [s, 0.0, c]])  # a rotation and a flip of J
    m = np.eye(4)
    m[:3, :3] = directions * np.asarray(spacing)[None, :]
    m[:3, 3] = origin
    return m


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _column(table, name):
    col = table.GetTable().GetColumnByName(name)
    assert col is not None, f"table has no column {name!r}"
    return [col.GetValue(i) for i in range(col.GetNumberOfTuples())]


# ------------------------------------------------------------------------------------------------ classify
def test_classify_3d_volume_fills_one_row_per_slice(scene, classifier_path):
    vol = phantom.make_volume(2, (6, 40, 48), rng=3).astype(np.float32)  # (K, J, I): 6 slices
    node = slicer.util.addVolumeFromArray(vol, _ijk_to_ras(), name="vol")
    logic = USFMAEEngineLogic(scene)

    out = logic.classify(node, classifier_path, device="cpu")

    table = out.table
    assert table.GetScene() is scene and table.IsA("vtkMRMLTableNode")
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == (
        ["slice"] + [f"p_{c}" for c in CLASSES] + ["label"])
    assert table.GetNumberOfRows() == vol.shape[0] + 1
    assert _column(table, "slice") == [str(i) for i in range(vol.shape[0])] + ["aggregate"]

    # the table holds what the engine gives for the original array, slice by slice in the same order
    from usfmae_core.checkpoints import load_model

    model, ckpt = load_model(classifier_path, expect="classifier")
    ref = classify_array(model, ckpt["config"], vol, kind="volume", device="cpu")
    probs = np.array([_column(table, f"p_{c}") for c in CLASSES]).T  # (K+1, C)
    np.testing.assert_allclose(probs[:-1], ref["per_frame"], atol=1e-5)
    np.testing.assert_allclose(probs[-1], ref["aggregate"], atol=1e-5)
    assert np.ptp(probs[:-1], axis=0).max() > 1e-3, "slices should differ, or slice order would go untested"
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    labels = _column(table, "label")
    assert labels[:-1] == [CLASSES[i] for i in probs[:-1].argmax(1)]
    assert labels[-1] == ref["label"] == table.GetAttribute("USFMAE.label")
    assert json.loads(table.GetAttribute("USFMAE.topSlices")) == ref["top_slices"]

    # a chart with one series per class, reading a numeric companion table
    chart = out.chart
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == len(CLASSES)
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNode() is out.plot_table and series.GetYColumnName() == f"p_{CLASSES[0]}"
    assert out.plot_table.GetNumberOfRows() == vol.shape[0]

    # running again into the same table replaces its rows and reuses the chart (no pile-up of series)
    n_nodes = scene.GetNumberOfNodes()
    again = logic.classify(node, classifier_path, table_node=table, device="cpu")
    assert again.table is table and again.chart is chart and table.GetNumberOfRows() == vol.shape[0] + 1
    assert scene.GetNumberOfNodes() == n_nodes


def test_classify_single_slice_2d_volume_is_an_image(scene, classifier_path):
    img = phantom.make_image(1, 48, rng=5).astype(np.float32)  # (H, W)
    node = slicer.util.addVolumeFromArray(img[None], np.diag([0.3, 0.3, 1.0, 1.0]), name="image")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "my results")
    out = USFMAEEngineLogic(scene).classify(node, classifier_path, table_node=table, device="cpu", chart=False)

    assert out.table is table and out.chart is None
    assert out.result["kind"] == "image" and out.result["n_frames"] == 1
    assert table.GetNumberOfRows() == 2  # the image + the aggregate
    assert _column(table, "slice") == ["0", "aggregate"]
    from usfmae_core.checkpoints import load_model

    model, ckpt = load_model(classifier_path, expect="classifier")
    ref = classify_array(model, ckpt["config"], img, kind="image", device="cpu")
    got = np.array([_column(table, f"p_{c}")[0] for c in CLASSES])
    np.testing.assert_allclose(got, ref["per_frame"][0], atol=1e-5)
    assert _column(table, "label") == [ref["label"], ref["label"]]


def test_classify_colour_volume_uses_grey(scene, classifier_path):
    """An RGB ultrasound (vector volume, as Slicer loads colour DICOM) stored as grey gives the grey result."""
    img = phantom.make_image(2, 40, rng=8)
    rgb = np.repeat(img[None, :, :, None], 3, axis=3)  # (1, H, W, 3)
    colour = slicer.util.addVolumeFromArray(rgb, name="rgb", nodeClassName="vtkMRMLVectorVolumeNode")
    grey = slicer.util.addVolumeFromArray(img[None].astype(np.float32), name="grey")
    logic = USFMAEEngineLogic(scene)
    a = logic.classify(colour, classifier_path, device="cpu", chart=False).result
    b = logic.classify(grey, classifier_path, device="cpu", chart=False).result
    assert a["kind"] == "image"
    np.testing.assert_allclose(a["per_frame"], b["per_frame"], atol=1e-6)


def test_classify_sequence_proxy_classifies_every_frame(scene, classifier_path):
    frames = phantom.make_cine(0, frames=4, size=40, rng=2).astype(np.float32)
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "clip")
    for t, frame in enumerate(frames):
        item = slicer.vtkMRMLScalarVolumeNode()
        slicer.util.updateVolumeFromArray(item, frame[None])
        seq.SetDataNodeAtValue(item, str(t))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "clip browser")
    browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
    proxy = slicer.util.addVolumeFromArray(frames[0][None], name="clip proxy")
    assert browser.AddProxyNode(proxy, seq, False) is proxy  # as Slicer's Sequences module links a proxy
    logic = USFMAEEngineLogic(scene)

    out = logic.classify(proxy, classifier_path, device="cpu")
    assert out.result["kind"] == "cine" and out.result["n_frames"] == len(frames)
    assert _column(out.table, "frame") == ["0", "1", "2", "3", "aggregate"]
    direct = logic.classify(seq, classifier_path, device="cpu", chart=False)  # the sequence node itself
    np.testing.assert_allclose(direct.result["per_frame"], out.result["per_frame"], atol=1e-6)
    # without the sequence, the proxy is the single frame it shows
    single = logic.classify(proxy, classifier_path, device="cpu", use_sequence=False, chart=False)
    assert single.result["kind"] == "image" and single.table.GetNumberOfRows() == 2


def test_classify_errors_are_one_line_and_leave_the_scene_alone(scene, classifier_path, mae_path, tmp_path):
    node = slicer.util.addVolumeFromArray(np.zeros((3, 16, 16), np.float32), name="v")
    logic = USFMAEEngineLogic(scene)
    n_nodes = scene.GetNumberOfNodes()
    with pytest.raises(UsfmaeError, match="does not exist"):
        logic.classify(node, tmp_path / "missing.pt", device="cpu")
    with pytest.raises(UsfmaeError, match="'mae' model but a classifier"):
        logic.classify(node, mae_path, device="cpu")  # an MAE is not a classifier
    with pytest.raises(UsfmaeError, match="no input"):
        logic.classify(None, classifier_path, device="cpu")
    with pytest.raises(UsfmaeError, match="not one"):
        logic.classify(node, classifier_path, device="cpu", kind="image")
    if not torch.cuda.is_available():
        with pytest.raises(UsfmaeError, match="CUDA"):
            logic.classify(node, classifier_path, device="cuda")
    assert scene.GetNumberOfNodes() == n_nodes
    for err in (UsfmaeError("a", "b"),):
        assert "\n" not in str(err)


# --------------------------------------------------------------------------------------------- reconstruct
def test_reconstruction_volumes_keep_the_input_geometry(scene, mae_path):
    vol = phantom.make_volume(1, (4, 40, 36), rng=7).astype(np.float32)
    ijk = _ijk_to_ras()
    node = slicer.util.addVolumeFromArray(vol, ijk, name="scan")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "probe")
    node.SetAndObserveTransformNodeID(transform.GetID())

    out = USFMAEEngineLogic(scene).reconstruct(node, mae_path, mask_ratio=0.75, seed=3, device="cpu")

    for result in (out.masked, out.reconstruction):
        assert result.IsA("vtkMRMLScalarVolumeNode") and result.GetScene() is scene
        np.testing.assert_allclose(_matrix(result), ijk, atol=1e-9)
        np.testing.assert_allclose(result.GetSpacing(), node.GetSpacing(), atol=1e-9)
        np.testing.assert_allclose(result.GetOrigin(), node.GetOrigin(), atol=1e-9)
        assert result.GetTransformNodeID() == transform.GetID()
        arr = slicer.util.arrayFromVolume(result)
        assert arr.shape == vol.shape and arr.min() >= 0.0 and arr.max() <= 1.0
    masked = slicer.util.arrayFromVolume(out.masked)
    recon = slicer.util.arrayFromVolume(out.reconstruction)
    # the same as the engine on the original array with the same seed, in the same slice order
    from usfmae_core.checkpoints import load_model

    mae, ckpt = load_model(mae_path, expect="mae")
    ref = reconstruct_frames(mae, vol, Preprocessing.from_dict(PREP), mask_ratio=0.75, seed=3)
    np.testing.assert_allclose(recon, ref["reconstruction"], atol=1e-5)
    np.testing.assert_allclose(masked, ref["masked"], atol=1e-6)
    hidden = out.extra["mask"] > 0.5
    assert 0.6 < hidden.mean() < 0.9 and np.all(masked[hidden] == 0)


def test_reconstruct_refuses_a_classifier(scene, classifier_path):
    node = slicer.util.addVolumeFromArray(np.random.rand(1, 32, 32).astype(np.float32), name="x")
    with pytest.raises(UsfmaeError, match="mae"):
        USFMAEEngineLogic(scene).reconstruct(node, classifier_path, device="cpu")


# -------------------------------------------------------------------------------------- models and jobs
def test_model_cache_import_and_info(tmp_path, monkeypatch, classifier_path):
    monkeypatch.setenv("USFMAE_HOME", str(tmp_path / "home"))
    logic = USFMAEEngineLogic(slicer.vtkMRMLScene())
    assert logic.model_cache_dir() == tmp_path / "home" / "models" and logic.cached_models() == []
    first = logic.import_model(classifier_path, name="breast v1")
    second = logic.import_model(classifier_path, name="breast v1")
    assert first.parent == logic.model_cache_dir() and first != second
    assert set(logic.cached_models()) == {first, second}
    info = logic.model_info(first)
    assert info["arch"] == "classifier" and info["classes"] == CLASSES and info["image_size"] == 32
    # foreign weights (facebook layout) are converted on import
    from usfmae_core.checkpoints import load_checkpoint, to_facebook_state_dict

    fb = tmp_path / "facebook_mae.pth"
    torch.save({"model": to_facebook_state_dict(load_checkpoint(classifier_path)["model"])}, fb)
    imported = logic.import_model(fb)
    assert logic.model_info(imported)["arch"] == "classifier"
    with pytest.raises(UsfmaeError, match="does not exist"):
        logic.import_model(tmp_path / "nope.pt")


def test_job_plans_are_accepted_by_the_engine_cli(scene, tmp_path):
    from usfmae_core.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for needed in ("prepare", "pretrain", "finetune"):
        if needed not in commands:
            pytest.skip(f"the engine has no 'usfmae {needed}' command yet")
    logic = USFMAEEngineLogic(scene)
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    init = tmp_path / "mae.pt"
    init.write_bytes(b"x")
    finetune = logic.finetune_plan(labelled, tmp_path / "ft", init=init, epochs=3, device="cpu", batch_size=8)
    node = slicer.util.addVolumeFromArray(phantom.make_volume(0, (4, 24, 24), rng=1), name="scene vol")
    exported = logic.export_scene_for_pretraining([node])
    try:
        files = sorted(exported.glob("*.nrrd"))
        assert len(files) == 1
        from usfmae_core.data.readers import read_ultrasound

        back = read_ultrasound(files[0])
        assert back.array.shape == (4, 24, 24)
        pretrain = logic.pretrain_plan([exported], tmp_path / "pt", epochs=2, device="cpu", preset="vit_test",
                                       image_size=32, batch_size=4)
        assert [s["name"] for s in pretrain] == ["prepare", "pretrain"]
        logic.validate_plan(finetune + pretrain)  # raises if a flag is unknown to this engine
    finally:
        import shutil

        shutil.rmtree(exported)
    with pytest.raises(UsfmaeError, match="refused"):
        logic.validate_plan([{"name": "finetune", "argv": ["finetune", "--no-such-flag"]}])
    with pytest.raises(UsfmaeError, match="does not exist"):
        logic.finetune_plan(tmp_path / "missing", tmp_path / "ft")
    assert logic.find_checkpoint(tmp_path / "ft") is None


# ------------------------------------------------------------------------------- background jobs, end to end
def _run_job(job, timeout=300):
    """Poll as the widget's timer does; returns the progress stages seen."""
    stages = set()
    import time

    end = time.monotonic() + timeout
    while job.running and time.monotonic() < end:
        job.poll()
        if job.progress:
            stages.add(job.progress.get("stage"))
        time.sleep(0.1)
    assert not job.running, f"job still running after {timeout} s; log tail: {list(job.log)[-5:]}"
    return stages


def test_finetune_job_writes_a_classifier_the_logic_can_use(scene, tmp_path):
    """The module's fine-tune path: plan -> child process (Scripts/usfmae_job.py -> usfmae finetune) with progress
    lines -> model.pt found -> classify a scene volume with it."""
    data = phantom.write_labelled_folder(tmp_path / "labelled", 4, size=40, seed=0)
    logic = USFMAEEngineLogic(scene)
    out = tmp_path / "finetune run"  # a space in the path, as users' folders have
    steps = logic.finetune_plan(data, out, epochs=2, device="cpu", batch_size=8, preset="vit_test",
                                extra_args=["--image-size", "32", "--patch-size", "8", "--workers", "0",
                                            "--no-tensorboard"])
    job = logic.start_job(steps, out, name="fine-tune")
    stages = _run_job(job)
    assert job.returncode == 0, list(job.log)[-10:]
    assert "finetune" in stages and job.fraction == 1.0
    assert json.loads((out / "job_plan.json").read_text())["steps"] == steps
    model = logic.find_checkpoint(out)
    assert model == out / "model.pt"
    assert logic.model_info(model)["classes"] == sorted(CLASSES)  # class folders, sorted
    node = slicer.util.addVolumeFromArray(phantom.make_volume(1, (3, 40, 40), rng=4), name="v")
    table = logic.classify(node, model, device="cpu", chart=False).table
    assert table.GetNumberOfRows() == 4


@pytest.mark.slow
def test_pretrain_job_on_scene_volumes(scene, tmp_path):
    """Pretraining on the scene's volumes: exported to a temporary NRRD folder, prepared, pretrained; the
    temporary folder is removed afterwards and the MAE reconstructs a scene volume."""
    logic = USFMAEEngineLogic(scene)
    for i in range(2):
        slicer.util.addVolumeFromArray(phantom.make_volume(i, (10, 40, 40), rng=i), name=f"scan {i}")
    temp = logic.export_scene_for_pretraining()
    out = tmp_path / "pretrain"
    steps = logic.pretrain_plan([temp], out, epochs=1, device="cpu", preset="vit_test", image_size=32,
                                batch_size=16, extra_args=["--patch-size", "8", "--workers", "0"])
    job = logic.start_job(steps, out, name="pretrain", temp_dir=temp)
    stages = _run_job(job, timeout=600)
    assert job.returncode == 0, list(job.log)[-10:]
    assert "pretrain" in stages
    logic.finish_job(job)
    assert not temp.exists()
    mae = logic.find_checkpoint(out)
    assert mae is not None and logic.model_info(mae)["arch"] == "mae"
    node = logic.scene_volumes()[0]
    rec = logic.reconstruct(node, mae, device="cpu")
    assert slicer.util.arrayFromVolume(rec.reconstruction).shape == slicer.util.arrayFromVolume(node).shape
