"""The USFMAE module's logic on the MRML scene: no Qt, the engine (torch, ``usfmae_core``) imported only when used.

:class:`USFMAEEngineLogic` is what ``USFMAE.USFMAELogic`` adds to Slicer's ``ScriptedLoadableModuleLogic``; it runs
in Slicer and, for the tests, on a bare ``slicer.vtkMRMLScene`` from the ``slicer-core`` package.

Array conventions: ``slicer.util.arrayFromVolume`` gives ``(K, J, I)`` = (slices, rows, columns); a single-slice
volume ``(1, H, W)`` is a 2D image, a sequence of single-slice volumes a cine ``(T, H, W)``. Spacing is passed to the
engine in array-axis order, i.e. ``reversed(node.GetSpacing())``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from USFMAELib.engine import MODULE_DIR, ensure_engine_on_path
from USFMAELib.jobs import Job

ensure_engine_on_path()
from usfmae_core.errors import UsfmaeError  # noqa: E402  (tiny module: no torch)

CLASSIFIER_ARCHS = ("classifier", "resnet", "densenet")  # as usfmae_core.workflows.predict (not imported: torch)
JOB_SCRIPT = MODULE_DIR / "Scripts" / "usfmae_job.py"
OUTPUT_ATTRIBUTE = "USFMAE.output"  # marks nodes this module created (not re-exported as pretraining data)
_PALETTE = ((0.12, 0.47, 0.71), (1.0, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
            (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81))


@dataclass
class InputImage:
    """Pixels of an input node as the engine wants them.

    Attributes:
        array: ``(H, W)`` for an image, ``(T, H, W)`` for a cine, ``(D, H, W)`` for a volume; float32, unscaled grey.
        kind: ``image`` | ``cine`` | ``volume``.
        spacing: per array axis (mm; the frame interval is not known for sequences and given as 1).
        node: the volume node whose geometry outputs copy (the proxy / first frame for sequences).
        index_name: name of the per-row index column (``slice`` or ``frame``).
    """

    array: np.ndarray
    kind: str
    spacing: tuple[float, ...]
    node: Any
    index_name: str = "slice"

    @property
    def frames(self) -> np.ndarray:
        """``(N, H, W)`` frames (N=1 for an image)."""
        return self.array[None] if self.array.ndim == 2 else self.array


@dataclass
class ClassifyOutput:
    result: dict[str, Any]
    table: Any
    chart: Any = None
    plot_table: Any = None


@dataclass
class ReconstructOutput:
    masked: Any
    reconstruction: Any
    mask_ratio: float
    extra: dict[str, Any] = field(default_factory=dict)


def _frame_index(result: dict[str, Any], n: int) -> np.ndarray:
    """The input slice / frame number of each row of ``result["per_frame"]`` (empty slices are not classified)."""
    index = result.get("frame_index")
    return np.arange(n) if index is None or len(index) != n else np.asarray(index, dtype=np.int64)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "volume"


class USFMAEEngineLogic:
    """Classify, reconstruct, manage models and start training jobs, on an MRML scene.

    Args:
        scene: the MRML scene (default: ``slicer.mrmlScene``, looked up when used).
    """

    def __init__(self, scene: Any = None) -> None:
        self._scene = scene
        self._models: dict[tuple, tuple[Any, dict]] = {}
        self._temp_dirs: dict[int, Path] = {}

    @property
    def scene(self) -> Any:
        scene = self._scene if self._scene is not None else getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise RuntimeError("no MRML scene: pass one to the logic or set slicer.mrmlScene")
        return scene

    # =========================================================================================== device / models
    @staticmethod
    def resolve_device(choice: str = "auto") -> str:
        """``auto|cuda|mps|cpu`` -> the device string to use (UsfmaeError when the accelerator is absent)."""
        from usfmae_core.device import resolve_device

        return str(resolve_device(choice or "auto"))

    @staticmethod
    def describe_device(choice: str = "auto") -> dict[str, Any]:
        """The device ``choice`` resolves to, with its name and memory (plain types), e.g.
        ``{"device": "cuda", "name": "NVIDIA H100", "memory_gb": 79.1, ...}``."""
        from usfmae_core.device import describe_device, resolve_device

        return describe_device(resolve_device(choice or "auto"))

    @staticmethod
    def model_cache_dir() -> Path:
        """Where imported models are kept (outside the Slicer install): ``$USFMAE_HOME/models`` or
        ``~/.usfmae/models``."""
        from usfmae_core.commands.info import model_cache_dir

        return model_cache_dir()

    def cached_models(self) -> list[Path]:
        """Model files in the cache, newest first."""
        folder = self.model_cache_dir()
        if not folder.is_dir():
            return []
        files = [p for p in folder.iterdir() if p.suffix in (".pt", ".pth") and p.is_file()]
        return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)

    def import_model(self, source: str | os.PathLike, name: str | None = None) -> Path:
        """Put a model into the cache and return its path there; works offline on local files.

        ``source`` may be one of our checkpoints (copied), foreign weights that ``usfmae import-weights`` converts
        (USF-MAE / facebook MAE, MONAI, timm ViT), or a MONAI bundle folder (its ``models/model.pt``).
        """
        from usfmae_core.checkpoints import import_weights, load_checkpoint

        src = Path(source).expanduser()
        if src.is_dir():
            candidates = [src / "models" / n for n in ("model.pt", "model.pth")]
            candidates += sorted((src / "models").glob("*.pt")) if (src / "models").is_dir() else []
            candidates += sorted(src.glob("*.pt")) + sorted(src.glob("*.pth"))
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise UsfmaeError(f"{src} holds no model file (looked for models/model.pt, *.pt, *.pth)",
                                  "choose a checkpoint file or a MONAI bundle folder with models/model.pt")
            stem = name or src.name
            src = found[0]
        else:
            stem = name or src.stem
        if not src.is_file():
            raise UsfmaeError(f"model file {src} does not exist", "check the path")
        folder = self.model_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{_safe_name(stem)}.pt"
        n = 1
        while dest.exists():
            dest = folder / f"{_safe_name(stem)}_{n}.pt"
            n += 1
        try:
            load_checkpoint(src)  # ours: keep the file as it is
        except UsfmaeError:
            return Path(import_weights(src, dest))  # foreign: convert (raises a one-line error if it cannot)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return dest

    def model_info(self, path: str | os.PathLike) -> dict[str, Any]:
        """What a checkpoint holds: arch, classes, preset, input size, spatial dims, where it came from."""
        from usfmae_core.checkpoints import load_checkpoint

        ckpt = load_checkpoint(Path(path).expanduser())
        cfg = ckpt.get("config", {})
        prep = cfg.get("preprocessing") or {}
        return {"arch": ckpt.get("arch"), "classes": list(cfg.get("classes") or []), "preset": cfg.get("preset"),
                "image_size": prep.get("image_size", cfg.get("img_size")), "spatial_dims": cfg.get("spatial_dims", 2),
                "meta": ckpt.get("meta", {}), "version": ckpt.get("usfmae_version")}

    def load_model(self, path: str | os.PathLike, expect: str | Sequence[str] = CLASSIFIER_ARCHS,
                   device: str = "cpu") -> tuple[Any, dict[str, Any]]:
        """Load (and keep, until the file changes) the model in ``path``; ``expect`` names the acceptable kinds."""
        from usfmae_core.checkpoints import load_model

        if not str(path).strip():
            raise UsfmaeError("no model is selected", "choose a model file or import one in the Model section")
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsfmaeError(f"model file {p} does not exist", "choose another model or import it again")
        expect = (expect,) if isinstance(expect, str) else tuple(expect)
        key = (str(p.resolve()), p.stat().st_mtime_ns, expect, str(device))
        if key not in self._models:
            self._models.clear()  # one model at a time: GPU memory is not hoarded
            model, ckpt = load_model(p, expect=expect, device=device)
            model.eval()
            self._models[key] = (model, ckpt)
        return self._models[key]

    def clear_models(self) -> None:
        """Forget loaded models (frees their memory)."""
        self._models.clear()

    # ===================================================================================================== input
    def sequence_for(self, node: Any) -> Any:
        """The sequence behind ``node``: the node itself if it is a sequence, the sequence it is a browser proxy of,
        or None."""
        if node is None:
            return None
        if node.IsA("vtkMRMLSequenceNode"):
            return node
        scene = node.GetScene() or self.scene
        browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
        for i in range(browsers.GetNumberOfItems()):
            seq = browsers.GetItemAsObject(i).GetSequenceNode(node)
            if seq is not None:
                return seq
        return None

    @staticmethod
    def _grey(node: Any) -> np.ndarray:
        """``(K, J, I)`` float32 grey pixels of a volume node (colour volumes converted with the data layer's rule)."""
        arr = slicer.util.arrayFromVolume(node)
        if arr is None:
            raise UsfmaeError(f"volume '{node.GetName()}' has no image data", "load or select another volume")
        if node.IsA("vtkMRMLVectorVolumeNode") or arr.ndim == 4:
            if arr.shape[-1] >= 3:
                from usfmae_core.data.readers import _to_grey

                return np.ascontiguousarray(_to_grey(arr)[0], dtype=np.float32)
            return np.ascontiguousarray(arr[..., 0], dtype=np.float32)
        return np.array(arr, dtype=np.float32, copy=True)

    def input_image(self, node: Any, kind: str = "auto", use_sequence: bool = True) -> InputImage:
        """The pixels of ``node`` (a scalar / vector volume, a sequence, or a sequence browser's proxy volume).

        ``kind`` ``auto`` makes a single-slice volume an image, a multi-slice one a volume and a sequence of
        single-slice volumes a cine; ``image`` / ``cine`` / ``volume`` force the reading of the slices.
        """
        if node is None:
            raise UsfmaeError("no input is selected", "choose a volume or a sequence in the Classify section")
        kind = (kind or "auto").lower()
        if kind not in ("auto", "image", "cine", "volume"):
            raise UsfmaeError(f"unknown input kind '{kind}'", "choose auto, image, cine or volume")
        seq = self.sequence_for(node) if use_sequence else None
        if seq is not None:
            return self._sequence_image(seq, node, kind)
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise UsfmaeError(f"'{node.GetName()}' is a {node.GetClassName()}, not an image",
                              "choose a scalar volume, a colour volume or a sequence of them")
        arr = self._grey(node)
        spacing = tuple(float(s) for s in reversed(node.GetSpacing()))
        if arr.shape[0] == 1 and kind in ("auto", "image"):
            return InputImage(arr[0], "image", spacing[1:], node)
        if kind == "image":
            raise UsfmaeError(f"'{node.GetName()}' has {arr.shape[0]} slices, not one",
                              "use kind 'volume' or 'cine', or choose a 2D image")
        kind = "volume" if kind == "auto" else kind
        return InputImage(arr, kind, spacing, node, "frame" if kind == "cine" else "slice")

    def _sequence_image(self, seq: Any, node: Any, kind: str) -> InputImage:
        n = seq.GetNumberOfDataNodes()
        if n == 0:
            raise UsfmaeError(f"sequence '{seq.GetName()}' is empty", "record or load frames first")
        frames, first = [], None
        for i in range(n):
            item = seq.GetNthDataNode(i)
            if item is None or not item.IsA("vtkMRMLScalarVolumeNode"):
                raise UsfmaeError(f"sequence '{seq.GetName()}' holds {item.GetClassName() if item else 'nothing'} "
                                  f"at item {i}, not images", "choose a sequence of ultrasound frames")
            arr = self._grey(item)
            if arr.shape[0] != 1:
                raise UsfmaeError(f"sequence '{seq.GetName()}' holds 3D volumes ({arr.shape[0]} slices per item)",
                                  "choose one time point (its proxy volume) with 'use sequence' off")
            if first is not None and arr.shape != first.shape:
                raise UsfmaeError(f"sequence '{seq.GetName()}' frames differ in size ({first.shape[1:]} vs "
                                  f"{arr.shape[1:]} at item {i})", "resample the frames to one size")
            first = arr if first is None else first
            frames.append(arr[0])
        ref = node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else seq.GetNthDataNode(0)
        sx, sy, _ = ref.GetSpacing()
        stack = np.stack(frames)
        if kind == "image":
            raise UsfmaeError(f"sequence '{seq.GetName()}' has {n} frames", "use kind 'cine' or 'auto'")
        kind = "cine" if kind == "auto" else kind
        return InputImage(stack, kind, (1.0, float(sy), float(sx)), ref, "frame" if kind == "cine" else "slice")

    # ================================================================================================== classify
    def classify(self, input_node: Any, model_path: str | os.PathLike, table_node: Any = None, device: str = "auto",
                 kind: str = "auto", use_sequence: bool = True, batch_size: int = 32, top_k: int = 3,
                 chart: bool = True, progress: Callable[[int], None] | None = None) -> ClassifyOutput:
        """Classify every slice / frame of ``input_node`` and write the probabilities into a table node.

        The table (``table_node``, or a new one) gets one row per slice / frame plus an ``aggregate`` row, and the
        columns ``slice`` (or ``frame``), ``p_<class>`` per class and ``label``; with ``chart`` a plot chart of the
        per-slice probabilities is made (or updated). ``progress`` is called with the number of frames done after
        each batch. Nothing is added to the scene when the model fails.
        """
        img = self.input_image(input_node, kind, use_sequence)
        dev = self.resolve_device(device)
        model, ckpt = self.load_model(model_path, CLASSIFIER_ARCHS, dev)
        config = ckpt["config"]  # class names: config["classes"] (class_0.. when a checkpoint lacks them)
        from usfmae_core.workflows.predict import classify_array

        result = classify_array(model, config, img.array, kind=img.kind, spacing=img.spacing, axis=0, device=dev,
                                batch_size=int(batch_size), top_k=int(top_k), progress=progress)
        scene = self.scene
        if table_node is None:
            table_node = scene.AddNewNodeByClass("vtkMRMLTableNode",
                                                 scene.GenerateUniqueName(f"{input_node.GetName()} USF-MAE classes"))
            table_node.SetAttribute(OUTPUT_ATTRIBUTE, "classification")
        self.fill_table(table_node, result, img.index_name)
        table_node.SetAttribute("USFMAE.model", str(model_path))
        table_node.SetAttribute("USFMAE.input", input_node.GetID() or input_node.GetName())
        out = ClassifyOutput(result, table_node)
        if chart:
            out.chart, out.plot_table = self.update_chart(table_node, result, img.index_name)
        return out

    @staticmethod
    def fill_table(table_node: Any, result: dict[str, Any], index_name: str = "slice") -> None:
        """Write ``classify_array``'s result into ``table_node`` (replacing its columns): ``index_name`` (text: the
        slice / frame number, and ``aggregate`` for the last row), ``p_<class>`` per class (float), ``label``."""
        classes = [str(c) for c in result["classes"]]
        per_frame = np.asarray(result["per_frame"], dtype=np.float64).reshape(-1, len(classes))
        frame_index = _frame_index(result, per_frame.shape[0])
        aggregate = np.asarray(result["aggregate"], dtype=np.float64).reshape(len(classes))
        rows = np.concatenate([per_frame, aggregate[None]], 0)
        wasModifying = table_node.StartModify()
        try:
            table_node.RemoveAllColumns()
            index = vtk.vtkStringArray()
            index.SetName(index_name)
            labels = vtk.vtkStringArray()
            labels.SetName("label")
            for i in range(per_frame.shape[0]):
                index.InsertNextValue(str(int(frame_index[i])))
                labels.InsertNextValue(classes[int(per_frame[i].argmax())])
            index.InsertNextValue("aggregate")
            labels.InsertNextValue(str(result.get("label", classes[int(aggregate.argmax())])))
            table_node.AddColumn(index)
            table_node.SetColumnDescription(index_name, f"{index_name} index (0-based, slowest array axis); empty "
                                            "or constant ones are not classified; the last row is the aggregate over "
                                            "the classified ones")
            for c, name in enumerate(classes):
                col = vtk.vtkDoubleArray()
                col.SetName(f"p_{name}")
                col.SetNumberOfTuples(rows.shape[0])
                for r in range(rows.shape[0]):
                    col.SetValue(r, float(rows[r, c]))
                table_node.AddColumn(col)
                table_node.SetColumnDescription(f"p_{name}", f"probability of class '{name}'")
            table_node.AddColumn(labels)
            table_node.SetColumnDescription("label", "most probable class")
            table_node.SetAttribute("USFMAE.label", str(result.get("label", "")))
            table_node.SetAttribute("USFMAE.kind", str(result.get("kind", "")))
            top = result.get("top_slices")
            table_node.SetAttribute("USFMAE.topSlices", json.dumps(np.asarray(top).tolist() if top is not None
                                                                   else []))
        finally:
            table_node.EndModify(wasModifying)

    def update_chart(self, table_node: Any, result: dict[str, Any], index_name: str = "slice") -> tuple[Any, Any]:
        """A plot chart of per-slice probabilities (one line per class) for ``table_node``, created on first use and
        updated afterwards. The chart reads a numeric companion table (the main table's index column is text)."""
        scene = self.scene
        classes = [str(c) for c in result["classes"]]
        per_frame = np.asarray(result["per_frame"], dtype=np.float64).reshape(-1, len(classes))
        plot_table = table_node.GetNodeReference("USFMAE.plotTable")
        if plot_table is None:
            plot_table = scene.AddNewNodeByClass("vtkMRMLTableNode",
                                                 scene.GenerateUniqueName(f"{table_node.GetName()} plot data"))
            plot_table.SetAttribute(OUTPUT_ATTRIBUTE, "plot data")
            table_node.SetNodeReferenceID("USFMAE.plotTable", plot_table.GetID())
        columns = [_frame_index(result, per_frame.shape[0]).astype(np.float64)] + [per_frame[:, c]
                                                                                   for c in range(len(classes))]
        slicer.util.updateTableFromArray(plot_table, columns, [index_name] + [f"p_{c}" for c in classes])
        chart = table_node.GetNodeReference("USFMAE.chart")
        if chart is None:
            chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode",
                                            scene.GenerateUniqueName(f"{table_node.GetName()} chart"))
            chart.SetAttribute(OUTPUT_ATTRIBUTE, "chart")
            table_node.SetNodeReferenceID("USFMAE.chart", chart.GetID())
        for i in reversed(range(chart.GetNumberOfPlotSeriesNodes())):  # series of a previous run
            old = chart.GetNthPlotSeriesNode(i)
            chart.RemoveNthPlotSeriesNodeID(i)
            if old is not None and old.GetAttribute(OUTPUT_ATTRIBUTE):
                scene.RemoveNode(old)
        for c, name in enumerate(classes):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode",
                                             scene.GenerateUniqueName(f"{table_node.GetName()} p_{name}"))
            series.SetAttribute(OUTPUT_ATTRIBUTE, "plot series")
            series.SetAndObserveTableNodeID(plot_table.GetID())
            series.SetXColumnName(index_name)
            series.SetYColumnName(f"p_{name}")
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone
                                  if per_frame.shape[0] > 1 else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetColor(*_PALETTE[c % len(_PALETTE)])
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle(f"USF-MAE: {result.get('label', '')}")
        chart.SetXAxisTitle(index_name)
        chart.SetYAxisTitle("probability")
        chart.SetYAxisRangeAuto(False)
        chart.SetYAxisRange(0.0, 1.0)
        return chart, plot_table

    # =============================================================================================== reconstruct
    def reconstruct(self, input_node: Any, model_path: str | os.PathLike, mask_ratio: float = 0.75, seed: int = 0,
                    device: str = "auto", kind: str = "auto", progress: Callable[[int], None] | None = None
                    ) -> ReconstructOutput:
        """Mask and reconstruct ``input_node`` with an MAE: a 2D MAE works slice by slice (frame by frame), a 3D MAE
        on the whole volume. Returns two new scalar volume nodes (masked input and reconstruction, values in
        [0, 1]) with the input's spacing, origin, IJK-to-RAS directions and parent transform. A sequence proxy is
        reconstructed as the frame it shows."""
        if not 0.0 < float(mask_ratio) < 1.0:
            raise UsfmaeError(f"mask ratio {mask_ratio} is outside (0, 1)", "choose e.g. 0.75")
        img = self.input_image(input_node, kind, use_sequence=False)
        dev = self.resolve_device(device)
        mae, ckpt = self.load_model(model_path, ("mae",), dev)
        from usfmae_core.workflows.predict import preprocessing_from_config
        from usfmae_core.workflows.reconstruct import reconstruct_frames, reconstruct_volume

        prep = preprocessing_from_config(ckpt["config"])
        if int(ckpt["config"].get("spatial_dims", 2)) == 3:
            if img.kind != "volume":
                raise UsfmaeError(f"{model_path} is a 3D MAE but '{input_node.GetName()}' is a 2D {img.kind}",
                                  "choose a 3D volume, or a 2D MAE for images and clips")
            out = reconstruct_volume(mae, img.array, prep, mask_ratio=float(mask_ratio), seed=int(seed), device=dev)
        else:
            out = reconstruct_frames(mae, img.frames, prep, mask_ratio=float(mask_ratio), seed=int(seed),
                                     device=dev, progress=progress)
        shape = slicer.util.arrayFromVolume(input_node).shape[:3]
        name = input_node.GetName()
        nodes = [self._volume_like(input_node, np.asarray(out[key], np.float32).reshape(shape), f"{name} {key}")
                 for key in ("masked", "reconstruction")]
        return ReconstructOutput(nodes[0], nodes[1], float(mask_ratio),
                                 {"mask": out.get("mask"), "loss": out.get("loss")})

    def _volume_like(self, reference: Any, array: np.ndarray, name: str) -> Any:
        """A new scalar volume node holding ``array`` (K, J, I) with ``reference``'s geometry and transform."""
        scene = self.scene
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
        node.CopyOrientation(reference)  # origin, spacing and IJK directions
        slicer.util.updateVolumeFromArray(node, array)
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
        node.SetAttribute(OUTPUT_ATTRIBUTE, "reconstruction")
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, 1.0)
        return node

    # ====================================================================================================== jobs
    def export_volumes(self, nodes: Iterable[Any], folder: str | os.PathLike) -> list[Path]:
        """Write volume nodes as NRRD files (with their geometry) into ``folder``, for pretraining on the scene."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for node in nodes:
            if node is None or node.GetImageData() is None:
                continue
            path = folder / f"{_safe_name(node.GetName())}_{len(written):03d}.nrrd"
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            storage.SetUseCompression(True)
            if not storage.WriteData(node):
                raise UsfmaeError(f"could not write '{node.GetName()}' to {path}", "check the disk space and folder")
            written.append(path)
        return written

    def scene_volumes(self) -> list[Any]:
        """The scene's scalar volumes, without this module's own outputs."""
        nodes = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
        return [n for n in found if not n.GetAttribute(OUTPUT_ATTRIBUTE) and not n.IsA("vtkMRMLLabelMapVolumeNode")]

    @staticmethod
    def finetune_plan(data: str | os.PathLike, out_dir: str | os.PathLike, init: str | os.PathLike | None = None,
                      epochs: int = 10, device: str = "auto", batch_size: int | None = None,
                      preset: str | None = None, extra_args: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Steps for ``usfmae finetune``: a labelled folder (one sub-folder per class), CSV or datalist JSON ->
        classifier ``out_dir/model.pt``; ``init`` is the pretrained MAE (None: a ViT of ``preset`` from scratch)."""
        if not str(data).strip() or not Path(data).expanduser().exists():
            raise UsfmaeError(f"labelled data '{data!s}' does not exist",
                              "choose a folder with one sub-folder per class, or a CSV (path,label)")
        argv = ["finetune", "--data", str(Path(data).expanduser()), "--out", str(Path(out_dir).expanduser()),
                "--epochs", str(int(epochs)), "--device", device or "auto"]
        if init is not None and str(init).strip():
            argv += ["--init", str(Path(init).expanduser())]
        elif preset:
            argv += ["--preset", preset]
        if batch_size:
            argv += ["--batch-size", str(int(batch_size))]
        return [{"name": "finetune", "argv": argv + [str(a) for a in extra_args]}]

    @staticmethod
    def pretrain_plan(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, epochs: int = 10,
                      device: str = "auto", init: str | os.PathLike | None = None, preset: str | None = None,
                      image_size: int | None = None, batch_size: int | None = None,
                      extra_args: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Steps for pretraining on unlabelled files / folders: ``usfmae prepare`` (frame corpus in
        ``out_dir/corpus``), then ``usfmae pretrain`` (``out_dir/pretrain/model.pt``)."""
        srcs = [str(Path(s).expanduser()) for s in sources if str(s).strip()]
        if not srcs:
            raise UsfmaeError("no unlabelled data was given", "choose a folder, or use the scene's volumes")
        missing = [s for s in srcs if not Path(s).exists()]
        if missing:
            raise UsfmaeError(f"unlabelled data {missing[0]} does not exist", "check the folder")
        out = Path(out_dir).expanduser()
        corpus = out / "corpus"
        prepare = ["prepare", *srcs, "--out", str(corpus)]
        if image_size:
            prepare += ["--image-size", str(int(image_size))]
        pretrain = ["pretrain", "--corpus", str(corpus), "--out", str(out / "pretrain"), "--epochs", str(int(epochs)),
                    "--device", device or "auto"]
        if init is not None and str(init).strip():
            pretrain += ["--init", str(Path(init).expanduser())]
        elif preset:
            pretrain += ["--preset", preset]
        if image_size:
            pretrain += ["--img-size", str(int(image_size))]
        if batch_size:
            pretrain += ["--batch-size", str(int(batch_size))]
        return [{"name": "prepare", "argv": prepare},
                {"name": "pretrain", "argv": pretrain + [str(a) for a in extra_args]}]

    @staticmethod
    def validate_plan(steps: Sequence[dict[str, Any]]) -> None:
        """Check every step's arguments against this engine's ``usfmae`` parser (before anything starts), so a
        mismatch is a one-line error here rather than a failed child process."""
        import contextlib
        import io

        from usfmae_core.cli import build_parser

        parser = build_parser()
        for step in steps:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    parser.parse_args([str(a) for a in step["argv"]])
            except SystemExit as exc:
                if exc.code in (0, None):
                    continue
                lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
                message = lines[-1] if lines else f"exit code {exc.code}"
                raise UsfmaeError(f"the engine's 'usfmae {step['name']}' refused the job's arguments ({message})",
                                  "update the USFMAE extension and its engine together") from None

    @staticmethod
    def python_executable() -> str:
        """``PythonSlicer`` inside Slicer (its launcher sets up the libraries), else this interpreter."""
        exe_dir = Path(sys.executable).resolve().parent
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            if (exe_dir / name).is_file():
                return str(exe_dir / name)
        return shutil.which("PythonSlicer") or sys.executable

    def job_environment(self) -> dict[str, str]:
        """Environment of child jobs (``USFMAE.USFMAELogic`` uses Slicer's start-up environment instead)."""
        return dict(os.environ)

    def start_job(self, steps: Sequence[dict[str, Any]], out_dir: str | os.PathLike, name: str = "job",
                  python: str | None = None, env: dict[str, str] | None = None, validate: bool = True,
                  temp_dir: str | os.PathLike | None = None) -> Job:
        """Write the plan to ``out_dir/job_plan.json`` and start it in a child process (returns at once).

        ``temp_dir`` (e.g. exported scene volumes) is deleted by :meth:`finish_job`.
        """
        if validate:
            self.validate_plan(steps)
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        plan = out / "job_plan.json"
        plan.write_text(json.dumps({"name": name, "steps": list(steps)}, indent=2) + "\n", encoding="utf-8")
        argv = [python or self.python_executable(), str(JOB_SCRIPT), str(plan)]
        job = Job(argv, env=env if env is not None else self.job_environment(), cwd=out, name=name).start()
        if temp_dir is not None:
            self._temp_dirs[id(job)] = Path(temp_dir)
        return job

    def finish_job(self, job: Job) -> None:
        """Clean up after a job that has ended (temporary exports)."""
        temp = self._temp_dirs.pop(id(job), None)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)

    def export_scene_for_pretraining(self, nodes: Iterable[Any] | None = None) -> Path:
        """Export ``nodes`` (default: the scene's volumes) to a new temporary folder of NRRD files."""
        nodes = list(self.scene_volumes() if nodes is None else nodes)
        if not nodes:
            raise UsfmaeError("the scene has no volumes to pretrain on", "load ultrasound volumes or choose a folder")
        folder = Path(tempfile.mkdtemp(prefix="usfmae_scene_"))
        self.export_volumes(nodes, folder)
        return folder

    @staticmethod
    def find_checkpoint(out_dir: str | os.PathLike, prefer: Sequence[str] = ("model", "best", "final", "last")
                        ) -> Path | None:
        """The model a finished job wrote into ``out_dir``: a preferred name if present, else the newest ``.pt``."""
        files = [p for p in Path(out_dir).expanduser().rglob("*.pt") if p.is_file() and not p.name.startswith(".")]
        if not files:
            return None
        for stem in prefer:
            named = [p for p in files if p.stem == stem or p.stem.startswith(stem + "_")]
            if named:
                return max(named, key=lambda p: p.stat().st_mtime)
        return max(files, key=lambda p: p.stat().st_mtime)
