"""The module's logic on a real MRML scene from the ``slicer-core`` package (no Slicer application, no fake module).

Every classification and reconstruction runs as the module runs it: a background job (child process running
``Scripts/usfmae_job.py`` -> ``usfmae predict`` / ``usfmae reconstruct``) whose results are loaded into the scene.
Inputs: 3D volumes, single-slice images, colour (vector) volumes, streaming volumes (a real codec-encoded frame),
sequences (every frame), label maps and nodes without image data (refused); results in the subject hierarchy under
the input's study and shown in a layout with a table view and a plot view.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core): the "
                             "module's logic needs a real MRML scene")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML scene (install slicer-core)", allow_module_level=True)
torch = pytest.importorskip("torch")

import vtk
from USFMAELib import inputs
from USFMAELib.logic import USFMAEEngineLogic
from vtk.util import numpy_support

from usfmae_core import UsfmaeError
from usfmae_core.checkpoints import load_model
from usfmae_core.data import phantom
from usfmae_core.data.transforms import Preprocessing
from usfmae_core.workflows.predict import classify_array
from usfmae_core.workflows.reconstruct import reconstruct_frames

CLASSES = list(phantom.CLASSES)


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


def _probabilities(table) -> np.ndarray:
    return np.array([_column(table, f"p_{c}") for c in CLASSES]).T


def _reference(model_path, array, kind, spacing=None):
    """What the engine gives for ``array`` (``spacing`` in array-axis order: the input's pixel spacing, which the
    engine's preprocessing uses, e.g. to letterbox anisotropic slices)."""
    model, ckpt = load_model(model_path, expect="classifier")
    return classify_array(model, ckpt["config"], np.asarray(array, np.float32), kind=kind, spacing=spacing,
                          device="cpu", precision="fp32")


def _sequence(scene, frames, name="clip", node_class="vtkMRMLScalarVolumeNode"):
    """A sequence of single-slice frames with a browser and a proxy, linked as Slicer's Sequences module does."""
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    for t, frame in enumerate(frames):
        item = getattr(slicer, node_class)()
        slicer.util.updateVolumeFromArray(item, frame[None])
        seq.SetDataNodeAtValue(item, str(t))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
    browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    logic.UpdateProxyNodesFromSequences(browser)
    return seq, browser, browser.GetProxyNode(seq)


# ------------------------------------------------------------------------------------------------ classify
def test_classify_3d_volume_in_the_background_fills_one_row_per_slice(scene, tiny_models, run_job):
    vol = phantom.make_volume(2, (6, 40, 48), rng=3).astype(np.float32)  # (K, J, I): 6 slices
    node = slicer.util.addVolumeFromArray(vol, _ijk_to_ras(), name="vol")
    logic = USFMAEEngineLogic(scene)

    spec = logic.classify_job(node, tiny_models["classifier"], device="cpu", precision="fp32")
    assert spec.steps[0]["argv"][0] == "predict" and "--kind" in spec.steps[0]["argv"]
    outcome, job = run_job(logic, spec)

    assert outcome.ok, outcome.message
    assert not spec.folder.exists(), "the job's temporary folder (input copy, predictions) is removed"
    table = outcome.nodes["table"]
    assert table.GetScene() is scene and table.IsA("vtkMRMLTableNode")
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == (
        ["slice"] + [f"p_{c}" for c in CLASSES] + ["label"])
    assert _column(table, "slice") == [str(i) for i in range(vol.shape[0])] + ["aggregate"]
    # what the engine gives for the original array, slice by slice in the same order
    ref = _reference(tiny_models["classifier"], vol, "volume", spacing=node.GetSpacing()[::-1])  # (K, J, I)
    probs = _probabilities(table)
    np.testing.assert_allclose(probs[:-1], ref["per_frame"], atol=1e-5)
    np.testing.assert_allclose(probs[-1], ref["aggregate"], atol=1e-5)
    assert np.ptp(probs[:-1], axis=0).max() > 1e-3, "slices should differ, or slice order would go untested"
    labels = _column(table, "label")
    assert labels[:-1] == [CLASSES[i] for i in probs[:-1].argmax(1)]
    assert labels[-1] == ref["label"] == table.GetAttribute("USFMAE.label")
    assert json.loads(table.GetAttribute("USFMAE.topSlices")) == ref["top_slices"]
    assert outcome.show == "table" and ref["label"] in outcome.message
    # a chart with one series per class reading a numeric companion table
    chart = outcome.nodes["chart"]
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == len(CLASSES)
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNode() is outcome.nodes["plot_table"] and series.GetYColumnName() == f"p_{CLASSES[0]}"
    # progress came from the child, per batch of frames or per input
    assert job.progress is not None and job.fraction == 1.0

    # again into the same table: its rows are replaced and the chart is reused (no pile-up of series or nodes)
    n_nodes = scene.GetNumberOfNodes()
    again, _ = run_job(logic, logic.classify_job(node, tiny_models["classifier"], table_node=table, device="cpu",
                                                  precision="fp32"))
    assert again.nodes["table"] is table and again.nodes["chart"] is chart
    assert table.GetNumberOfRows() == vol.shape[0] + 1 and scene.GetNumberOfNodes() == n_nodes


def test_classify_single_slice_colour_and_streaming_volumes(scene, tiny_models, run_job):
    """A one-slice volume is an image; an RGB vector volume and a streaming volume (a frame encoded with Slicer's
    RV24 codec, decoded on read) give the grey result (the engine's colour rule, applied in the child)."""
    img = phantom.make_image(1, 48, rng=5)  # (H, W) uint8
    grey = slicer.util.addVolumeFromArray(img[None].astype(np.float32), np.diag([0.3, 0.3, 1.0, 1.0]), name="image")
    rgb = np.repeat(img[None, :, :, None], 3, axis=3)  # (1, H, W, 3)
    colour = slicer.util.addVolumeFromArray(rgb, name="rgb", nodeClassName="vtkMRMLVectorVolumeNode")

    encoder = scene.AddNewNodeByClass("vtkMRMLStreamingVolumeNode", "encoder")
    image = vtk.vtkImageData()
    image.SetDimensions(img.shape[1], img.shape[0], 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = rgb.reshape(-1, 3)
    encoder.SetAndObserveImageData(image)
    encoder.SetCodecFourCC("RV24")
    assert encoder.EncodeImageData()
    stream = scene.AddNewNodeByClass("vtkMRMLStreamingVolumeNode", "stream")
    stream.SetAndObserveFrame(encoder.GetFrame())  # only the compressed frame: decoded when read
    assert stream.IsA("vtkMRMLStreamingVolumeNode") and stream.GetFrame() is not None

    logic = USFMAEEngineLogic(scene)
    ref = _reference(tiny_models["classifier"], img, "image")
    for node in (grey, colour, stream):
        outcome, job = run_job(logic, logic.classify_job(node, tiny_models["classifier"], device="cpu",
                                                            precision="fp32"))
        assert outcome.ok, (node.GetName(), outcome.message, list(job.log)[-5:])
        table = outcome.nodes["table"]
        assert _column(table, "slice") == ["0", "aggregate"] and outcome.value["kind"] == "image"
        np.testing.assert_allclose(_probabilities(table)[0], ref["per_frame"][0], atol=1e-5, err_msg=node.GetName())


def test_classify_a_sequence_reads_every_frame(scene, tiny_models, run_job):
    frames = phantom.make_cine(0, frames=4, size=40, rng=2).astype(np.float32)
    seq, browser, proxy = _sequence(scene, frames)
    logic = USFMAEEngineLogic(scene)

    outcome, _ = run_job(logic, logic.classify_job(proxy, tiny_models["classifier"], device="cpu",
                                                  precision="fp32"))
    assert outcome.ok, outcome.message
    assert outcome.value["kind"] == "cine" and outcome.value["n_frames"] == len(frames)
    assert _column(outcome.nodes["table"], "frame") == ["0", "1", "2", "3", "aggregate"]
    ref = _reference(tiny_models["classifier"], frames, "cine")
    np.testing.assert_allclose(_probabilities(outcome.nodes["table"])[:-1], ref["per_frame"], atol=1e-5)
    # the sequence node itself gives the same; without the sequence, the proxy is the one frame it shows
    direct, _ = run_job(logic, logic.classify_job(seq, tiny_models["classifier"], device="cpu", precision="fp32"))
    np.testing.assert_allclose(direct.value["per_frame"], outcome.value["per_frame"], atol=1e-6)
    browser.SetSelectedItemNumber(2)
    single, _ = run_job(logic, logic.classify_job(proxy, tiny_models["classifier"], device="cpu",
                                                  use_sequence=False))
    assert single.value["kind"] == "image" and single.nodes["table"].GetNumberOfRows() == 2


def test_bad_inputs_are_refused_in_one_line_and_leave_the_scene_alone(scene, tiny_models, run_job, tmp_path):
    logic = USFMAEEngineLogic(scene)
    volume = slicer.util.addVolumeFromArray(np.random.rand(3, 16, 16).astype(np.float32), name="v")
    labels = slicer.util.addVolumeFromArray(np.zeros((3, 16, 16), np.uint8), name="labels",
                                            nodeClassName="vtkMRMLLabelMapVolumeNode")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")  # no image data
    broken = scene.AddNewNodeByClass("vtkMRMLStreamingVolumeNode", "recording")
    frame = slicer.vtkStreamingVolumeFrame()
    frame.SetCodecFourCC("VP90")  # a codec this Slicer does not have (SlicerIGSIO provides it)
    frame.SetDimensions(16, 16, 1)
    frame.SetNumberOfComponents(3)
    frame.SetVTKScalarType(vtk.VTK_UNSIGNED_CHAR)
    broken.SetAndObserveFrame(frame)
    model = tiny_models["classifier"]
    n_nodes = scene.GetNumberOfNodes()
    cases = [((None, model), "no input"), ((labels, model), "label map"), ((empty, model), "has no image data"),
             ((broken, model), "codec 'VP90'"), ((volume, tmp_path / "missing.pt"), "does not exist"),
             ((volume, ""), "no classifier")]
    for args, match in cases:
        with pytest.raises(UsfmaeError, match=match) as err:
            logic.classify_job(*args, device="cpu")
        assert "\n" not in str(err.value) and "; " in str(err.value)
    with pytest.raises(UsfmaeError, match="not one"):
        logic.classify_job(volume, model, kind="image")
    with pytest.raises(UsfmaeError, match="label map"):
        logic.reconstruct_job(labels, tiny_models["mae"])
    # an MAE given as the classifier: the child's engine refuses it, the outcome says why, nothing is added
    outcome, _ = run_job(logic, logic.classify_job(volume, tiny_models["mae"], device="cpu"))
    assert not outcome.ok and "classifier" in outcome.message and "\n" not in outcome.message
    assert scene.GetNumberOfNodes() == n_nodes


# --------------------------------------------------------------------------------------------- reconstruct
def test_reconstruction_volumes_keep_the_input_geometry(scene, tiny_models, run_job):
    vol = phantom.make_volume(1, (4, 40, 36), rng=7).astype(np.float32)
    ijk = _ijk_to_ras()
    node = slicer.util.addVolumeFromArray(vol, ijk, name="scan")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "probe")
    node.SetAndObserveTransformNodeID(transform.GetID())
    logic = USFMAEEngineLogic(scene)

    outcome, job = run_job(logic, logic.reconstruct_job(node, tiny_models["mae"], mask_ratio=0.75, seed=3,
                                                        device="cpu"))

    assert outcome.ok and outcome.show == "volumes", outcome.message
    # the progress bar followed the child's batches of slices to the end
    assert job.progress["stage"] == "reconstruct" and job.progress["total"] == 4 and job.fraction == 1.0
    mae, _ = load_model(tiny_models["mae"], expect="mae")
    ref = reconstruct_frames(mae, vol, Preprocessing.from_dict(tiny_models["prep"]), mask_ratio=0.75, seed=3)
    for key in ("masked", "reconstruction"):
        result = outcome.nodes[key]
        assert result.IsA("vtkMRMLScalarVolumeNode") and result.GetScene() is scene
        np.testing.assert_allclose(_matrix(result), ijk, atol=1e-9)
        assert result.GetTransformNodeID() == transform.GetID()
        np.testing.assert_allclose(slicer.util.arrayFromVolume(result), ref[key], atol=1e-5)

    # a single-slice image comes back as a single-slice volume too
    img = slicer.util.addVolumeFromArray(phantom.make_image(0, 40, rng=1)[None].astype(np.float32), name="one")
    one, _ = run_job(logic, logic.reconstruct_job(img, tiny_models["mae"], device="cpu"))
    assert one.ok, one.message
    assert slicer.util.arrayFromVolume(one.nodes["reconstruction"]).shape == (1, 40, 40)


# ---------------------------------------------------------------------------------------- progress, Cancel
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def test_classify_reports_progress_and_cancel_mid_run_leaves_the_scene_alone(scene, tiny_models):
    """What the widget does with Classify (Reconstruct runs the same way): progress records from the child (per batch
    of slices) drive the bar; Cancel mid-run (``request_cancel``, non-blocking, as the button calls it) ends the
    child's process group, the outcome says "cancelled", the job's temporary folder is removed and nothing is added
    to the scene."""
    logic = USFMAEEngineLogic(scene)
    big = slicer.util.addVolumeFromArray(
        np.random.default_rng(0).integers(0, 255, (3000, 24, 24)).astype(np.uint8), name="long")
    n_nodes = scene.GetNumberOfNodes()
    spec = logic.classify_job(big, tiny_models["classifier"], device="cpu", batch_size=1, precision="fp32")
    job = logic.start_job(spec)
    try:
        deadline = time.monotonic() + 300
        while job.running and (job.progress is None or job.progress.get("stage") != "classify"):
            assert time.monotonic() < deadline, f"no progress from the child; log: {list(job.log)[-5:]}"
            job.poll()
            time.sleep(0.02)
        assert job.running, f"the job ended before it could be cancelled: {list(job.log)[-5:]}"
        first = dict(job.progress)
        assert first["total"] == 3000 and 0 < first["step"] < 3000 and 0.0 < job.fraction < 1.0
        pid = job.proc.pid
        job.request_cancel(timeout=5.0)
        end = time.monotonic() + 30
        while job.running and time.monotonic() < end:
            job.poll()
            time.sleep(0.05)
    finally:
        if job.running:
            job.cancel(timeout=1.0)
    assert not job.running and job.cancelled and not _alive(pid)
    assert job.progress["step"] < 3000, "cancelled before the end"
    outcome = logic.finish_job(job)
    assert not outcome.ok and outcome.cancelled and "cancelled" in outcome.message
    assert not spec.folder.exists() and scene.GetNumberOfNodes() == n_nodes



# ------------------------------------------------------------------------------ where results go and show
def test_results_go_under_the_inputs_study_and_show_in_a_table_and_plot_layout(scene, tiny_models, run_job):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    series = sh.CreateFolderItem(study, "Series 3")
    node = slicer.util.addVolumeFromArray(phantom.make_volume(0, (3, 32, 32), rng=2), name="scan")
    sh.CreateItem(series, node)
    logic = USFMAEEngineLogic(scene)

    outcome, _ = run_job(logic, logic.classify_job(node, tiny_models["classifier"], device="cpu"))
    assert outcome.ok, outcome.message
    folder = sh.GetItemChildWithName(study, "USF-MAE scan")
    assert folder, "a results folder directly under the study"
    placed = {sh.GetItemDataNode(sh.GetItemByPositionUnderParent(folder, i)).GetID()
              for i in range(sh.GetNumberOfItemChildren(folder))}
    assert {outcome.nodes[k].GetID() for k in ("table", "chart", "plot_table")} <= placed
    rec, _ = run_job(logic, logic.reconstruct_job(node, tiny_models["mae"], device="cpu"))
    assert sh.GetItemParent(sh.GetItemByDataNode(rec.nodes["reconstruction"])) == folder
    # an input outside any study: the results folder sits beside it
    loose = slicer.util.addVolumeFromArray(phantom.make_volume(1, (2, 32, 32), rng=3), name="loose")
    assert sh.GetItemParent(logic.place_in_subject_hierarchy([], loose)) == sh.GetSceneItemID()

    # the layout: Slicer's layout logic makes the views of the arrangement, the application logic fills them
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)  # slices + 3D, no table
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logic.show_table_and_chart(outcome.nodes["table"], outcome.nodes["chart"], app)
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView
    table_view = scene.GetFirstNodeByClass("vtkMRMLTableViewNode")
    plot_view = scene.GetFirstNodeByClass("vtkMRMLPlotViewNode")
    assert table_view.GetTableNodeID() == outcome.nodes["table"].GetID()
    assert plot_view.GetPlotChartNodeID() == outcome.nodes["chart"].GetID()
    # Slicer's own ShowChartInLayout choice for this arrangement has a plot but no table view:
    description = layout.GetLayoutDescription(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalPlotView)
    assert "vtkMRMLPlotViewNode" in description and "vtkMRMLTableViewNode" not in description


# --------------------------------------------------------------------------------- pretraining on the scene
def test_scene_export_writes_every_frame_of_sequences(scene):
    from usfmae_core.data.readers import read_ultrasound

    logic = USFMAEEngineLogic(scene)
    slicer.util.addVolumeFromArray(phantom.make_volume(0, (4, 24, 24), rng=1), name="vol")
    frames = phantom.make_cine(1, frames=5, size=32, rng=4)
    _sequence(scene, frames, "clip")
    slicer.util.addVolumeFromArray(np.zeros((4, 24, 24), np.uint8), name="labels",
                                   nodeClassName="vtkMRMLLabelMapVolumeNode")
    out = slicer.util.addVolumeFromArray(np.zeros((4, 24, 24), np.float32), name="a result")
    out.SetAttribute("USFMAE.output", "reconstruction")
    rgb = np.stack([frames[:3], frames[:3] // 2, 255 - frames[:3]], axis=-1).astype(np.uint8)  # colour video
    _sequence(scene, rgb, "video", "vtkMRMLVectorVolumeNode")

    sources = logic.scene_sources()
    # not the proxies, the label map or our output
    assert sorted(s.GetName() for s in sources) == ["clip", "video", "vol"]
    folder = logic.export_scene_for_pretraining()
    try:
        files = sorted(p.name for p in folder.iterdir())
        assert len(files) == 3 and sum(f.endswith(".seq.nrrd") for f in files) == 2
        clip = read_ultrasound(next(folder.glob("clip_*.seq.nrrd")))
        assert clip.kind == "cine" and clip.array.shape == frames.shape  # every frame, not the one shown
        np.testing.assert_array_equal(clip.array, frames.astype(np.float32))
        video = read_ultrasound(next(folder.glob("video_*.seq.nrrd")))  # Slicer's colour sequence file
        luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        assert video.kind == "cine" and video.meta["colour"].startswith("rgb->luma")
        np.testing.assert_allclose(video.array, luma, atol=1e-3)
        assert read_ultrasound(next(p for p in folder.glob("*.nrrd") if not p.name.endswith(".seq.nrrd"))
                               ).array.shape == (4, 24, 24)
    finally:
        import shutil

        shutil.rmtree(folder)


# ------------------------------------------------------------------------------------- first run: samples
def test_sample_data_is_made_offline_loaded_as_slicer_loads_it_and_classified(scene, tiny_models, run_job, tmp_path):
    from USFMAELib import samples

    logic = USFMAEEngineLogic(scene)
    # Sample Data's button on a fresh Slicer (no torch, none of the engine's packages): one line saying where to
    # install them, instead of a failed job (the phantom generator is the engine's)
    fresh = {"numpy": "2.0.2", "pydicom": "2.4.4", "pillow": "11.2.1", "scipy": "1.13.1", "simpleitk": "2.5.2"}
    message = logic.not_ready_message(installed=fresh)
    assert "not installed yet" in message and "PyTorch" in message and "Install Python packages" in message
    assert "\n" not in message and logic.not_ready_message() is None  # this environment has them all
    assert [s.name for s in samples.missing_samples(tmp_path)] == [s.name for s in samples.SAMPLES]
    outcome, _ = run_job(logic, logic.samples_job(tmp_path))
    assert outcome.ok, outcome.message
    assert samples.missing_samples(tmp_path) == []
    loaded = logic.load_samples(outcome.value)  # Slicer's storage nodes and Sequences logic
    volume, cine = loaded["USFMAEPhantomVolume"], loaded["USFMAEPhantomCine"]
    assert slicer.util.arrayFromVolume(volume).shape == (64, 128, 128)
    np.testing.assert_allclose(volume.GetSpacing(), (0.3, 0.3, 0.5))
    assert inputs.sequence_for(cine).GetNumberOfDataNodes() == 32
    classified, _ = run_job(logic, logic.classify_job(cine, tiny_models["classifier"], device="cpu"))
    assert classified.ok and classified.nodes["table"].GetNumberOfRows() == 33


# ------------------------------------------------------------------------------------------- models, device
def test_model_cache_import_details_and_device_in_the_background(tmp_path, monkeypatch, scene, tiny_models,
                                                                 run_job):
    monkeypatch.setenv("USFMAE_HOME", str(tmp_path / "home"))
    logic = USFMAEEngineLogic(scene)
    from usfmae_core.commands.info import model_cache_dir

    assert logic.model_cache_dir() == tmp_path / "home" / "models" == model_cache_dir()  # the engine's folder
    assert logic.cached_models() == []
    first, _ = run_job(logic, logic.import_job(tiny_models["classifier"], name="breast v1"))
    second, _ = run_job(logic, logic.import_job(tiny_models["classifier"], name="breast v1"))
    assert first.ok and second.ok, (first.message, second.message)
    assert first.value["path"] != second.value["path"] and first.parameters == {"classifierPath": first.value["path"]}
    assert {str(p) for p in logic.cached_models()} == {first.value["path"], second.value["path"]}
    # foreign weights (facebook layout) are converted on import; an MAE goes to the MAE field
    from usfmae_core.checkpoints import load_checkpoint, to_facebook_state_dict

    fb = tmp_path / "facebook_mae.pth"
    torch.save({"model": to_facebook_state_dict(load_checkpoint(tiny_models["mae"])["model"])}, fb)
    mae, _ = run_job(logic, logic.import_job(fb))
    assert mae.ok and "maePath" in mae.parameters, mae.message
    info, _ = run_job(logic, logic.model_info_job(first.value["path"]))
    assert info.ok and info.value["classes"] == CLASSES and info.value["image_size"] == 32
    assert info.message.startswith("classifier (vit_test, 2D, 32 px)")
    device, _ = run_job(logic, logic.device_job("cpu"))
    assert device.ok and device.value["device"]["device"] == "cpu" and device.message.startswith("cpu")
    with pytest.raises(UsfmaeError, match="does not exist"):
        logic.import_job(tmp_path / "nope.pt")


# --------------------------------------------------------------------------------------------- training jobs
def test_training_plans_are_checked_by_the_childs_engine_before_anything_runs(scene, tmp_path, run_job):
    logic = USFMAEEngineLogic(scene)
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    init = tmp_path / "mae.pt"
    init.write_bytes(b"x")
    node = slicer.util.addVolumeFromArray(phantom.make_volume(0, (4, 24, 24), rng=1), name="scene vol")
    finetune = logic.finetune_job(labelled, tmp_path / "ft", init=init, epochs=3, device="cpu", batch_size=8)
    pretrain = logic.pretrain_job([], tmp_path / "pt", use_scene=True, epochs=2, device="cpu", preset="vit_test",
                                  image_size=32, batch_size=4)
    exported = pretrain.temporary[0]
    assert [p.name.endswith(".nrrd") for p in exported.iterdir()] == [True] and node is not None
    # one plan holding every step and a bad one at the end: only the bad one is named, and nothing ran
    spec = logic.function_job("json:dumps", {}, "check")
    bad = ["finetune", "--data", str(labelled), "--out", str(tmp_path / "x"), "--no-such-flag"]
    spec.steps = finetune.steps + pretrain.steps + [{"name": "bad", "argv": bad}]
    outcome, job = run_job(logic, spec)
    assert not outcome.ok and "'usfmae bad' refused" in outcome.message and "--no-such-flag" in outcome.message
    assert not any("step 1/" in line for line in job.log)
    logic.finish_job(_ended(logic, pretrain))
    assert not exported.exists(), "the scene export is removed with the job"
    with pytest.raises(UsfmaeError, match="does not exist"):
        logic.finetune_job(tmp_path / "missing", tmp_path / "ft")
    assert logic.find_checkpoint(tmp_path / "ft") is None


def _ended(logic, spec):
    """A job of ``spec`` that was started and cancelled at once (to finish it)."""
    job = logic.start_job(spec)
    job.cancel(timeout=5.0)
    return job


def test_finetune_job_writes_a_classifier_the_logic_can_use(scene, tmp_path, run_job):
    """The module's fine-tune path: plan -> child process (Scripts/usfmae_job.py -> usfmae finetune) with progress
    lines -> model.pt -> the classifier parameter -> classify a scene volume with it."""
    data = phantom.write_labelled_folder(tmp_path / "labelled", 4, size=40, seed=0)
    logic = USFMAEEngineLogic(scene)
    out = tmp_path / "finetune run"  # a space in the path, as users' folders have
    spec = logic.finetune_job(data, out, epochs=2, device="cpu", batch_size=8, preset="vit_test",
                              extra_args=["--image-size", "32", "--patch-size", "8", "--workers", "0",
                                          "--no-tensorboard"])
    outcome, job = run_job(logic, spec)
    assert outcome.ok, list(job.log)[-10:]
    assert job.progress["stage"] == "finetune" and job.fraction == 1.0
    assert json.loads((out / "job_plan.json").read_text())["steps"] == spec.steps
    assert outcome.parameters == {"classifierPath": str(out / "model.pt")}
    node = slicer.util.addVolumeFromArray(phantom.make_volume(1, (3, 40, 40), rng=4), name="v")
    classified, _ = run_job(logic, logic.classify_job(node, outcome.parameters["classifierPath"], device="cpu"))
    assert classified.ok and classified.value["classes"] == sorted(CLASSES)  # class folders, sorted


@pytest.mark.slow
def test_pretrain_job_on_scene_volumes(scene, tmp_path, run_job):
    """Pretraining on the scene's volumes: exported to a temporary NRRD folder, prepared, pretrained; the
    temporary folder is removed afterwards and the MAE reconstructs a scene volume."""
    logic = USFMAEEngineLogic(scene)
    for i in range(2):
        slicer.util.addVolumeFromArray(phantom.make_volume(i, (10, 40, 40), rng=i), name=f"scan {i}")
    spec = logic.pretrain_job([], tmp_path / "pretrain", use_scene=True, epochs=1, device="cpu", preset="vit_test",
                              image_size=32, batch_size=16, extra_args=["--patch-size", "8", "--workers", "0"])
    outcome, job = run_job(logic, spec, timeout=600)
    assert outcome.ok, list(job.log)[-10:]
    assert not spec.temporary[0].exists()
    rec, _ = run_job(logic, logic.reconstruct_job(logic.scene_sources()[0], outcome.parameters["maePath"],
                                                  device="cpu"))
    assert rec.ok, rec.message


# --------------------------------------------------------------------------------------- weights download
def test_fetch_weights_job(scene, tmp_path, monkeypatch, run_job):
    """*Get started > Fetch*: ``usfmae pull NAME`` as a background job. Offline (CI has only package registries): the
    engine's one-line message with the address, plus what to do in Slicer (Import). From a reachable copy (``--url
    file://``, as a mirror would be): facebook-MAE weights downloaded with progress, imported into the model cache and
    chosen as the MAE and as fine-tuning's start."""
    import socket

    from usfmae_core.checkpoints import load_checkpoint, to_facebook_state_dict
    from usfmae_core.networks.presets import build_model, mae_config

    monkeypatch.setenv("USFMAE_HOME", str(tmp_path / "home"))
    logic = USFMAEEngineLogic(scene)
    with pytest.raises(UsfmaeError, match="unknown weights"):
        logic.pull_job("usf-mae-1ep")
    spec = logic.pull_job("usf-mae-100ep")
    assert spec.steps == [{"name": "pull", "argv": ["pull", "usf-mae-100ep"]}]

    with socket.socket() as s:  # an address nothing answers: the machine's network does not matter
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/USF-MAE_100ep.pth"
    spec.steps[0]["argv"] += ["--url", url]
    outcome, job = run_job(logic, spec)
    assert not outcome.ok and not outcome.cancelled and "\n" not in outcome.message
    assert "usf-mae-100ep: cannot download" in outcome.message and url in outcome.message
    assert "in Slicer: open that address in a web browser" in outcome.message and "Import" in outcome.message
    assert logic.cached_models() == []

    torch.manual_seed(0)
    weights = tmp_path / "mirror" / "USF-MAE_100ep.pth"
    weights.parent.mkdir()
    torch.save(to_facebook_state_dict(build_model("mae", mae_config("vit_test", img_size=32)).state_dict()), weights)
    spec = logic.pull_job("usf-mae-100ep")
    spec.steps[0]["argv"] += ["--url", weights.as_uri()]
    outcome, job = run_job(logic, spec)
    assert outcome.ok, outcome.message
    cached = tmp_path / "home" / "models" / "usf-mae-100ep.pt"
    assert outcome.value == str(cached) and logic.cached_models() == [cached]
    assert outcome.parameters == {"maePath": str(cached), "finetuneInit": str(cached)}
    assert job.progress["stage"] == "pull usf-mae-100ep" and job.fraction == 1.0
    assert load_checkpoint(cached)["meta"]["source_format"] == "facebook_mae"
