"""MaskSAMTrainer: fine-tune MaskSAM on corrected segmentations from the scene (segment, correct, fine-tune)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "MaskSAMSegment"))

from MaskSAMSegmentLib import dependencies, engine_process, models  # noqa: E402
from MaskSAMTrainerLib import progress_rows, scene_dataset, train_process, training_plot  # noqa: E402


class MaskSAMTrainer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MaskSAM Trainer"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["MaskSAMSegment"]
        self.parent.contributors = ["MaskSAM for 3D Slicer developers"]
        self.parent.helpText = ("Fine-tune a MaskSAM model on volumes and their corrected segmentations, then use "
                                "the new model in MaskSAM Segment. Research use only.")
        self.parent.acknowledgementText = "MaskSAM: Xie et al., arXiv 2403.14103."


class MaskSAMTrainerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.cases = []
        self.run = None
        self._updatingGUI = False
        self.timer = qt.QTimer()
        self.timer.setInterval(500)
        self.timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MaskSAMTrainer.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = MaskSAMTrainerLogic()
        self.ui.plotWidget.setMRMLPlotViewNode(self.logic.curves.ensureNodes())
        self.ui.deviceComboBox.addItems(["auto", "cpu", "cuda"])
        for entry in self.logic.registry.models():
            self.ui.baseModelComboBox.addItem(entry["label"], entry["path"])
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.stopButton.enabled = False
        for widget, signal in ((self.ui.baseModelComboBox, "currentIndexChanged(int)"),
                               (self.ui.stepsSpinBox, "valueChanged(int)"),
                               (self.ui.deviceComboBox, "currentIndexChanged(int)"),
                               (self.ui.outputPathLineEdit, "currentPathChanged(QString)"),
                               (self.ui.holdOutCheckBox, "toggled(bool)")):
            widget.connect(signal, self.updateParameterNodeFromGUI)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.updateGUIFromParameterNode()

    # --- parameter node: the user's choices, saved with the scene -------------------------------------------------
    def updateGUIFromParameterNode(self, *_):
        node = self.logic.getParameterNode()
        self._updatingGUI = True
        try:
            index = self.ui.baseModelComboBox.findData(node.GetParameter("BaseModel"))
            if index >= 0:
                self.ui.baseModelComboBox.setCurrentIndex(index)
            if node.GetParameter("Steps"):
                self.ui.stepsSpinBox.value = int(node.GetParameter("Steps"))
            device = self.ui.deviceComboBox.findText(node.GetParameter("Device"))
            if device >= 0:
                self.ui.deviceComboBox.setCurrentIndex(device)
            if node.GetParameter("OutputFolder"):
                self.ui.outputPathLineEdit.currentPath = node.GetParameter("OutputFolder")
            if node.GetParameter("HoldOut"):
                self.ui.holdOutCheckBox.checked = node.GetParameter("HoldOut") == "true"
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *_):
        if self._updatingGUI:
            return
        node = self.logic.getParameterNode()
        wasModified = node.StartModify()
        node.SetParameter("BaseModel", self.ui.baseModelComboBox.currentData or "")
        node.SetParameter("Steps", str(self.ui.stepsSpinBox.value))
        node.SetParameter("Device", self.ui.deviceComboBox.currentText)
        node.SetParameter("OutputFolder", self.ui.outputPathLineEdit.currentPath or "")
        node.SetParameter("HoldOut", "true" if self.ui.holdOutCheckBox.checked else "false")
        node.EndModify(wasModified)

    def onSceneEndClose(self, caller, event):
        self.cases = []
        self.ui.casesListWidget.clear()
        if self.parent.isEntered:
            self.updateGUIFromParameterNode()

    def enter(self):
        self.updateGUIFromParameterNode()

    def onAddCase(self):
        volume = self.ui.volumeSelector.currentNode()
        segmentation = self.ui.segmentationSelector.currentNode()
        if volume is None or segmentation is None:
            return
        self.cases.append((volume, segmentation))
        self.ui.casesListWidget.addItem(f"{volume.GetName()} + {segmentation.GetName()}")

    def onTrain(self):
        base = self.ui.baseModelComboBox.currentData
        if not base:
            slicer.util.errorDisplay("Choose a model to fine-tune (add one in MaskSAM Segment).")
            return
        if not dependencies.ensure_in_slicer("MaskSAM Trainer"):
            self.ui.logTextEdit.append("Not started: required Python packages are missing.")
            return
        classes = [name for name, _ in models.model_organs(base)]
        if not classes:
            slicer.util.errorDisplay(f"{base} has no readable model card (model.json).")
            return
        folder = self.ui.outputPathLineEdit.currentPath
        if not folder:
            slicer.util.errorDisplay("Choose an output folder for the dataset and the new model.")
            return
        try:
            report = self.logic.writeDataset(self.cases, classes, os.path.join(folder, "dataset"))
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.logTextEdit.append(f"dataset: {len(report['cases'])} cases")
        for note in scene_dataset.absent_class_notes(report, classes):
            self.ui.logTextEdit.append(note)
        try:
            self.run = self.logic.startTraining(os.path.join(folder, "dataset"), os.path.join(folder, "model"), base,
                                                self.ui.stepsSpinBox.value, self.ui.deviceComboBox.currentText,
                                                classes, holdOut=self.ui.holdOutCheckBox.checked)
        except OSError as exc:
            slicer.util.errorDisplay(f"Training could not start: {exc}")
            return
        self.ui.logTextEdit.append(f"training into {self.logic.lastOutput}")
        # the logic emptied (or re-created, after a scene close) the curves: show them
        self.ui.plotWidget.setMRMLPlotViewNode(self.logic.curves.ensureNodes())
        self.ui.progressBar.setValue(0)
        self.ui.trainButton.enabled = False
        self.ui.stopButton.enabled = True
        self.timer.start()

    def onPoll(self):
        if self.run is None:
            self.timer.stop()
            return
        code = self.run.poll()
        for line in self.run.last_lines:
            self.showLine(line)
        if code is not None:
            self.finishRun(code)

    def showLine(self, line):
        """One line the train process printed: log it; a progress line moves the bar and adds a plot point."""
        self.ui.logTextEdit.append(line)
        progress = progress_rows.parse_line(line)
        if progress is None:
            return
        if progress.get("stage") == "train" and progress.get("total"):
            self.ui.progressBar.setValue(int(100 * progress.get("done", 0) / progress["total"]))
        verdict = progress_rows.fine_tuning_verdict(progress)
        if verdict is not None:
            message, worse = verdict
            self.ui.logTextEdit.append(message)
            if worse:
                slicer.util.warningDisplay(message, windowTitle="MaskSAM Trainer")
        self.logic.recordProgress(progress)

    def finishRun(self, code):
        self.timer.stop()
        run, self.run = self.run, None
        self.ui.trainButton.enabled = True
        self.ui.stopButton.enabled = False
        try:
            result = self.logic.finishTraining(run, code)
        finally:
            run.cleanup()
        self.ui.logTextEdit.append(result.message)
        if result.kind == "stopped":
            if slicer.util.confirmYesNoDisplay(result.message + " Use it in MaskSAM Segment?",
                                               windowTitle="MaskSAM Trainer"):
                self.logic.registerModel(result.model)
                self.ui.logTextEdit.append(f"model registered: {result.model}")
        elif result.kind == "complete":
            self.logic.registerModel(result.model)
            self.ui.logTextEdit.append(f"model registered: {result.model}")
        elif result.kind == "failed":
            slicer.util.errorDisplay(result.message, detailedText=run.log_text()[-20000:])

    def onStop(self):
        """Ask train to stop: it finishes the current step and saves a valid (partial) model, which is then
        offered; the tree is killed only when it has not ended after ``train_process.STOP_GRACE_S``."""
        if self.run is not None and not self.run.cancelled:
            self.run.request_stop(train_process.STOP_GRACE_S)
            self.ui.stopButton.enabled = False
            self.ui.logTextEdit.append("Stopping after the current step...")

    def cleanup(self):
        """The module or Slicer is closing: stop a running training (it must not outlive the module)."""
        self.timer.stop()
        if self.run is not None:
            run, self.run = self.run, None
            run.cancel(grace_s=5.0)
        self.removeObservers()


class MaskSAMTrainerLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console without the widget. ``curves`` holds the live loss / validation Dice table and
    chart in ``scene`` (default ``slicer.mrmlScene``)."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        settings_dir = Path(slicer.app.slicerUserSettingsFilePath).parent if hasattr(slicer, "app") else Path.home()
        self.registry = models.ModelRegistry(settings_dir / "MaskSAM" / "models.json")
        self.lastOutput = None
        self.curves = training_plot.TrainingCurves(scene)

    def writeDataset(self, cases, classes, folder, manual=None, ignore_unmapped=False):
        return scene_dataset.write_dataset(cases, classes, folder, manual, ignore_unmapped)

    def startTraining(self, dataset, out, base, steps, device, classes, holdOut=True):
        """Start ``python -m masksam_core.train --progress json`` in the background; the curves start empty.
        The model goes to ``out``, or ``out-2``, ``out-3``, ... when that exists (``lastOutput`` says which).
        ``holdOut``: validate on a quarter of each case's slices (``--val-slices auto``), which are not trained on."""
        out = train_process.unique_output_dir(out)
        self.lastOutput = out
        self.curves.reset()
        cmd = train_process.train_command(engine_process.slicer_python(), dataset, out, base, steps, device, classes,
                                          val_slices="auto" if holdOut else None,
                                          val_fraction=None if holdOut else 0.0)
        return engine_process.EngineRun(lambda _wd: cmd, outputs=[out])

    def finishTraining(self, run, code):
        """What the ended run left (:class:`train_process.Outcome`): a complete model, a partial one after Stop,
        nothing, or a failure."""
        return train_process.outcome(code, self.lastOutput, run.cancelled)

    def recordLine(self, line):
        """Feed one output line of the train process; a loss or validation line adds a row to the curves."""
        return self.curves.addLine(line)

    def recordProgress(self, progress):
        """Same as :meth:`recordLine` for an already decoded progress object."""
        return self.curves.addProgress(progress)

    recordPoint = recordProgress  # former name

    def registerModel(self, folder):
        self.registry.add(folder)


class MaskSAMTrainerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer; the rest of the logic is tested in CI (Testing/test_slicer_trainer_*.py)."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_curves()

    def test_curves(self):
        logic = MaskSAMTrainerLogic()
        for line in ('{"stage": "train", "done": 1, "total": 2, "loss": 1.5}', "a log line",
                     '{"stage": "train", "done": 2, "total": 2, "loss": 1.25}',
                     '{"stage": "validation", "done": 2, "total": 2, "step": 2, "dice_mean": 0.5}'):
            logic.recordLine(line)
        table = logic.curves.tableNode
        self.assertEqual(table.GetNumberOfRows(), 3)
        self.assertEqual(list(slicer.util.arrayFromTableColumn(table, "step")), [1, 2, 2])
        self.assertEqual(logic.curves.chartNode.GetNumberOfPlotSeriesNodes(), 2)
        self.delayDisplay("Test passed")
