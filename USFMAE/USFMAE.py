"""USF-MAE for 3D Slicer: classify, reconstruct, fine-tune and pretrain ultrasound foundation models.

Module (metadata), Widget (GUI wiring only), Logic (no Qt; calls the ``usfmae_core`` engine through
:class:`USFMAELib.logic.USFMAEEngineLogic`) and Test (runs inside Slicer on a phantom, no network).
Nothing heavy is imported at module load: torch and the engine's models are imported when first used.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Annotated

import ctk
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

    def translate(context, text):
        return text

from USFMAELib import engine
from USFMAELib.logic import USFMAEEngineLogic, UsfmaeError

SETTINGS_DEVICE = "USFMAE/Device"
PRESETS = ("vit_test", "vit_micro", "vit_tiny", "vit_small", "vit_base", "vit_large")


#
# USFMAE
#
class USFMAE(ScriptedLoadableModule):
    """Module metadata (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("USF-MAE")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Ultrasound")]
        self.parent.dependencies = []  # torch comes through the PyTorch extension (PyTorchUtils), on request
        self.parent.contributors = ["USF-MAE contributors"]
        self.parent.helpText = _("""
Ultrasound foundation model (USF-MAE: masked autoencoder pretrained on ultrasound).
<ul>
<li><b>Classify</b> a 2D image, a 3D volume or a sequence (cine): class probabilities per slice / frame and their
aggregate in a table, with a chart.</li>
<li><b>Reconstruct</b> an image with a pretrained MAE (masked input and reconstruction, with the input's geometry).</li>
<li><b>Fine-tune</b> a classifier on a labelled folder or CSV, and <b>pretrain</b> an MAE on unlabelled folders or
the scene's volumes, in a background process with progress, ETA and cancel.</li>
</ul>
Models are kept in <code>~/.usfmae/models</code> (or <code>$USFMAE_HOME/models</code>). Runs on a CUDA GPU, Apple
MPS or the CPU. The same engine powers the <code>usfmae</code> command line and the MONAI bundle.
""")
        self.parent.acknowledgementText = _("""
Built on PyTorch, MONAI and the USF-MAE method (masked autoencoders pretrained on ultrasound, after He et al.,
"Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).
""")


#
# USFMAEParameterNode
#
@parameterNodeWrapper
class USFMAEParameterNode:
    """The module's state, saved with the scene.

    Paths are plain strings (an empty string: not chosen); the widget wires them to path editors by hand.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputTable: vtkMRMLTableNode
    classifierPath: str = ""
    maePath: str = ""
    device: str = "auto"
    inputKind: str = "auto"
    useSequence: bool = True
    batchSize: Annotated[int, WithinRange(1, 1024)] = 32
    maskRatio: Annotated[float, WithinRange(0.05, 0.95)] = 0.75
    maskSeed: Annotated[int, WithinRange(0, 1000000)] = 0
    finetuneData: str = ""
    finetuneInit: str = ""
    finetunePreset: str = "vit_small"
    finetuneEpochs: Annotated[int, WithinRange(1, 1000)] = 20
    finetuneOutput: str = ""
    pretrainSource: str = ""
    pretrainUseScene: bool = False
    pretrainInit: str = ""
    pretrainPreset: str = "vit_small"
    pretrainImageSize: Annotated[int, WithinRange(32, 1024)] = 224
    pretrainEpochs: Annotated[int, WithinRange(1, 10000)] = 50
    pretrainOutput: str = ""


#
# USFMAEWidget
#
class USFMAEWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only: every computation is a :class:`USFMAELogic` call."""

    # path editors <-> string parameters: (widget name, parameter, what the editor picks)
    PATH_FIELDS = (("classifierPathLineEdit", "classifierPath", "model"),
                   ("maePathLineEdit", "maePath", "model"),
                   ("finetuneDataPathLineEdit", "finetuneData", "any"),
                   ("finetuneInitPathLineEdit", "finetuneInit", "model"),
                   ("finetuneOutputPathLineEdit", "finetuneOutput", "dir"),
                   ("pretrainSourcePathLineEdit", "pretrainSource", "dir"),
                   ("pretrainInitPathLineEdit", "pretrainInit", "model"),
                   ("pretrainOutputPathLineEdit", "pretrainOutput", "dir"))
    COMBO_FIELDS = (("inputKindComboBox", "inputKind"), ("finetunePresetComboBox", "finetunePreset"),
                    ("pretrainPresetComboBox", "pretrainPreset"))

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._job = None
        self._jobKind = None
        self._jobOutput = None
        self._deviceChecked = False
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(250)
        self._jobTimer.connect("timeout()", self.onJobTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/USFMAE.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = USFMAELogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for widgetName, parameter, kind in self.PATH_FIELDS:
            editor = getattr(self.ui, widgetName)
            if kind == "model":
                editor.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
                editor.nameFilters = ["Models (*.pt *.pth)", "All files (*)"]
            elif kind == "dir":
                editor.filters = ctk.ctkPathLineEdit.Dirs
            else:
                editor.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Files
            editor.settingKey = f"USFMAE/{parameter}"
            editor.connect("currentPathChanged(QString)",
                           lambda path, p=parameter: self._setParameter(p, path))
        self.ui.importPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Dirs
        self.ui.importPathLineEdit.nameFilters = ["Weights (*.pt *.pth *.bin)", "All files (*)"]
        for widgetName, parameter in self.COMBO_FIELDS:
            getattr(self.ui, widgetName).connect("currentTextChanged(QString)",
                                                 lambda text, p=parameter: self._setParameter(p, text))

        # the device choice is remembered in the application settings (not only in the scene)
        saved = str(qt.QSettings().value(SETTINGS_DEVICE, "auto"))
        self.ui.deviceComboBox.setCurrentIndex(max(0, self.ui.deviceComboBox.findText(saved)))
        self.ui.deviceComboBox.connect("currentTextChanged(QString)", self.onDeviceChanged)

        self.ui.detectDeviceButton.connect("clicked(bool)", self.onDetectDevice)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.useAsClassifierButton.connect("clicked(bool)", lambda: self._useCachedModel("classifierPath"))
        self.ui.useAsMaeButton.connect("clicked(bool)", lambda: self._useCachedModel("maePath"))
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassify)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstruct)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.pretrainButton.connect("clicked(bool)", self.onPretrain)
        self.ui.cancelJobButton.connect("clicked(bool)", self.onCancelJob)

        self.initializeParameterNode()
        self.updateDependencyStatus()
        self.refreshCachedModels()

    def cleanup(self) -> None:
        """Called when the application closes: stop a running job (its whole process tree)."""
        self._jobTimer.stop()
        if self._job is not None and self._job.running:
            self._job.cancel(timeout=3.0)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if not self._deviceChecked and engine.torch_installed():
            qt.QTimer.singleShot(200, self.onDetectDevice)  # after the panel is shown: importing torch takes time

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---------------------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first
        self._parameterNode.device = self.ui.deviceComboBox.currentText

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.updateGuiFromParameterNode()

    def _setParameter(self, name: str, value) -> None:
        if self._parameterNode is None or self._updatingGui:
            return
        if getattr(self._parameterNode, name) != value:
            setattr(self._parameterNode, name, value)

    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        """Path editors and combo boxes (not bound by connectGui) follow the parameter node; buttons are enabled
        when their inputs are set."""
        p = self._parameterNode
        if p is None:
            return
        self._updatingGui = True
        try:
            for widgetName, parameter, _kind in self.PATH_FIELDS:
                editor = getattr(self.ui, widgetName)
                if editor.currentPath != getattr(p, parameter):
                    editor.currentPath = getattr(p, parameter)
            for widgetName, parameter in self.COMBO_FIELDS:
                combo = getattr(self.ui, widgetName)
                index = combo.findText(getattr(p, parameter))
                if index >= 0 and combo.currentIndex != index:
                    combo.setCurrentIndex(index)
        finally:
            self._updatingGui = False
        busy = self._job is not None and self._job.running
        self.ui.classifyButton.enabled = bool(p.inputVolume and p.classifierPath)
        self.ui.reconstructButton.enabled = bool(p.inputVolume and p.maePath)
        self.ui.finetuneButton.enabled = bool(p.finetuneData) and not busy
        self.ui.pretrainButton.enabled = bool(p.pretrainSource or p.pretrainUseScene) and not busy
        self.ui.classifyButton.toolTip = _("Classify every slice / frame of the input") if p.classifierPath else \
            _("Choose a classifier in the Model section")

    # ------------------------------------------------------------------------------------------------ helpers
    def _guarded(self, what: str, function):
        """Run ``function`` with a wait cursor; user errors appear as their one-line cause and fix, unexpected
        ones with the traceback in the details. The scene is left as it was (the logic adds nodes last)."""
        try:
            with slicer.util.WaitCursor():
                return function()
        except UsfmaeError as err:
            slicer.util.errorDisplay(_("{what}: {cause}").format(what=what, cause=str(err)),
                                     windowTitle=_("USF-MAE"))
        except Exception as err:  # noqa: BLE001 - the GUI must report, not crash
            logging.error(traceback.format_exc())
            slicer.util.errorDisplay(_("{what} failed: {error}").format(what=what, error=err),
                                     detailedText=traceback.format_exc(), windowTitle=_("USF-MAE"))
        return None

    def _device(self) -> str:
        return self.ui.deviceComboBox.currentText or "auto"

    def _defaultRunFolder(self, kind: str) -> str:
        return str(self.logic.model_cache_dir().parent / "runs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")

    def _engineReady(self) -> bool:
        """True when torch and the engine's packages are installed; otherwise says how to get them."""
        missing = ([] if engine.torch_installed() else ["torch"]) + engine.missing_requirements()
        if not missing:
            return True
        slicer.util.errorDisplay(
            _("USF-MAE needs Python packages that are not installed yet: {packages}; press 'Install Python "
              "packages...' in the Setup section").format(packages=", ".join(missing)), windowTitle=_("USF-MAE"))
        return False

    # -------------------------------------------------------------------------------------- setup section
    def onDeviceChanged(self, text: str) -> None:
        qt.QSettings().setValue(SETTINGS_DEVICE, text)
        if self._parameterNode:
            self._parameterNode.device = text
        if self._deviceChecked:
            self.onDetectDevice()

    def onDetectDevice(self) -> None:
        if not engine.torch_installed():
            self.ui.deviceInfoLabel.text = _("PyTorch is not installed (see Packages below)")
            return
        info = self._guarded(_("Device"), lambda: self.logic.describe_device(self._device()))
        self._deviceChecked = True
        if info:
            memory = f", {info['memory_gb']} GB" if info.get("memory_gb") else ""
            self.ui.deviceInfoLabel.text = f"{info['device']}: {info['name']}{memory}"

    def updateDependencyStatus(self) -> None:
        missing = ([] if engine.torch_installed() else ["torch (PyTorch extension)"]) + engine.missing_requirements()
        if missing:
            self.ui.dependenciesLabel.text = _("Missing: {packages}").format(packages=", ".join(missing))
        else:
            self.ui.dependenciesLabel.text = _("All required Python packages are installed")
        self.ui.installDependenciesButton.enabled = bool(missing)

    def onInstallDependencies(self) -> None:
        """Install torch through the PyTorch extension and the other packages with pip, after asking."""
        self._guarded(_("Installing Python packages"), self._installDependencies)
        self.updateDependencyStatus()

    def _installDependencies(self) -> None:
        if not engine.torch_installed():
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise UsfmaeError("this module needs the PyTorch extension to install PyTorch",
                                  "install 'PyTorch' from the Extensions Manager and restart Slicer") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=True,
                                                torchVersionRequirement=engine.TORCH_REQUIREMENT[len("torch"):])
                if torch is None:
                    return  # the user declined or it failed (PyTorchUtils has reported it)
        missing = engine.missing_requirements()
        if not missing:
            return
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.12: asks and shows progress
            packaging.pip_ensure(missing, requester="USF-MAE")
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("USF-MAE needs these Python packages:\n\n{packages}\n\nInstall them now? This can take a few "
                  "minutes.").format(packages="\n".join(missing)), windowTitle=_("USF-MAE")):
            return
        slicer.util.pip_install(missing)

    # -------------------------------------------------------------------------------------- model section
    def refreshCachedModels(self) -> None:
        self.ui.cachedModelsComboBox.clear()
        if not engine.ensure_engine_on_path():
            self.ui.cacheDirLabel.text = _("the usfmae engine was not found next to the module")
            return
        try:
            folder = self.logic.model_cache_dir()
        except ImportError:
            return
        self.ui.cacheDirLabel.text = str(folder)
        for path in self.logic.cached_models():
            self.ui.cachedModelsComboBox.addItem(path.name, str(path))

    def _useCachedModel(self, parameter: str) -> None:
        index = self.ui.cachedModelsComboBox.currentIndex
        if index < 0 or self._parameterNode is None:
            return
        setattr(self._parameterNode, parameter, self.ui.cachedModelsComboBox.itemData(index))
        self._showModelInfo(self.ui.cachedModelsComboBox.itemData(index))

    def onImportModel(self) -> None:
        source = self.ui.importPathLineEdit.currentPath
        if not source:
            slicer.util.errorDisplay(_("Choose a weights file or a bundle folder to import"), windowTitle=_("USF-MAE"))
            return
        if not self._engineReady():
            return
        path = self._guarded(_("Import"), lambda: self.logic.import_model(source))
        if path is None:
            return
        self.refreshCachedModels()
        self.ui.cachedModelsComboBox.setCurrentIndex(self.ui.cachedModelsComboBox.findData(str(path)))
        info = self._showModelInfo(path)
        if info and self._parameterNode is not None:  # a classifier goes to Classify, an MAE to Reconstruct
            setattr(self._parameterNode, "maePath" if info["arch"] == "mae" else "classifierPath", str(path))

    def _showModelInfo(self, path):
        info = self._guarded(_("Model"), lambda: self.logic.model_info(path))
        if info:
            classes = ", ".join(info["classes"]) if info["classes"] else "-"
            self.ui.modelInfoLabel.text = (f"{info['arch']} ({info.get('preset') or 'custom'}, "
                                           f"{info.get('spatial_dims', 2)}D, {info.get('image_size')} px); "
                                           f"classes: {classes}")
        return info

    # ---------------------------------------------------------------------------------- classify / reconstruct
    def onClassify(self) -> None:
        p = self._parameterNode
        if not self._engineReady():
            return

        def progress(done: int) -> None:
            slicer.util.showStatusMessage(_("USF-MAE: classified {n} more frame(s)").format(n=done), 2000)
            slicer.app.processEvents()

        out = self._guarded(_("Classify"), lambda: self.logic.classify(
            p.inputVolume, p.classifierPath, table_node=p.outputTable, device=self._device(), kind=p.inputKind,
            use_sequence=p.useSequence, batch_size=p.batchSize, progress=progress))
        if out is None:
            return
        p.outputTable = out.table
        result = out.result
        probability = max(result["aggregate"])
        self.ui.classifyResultLabel.text = _("{label} (mean probability {p:.2f} over {n} {what}); most typical: "
                                             "{top}").format(label=result["label"], p=float(probability),
                                                             n=result["n_frames"],
                                                             what="frame(s)" if result["kind"] == "cine" else
                                                             "slice(s)", top=result.get("top_slices"))
        self._showTableAndChart(out.table, out.chart)

    def _showTableAndChart(self, table, chart) -> None:
        try:
            if chart is not None:
                slicer.modules.plots.logic().ShowChartInLayout(chart)
            selection = slicer.app.applicationLogic().GetSelectionNode()
            selection.SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
        except Exception:  # noqa: BLE001 - showing is a convenience; the nodes are in the scene anyway
            logging.debug(traceback.format_exc())

    def onReconstruct(self) -> None:
        p = self._parameterNode
        if not self._engineReady():
            return
        out = self._guarded(_("Reconstruct"), lambda: self.logic.reconstruct(
            p.inputVolume, p.maePath, mask_ratio=p.maskRatio, seed=p.maskSeed, device=self._device(),
            kind=p.inputKind))
        if out is not None:
            slicer.util.setSliceViewerLayers(background=out.masked, foreground=out.reconstruction,
                                             foregroundOpacity=0.5, fit=True)

    # ---------------------------------------------------------------------------------------------- jobs
    def onFinetune(self) -> None:
        p = self._parameterNode
        if not self._engineReady():
            return
        out = p.finetuneOutput or self._defaultRunFolder("finetune")

        def start():
            steps = self.logic.finetune_plan(p.finetuneData, out, init=p.finetuneInit or None,
                                             epochs=p.finetuneEpochs, device=self._device(),
                                             preset=p.finetunePreset)
            return self.logic.start_job(steps, out, name="fine-tune")

        self._startJob("finetune", out, start)

    def onPretrain(self) -> None:
        p = self._parameterNode
        if not self._engineReady():
            return
        out = p.pretrainOutput or self._defaultRunFolder("pretrain")

        def start():
            temp = None
            if p.pretrainUseScene:
                temp = self.logic.export_scene_for_pretraining()
                sources = [temp]
            else:
                sources = [p.pretrainSource]
            try:
                steps = self.logic.pretrain_plan(sources, out, epochs=p.pretrainEpochs, device=self._device(),
                                                 init=p.pretrainInit or None, preset=p.pretrainPreset,
                                                 image_size=p.pretrainImageSize)
                return self.logic.start_job(steps, out, name="pretrain", temp_dir=temp)
            except Exception:
                if temp is not None:
                    import shutil

                    shutil.rmtree(temp, ignore_errors=True)
                raise

        self._startJob("pretrain", out, start)

    def _startJob(self, kind: str, out: str, start) -> None:
        if self._job is not None and self._job.running:
            slicer.util.errorDisplay(_("A job is already running; cancel it or wait for it to finish"),
                                     windowTitle=_("USF-MAE"))
            return
        job = self._guarded(_("Starting {kind}").format(kind=kind), start)
        if job is None:
            return
        self._job, self._jobKind, self._jobOutput = job, kind, out
        self.ui.jobLogTextEdit.clear()
        self.ui.jobLogTextEdit.appendPlainText(" ".join(job.argv))
        self.ui.jobProgressBar.setMaximum(0)  # busy until the first progress line
        self.ui.jobStatusLabel.text = job.status_text()
        self.ui.cancelJobButton.enabled = True
        self.ui.jobCollapsibleButton.collapsed = False
        self.updateGuiFromParameterNode()
        self._jobTimer.start()

    def onJobTimer(self) -> None:
        job = self._job
        if job is None:
            self._jobTimer.stop()
            return
        for line in job.poll():  # never blocks: a reader thread fills the queue
            self.ui.jobLogTextEdit.appendPlainText(line)
        fraction = job.fraction
        if fraction is None:
            self.ui.jobProgressBar.setMaximum(0)
        else:
            self.ui.jobProgressBar.setMaximum(1000)
            self.ui.jobProgressBar.setValue(int(fraction * 1000))
        self.ui.jobStatusLabel.text = job.status_text()
        if not job.running:
            self._jobTimer.stop()
            self._onJobFinished(job)

    def onCancelJob(self) -> None:
        if self._job is not None and self._job.running:
            self._job.request_cancel(timeout=10.0)  # SIGTERM now, SIGKILL for what is left after 10 s
            self.ui.jobStatusLabel.text = _("cancelling...")
            self.ui.cancelJobButton.enabled = False

    def _onJobFinished(self, job) -> None:
        self.logic.finish_job(job)
        self.ui.cancelJobButton.enabled = False
        self.ui.jobProgressBar.setMaximum(1000)
        self.updateGuiFromParameterNode()
        if job.cancelled:
            return
        if job.returncode != 0:
            errors = [line for line in job.log if line.startswith("usfmae: error:")]
            cause = errors[-1][len("usfmae: error:"):].strip() if errors else _(
                "exit code {code}; see the job log").format(code=job.returncode)
            slicer.util.errorDisplay(_("The {kind} job failed: {cause}").format(kind=job.name, cause=cause),
                                     windowTitle=_("USF-MAE"))
            return
        self.ui.jobProgressBar.setValue(1000)
        model = self.logic.find_checkpoint(self._jobOutput)
        if model is None:
            return
        if self._parameterNode is not None:
            if self._jobKind == "finetune":
                self._parameterNode.classifierPath = str(model)
            else:
                self._parameterNode.maePath = str(model)
                self._parameterNode.finetuneInit = str(model)
        slicer.util.infoDisplay(_("The {kind} job finished: {model}").format(kind=job.name, model=model),
                                windowTitle=_("USF-MAE"))


#
# USFMAELogic
#
class USFMAELogic(ScriptedLoadableModuleLogic, USFMAEEngineLogic):
    """The module's logic: Slicer's parameter-node handling plus the Qt-free engine logic
    (:class:`USFMAELib.logic.USFMAEEngineLogic`: classify, reconstruct, model cache, background jobs)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # its super().__init__() runs USFMAEEngineLogic.__init__ ...
        if not hasattr(self, "_models"):  # ... in Slicer versions whose base class does not chain __init__
            USFMAEEngineLogic.__init__(self)

    def getParameterNode(self):
        return USFMAEParameterNode(super().getParameterNode())

    def job_environment(self) -> dict:
        """PythonSlicer is a launcher that sets up its own library paths: start it from the environment Slicer
        itself was started in (as ``slicer.util.launchConsoleProcess`` does)."""
        return dict(slicer.util.startupEnvironment())


#
# USFMAETest
#
class USFMAETest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Developer mode: Reload and Test, or ctest): a phantom volume, tiny random models, no
    network. Skipped with a message when torch or the engine's packages are not installed."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_USFMAE_classify_reconstruct_phantom()
        self.setUp()
        self.test_USFMAE_job_progress_and_cancel()

    def _ready(self) -> bool:
        missing = ([] if engine.torch_installed() else ["torch"]) + engine.missing_requirements()
        if missing:
            self.delayDisplay(f"USFMAE test skipped: missing Python packages {', '.join(missing)}")
            logging.warning("USFMAE test skipped: missing %s", ", ".join(missing))
            return False
        return engine.ensure_engine_on_path()

    def _tinyModels(self, folder: Path) -> tuple[Path, Path]:
        import torch

        from usfmae_core.checkpoints import make_checkpoint, save_checkpoint
        from usfmae_core.data.phantom import CLASSES
        from usfmae_core.data.transforms import Preprocessing
        from usfmae_core.networks.presets import build_model, mae_config

        torch.manual_seed(0)
        prep = Preprocessing(image_size=32, in_channels=3).to_dict()
        mae_cfg = {**mae_config("vit_test", img_size=32, patch_size=8), "preset": "vit_test", "preprocessing": prep}
        clf_cfg = {**{k: mae_cfg[k] for k in ("in_channels", "img_size", "patch_size", "spatial_dims",
                                              "hidden_size", "num_layers", "num_heads", "mlp_ratio", "qkv_bias",
                                              "drop_path_rate")},
                   "num_classes": len(CLASSES), "pool": "avg", "dropout": 0.0, "preset": "vit_test",
                   "classes": list(CLASSES), "preprocessing": prep}
        mae_path = save_checkpoint(folder / "mae.pt", make_checkpoint(build_model("mae", mae_cfg), "mae", mae_cfg))
        clf_path = save_checkpoint(folder / "classifier.pt",
                                   make_checkpoint(build_model("classifier", clf_cfg), "classifier", clf_cfg))
        return clf_path, mae_path

    def test_USFMAE_classify_reconstruct_phantom(self) -> None:
        self.delayDisplay("Starting the USFMAE classify / reconstruct test")
        if not self._ready():
            return
        import numpy as np

        from usfmae_core.data import phantom

        folder = Path(slicer.util.tempDirectory("USFMAETest"))
        classifier, mae = self._tinyModels(folder)
        volume = phantom.make_volume(2, (8, 48, 48), rng=0)
        ijkToRas = np.diag([0.3, 0.3, 0.8, 1.0])
        ijkToRas[:3, 3] = (5.0, -10.0, 2.0)
        node = slicer.util.addVolumeFromArray(volume, ijkToRas, name="phantom")

        logic = USFMAELogic()
        out = logic.classify(node, classifier, device="cpu")
        table = out.table
        self.assertEqual(table.GetNumberOfRows(), volume.shape[0] + 1)
        self.assertEqual(table.GetColumnName(0), "slice")
        self.assertEqual(table.GetCellText(volume.shape[0], 0), "aggregate")
        self.assertEqual([table.GetColumnName(i) for i in range(1, 4)], [f"p_{c}" for c in phantom.CLASSES])
        self.assertIsNotNone(out.chart)
        self.delayDisplay("Classified")

        recon = logic.reconstruct(node, mae, mask_ratio=0.75, device="cpu")
        for result in (recon.masked, recon.reconstruction):
            self.assertEqual(result.GetSpacing(), node.GetSpacing())
            self.assertEqual(result.GetOrigin(), node.GetOrigin())
            self.assertEqual(slicer.util.arrayFromVolume(result).shape, volume.shape)
        self.delayDisplay("Reconstructed")

        previous = os.environ.get("USFMAE_HOME")
        os.environ["USFMAE_HOME"] = str(folder / "home")  # keep the user's model cache untouched
        try:
            cached = logic.import_model(classifier, name="test classifier")
            self.assertEqual(logic.model_info(cached)["arch"], "classifier")
        finally:
            if previous is None:
                del os.environ["USFMAE_HOME"]
            else:
                os.environ["USFMAE_HOME"] = previous
        self.delayDisplay("Test passed")

    def test_USFMAE_job_progress_and_cancel(self) -> None:
        self.delayDisplay("Starting the USFMAE background job test")
        import sys

        from USFMAELib.jobs import Job

        script = ("import json, time\n"
                  "for i in range(600):\n"
                  "    print('USFMAE_PROGRESS ' + json.dumps({'stage': 'test', 'step': i, 'total': 600}), "
                  "flush=True)\n"
                  "    time.sleep(0.1)\n")
        job = Job([USFMAELogic.python_executable(), "-c", script], env=USFMAELogic().job_environment()).start()
        deadline = time.monotonic() + 60
        while job.progress is None and job.running and time.monotonic() < deadline:
            job.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNotNone(job.progress, f"no progress line; log: {list(job.log)[-5:]} ({sys.executable})")
        job.cancel(timeout=5.0)
        self.assertFalse(job.running)
        self.assertTrue(job.cancelled)
        self.delayDisplay("Test passed")
