"""The USFMAE module's logic on the MRML scene: no Qt, and no torch in this process.

Every computation that needs torch runs as a background job in a child process (:mod:`USFMAELib.jobs`,
``Scripts/usfmae_job.py``): classify, reconstruct, fine-tune, pretrain, importing a model or reading its details,
checking the device, writing the sample data, downloading weights. The logic here

1. turns the module's parameters into a :class:`JobSpec` (``*_job`` methods): it checks the inputs, writes what
   the child reads (an input NRRD, a plan of steps) and records what finishing needs;
2. starts it (:meth:`USFMAEEngineLogic.start_job`, returns at once);
3. when the job has ended, :meth:`USFMAEEngineLogic.finish_job` loads its results into the scene (a table of
   class probabilities with a chart, reconstruction volumes with the input's geometry, a model path, sample data),
   places them in the subject hierarchy under the input's study, and says what happened in a :class:`JobOutcome`.

:class:`USFMAEEngineLogic` is what ``USFMAE.USFMAELogic`` adds to Slicer's ``ScriptedLoadableModuleLogic``; it runs
in Slicer and, for the tests, on a ``slicer.vtkMRMLScene`` of the ``slicer-core`` package.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from USFMAELib import inputs, install, models, samples
from USFMAELib.engine import MODULE_DIR, TORCH_REQUIREMENT, UsfmaeError, engine_missing_message, requirements
from USFMAELib.jobs import Job

JOB_SCRIPT = MODULE_DIR / "Scripts" / "usfmae_job.py"
OUTPUT_ATTRIBUTE = "USFMAE.output"  # marks nodes this module created (not re-exported as pretraining data)
RESULTS_FOLDER = "USF-MAE"  # subject hierarchy folder (per input) that holds the results
WEIGHTS = ("usf-mae-100ep", "usf-mae-500ep")  # names `usfmae pull` knows (usfmae_core.hub)
# what a Slicer user does instead of the command line fix that the engine's error names
FAILURE_HINTS = {"pull": "open that address in a web browser, then choose the downloaded file under Model > "
                         "Import weights and press 'Import into the model cache'"}
# what fine-tuning trains (the GUI's choices -> `usfmae finetune --volume-model`)
VOLUME_MODELS = {"2D classifier (images; volumes slice by slice)": None,
                 "volume: attention over slices (MIL)": "mil",
                 "volume: native 3D ViT": "3d"}
_PALETTE = ((0.12, 0.47, 0.71), (1.0, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
            (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81))


@dataclass
class JobSpec:
    """A background job before it starts.

    Attributes:
        kind: ``classify``, ``reconstruct``, ``finetune``, ``pretrain``, ``pull``, ``samples``, ``import``,
            ``model-info`` or ``device``.
        name: a label for the GUI.
        steps: the plan (``argv`` or ``call`` steps, see ``Scripts/usfmae_job.py``).
        folder: the job's folder (plan, inputs, outputs of the steps).
        context: what :meth:`USFMAEEngineLogic.finish_job` needs (node IDs, paths).
        temporary: folders removed when the job is finished.
        exclusive: a long job that occupies the module's job slot (with progress and Cancel); ``False`` for the
            short probes (device, model details) that may run beside it.
    """

    kind: str
    name: str
    steps: list[dict[str, Any]]
    folder: Path
    context: dict[str, Any] = field(default_factory=dict)
    temporary: list[Path] = field(default_factory=list)
    exclusive: bool = True


@dataclass
class JobOutcome:
    """What a finished job did.

    Attributes:
        ok: finished without error (``False`` when it failed or was cancelled).
        cancelled: the user cancelled it.
        message: one line for the user (the result, or the error's cause and fix).
        nodes: nodes added or updated in the scene, by role (``table``, ``chart``, ``masked``, ...).
        parameters: parameter-node fields to set (e.g. ``classifierPath`` after fine-tuning).
        value: a function step's value (device description, model details, sample paths).
        show: how the widget shows it: ``table`` (table and chart in a layout with both), ``volumes``, or None.
    """

    kind: str
    ok: bool
    cancelled: bool = False
    message: str = ""
    nodes: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    value: Any = None
    show: str | None = None


def _node_name(node: Any) -> str:
    return node.GetName() or node.GetID() or "input"


def _frame_index(result: dict[str, Any], n: int) -> np.ndarray:
    """The input slice / frame number of each row of ``result["per_frame"]`` (empty slices are not classified)."""
    index = result.get("frame_index")
    return np.arange(n) if index is None or len(index) != n else np.asarray(index, dtype=np.int64)


class USFMAEEngineLogic:
    """Jobs and results of the USFMAE module on an MRML scene.

    Args:
        scene: the MRML scene (default: ``slicer.mrmlScene``, looked up when used).
    """

    def __init__(self, scene: Any = None) -> None:
        self._scene = scene

    @property
    def scene(self) -> Any:
        scene = self._scene if self._scene is not None else getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise RuntimeError("no MRML scene: pass one to the logic or set slicer.mrmlScene")
        return scene

    # ============================================================================================ set-up / models
    @staticmethod
    def install_plan(installed: dict[str, str] | None = None) -> install.InstallPlan:
        """What to install for the engine (see :mod:`USFMAELib.install`)."""
        return install.plan_install(requirements(), TORCH_REQUIREMENT, installed)

    @classmethod
    def not_ready_message(cls, installed: dict[str, str] | None = None) -> str | None:
        """None when jobs can run (the engine is found and its packages are installed); else one line saying what
        is missing and where to install it (for entry points outside the module's panel, e.g. Sample Data)."""
        missing = engine_missing_message()
        if missing:
            return f"USF-MAE cannot run: {missing}"
        plan = cls.install_plan(installed)
        if plan.nothing_to_install:
            return None
        return (f"USF-MAE needs Python packages that are not installed yet ({plan.summary().replace(chr(10), '; ')}); "
                "open the USF-MAE module (Modules > Ultrasound), section Setup, and press 'Install Python packages...'")

    @staticmethod
    def model_cache_dir() -> Path:
        return models.model_cache_dir()

    @staticmethod
    def cached_models() -> list[Path]:
        return models.cached_models()

    # ============================================================================================== job specs
    def _folder(self, kind: str, folder: str | os.PathLike | None) -> tuple[Path, list[Path]]:
        if folder is not None and str(folder).strip():
            path = Path(folder).expanduser()
            path.mkdir(parents=True, exist_ok=True)
            return path, []
        path = Path(tempfile.mkdtemp(prefix=f"usfmae_{kind}_"))
        return path, [path]

    @staticmethod
    def _model_file(path: str | os.PathLike | None, what: str) -> Path:
        if path is None or not str(path).strip():
            raise UsfmaeError(f"no {what} is selected", f"choose a {what} file, or import one in the Model section")
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsfmaeError(f"{what} file {p} does not exist", "choose another model or import it again")
        return p

    def classify_job(self, input_node: Any, model_path: str | os.PathLike, table_node: Any = None,
                     device: str = "auto", kind: str = "auto", use_sequence: bool = True, batch_size: int = 32,
                     precision: str = "auto", folder: str | os.PathLike | None = None) -> JobSpec:
        """Classify every slice / frame of ``input_node`` (every frame of the sequence behind a proxy) in the
        background: ``usfmae predict`` on the exported pixels; finishing fills ``table_node`` (or a new table).
        ``precision``: as ``usfmae predict --precision`` (auto: bf16 where the device has it natively)."""
        model = self._model_file(model_path, "classifier")
        if input_node is None or not input_node.IsA("vtkMRMLSequenceNode"):
            inputs.check_volume(input_node)
        out, temporary = self._folder("classify", folder)
        try:
            exported = inputs.export_input(input_node, out, kind, use_sequence)
        except Exception:
            for t in temporary:
                shutil.rmtree(t, ignore_errors=True)
            raise
        # --overwrite: a job folder chosen by the user is this job's own scratch space, re-classified at will
        argv = ["predict", str(model), str(exported.path), "--out", str(out / "predict"), "--device", device or "auto",
                "--batch-size", str(int(batch_size)), "--kind", exported.kind, "--precision", precision, "--overwrite"]
        context = {"input": exported.reference.GetID(), "source": _node_name(exported.source),
                   "table": table_node.GetID() if table_node is not None else None,
                   "index_name": exported.index_name, "model": str(model), "notes": exported.notes,
                   "shape": list(exported.shape), "sequence": exported.kind == "cine"}
        return JobSpec("classify", f"classify {_node_name(exported.source)}", [{"name": "classify", "argv": argv}],
                       out, context, temporary)

    def reconstruct_job(self, input_node: Any, model_path: str | os.PathLike, mask_ratio: float = 0.75,
                        seed: int = 0, device: str = "auto", folder: str | os.PathLike | None = None) -> JobSpec:
        """Mask and reconstruct ``input_node`` (the frame a proxy shows) in the background with an MAE:
        ``usfmae reconstruct``; finishing adds the masked input and the reconstruction as volumes."""
        if not 0.0 < float(mask_ratio) < 1.0:
            raise UsfmaeError(f"mask ratio {mask_ratio} is outside (0, 1)", "choose e.g. 0.75")
        model = self._model_file(model_path, "MAE")
        inputs.check_volume(input_node)
        out, temporary = self._folder("reconstruct", folder)
        try:
            exported = inputs.export_input(input_node, out, "auto", use_sequence=False)
        except Exception:
            for t in temporary:
                shutil.rmtree(t, ignore_errors=True)
            raise
        argv = ["reconstruct", str(model), str(exported.path), "--out", str(out / "reconstruct"), "--mask-ratio",
                f"{float(mask_ratio):g}", "--seed", str(int(seed)), "--device", device or "auto", "--overwrite"]
        context = {"input": input_node.GetID(), "shape": list(exported.shape), "mask_ratio": float(mask_ratio)}
        return JobSpec("reconstruct", f"reconstruct {_node_name(input_node)}",
                       [{"name": "reconstruct", "argv": argv}], out, context, temporary)

    def finetune_job(self, data: str | os.PathLike, out_dir: str | os.PathLike, **plan: Any) -> JobSpec:
        """Fine-tune a classifier (see :meth:`finetune_plan`) into ``out_dir``."""
        steps = self.finetune_plan(data, out_dir, **plan)
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        return JobSpec("finetune", "fine-tune", steps, out, {"out": str(out)})

    def finetune_scene_job(self, label_table: Any, out_dir: str | os.PathLike, **plan: Any) -> JobSpec:
        """Fine-tune on volumes / sequences loaded in the scene, labelled in ``label_table`` (one row per scan:
        volume, class; :meth:`label_table_entries`). They are written as class folders into ``out_dir/scene_data``
        (NRRD volumes with their spacing, sequences as ``.seq.nrrd`` clips), kept with the run so that its
        ``datalist.json`` stays readable, then :meth:`finetune_plan` runs on that folder."""
        out = Path(out_dir).expanduser()
        entries = self.label_table_entries(label_table)  # refuse a bad table before writing anything
        data = self.export_labelled_scene(entries, out / "scene_data")
        spec = self.finetune_job(data, out, **plan)
        spec.context["scene_data"] = str(data)
        spec.name = f"fine-tune on {len(entries)} scene scans"
        return spec

    def pretrain_job(self, sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, use_scene: bool = False,
                     **plan: Any) -> JobSpec:
        """Pretrain an MAE on folders, or on the scene's volumes and sequences (exported to a temporary folder)."""
        temporary: list[Path] = []
        if use_scene:
            exported = self.export_scene_for_pretraining()
            temporary.append(exported)
            sources = [exported]
        try:
            steps = self.pretrain_plan(sources, out_dir, **plan)
        except Exception:
            for t in temporary:
                shutil.rmtree(t, ignore_errors=True)
            raise
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        return JobSpec("pretrain", "pretrain", steps, out, {"out": str(out)}, temporary)

    def pull_job(self, name: str) -> JobSpec:
        """Download published USF-MAE weights into the model cache: ``usfmae pull NAME`` (the engine's download,
        with its hash check and offline message)."""
        if name not in WEIGHTS:
            raise UsfmaeError(f"unknown weights '{name}'", f"choose one of {', '.join(WEIGHTS)}")
        out, temporary = self._folder("pull", None)
        before = {str(p): p.stat().st_mtime_ns for p in self.cached_models()}
        return JobSpec("pull", f"download {name}", [{"name": "pull", "argv": ["pull", name]}], out,
                       {"name": name, "before": before}, temporary)

    def function_job(self, call: str, kwargs: dict[str, Any] | None = None, name: str = "",
                     kind: str = "function", context: dict[str, Any] | None = None,
                     exclusive: bool = True) -> JobSpec:
        """Call ``"module:function"`` (of the engine or of ``USFMAELib``) with JSON ``kwargs`` in a child process;
        its return value is the outcome's ``value``."""
        out, temporary = self._folder(kind, None)
        return JobSpec(kind, name or call, [{"name": "value", "call": call, "kwargs": dict(kwargs or {})}], out,
                       dict(context or {}), temporary, exclusive)

    def samples_job(self, folder: str | os.PathLike | None = None) -> JobSpec:
        """Write the sample data (:mod:`USFMAELib.samples`) with the engine's phantom generator."""
        target = Path(folder) if folder is not None else samples.samples_dir()
        return self.function_job("USFMAELib.samples:write_samples", {"folder": str(target)}, "make sample data",
                                 "samples", {"folder": str(target)})

    def import_job(self, source: str | os.PathLike, name: str | None = None) -> JobSpec:
        """Import weights or a bundle folder into the model cache (:func:`USFMAELib.models.import_model`)."""
        src = Path(str(source).strip()).expanduser() if str(source).strip() else None
        if src is None or not src.exists():
            raise UsfmaeError(f"'{source}' does not exist" if src else "no weights file or bundle folder is chosen",
                              "choose a checkpoint file (.pt, .pth) or a MONAI bundle folder")
        return self.function_job("USFMAELib.models:import_model",
                                 {"source": str(src), "cache_dir": str(self.model_cache_dir()), "name": name},
                                 f"import {src.name}", "import")

    def model_info_job(self, path: str | os.PathLike) -> JobSpec:
        """Read a checkpoint's details (arch, classes, sizes) in the background (a short probe)."""
        model = self._model_file(path, "model")
        return self.function_job("USFMAELib.models:model_info", {"path": str(model)}, "model details", "model-info",
                                 {"path": str(model)}, exclusive=False)

    def device_job(self, device: str = "auto") -> JobSpec:
        """Describe the device ``auto|cuda|mps|cpu`` resolves to, with versions (``usfmae info``; a short probe)."""
        return self.function_job("usfmae_core.commands.info:collect_info", {"device": device or "auto"},
                                 "check device", "device", exclusive=False)

    # ================================================================================================= run jobs
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

    def start_job(self, spec: JobSpec, python: str | None = None, env: dict[str, str] | None = None) -> Job:
        """Write ``spec``'s plan to ``<folder>/job_plan.json`` and start it in a child process (returns at once).
        The child checks the plan against its engine before the first step."""
        spec.folder.mkdir(parents=True, exist_ok=True)
        plan = spec.folder / "job_plan.json"
        plan.write_text(json.dumps({"name": spec.name, "kind": spec.kind, "steps": spec.steps}, indent=2) + "\n",
                        encoding="utf-8")
        argv = [python or self.python_executable(), str(JOB_SCRIPT), str(plan)]
        job = Job(argv, env=env if env is not None else self.job_environment(), cwd=spec.folder, name=spec.name)
        job.spec = spec
        for note in spec.context.get("notes", []):
            job.log.append(f"[USF-MAE] input: {note}")
        return job.start()

    def finish_job(self, job: Job) -> JobOutcome:
        """Load what an ended job produced into the scene and say what happened; removes its temporary folders.
        Nothing is added to the scene when the job failed or was cancelled."""
        spec: JobSpec = job.spec
        try:
            if job.cancelled:
                return JobOutcome(spec.kind, False, True, f"{spec.name} was cancelled")
            if job.returncode != 0:
                cause = job.error() or f"exit code {job.returncode}; see the job log"
                hint = FAILURE_HINTS.get(spec.kind)
                return JobOutcome(spec.kind, False, False,
                                  f"{spec.name} failed: {cause}" + (f" (in Slicer: {hint})" if hint else ""))
            finish = getattr(self, f"_finish_{spec.kind.replace('-', '_')}", self._finish_function)
            return finish(job, spec)
        except UsfmaeError as err:
            return JobOutcome(spec.kind, False, False, f"{spec.name}: {err}")
        finally:
            for folder in spec.temporary:
                shutil.rmtree(folder, ignore_errors=True)

    # --------------------------------------------------------------------------------------------- finishers
    def _node(self, node_id: str | None) -> Any:
        return self.scene.GetNodeByID(node_id) if node_id else None

    def _finish_classify(self, job: Job, spec: JobSpec) -> JobOutcome:
        ctx = spec.context
        result = read_predictions(spec.folder / "predict")
        input_node = self._node(ctx["input"])
        if result.get("attention") is not None:
            return self._finish_attention(ctx, result, input_node)
        table = self._node(ctx.get("table"))
        if table is None:
            table = self.scene.AddNewNodeByClass("vtkMRMLTableNode",
                                                 self.scene.GenerateUniqueName(f"{ctx['source']} USF-MAE classes"))
            table.SetAttribute(OUTPUT_ATTRIBUTE, "classification")
        index_name = ctx["index_name"] if result["scope"] == "frame" else "volume"
        self.fill_table(table, result, index_name)
        table.SetAttribute("USFMAE.model", ctx["model"])
        table.SetAttribute("USFMAE.input", ctx["input"] or "")
        chart, plot_table = self.update_chart(table, result, index_name)
        nodes = {"table": table, "chart": chart, "plot_table": plot_table}
        if input_node is not None:
            self.place_in_subject_hierarchy(list(nodes.values()) + self._series(chart), input_node)
        probability = float(max(result["aggregate"]))
        what = {"cine": "frame(s)", "volume": "slice(s)"}.get(result["kind"], "image")
        excluded = f", {result['n_excluded']} empty / constant left out" if result["n_excluded"] else ""
        message = (f"{result['label']} (mean probability {probability:.2f} over {result['n_frames']} {what}{excluded}; "
                   f"most typical: {', '.join(str(i) for i in result['top_slices']) or '-'})")
        return JobOutcome("classify", True, message=message, nodes=nodes, value=result, show="table")

    def _finish_attention(self, ctx: dict[str, Any], result: dict[str, Any], input_node: Any) -> JobOutcome:
        """An attention-MIL volume model's result: a table with the volume-level probabilities and every slice's
        attention, a chart of the attention along the slices and, for a volume, the attention as a volume with the
        input's geometry (each slice filled with its attention relative to the largest; 0 on slices left out)."""
        table = self._node(ctx.get("table"))
        if table is None:
            table = self.scene.AddNewNodeByClass("vtkMRMLTableNode",
                                                 self.scene.GenerateUniqueName(f"{ctx['source']} USF-MAE classes"))
            table.SetAttribute(OUTPUT_ATTRIBUTE, "classification")
        index_name = ctx["index_name"]
        self.fill_attention_table(table, result, index_name)
        table.SetAttribute("USFMAE.model", ctx["model"])
        table.SetAttribute("USFMAE.input", ctx["input"] or "")
        chart, plot_table = self.update_attention_chart(table, result, index_name)
        nodes: dict[str, Any] = {"table": table, "chart": chart, "plot_table": plot_table}
        if input_node is not None and not ctx.get("sequence"):
            nodes["attention_volume"] = self.attention_volume(input_node, result, tuple(ctx["shape"]))
        if input_node is not None:
            self.place_in_subject_hierarchy(list(nodes.values()) + self._series(chart), input_node)
        k = int(np.argmax(result["aggregate"]))
        what = "frame(s)" if result["kind"] == "cine" else "slice(s)"
        excluded = f", {result['n_excluded']} empty / constant left out" if result["n_excluded"] else ""
        top = ", ".join(str(i) for i in result["top_slices"]) or "-"
        message = (f"{result['label']} (volume-level probability {float(result['aggregate'][k]):.2f}; "
                   f"{len(result['attention'])} {what} pooled by attention{excluded}; most attention on {top})")
        return JobOutcome("classify", True, message=message, nodes=nodes, value=result, show="table")

    @staticmethod
    def fill_attention_table(table_node: Any, result: dict[str, Any], index_name: str = "slice") -> None:
        """The volume-level result and the attention per slice in ``table_node`` (replacing its columns):
        ``index_name`` (text: the slice / frame number; ``volume`` for the first row), ``attention`` (float, sums to 1
        over the slices; empty for the volume row), ``p_<class>`` (the volume's probabilities, on the volume row) and
        ``label``."""
        classes = [str(c) for c in result["classes"]]
        attention = np.asarray(result["attention"], dtype=np.float64)
        index = np.asarray(result["slice_index"], dtype=np.int64)
        aggregate = np.asarray(result["aggregate"], dtype=np.float64).reshape(len(classes))
        was_modifying = table_node.StartModify()
        try:
            table_node.RemoveAllColumns()
            names = vtk.vtkStringArray()
            names.SetName(index_name)
            names.InsertNextValue("volume")
            for i in index:
                names.InsertNextValue(str(int(i)))
            table_node.AddColumn(names)
            table_node.SetColumnDescription(index_name, f"'volume' for the volume-level result, then each {index_name} "
                                            "pooled by the model (0-based; empty / constant ones are left out)")
            att = vtk.vtkDoubleArray()
            att.SetName("attention")
            att.SetNumberOfTuples(len(index) + 1)
            att.SetValue(0, float("nan"))
            for r, a in enumerate(attention):
                att.SetValue(r + 1, float(a))
            table_node.AddColumn(att)
            table_node.SetColumnDescription("attention",
                                            f"the {index_name}'s weight in the volume's result (sums to 1)")
            for c, name in enumerate(classes):
                col = vtk.vtkDoubleArray()
                col.SetName(f"p_{name}")
                col.SetNumberOfTuples(len(index) + 1)
                col.SetValue(0, float(aggregate[c]))
                for r in range(len(index)):
                    col.SetValue(r + 1, float("nan"))
                table_node.AddColumn(col)
                table_node.SetColumnDescription(f"p_{name}", f"volume-level probability of class '{name}'")
            labels = vtk.vtkStringArray()
            labels.SetName("label")
            labels.InsertNextValue(str(result["label"]))
            for _ in index:
                labels.InsertNextValue("")
            table_node.AddColumn(labels)
            table_node.SetColumnDescription("label", "the volume's most probable class")
            table_node.SetAttribute("USFMAE.label", str(result["label"]))
            table_node.SetAttribute("USFMAE.kind", str(result.get("kind", "")))
            table_node.SetAttribute("USFMAE.topSlices", json.dumps([int(i) for i in result.get("top_slices") or []]))
        finally:
            table_node.EndModify(was_modifying)

    def _plot_nodes(self, table_node: Any, columns: list[np.ndarray], names: list[str]) -> tuple[Any, Any]:
        """The numeric companion table of ``table_node`` filled with ``columns`` and its plot chart emptied of a
        previous run's series, both created on first use; returns ``(plot table, chart)``."""
        scene = self.scene
        plot_table = table_node.GetNodeReference("USFMAE.plotTable")
        if plot_table is None:
            plot_table = scene.AddNewNodeByClass("vtkMRMLTableNode",
                                                 scene.GenerateUniqueName(f"{table_node.GetName()} plot data"))
            plot_table.SetAttribute(OUTPUT_ATTRIBUTE, "plot data")
            table_node.SetNodeReferenceID("USFMAE.plotTable", plot_table.GetID())
        slicer.util.updateTableFromArray(plot_table, columns, names)
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
        return plot_table, chart

    def update_attention_chart(self, table_node: Any, result: dict[str, Any], index_name: str = "slice"
                               ) -> tuple[Any, Any]:
        """A plot chart of the attention along the slices (one series), created on first use and updated
        afterwards (the same chart and companion table as :meth:`update_chart`)."""
        scene = self.scene
        columns = [np.asarray(result["slice_index"], dtype=np.float64), np.asarray(result["attention"], np.float64)]
        plot_table, chart = self._plot_nodes(table_node, columns, [index_name, "attention"])
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode",
                                         scene.GenerateUniqueName(f"{table_node.GetName()} attention"))
        series.SetAttribute(OUTPUT_ATTRIBUTE, "plot series")
        series.SetAndObserveTableNodeID(plot_table.GetID())
        series.SetXColumnName(index_name)
        series.SetYColumnName("attention")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series.SetColor(*_PALETTE[3])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        k = int(np.argmax(result["aggregate"]))
        chart.SetTitle(f"USF-MAE: {result['label']} ({float(result['aggregate'][k]):.2f}), attention per {index_name}")
        chart.SetXAxisTitle(index_name)
        chart.SetYAxisTitle("attention")
        chart.SetYAxisRangeAuto(True)
        return chart, plot_table

    def attention_volume(self, reference: Any, result: dict[str, Any], shape: tuple[int, ...]) -> Any:
        """The attention as a scalar volume with ``reference``'s geometry (spacing, origin, directions, parent
        transform): every voxel of a slice (along the model's axis, in the exported ``(K, J, I)`` array order)
        holds that slice's attention divided by the largest one, slices left out hold 0. Shown with a warm colour
        map over the input."""
        axis = int(result.get("axis") or 0)
        weights = np.zeros(int(shape[axis]), dtype=np.float32)
        attention = np.asarray(result["attention"], dtype=np.float32)
        weights[np.asarray(result["slice_index"], dtype=np.int64)] = attention / max(float(attention.max()), 1e-12)
        view = [1, 1, 1]
        view[axis] = -1
        array = np.broadcast_to(weights.reshape(view), tuple(int(s) for s in shape))
        node = self.volume_like(reference, array, f"{_node_name(reference)} USF-MAE attention")
        node.SetAttribute(OUTPUT_ATTRIBUTE, "attention")
        node.SetAttribute("USFMAE.attentionAxis", str(axis))
        display = node.GetDisplayNode()
        if display is not None:
            display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeWarm1")
        return node

    def _finish_reconstruct(self, job: Job, spec: JobSpec) -> JobOutcome:
        ctx = spec.context
        input_node = self._node(ctx["input"])
        if input_node is None:
            raise UsfmaeError("the input volume was removed from the scene while the job ran", "run it again")
        summary = json.loads((spec.folder / "reconstruct" / "reconstruct.json").read_text(encoding="utf-8"))
        volumes = summary.get("volumes") or {}
        if not {"masked", "reconstruction"} <= set(volumes):
            raise UsfmaeError("the engine wrote no reconstruction volumes", "update the USFMAE extension and engine")
        shape = tuple(ctx["shape"])
        name = _node_name(input_node)
        nodes = {key: self.volume_like(input_node, inputs.read_volume_file(volumes[key]).reshape(shape),
                                       f"{name} {key}")
                 for key in ("masked", "reconstruction")}
        self.place_in_subject_hierarchy(list(nodes.values()), input_node)
        message = (f"masked-patch loss {float(summary.get('loss', float('nan'))):.4f} with "
                   f"{ctx['mask_ratio']:.0%} of the patches hidden")
        return JobOutcome("reconstruct", True, message=message, nodes=nodes, value=summary, show="volumes")

    def _finish_finetune(self, job: Job, spec: JobSpec) -> JobOutcome:
        model = Path(spec.context["out"]) / "model.pt"
        model = model if model.is_file() else self.find_checkpoint(spec.context["out"])
        if model is None:
            raise UsfmaeError(f"the job wrote no model into {spec.context['out']}", "see the job log")
        return JobOutcome("finetune", True, message=f"classifier written: {model}",
                          parameters={"classifierPath": str(model)})

    def _finish_pretrain(self, job: Job, spec: JobSpec) -> JobOutcome:
        model = self.find_checkpoint(spec.context["out"])
        if model is None:
            raise UsfmaeError(f"the job wrote no model into {spec.context['out']}", "see the job log")
        return JobOutcome("pretrain", True, message=f"MAE written: {model}",
                          parameters={"maePath": str(model), "finetuneInit": str(model)})

    def _finish_pull(self, job: Job, spec: JobSpec) -> JobOutcome:
        before = spec.context["before"]
        printed = [Path(w) for line in job.log for w in line.split() if w.endswith((".pt", ".pth"))]
        found = [p for p in printed if p.is_file()][-1:]  # the path the command printed last
        if not found:  # else the newest cache file that the download added or replaced
            found = [p for p in self.cached_models() if before.get(str(p)) != p.stat().st_mtime_ns][:1]
        if not found:
            raise UsfmaeError(f"'usfmae pull {spec.context['name']}' finished but no model file was found in "
                              f"{self.model_cache_dir()}", "see the job log")
        model = found[0]
        return JobOutcome("pull", True, message=f"{spec.context['name']} downloaded: {model}",
                          parameters={"maePath": str(model), "finetuneInit": str(model)}, value=str(model))

    def _finish_function(self, job: Job, spec: JobSpec) -> JobOutcome:
        return JobOutcome(spec.kind, True, message=f"{spec.name} finished", value=job.results.get("value"))

    def _finish_samples(self, job: Job, spec: JobSpec) -> JobOutcome:
        written = job.results.get("value") or {}
        missing = [s.name for s in samples.SAMPLES if s.name not in written]
        if missing:
            raise UsfmaeError(f"the sample data job wrote no {', '.join(missing)}", "see the job log")
        return JobOutcome("samples", True, message=f"sample data written to {spec.context['folder']}", value=written)

    def _finish_import(self, job: Job, spec: JobSpec) -> JobOutcome:
        info = job.results.get("value") or {}
        if not info.get("path"):
            raise UsfmaeError("the import job returned no model", "see the job log")
        parameter = "maePath" if info.get("arch") == "mae" else "classifierPath"
        return JobOutcome("import", True, message=f"imported as {info['path']}", parameters={parameter: info["path"]},
                          value=info)

    def _finish_model_info(self, job: Job, spec: JobSpec) -> JobOutcome:
        info = job.results.get("value") or {}
        return JobOutcome("model-info", True, message=describe_model(info), value=info)

    def _finish_device(self, job: Job, spec: JobSpec) -> JobOutcome:
        info = job.results.get("value") or {}
        dev = info.get("device") or {}
        memory = f", {dev['memory_gb']} GB" if dev.get("memory_gb") else ""
        message = (f"{dev.get('device', '?')}: {dev.get('name', '?')}{memory} (torch {info.get('torch', '?')}, "
                   f"CUDA {'available' if info.get('cuda_available') else 'not available'})")
        return JobOutcome("device", True, message=message, value=info)

    @staticmethod
    def _series(chart: Any) -> list[Any]:
        return [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())] if chart else []

    # ============================================================================================= results
    @staticmethod
    def fill_table(table_node: Any, result: dict[str, Any], index_name: str = "slice") -> None:
        """Write a classification result into ``table_node`` (replacing its columns): ``index_name`` (text: the
        slice / frame number, and ``aggregate`` for the last row), ``p_<class>`` per class (float), ``label``."""
        classes = [str(c) for c in result["classes"]]
        per_frame = np.asarray(result["per_frame"], dtype=np.float64).reshape(-1, len(classes))
        frame_index = _frame_index(result, per_frame.shape[0])
        aggregate = np.asarray(result["aggregate"], dtype=np.float64).reshape(len(classes))
        rows = np.concatenate([per_frame, aggregate[None]], 0)
        was_modifying = table_node.StartModify()
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
            table_node.SetAttribute("USFMAE.topSlices", json.dumps([int(i) for i in top] if top is not None else []))
        finally:
            table_node.EndModify(was_modifying)

    def update_chart(self, table_node: Any, result: dict[str, Any], index_name: str = "slice") -> tuple[Any, Any]:
        """A plot chart of per-slice probabilities (one line per class) for ``table_node``, created on first use and
        updated afterwards. The chart reads a numeric companion table (the main table's index column is text)."""
        scene = self.scene
        classes = [str(c) for c in result["classes"]]
        per_frame = np.asarray(result["per_frame"], dtype=np.float64).reshape(-1, len(classes))
        columns = [_frame_index(result, per_frame.shape[0]).astype(np.float64)] + [per_frame[:, c]
                                                                                   for c in range(len(classes))]
        plot_table, chart = self._plot_nodes(table_node, columns, [index_name] + [f"p_{c}" for c in classes])
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

    def volume_like(self, reference: Any, array: np.ndarray, name: str) -> Any:
        """A new scalar volume node holding ``array`` ``(K, J, I)`` with ``reference``'s geometry and transform."""
        scene = self.scene
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
        node.CopyOrientation(reference)  # origin, spacing and IJK directions
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
        node.SetAttribute(OUTPUT_ATTRIBUTE, "reconstruction")
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, 1.0)
        return node

    def place_in_subject_hierarchy(self, nodes: Iterable[Any], input_node: Any) -> int:
        """Put ``nodes`` into the folder ``USF-MAE <input name>`` under the input's study (the nearest ancestor of the
        input's item at the DICOM study level; else the input's parent, e.g. the scene). Returns the folder item."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        study_level = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
        item = sh.GetItemByDataNode(input_node)
        parent = sh.GetItemParent(item) if item else sh.GetSceneItemID()
        ancestor = parent
        while ancestor and ancestor != sh.GetSceneItemID():
            if sh.GetItemLevel(ancestor) == study_level:
                parent = ancestor
                break
            ancestor = sh.GetItemParent(ancestor)
        name = f"{RESULTS_FOLDER} {_node_name(input_node)}"
        folder = sh.GetItemChildWithName(parent, name) or sh.CreateFolderItem(parent, name)
        for node in nodes:
            if node is None:
                continue
            child = sh.GetItemByDataNode(node)
            if child:
                sh.SetItemParent(child, folder)
            else:
                sh.CreateItem(folder, node)
        return folder

    @staticmethod
    def layout_for_table_and_chart(layout_node: Any) -> int:
        """The view arrangement to show a table beside a chart: the current one if its layout already holds a table
        view and a plot view, else Slicer's *Four-Up Plot Table* (``ShowChartInLayout`` alone picks a layout with
        a plot view but no table view)."""
        current = layout_node.GetViewArrangement()
        description = layout_node.GetLayoutDescription(current) or ""
        if "vtkMRMLTableViewNode" in description and "vtkMRMLPlotViewNode" in description:
            return current
        return slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView

    def show_table_and_chart(self, table: Any, chart: Any, application_logic: Any) -> None:
        """Switch to a layout with a table view and a plot view and show ``table`` and ``chart`` in them
        (``application_logic``: ``slicer.app.applicationLogic()``, or a ``vtkSlicerApplicationLogic``)."""
        layout_node = self.scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layout_node is not None:
            arrangement = self.layout_for_table_and_chart(layout_node)
            if arrangement != layout_node.GetViewArrangement():
                layout_node.SetViewArrangement(arrangement)
        selection = application_logic.GetSelectionNode()
        selection.SetActiveTableID(table.GetID())
        if chart is not None:
            selection.SetActivePlotChartID(chart.GetID())
        application_logic.PropagateTableSelection()
        application_logic.PropagatePlotChartSelection()

    def load_samples(self, paths: dict[str, str], sequences_logic: Any = None) -> dict[str, Any]:
        """Load the sample data files into the scene: the volume as a scalar volume, the cine as a sequence with a
        browser and its proxy volume (``sequences_logic``: ``slicer.modules.sequences.logic()`` in Slicer, made
        here otherwise). Returns ``{sample name: node shown}`` (the proxy for the cine)."""
        scene = self.scene
        loaded = {}
        if sequences_logic is None:  # Slicer's Sequences logic (registers the sequence node classes, makes proxies)
            sequences_logic = slicer.vtkSlicerSequencesLogic()
            sequences_logic.SetMRMLScene(scene)
        for sample in samples.SAMPLES:
            path = paths.get(sample.name)
            if not path:
                continue
            if sample.load_file_type == "SequenceFile":
                seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(sample.node_name))
                storage = scene.AddNewNodeByClass("vtkMRMLVolumeSequenceStorageNode")
                storage.SetFileName(str(path))
                if not storage.ReadData(seq):
                    raise UsfmaeError(f"sample {path} cannot be read", "delete it; it is written again")
                seq.SetAndObserveStorageNodeID(storage.GetID())
                browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode",
                                                  scene.GenerateUniqueName(f"{sample.node_name} browser"))
                browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
                sequences_logic.UpdateProxyNodesFromSequences(browser)
                loaded[sample.name] = browser.GetProxyNode(seq)
            else:
                node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(sample.node_name))
                storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
                storage.SetFileName(str(path))
                if not storage.ReadData(node):
                    raise UsfmaeError(f"sample {path} cannot be read", "delete it; it is written again")
                node.SetAndObserveStorageNodeID(storage.GetID())
                node.CreateDefaultDisplayNodes()
                loaded[sample.name] = node
        return loaded

    # ====================================================================================== pretraining input
    def scene_sources(self) -> list[Any]:
        """What pretraining on the scene reads: every sequence of volumes (all its frames) and every scalar volume
        that is not a sequence proxy, a label map or one of this module's outputs."""
        scene = self.scene
        found: list[Any] = []
        proxies = set()
        browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
        seen = set()
        for i in range(browsers.GetNumberOfItems()):
            browser = browsers.GetItemAsObject(i)
            sequences = vtk.vtkCollection()
            browser.GetSynchronizedSequenceNodes(sequences, True)
            for j in range(sequences.GetNumberOfItems()):
                seq = sequences.GetItemAsObject(j)
                proxy = browser.GetProxyNode(seq)
                if proxy is not None:
                    proxies.add(proxy.GetID())
                item = seq.GetNthDataNode(0) if seq.GetNumberOfDataNodes() else None
                if item is not None and item.IsA("vtkMRMLScalarVolumeNode") and seq.GetID() not in seen:
                    seen.add(seq.GetID())
                    found.append(seq)
        volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        for i in range(volumes.GetNumberOfItems()):
            node = volumes.GetItemAsObject(i)
            if node.GetID() in proxies or node.GetAttribute(OUTPUT_ATTRIBUTE) or node.IsA("vtkMRMLLabelMapVolumeNode"):
                continue
            found.append(node)
        return found

    def export_scene_for_pretraining(self, sources: Iterable[Any] | None = None) -> Path:
        """Write ``sources`` (default: :meth:`scene_sources`) into a new temporary folder: volumes as NRRD, sequences
        as Slicer sequence files (``.seq.nrrd``, every frame: the engine reads them as cine)."""
        sources = list(self.scene_sources() if sources is None else sources)
        if not sources:
            raise UsfmaeError("the scene has no volumes or sequences to pretrain on",
                              "load ultrasound volumes or recordings, or choose a folder")
        folder = Path(tempfile.mkdtemp(prefix="usfmae_scene_"))
        try:
            for i, node in enumerate(sources):
                stem = f"{models.safe_name(_node_name(node))}_{i:03d}"
                if node.IsA("vtkMRMLSequenceNode"):
                    self._write_sequence(node, folder / f"{stem}.seq.nrrd")
                else:
                    inputs.write_pixels(inputs.volume_pixels(node), folder / f"{stem}.nrrd", node.GetSpacing())
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    @staticmethod
    def _write_sequence(seq: Any, path: Path) -> None:
        """Every frame of ``seq`` as a Slicer ``.seq.nrrd``: frames are decoded (streaming recordings) and written
        grey or colour as stored, with Slicer's own sequence writer."""
        pixels, first = inputs.sequence_pixels(seq)
        out = slicer.vtkMRMLSequenceNode()
        out.SetIndexName(seq.GetIndexName())
        out.SetIndexUnit(seq.GetIndexUnit())
        for t in range(pixels.shape[0]):
            frame = (slicer.vtkMRMLVectorVolumeNode() if pixels.ndim == 4 else slicer.vtkMRMLScalarVolumeNode())
            slicer.util.updateVolumeFromArray(frame, np.ascontiguousarray(pixels[t][None]))
            frame.SetSpacing(first.GetSpacing())
            out.SetDataNodeAtValue(frame, seq.GetNthIndexValue(t))
        storage = slicer.vtkMRMLVolumeSequenceStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(out):
            raise UsfmaeError(f"could not write sequence '{seq.GetName()}' to {path}", "check the free disk space")

    # ==================================================================================== labelled scene data
    def label_table_for_scene(self, name: str = "USF-MAE labels") -> Any:
        """A new table listing the scene's volumes and sequences (:meth:`scene_sources`), one per row, with an empty
        ``class`` column for the user to fill: the input of :meth:`finetune_scene_job`."""
        sources = self.scene_sources()
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(name))
        volumes, classes = vtk.vtkStringArray(), vtk.vtkStringArray()
        volumes.SetName("volume")
        classes.SetName("class")
        for node in sources:
            volumes.InsertNextValue(_node_name(node))
            classes.InsertNextValue("")
        table.AddColumn(volumes)
        table.AddColumn(classes)
        table.SetColumnDescription("volume", "a volume or sequence of the scene (name or node ID)")
        table.SetColumnDescription("class", "its class; rows without a class are not used")
        table.SetAttribute(OUTPUT_ATTRIBUTE, "labels")
        return table

    def label_table_entries(self, table_node: Any) -> list[tuple[Any, str]]:
        """``(node, class)`` per row of a label table: a ``volume`` column (else the first column) naming a scalar
        volume, a sequence or a sequence proxy of the scene (by name or node ID), and a ``class`` column (else the
        second). Rows without a class are skipped; a proxy stands for its whole sequence (a clip).

        Raises:
            UsfmaeError: no table, an unknown or ambiguous volume name, a label map, or fewer than 2 classes.
        """
        if table_node is None or table_node.GetTable() is None or table_node.GetNumberOfColumns() < 2:
            raise UsfmaeError("no label table with a volume and a class column is chosen",
                              "create one with 'List scene volumes' and fill in each volume's class")
        names = [table_node.GetColumnName(i) for i in range(table_node.GetNumberOfColumns())]
        lower = [n.strip().lower() for n in names]
        vol_col = names[lower.index("volume")] if "volume" in lower else names[0]
        cls_col = names[lower.index("class")] if "class" in lower else names[1] if names[1] != vol_col else names[0]
        table = table_node.GetTable()
        volumes, classes = table.GetColumnByName(vol_col), table.GetColumnByName(cls_col)
        entries: list[tuple[Any, str]] = []
        for r in range(table_node.GetNumberOfRows()):
            label = str(classes.GetValue(r)).strip()
            ref = str(volumes.GetValue(r)).strip()
            if not label or not ref:
                continue
            node = self._scene_node(ref, table_node.GetName(), r)
            seq = inputs.sequence_for(node, self.scene) if not node.IsA("vtkMRMLSequenceNode") else node
            entries.append((seq if seq is not None else node, label))
        found = sorted({c for _, c in entries})
        if len(found) < 2:
            raise UsfmaeError(f"label table '{table_node.GetName()}' gives {len(entries)} labelled scan(s) of "
                              f"{len(found)} class(es) ({', '.join(found) or '-'})",
                              "a classifier needs at least 2 classes: fill in the class column")
        return entries

    def _scene_node(self, ref: str, table: str, row: int) -> Any:
        node = self.scene.GetNodeByID(ref)
        if node is None:
            nodes = self.scene.GetNodesByName(ref)
            matches = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
            matches = [n for n in matches if n.IsA("vtkMRMLScalarVolumeNode") or n.IsA("vtkMRMLSequenceNode")]
            # a sequence and its browser's proxy carry the same name: one scan (the sequence)
            scans = {}
            for n in matches:
                seq = inputs.sequence_for(n, self.scene)
                scans.setdefault((seq or n).GetID(), seq or n)
            matches = list(scans.values())
            if len(matches) > 1:
                raise UsfmaeError(f"row {row + 1} of '{table}' names '{ref}', which {len(matches)} scene nodes are "
                                  "called", "rename them apart, or give the node ID instead of the name")
            node = matches[0] if matches else None
        if node is None or not (node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLSequenceNode")):
            raise UsfmaeError(f"row {row + 1} of '{table}' names '{ref}', which is not a volume or sequence of the "
                              "scene", "correct the name (or node ID), or remove the row")
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise UsfmaeError(f"row {row + 1} of '{table}' names the label map '{ref}'", "label maps are not scans")
        return node

    def export_labelled_scene(self, entries: Sequence[tuple[Any, str]], folder: str | os.PathLike) -> Path:
        """Write labelled scene scans as class folders ``folder/<class>/<name>.nrrd`` (volumes, with their spacing)
        or ``.seq.nrrd`` (sequences: every frame, read as a clip); a new run replaces an earlier export."""
        folder = Path(folder).expanduser()
        if folder.exists():
            shutil.rmtree(folder)
        for i, (node, label) in enumerate(entries):
            target = folder / models.safe_name(label)
            target.mkdir(parents=True, exist_ok=True)
            stem = f"{models.safe_name(_node_name(node))}_{i:03d}"
            if node.IsA("vtkMRMLSequenceNode"):
                self._write_sequence(node, target / f"{stem}.seq.nrrd")
            else:
                inputs.check_volume(node)
                inputs.write_pixels(inputs.volume_pixels(node), target / f"{stem}.nrrd", node.GetSpacing())
        return folder

    # ========================================================================================= training plans
    @staticmethod
    def finetune_plan(data: str | os.PathLike, out_dir: str | os.PathLike, init: str | os.PathLike | None = None,
                      epochs: int = 10, device: str = "auto", batch_size: int | None = None,
                      preset: str | None = None, volume_model: str | None = None,
                      extra_args: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Steps for ``usfmae finetune``: a labelled folder (one sub-folder per class), CSV or datalist JSON ->
        classifier ``out_dir/model.pt``; ``init`` is the pretrained MAE (None: a ViT of ``preset`` from scratch);
        ``volume_model`` ``mil`` / ``3d`` (or a label of :data:`VOLUME_MODELS`) trains one label per volume / clip."""
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
        model = VOLUME_MODELS.get(volume_model, volume_model) if volume_model else None
        if model is not None:
            if model not in ("mil", "3d"):
                raise UsfmaeError(f"unknown volume model '{volume_model}'",
                                  f"choose one of: {', '.join(VOLUME_MODELS)}")
            argv += ["--volume-model", model]
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


def read_predictions(folder: str | os.PathLike) -> dict[str, Any]:
    """A ``usfmae predict`` output folder (one input) as ``classify_array``'s result: ``classes``, ``per_frame``
    ``(N, K)``, ``aggregate``, ``label``, ``top_slices``, ``kind``, ``n_frames``, ``scope``, ``volume_model`` and, for
    an attention-MIL model, ``attention`` and ``slice_index`` (every pooled slice) and ``axis``."""
    folder = Path(folder)
    try:
        report = json.loads((folder / "predictions.json").read_text(encoding="utf-8"))
        with open(folder / "predictions.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as err:
        raise UsfmaeError(f"the classification results in {folder} cannot be read ({err})", "see the job log") from None
    if not report.get("results"):
        skipped = report.get("skipped") or [{"reason": "nothing was classified"}]
        raise UsfmaeError(f"the input could not be classified ({skipped[0].get('reason')})", "see the job log")
    classes = [str(c) for c in report["classes"]]
    summary = report["results"][0]
    rows = sorted(rows, key=lambda r: int(r["index"]))
    per_frame = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64).reshape(
        -1, len(classes))
    aggregate = np.array([float(summary[f"p_{c}"]) for c in classes])
    scope = "volume" if report.get("volume_model") or report.get("spatial_dims") == 3 else "frame"
    attention = slice_index = None
    if (folder / "attention.csv").is_file():  # attention MIL: every pooled slice's weight
        with open(folder / "attention.csv", newline="", encoding="utf-8") as f:
            att = sorted((r for r in csv.DictReader(f) if r["source"] == summary["source"]),
                         key=lambda r: int(r["index"]))
        attention = np.array([float(r["attention"]) for r in att])
        slice_index = np.array([int(r["index"]) for r in att], dtype=np.int64)
    return {"classes": classes, "per_frame": per_frame, "frame_index": np.array([int(r["index"]) for r in rows]),
            "aggregate": aggregate, "label": summary["label"], "top_slices": list(summary.get("top_slices") or []),
            "kind": summary["kind"], "n_frames": int(summary["n_frames"]),
            "n_excluded": int(summary.get("n_excluded") or 0), "scope": scope,
            "volume_model": report.get("volume_model"), "axis": report.get("axis"),
            "attention": attention, "slice_index": slice_index}


def describe_model(info: dict[str, Any]) -> str:
    """One line for a model's details (:func:`USFMAELib.models.model_info`)."""
    if not info:
        return "no details"
    classes = ", ".join(info.get("classes") or []) or "-"
    return (f"{info.get('arch')} ({info.get('preset') or 'custom'}, {info.get('spatial_dims', 2)}D, "
            f"{info.get('image_size')} px); classes: {classes}")


def action_states(values: dict[str, Any], busy: bool, engine_ready: bool = True) -> dict[str, str | None]:
    """Which of the module's actions can start now: ``{action: None}`` when it can, else the reason it cannot
    (the button's tool tip). ``values``: the parameter node's fields; ``busy``: a long job is running."""
    def need(ok: bool, reason: str) -> str | None:
        if not engine_ready:
            return "the usfmae engine is missing or its Python packages are not installed (see Setup)"
        if busy:
            return "a job is running: wait for it or cancel it"
        return None if ok else reason

    return {
        "classify": need(bool(values.get("inputVolume")) and bool(values.get("classifierPath")),
                         "choose an input and a classifier (Model section)"),
        "reconstruct": need(bool(values.get("inputVolume")) and bool(values.get("maePath")),
                            "choose an input and an MAE (Model section)"),
        "finetune": need(bool(values.get("finetuneData")) or bool(values.get("finetuneLabelTable")),
                         "choose the labelled data, or a table labelling scene volumes"),
        "pretrain": need(bool(values.get("pretrainSource")) or bool(values.get("pretrainUseScene")),
                         "choose a folder of unlabelled ultrasound, or use the scene's volumes"),
        "import": need(True, ""),
        "pull": need(True, ""),
        "samples": need(True, ""),
    }
