"""USF-MAE for 3D Slicer: classify, reconstruct, fine-tune and pretrain ultrasound foundation models.

Module (metadata, sample data), Widget (GUI wiring only), Logic (Slicer's parameter node + the Qt-free
:class:`USFMAELib.logic.USFMAEEngineLogic`) and Test (runs inside Slicer on the phantom sample, no network).

Nothing heavy is imported here: every computation that needs torch runs in a background child process
(``Scripts/usfmae_job.py``), so entering the module loads no torch, holds no GPU memory and the GUI never waits.
The module also loads when the engine (``usfmae_core``) is missing, and says so in its panel.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated, ClassVar

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

    def translate(context, text):
        return text

from USFMAELib import engine, install, paths, samples
from USFMAELib.engine import UsfmaeError
from USFMAELib.logic import WEIGHTS, USFMAEEngineLogic, action_states

logger = logging.getLogger(__name__)

SETTINGS_DEVICE = "USFMAE/Device"
SETTINGS_TORCH_BACKEND = "USFMAE/TorchBackend"
TITLE = "USF-MAE"


#
# USFMAE
#
class USFMAE(ScriptedLoadableModule):
    """Module metadata (title, category, help) and the sample data registration."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("USF-MAE")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Ultrasound")]
        self.parent.dependencies = []  # torch comes through the PyTorch extension (PyTorchUtils), on request
        self.parent.contributors = ["USF-MAE contributors"]
        self.parent.helpText = _("""
Ultrasound foundation model (USF-MAE: masked autoencoder pretrained on ultrasound).
<ul>
<li><b>Get started</b>: load a sample ultrasound volume or cine (made offline) and fetch published USF-MAE
weights.</li>
<li><b>Classify</b> a 2D image, a 3D volume or a sequence (cine): class probabilities per slice / frame and their
aggregate in a table, with a chart.</li>
<li><b>Reconstruct</b> an image with a pretrained MAE (masked input and reconstruction, with the input's geometry).</li>
<li><b>Fine-tune</b> a classifier on a labelled folder or CSV, and <b>pretrain</b> an MAE on unlabelled folders or
the scene's volumes and sequences.</li>
</ul>
Everything runs in a background process with progress and Cancel. Models are kept in <code>~/.usfmae/models</code>
(or <code>$USFMAE_HOME/models</code>). The same engine powers the <code>usfmae</code> command line and the MONAI
bundle.
""")
        self.parent.acknowledgementText = _("""
Built on PyTorch, MONAI and the USF-MAE method (masked autoencoders pretrained on ultrasound, after He et al.,
"Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Add the phantom samples to the Sample Data module (category "Ultrasound (USF-MAE)"). The files are made on
    first use by a background job (:mod:`USFMAELib.samples`); after that Sample Data loads them like any sample."""
    try:
        import SampleData
    except ImportError:
        return
    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "USFMAE.png")
    for sample in samples.SAMPLES:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=samples.CATEGORY, sampleName=sample.name, thumbnailFileName=icon,
            uris=samples.sample_path(sample).as_uri(), fileNames=sample.file_name, nodeNames=sample.node_name,
            loadFileTypes=sample.load_file_type, customDownloader=loadSampleData)


def loadSampleData(source) -> list:
    """Sample Data's button: make the sample files if they are missing (a background job; the GUI stays live
    and a dialog offers Cancel), then load the sample through Sample Data's own loader."""
    import SampleData

    if samples.missing_samples():
        logic = USFMAELogic()
        notReady = logic.not_ready_message()  # the phantom generator is the engine's (torch): packages first
        if notReady:
            slicer.util.errorDisplay(notReady, windowTitle=_(TITLE))
            return []
        job = logic.start_job(logic.samples_job())
        dialog = slicer.util.createProgressDialog(labelText=_("Making the USF-MAE sample data..."), maximum=0)
        try:
            while job.running:
                job.poll()
                slicer.app.processEvents()
                if dialog.wasCanceled:
                    job.cancel(timeout=3.0)
                time.sleep(0.05)
        finally:
            dialog.close()
        outcome = logic.finish_job(job)
        if not outcome.ok:
            if not outcome.cancelled:
                slicer.util.errorDisplay(outcome.message, windowTitle=_(TITLE))
            return []
    return SampleData.SampleDataLogic().downloadFromSource(source)


#
# USFMAEParameterNode
#
@parameterNodeWrapper
class USFMAEParameterNode:
    """The module's state, saved with the scene.

    Paths are plain strings (``""``: not chosen), set from the path editors' text as typed (``USFMAELib.paths``).
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
    finetuneLabelTable: vtkMRMLTableNode
    finetuneVolumeModel: str = "2D classifier (images; volumes slice by slice)"
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
    """GUI wiring only: what to run and how to show results are decided by the logic."""

    COMBO_FIELDS = (("inputKindComboBox", "inputKind"), ("finetunePresetComboBox", "finetunePreset"),
                    ("finetuneVolumeModelComboBox", "finetuneVolumeModel"),
                    ("pretrainPresetComboBox", "pretrainPreset"))
    ACTION_BUTTONS: ClassVar[dict[str, str]] = {
        "classify": "classifyButton", "reconstruct": "reconstructButton", "finetune": "finetuneButton",
        "pretrain": "pretrainButton", "import": "importModelButton", "pull": "pullWeightsButton",
        "samples": "loadSamplesButton"}

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._job = None  # the long job (progress bar, Cancel)
        self._probes = {}  # short background probes by kind (device, model details)
        self._engineMessage = None
        self._installPlan = None  # cached install plan (what is missing), refreshed by updateDependencyStatus
        self._deviceChecked = False
        self._probedModels = set()  # model paths whose details were read
        self._tooltips = {}  # the .ui's tool tips of the action buttons
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

        for field in paths.PATH_FIELDS:
            editor = getattr(self.ui, field.widget)
            editor.filters = functools.reduce(operator.or_,
                                              (getattr(ctk.ctkPathLineEdit, f) for f in field.ctk_filters))
            editor.nameFilters = list(field.name_filters)
            editor.settingKey = field.setting_key  # history: ctkPathLineEdit/USFMAE/<name> in the settings
            if field.parameter:  # follow the text as typed (currentPathChanged skips cleared / unaccepted text)
                editor.comboBox().connect("editTextChanged(QString)",
                                          lambda text, f=field: self._setParameter(f.parameter,
                                                                                   paths.parameter_value(text)))
            if field.file_button:
                getattr(self.ui, field.file_button).connect("clicked(bool)", lambda checked, f=field: self._pick(f))
        for widgetName, parameter in self.COMBO_FIELDS:
            getattr(self.ui, widgetName).connect("currentTextChanged(QString)",
                                                 lambda text, p=parameter: self._setParameter(p, text))

        # device and PyTorch build are remembered in the application settings (not only in the scene)
        saved = str(qt.QSettings().value(SETTINGS_DEVICE, "auto"))
        self.ui.deviceComboBox.setCurrentIndex(max(0, self.ui.deviceComboBox.findText(saved)))
        self.ui.deviceComboBox.connect("currentTextChanged(QString)", self.onDeviceChanged)
        self.ui.torchBackendComboBox.setCurrentText(str(qt.QSettings().value(SETTINGS_TORCH_BACKEND, "automatic")))
        self.ui.torchBackendComboBox.connect(
            "currentTextChanged(QString)", lambda text: qt.QSettings().setValue(SETTINGS_TORCH_BACKEND, text))
        for name in WEIGHTS:
            self.ui.pullWeightsComboBox.addItem(name)

        self.ui.detectDeviceButton.connect("clicked(bool)", self.onDetectDevice)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.loadSamplesButton.connect("clicked(bool)", self.onLoadSamples)
        self.ui.pullWeightsButton.connect("clicked(bool)", self.onPullWeights)
        self.ui.useAsClassifierButton.connect("clicked(bool)", lambda: self._useCachedModel("classifierPath"))
        self.ui.useAsMaeButton.connect("clicked(bool)", lambda: self._useCachedModel("maePath"))
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassify)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstruct)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.listSceneScansButton.connect("clicked(bool)", self.onListSceneScans)
        self.ui.pretrainButton.connect("clicked(bool)", self.onPretrain)
        self.ui.cancelJobButton.connect("clicked(bool)", self.onCancelJob)

        self._tooltips = {action: getattr(self.ui, name).toolTip for action, name in self.ACTION_BUTTONS.items()}
        self._engineMessage = engine.engine_missing_message()
        self.initializeParameterNode()
        self.updateDependencyStatus()
        self.refreshCachedModels()

    def cleanup(self) -> None:
        """Called when the application closes: stop running jobs (their whole process trees)."""
        self._jobTimer.stop()
        for job in [self._job, *self._probes.values()]:
            if job is not None and job.running:
                job.cancel(timeout=3.0)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if not self._deviceChecked and self._engineReady(quiet=True):
            self.onDetectDevice()  # once, as a background probe: entering the module imports no torch

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
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
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

    def _values(self) -> dict:
        p = self._parameterNode
        return {name: getattr(p, name) for name in ("inputVolume", "classifierPath", "maePath", "finetuneData",
                                                      "finetuneLabelTable", "pretrainSource", "pretrainUseScene")
                } if p else {}

    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        """Path editors and combo boxes (not bound by connectGui) follow the parameter node; the logic says which
        actions can start."""
        p = self._parameterNode
        if p is None:
            return
        self._updatingGui = True
        try:
            for field in paths.PATH_FIELDS:
                editor = getattr(self.ui, field.widget)
                if field.parameter and editor.currentPath != getattr(p, field.parameter):
                    editor.currentPath = getattr(p, field.parameter)
            for widgetName, parameter in self.COMBO_FIELDS:
                combo = getattr(self.ui, widgetName)
                index = combo.findText(getattr(p, parameter))
                if index >= 0 and combo.currentIndex != index:
                    combo.setCurrentIndex(index)
        finally:
            self._updatingGui = False
        busy = self._job is not None and self._job.running
        for action, reason in action_states(self._values(), busy, self._engineReady(quiet=True)).items():
            button = getattr(self.ui, self.ACTION_BUTTONS[action])
            button.enabled = reason is None
            button.toolTip = reason or self._tooltips.get(action, "")
        for path in (p.classifierPath, p.maePath):  # details of a newly chosen model, read in the background
            if path and path not in self._probedModels and Path(path).is_file():
                self._probedModels.add(path)
                self._probeModel(path)

    # ------------------------------------------------------------------------------------------------ helpers
    def _engineReady(self, quiet: bool = False, refresh: bool = False) -> bool:
        """True when the engine, torch and the engine's packages are there; otherwise (unless ``quiet``) says how
        to get them. The package check (installed distributions' metadata) is cached until ``refresh``."""
        if self._engineMessage:
            if not quiet:
                slicer.util.errorDisplay(_("USF-MAE cannot run: {message}").format(message=self._engineMessage),
                                         windowTitle=_(TITLE))
            return False
        if refresh or self._installPlan is None:
            self._installPlan = self.logic.install_plan()
        plan = self._installPlan
        if plan.nothing_to_install:
            return True
        if not quiet:
            slicer.util.errorDisplay(_("USF-MAE needs Python packages that are not installed yet:\n{packages}\n\nPress "
                                       "'Install Python packages...' in the Setup section.").format(
                packages=plan.summary()), windowTitle=_(TITLE))
        return False

    def _device(self) -> str:
        return self.ui.deviceComboBox.currentText or "auto"

    def _defaultRunFolder(self, kind: str) -> str:
        return str(self.logic.model_cache_dir().parent / "runs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")

    def _pick(self, field) -> None:
        """The extra button of a folder-or-file field: pick a file (the "..." button picks a folder)."""
        editor = getattr(self.ui, field.widget)
        start = editor.currentPath or str(Path.home())
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Choose a file"), start, ";;".join(field.name_filters))
        if path:
            editor.currentPath = path

    def _addToHistory(self, action: str) -> None:
        values = {f.parameter or f.widget: (getattr(self._parameterNode, f.parameter) if f.parameter else
                                            getattr(self.ui, f.widget).currentPath) for f in paths.PATH_FIELDS}
        for field in paths.history_fields(action, values):
            getattr(self.ui, field.widget).addCurrentPathToHistory()

    def _start(self, action: str, makeSpec) -> None:
        """Check, build the job (``makeSpec`` returns a JobSpec) and start it; user errors are one dialog line."""
        if self._job is not None and self._job.running:
            slicer.util.errorDisplay(_("A job is already running; cancel it or wait for it to finish"),
                                     windowTitle=_(TITLE))
            return
        if not self._engineReady():
            return
        try:
            with slicer.util.WaitCursor():
                spec = makeSpec()
                job = self.logic.start_job(spec)
        except UsfmaeError as err:
            slicer.util.errorDisplay(str(err), windowTitle=_(TITLE))
            return
        except Exception as err:  # noqa: BLE001 - the GUI must report, not crash
            logger.error(traceback.format_exc())
            slicer.util.errorDisplay(_("{action} failed to start: {error}").format(action=action, error=err),
                                     detailedText=traceback.format_exc(), windowTitle=_(TITLE))
            return
        self._addToHistory(action)
        self._job = job
        self.ui.jobLogTextEdit.clear()
        self.ui.jobLogTextEdit.appendPlainText(" ".join(job.argv))
        for line in job.log:
            self.ui.jobLogTextEdit.appendPlainText(line)
        self.ui.jobProgressBar.setMaximum(0)  # busy until the first progress line
        self.ui.jobStatusLabel.text = job.status_text()
        self.ui.cancelJobButton.enabled = True
        self.ui.jobCollapsibleButton.collapsed = False
        self.updateGuiFromParameterNode()
        self._jobTimer.start()

    def _probe(self, spec) -> None:
        """Start a short background probe (device, model details); a newer probe of the same kind replaces it."""
        old = self._probes.pop(spec.kind, None)
        if old is not None and old.running:
            old.cancel(timeout=1.0)
            self.logic.finish_job(old)
        self._probes[spec.kind] = self.logic.start_job(spec)
        self._jobTimer.start()

    # ------------------------------------------------------------------------------------------ job watching
    def onJobTimer(self) -> None:
        for kind, probe in list(self._probes.items()):
            probe.poll()
            if not probe.running:
                del self._probes[kind]
                self._onProbeFinished(self.logic.finish_job(probe))
        job = self._job
        if job is not None:
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
                self._job = None
                self._onJobFinished(job)
        if self._job is None and not self._probes:
            self._jobTimer.stop()

    def onCancelJob(self) -> None:
        if self._job is not None and self._job.running:
            self._job.request_cancel(timeout=10.0)  # SIGTERM now, SIGKILL for what is left after 10 s
            self.ui.jobStatusLabel.text = _("cancelling...")
            self.ui.cancelJobButton.enabled = False

    def _onJobFinished(self, job) -> None:
        outcome = self.logic.finish_job(job)
        self.ui.cancelJobButton.enabled = False
        self.ui.jobProgressBar.setMaximum(1000)
        self.ui.jobProgressBar.setValue(1000 if outcome.ok else 0)
        self.ui.jobLogTextEdit.appendPlainText(f"[USF-MAE] {outcome.message}")
        p = self._parameterNode
        if p is not None:
            for name, value in outcome.parameters.items():
                setattr(p, name, value)
        self.updateGuiFromParameterNode()
        if outcome.cancelled:
            return
        if not outcome.ok:
            slicer.util.errorDisplay(outcome.message, windowTitle=_(TITLE))
            return
        if outcome.kind == "classify":
            if p is not None:
                p.outputTable = outcome.nodes["table"]
            self.ui.classifyResultLabel.text = outcome.message
            self.logic.show_table_and_chart(outcome.nodes["table"], outcome.nodes["chart"],
                                            slicer.app.applicationLogic())
            if outcome.nodes.get("attention_volume") is not None:  # attention MIL: which slices drove the result
                slicer.util.setSliceViewerLayers(background=p.inputVolume if p is not None else None,
                                                 foreground=outcome.nodes["attention_volume"], foregroundOpacity=0.4)
        elif outcome.kind == "reconstruct":
            slicer.util.setSliceViewerLayers(background=outcome.nodes["masked"],
                                             foreground=outcome.nodes["reconstruction"], foregroundOpacity=0.5,
                                             fit=True)
            self.ui.reconstructResultLabel.text = outcome.message
        elif outcome.kind == "samples":
            self._loadSamples(outcome.value)
        else:
            self.refreshCachedModels()
            slicer.util.showStatusMessage(f"USF-MAE: {outcome.message}", 5000)
            if outcome.kind in ("finetune", "pretrain", "pull"):
                slicer.util.infoDisplay(outcome.message, windowTitle=_(TITLE))

    def _onProbeFinished(self, outcome) -> None:
        if outcome.kind == "device":
            self.ui.deviceInfoLabel.text = outcome.message
        elif outcome.kind == "model-info":
            self.ui.modelInfoLabel.text = outcome.message
        if not outcome.ok and not outcome.cancelled:
            logger.warning(outcome.message)

    # -------------------------------------------------------------------------------------- setup section
    def onDeviceChanged(self, text: str) -> None:
        qt.QSettings().setValue(SETTINGS_DEVICE, text)
        if self._parameterNode:
            self._parameterNode.device = text
        if self._engineReady(quiet=True):
            self.onDetectDevice()

    def onDetectDevice(self) -> None:
        if not self._engineReady(quiet=True):
            self.ui.deviceInfoLabel.text = _("install the Python packages first (below)")
            return
        self.ui.deviceInfoLabel.text = _("checking...")
        self._deviceChecked = True
        self._probe(self.logic.device_job(self._device()))

    def updateDependencyStatus(self) -> None:
        if self._engineMessage:
            self.ui.engineStatusLabel.text = self._engineMessage
            self.ui.engineStatusLabel.visible = True
            self.ui.dependenciesLabel.text = _("the engine is missing (see above)")
            self.ui.installDependenciesButton.enabled = False
            return
        self.ui.engineStatusLabel.visible = False
        self._engineReady(quiet=True, refresh=True)
        plan = self._installPlan
        self.ui.dependenciesLabel.text = (_("All required Python packages are installed") if plan.nothing_to_install
                                          else _("To install: {packages}").format(
                                              packages=plan.summary().replace("\n", "; ")))
        self.ui.dependenciesLabel.toolTip = plan.details()
        self.ui.installDependenciesButton.enabled = not plan.nothing_to_install
        self.updateGuiFromParameterNode()

    def onInstallDependencies(self) -> None:
        """torch through the PyTorch extension (the chosen build), the rest with pip one package at a time, Slicer's
        own packages pinned; declining installs nothing and is not an error; a restart is offered when needed."""
        plan = self.logic.install_plan()
        if plan.nothing_to_install:
            self.updateDependencyStatus()
            return
        if slicer.app.commandOptions().testingEnabled:
            logger.info("USF-MAE: testing mode, packages not installed: %s", plan.summary())
            return
        blocked = install.torch_upgrade_blocked(plan)
        if blocked:
            slicer.util.warningDisplay(blocked, windowTitle=_(TITLE))
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("USF-MAE will install:\n\n{packages}\n\nThis needs a network connection and can take several "
                  "minutes. Slicer's own packages are left as they are.").format(packages=plan.summary()),
                windowTitle=_(TITLE), detailedText=plan.details()):
            self.ui.dependenciesLabel.text = _("Not installed (declined). To install: {packages}").format(
                packages=plan.summary().replace("\n", "; "))
            return
        before = install.installed_versions()
        first = plan
        failures = []
        with slicer.util.WaitCursor():
            if plan.torch is not None:
                try:
                    import PyTorchUtils
                except ModuleNotFoundError:
                    slicer.util.errorDisplay(_("Installing PyTorch needs the PyTorch extension: install 'PyTorch' from "
                                               "the Extensions Manager, restart Slicer and press Install again"),
                                             windowTitle=_(TITLE))
                    return
                backend = self.ui.torchBackendComboBox.currentText
                try:  # light-the-torch in a child process: raises when it fails (network, no build)
                    PyTorchUtils.PyTorchUtilsLogic().installTorch(
                        askConfirmation=False, forceComputationBackend=None if backend == "automatic" else backend,
                        torchVersionRequirement=plan.torch_requirement)
                except Exception:  # noqa: BLE001 - reported below from what is installed now
                    logger.error(traceback.format_exc())
                plan = self.logic.install_plan()  # pins the torch now installed
                blocked = install.pip_blocked_by_torch(plan)
                if blocked:
                    self.updateDependencyStatus()
                    slicer.util.errorDisplay(blocked, windowTitle=_(TITLE))
                    self._reportBundledChanges(before)
                    return
            constraints = Path(tempfile.mkdtemp(prefix="usfmae_pip_")) / "constraints.txt"
            constraints.write_text(plan.constraints_text(), encoding="utf-8")
            for requirement in plan.pip:
                try:
                    slicer.util.pip_install(install.pip_arguments(requirement, constraints))
                except Exception:  # noqa: BLE001 - one package failing does not stop the others
                    logger.error(traceback.format_exc())
                    failures.append(requirement)
        self.updateDependencyStatus()
        if failures:
            slicer.util.errorDisplay(_("These packages could not be installed: {packages}; see the Python console "
                                       "for pip's message (network, or no build for this platform)").format(
                packages=", ".join(failures)), windowTitle=_(TITLE))
        self._reportBundledChanges(before)
        reasons = install.restart_recommended(first, before, install.installed_versions())
        if reasons and slicer.util.confirmYesNoDisplay(
                _("Restart Slicer now to finish the installation? Packages that were already loaded changed."),
                windowTitle=_(TITLE), detailedText="\n".join(reasons)):
            slicer.util.restart()

    def _reportBundledChanges(self, before: dict) -> None:
        """Say which of Slicer's own packages changed during an installation (e.g. by the PyTorch extension)."""
        changed = install.bundled_changes(before, install.installed_versions())
        if changed:
            slicer.util.warningDisplay(
                _("Packages that Slicer ships changed during the installation (the PyTorch extension installs PyTorch "
                  "without USF-MAE's pins):\n{packages}").format(packages="\n".join(changed)), windowTitle=_(TITLE))

    # -------------------------------------------------------------------------------------- get started
    def onLoadSamples(self) -> None:
        if samples.missing_samples():
            self._start("samples", self.logic.samples_job)
        else:
            self._loadSamples({s.name: str(samples.sample_path(s)) for s in samples.SAMPLES})

    def _loadSamples(self, written: dict) -> None:
        loaded = self.logic.load_samples(written, slicer.modules.sequences.logic())
        shown = loaded.get("USFMAEPhantomCine") or next(iter(loaded.values()), None)
        if shown is None:
            return
        if self._parameterNode is not None:
            self._parameterNode.inputVolume = shown
        slicer.util.setSliceViewerLayers(background=shown, fit=True)

    def onPullWeights(self) -> None:
        name = self.ui.pullWeightsComboBox.currentText
        self._start("pull", lambda: self.logic.pull_job(name))

    # -------------------------------------------------------------------------------------- model section
    def refreshCachedModels(self) -> None:
        self.ui.cachedModelsComboBox.clear()
        self.ui.cacheDirLabel.text = str(self.logic.model_cache_dir())
        for path in self.logic.cached_models():
            self.ui.cachedModelsComboBox.addItem(path.name, str(path))

    def _useCachedModel(self, parameter: str) -> None:
        index = self.ui.cachedModelsComboBox.currentIndex
        if index >= 0 and self._parameterNode is not None:
            setattr(self._parameterNode, parameter, self.ui.cachedModelsComboBox.itemData(index))

    def _probeModel(self, path: str) -> None:
        if path and Path(path).is_file() and self._engineReady(quiet=True):
            self.ui.modelInfoLabel.text = _("reading...")
            self._probe(self.logic.model_info_job(path))

    def onImportModel(self) -> None:
        source = paths.parameter_value(self.ui.importPathLineEdit.currentPath)
        self._start("import", lambda: self.logic.import_job(source))

    # ---------------------------------------------------------------------------------- classify / reconstruct
    def onClassify(self) -> None:
        p = self._parameterNode
        self._start("classify", lambda: self.logic.classify_job(
            p.inputVolume, p.classifierPath, table_node=p.outputTable, device=self._device(), kind=p.inputKind,
            use_sequence=p.useSequence, batch_size=p.batchSize))

    def onReconstruct(self) -> None:
        p = self._parameterNode
        self._start("reconstruct", lambda: self.logic.reconstruct_job(
            p.inputVolume, p.maePath, mask_ratio=p.maskRatio, seed=p.maskSeed, device=self._device()))

    # ---------------------------------------------------------------------------------------------- training
    def onFinetune(self) -> None:
        p = self._parameterNode
        plan = {"init": p.finetuneInit or None, "epochs": p.finetuneEpochs, "device": self._device(),
                "preset": p.finetunePreset, "volume_model": p.finetuneVolumeModel}
        out = p.finetuneOutput or self._defaultRunFolder("finetune")
        if p.finetuneLabelTable is not None:  # scans of the scene, labelled in a table
            self._start("finetune", lambda: self.logic.finetune_scene_job(p.finetuneLabelTable, out, **plan))
        else:
            self._start("finetune", lambda: self.logic.finetune_job(p.finetuneData, out, **plan))

    def onListSceneScans(self) -> None:
        """A label table listing the scene's volumes and sequences, chosen for fine-tuning and shown to be filled."""
        table = self.logic.label_table_for_scene()
        if self._parameterNode is not None:
            self._parameterNode.finetuneLabelTable = table
        self.logic.show_table_and_chart(table, None, slicer.app.applicationLogic())
        slicer.util.showStatusMessage(_("USF-MAE: fill in the class of each scan in '{table}'").format(
            table=table.GetName()), 5000)

    def onPretrain(self) -> None:
        p = self._parameterNode
        self._start("pretrain", lambda: self.logic.pretrain_job(
            [p.pretrainSource], p.pretrainOutput or self._defaultRunFolder("pretrain"), use_scene=p.pretrainUseScene,
            epochs=p.pretrainEpochs, device=self._device(), init=p.pretrainInit or None, preset=p.pretrainPreset,
            image_size=p.pretrainImageSize))


#
# USFMAELogic
#
class USFMAELogic(ScriptedLoadableModuleLogic, USFMAEEngineLogic):
    """The module's logic: Slicer's parameter-node handling plus the Qt-free engine logic
    (:class:`USFMAELib.logic.USFMAEEngineLogic`: background jobs and their results in the scene)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # its super().__init__() may run USFMAEEngineLogic.__init__ ...
        USFMAEEngineLogic.__init__(self)  # ... or not (Slicer versions differ): set its state either way

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
    """Runs inside Slicer (Developer mode: Reload and Test, or ctest): the phantom sample data and tiny random models
    made by background jobs, classify and reconstruct as background jobs, no network. Skipped with a message when the
    engine's Python packages are not installed."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_USFMAE_jobs_on_the_sample_data()

    def _wait(self, logic, spec, timeout: float = 600.0):
        job = logic.start_job(spec)
        deadline = time.monotonic() + timeout
        while job.running and time.monotonic() < deadline:
            job.poll()
            slicer.app.processEvents()  # the GUI stays live while the child works
            time.sleep(0.05)
        if job.running:
            job.cancel(timeout=3.0)
        outcome = logic.finish_job(job)
        self.assertTrue(outcome.ok, f"{outcome.message}; log: {list(job.log)[-10:]}")
        return outcome

    def test_USFMAE_jobs_on_the_sample_data(self) -> None:
        self.delayDisplay("Starting the USFMAE test")
        logic = USFMAELogic()
        if not logic.install_plan().nothing_to_install:
            self.delayDisplay(f"USFMAE test skipped: install first: {logic.install_plan().summary()}")
            return
        folder = Path(slicer.util.tempDirectory("USFMAETest"))
        made = self._wait(logic, logic.samples_job(folder / "samples")).value
        loaded = logic.load_samples(made, slicer.modules.sequences.logic())
        volume, cine = loaded["USFMAEPhantomVolume"], loaded["USFMAEPhantomCine"]
        self.delayDisplay("Sample data made and loaded")

        tiny = self._wait(logic, logic.function_job("USFMAELib.selftest:write_tiny_models",
                                                    {"folder": str(folder / "models")}, "tiny models")).value

        out = self._wait(logic, logic.classify_job(volume, tiny["classifier"], device="cpu"))
        table = out.nodes["table"]
        self.assertEqual(table.GetNumberOfRows(), slicer.util.arrayFromVolume(volume).shape[0] + 1)
        self.assertEqual(table.GetCellText(table.GetNumberOfRows() - 1, 0), "aggregate")
        out = self._wait(logic, logic.classify_job(cine, tiny["classifier"], device="cpu"))
        self.assertEqual(out.nodes["table"].GetColumnName(0), "frame")
        self.assertEqual(out.nodes["table"].GetNumberOfRows(), 32 + 1)  # every frame of the sequence
        logic.show_table_and_chart(out.nodes["table"], out.nodes["chart"], slicer.app.applicationLogic())
        self.delayDisplay("Classified")

        rec = self._wait(logic, logic.reconstruct_job(volume, tiny["mae"], device="cpu"))
        for node in (rec.nodes["masked"], rec.nodes["reconstruction"]):
            self.assertEqual(node.GetSpacing(), volume.GetSpacing())
            self.assertEqual(node.GetOrigin(), volume.GetOrigin())
        self.delayDisplay("Test passed")
        sys.stdout.flush()
