"""The module widgets' control flow (segment, cancel, organ checklist, parameter node, cleanup, Trainer stop)
against real MRML from slicer-core and real engine processes (the stub engine), with small stand-ins for the Qt
widgets that only the Slicer application has."""
from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module is not slicer-core", allow_module_level=True)

from slicer_stubs import import_module_without_qt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MaskSAMSegment"))
from MaskSAMSegmentLib import engine_process  # noqa: E402

from masksam_core.labels import class_entries  # noqa: E402


class Widget:
    """Any Qt widget: attributes are set freely, methods record nothing."""

    def __init__(self, **attrs):
        self.enabled, self.checked, self.text = True, False, ""
        self.__dict__.update(attrs)

    def connect(self, *args):
        pass

    def blockSignals(self, flag):
        pass

    def setValue(self, value):
        self.value = value

    def __getattr__(self, name):  # setRowCount, setItem, ...
        return lambda *a, **k: None


class Selector(Widget):
    def __init__(self, node=None):
        super().__init__(node=node)

    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        self.node = node


class SegmentSelector(Selector):
    """qMRMLSegmentSelectorWidget: a segmentation node and one of its segment IDs."""

    def __init__(self, node=None, segment_id=""):
        super().__init__(node)
        self.segment_id = segment_id

    def currentSegmentID(self):
        return self.segment_id

    def setCurrentSegmentID(self, segment_id):
        self.segment_id = segment_id


class ComboBox(Widget):
    def __init__(self, items=()):
        super().__init__(items=list(items), index=0 if items else -1)

    @property
    def count(self):
        return len(self.items)

    @property
    def currentData(self):
        return self.items[self.index][1] if self.index >= 0 else None

    @property
    def currentText(self):
        return self.items[self.index][0] if self.index >= 0 else ""

    def clear(self):
        self.items, self.index = [], -1

    def addItem(self, label, data=None):
        self.items.append((label, data))
        self.index = max(self.index, 0)

    def addItems(self, labels):
        for label in labels:
            self.addItem(label, label)

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def findText(self, text):
        return next((i for i, (t, _) in enumerate(self.items) if t == text), -1)

    def setCurrentIndex(self, index):
        self.index = index

    def itemData(self, index):
        return self.items[index][1]


class ListItem:
    def __init__(self, text):
        self.text, self.role_data, self.state, self.item_flags = text, {}, 0, 1

    def setData(self, role, value):
        self.role_data[role] = value

    def data(self, role):
        return self.role_data.get(role)

    def flags(self):
        return self.item_flags

    def setFlags(self, flags):
        self.item_flags = flags

    def setCheckState(self, state):
        self.state = state

    def checkState(self):
        return self.state


class ListWidget(Widget):
    def __init__(self):
        super().__init__(items=[])

    @property
    def count(self):
        return len(self.items)

    def clear(self):
        self.items = []

    def addItem(self, item):
        self.items.append(item)

    def item(self, i):
        return self.items[i]


class Timer(Widget):
    active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def setInterval(self, ms):
        pass


def _fake_qt():
    qt = types.ModuleType("qt")
    qt.QTimer = Timer
    qt.QListWidgetItem = ListItem
    qt.QTableWidgetItem = lambda text: text
    qt.Qt = types.SimpleNamespace(Checked=2, Unchecked=0, UserRole=256, ItemIsUserCheckable=16)
    return qt


def _model(folder: Path) -> str:
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"name": "m", "backbone": {"name": "litemedsam"},
                                                   "classes": class_entries(["liver", "spleen", "aorta"])}))
    return str(folder)


@pytest.fixture()
def segment_widget(monkeypatch, tmp_path):
    mod = import_module_without_qt(monkeypatch, "MaskSAMSegment")
    monkeypatch.setattr(mod, "qt", _fake_qt())
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(volume, np.zeros((6, 8, 8), np.int16))
    parameters = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text))
    widget = mod.MaskSAMSegmentWidget.__new__(mod.MaskSAMSegmentWidget)
    mod.MaskSAMSegmentWidget.__init__(widget)
    widget.logic = mod.MaskSAMSegmentLogic()
    widget.logic.getParameterNode = lambda: parameters
    widget.logic.registry = types.SimpleNamespace(models=lambda: [{"label": "m", "path": _model(tmp_path / "m")}])
    widget.parent = types.SimpleNamespace(isEntered=True)
    widget.removeObservers = lambda: None
    widget.ui = types.SimpleNamespace(
        inputVolumeSelector=Selector(volume), outputSegmentationSelector=Selector(), modelComboBox=ComboBox(),
        deviceComboBox=ComboBox([("auto", "auto"), ("cpu", "cpu")]), fastCheckBox=Widget(), show3DCheckBox=Widget(),
        samCheckpointPathLineEdit=Widget(currentPath=""), allOrgansCheckBox=Widget(), organsListWidget=ListWidget(),
        segmentButton=Widget(), cancelButton=Widget(), statusLabel=Widget(), progressBar=Widget(),
        resultsTable=Widget(), refineSegmentSelector=SegmentSelector(), refineRoiSelector=Selector(),
        refinePointsSelector=Selector())
    widget.refreshModels()
    widget.initializeParameterNode()
    started = []
    real_start = widget.logic.start

    def start_stub(volume_node, model, organs=None, hang_s=0.0, **kwargs):  # the stub engine instead of predict
        started.append(organs)
        return real_start(volume_node, model, organs=organs, engine=lambda py, i, o: engine_process.stub_command(
            py, i, o, hang_s=widget.hang_s))

    widget.hang_s = 0.0
    widget.logic.start = start_stub
    widget.started = started
    widget.errors = errors
    return widget, scene, parameters


def _poll_until_done(widget, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while widget.run is not None and time.monotonic() < deadline:
        widget.onPoll()
        time.sleep(0.05)
    assert widget.run is None and not widget.timer.active


def test_segment_with_an_organ_subset_and_the_parameter_node(segment_widget):
    widget, scene, parameters = segment_widget
    assert [i.text for i in widget.ui.organsListWidget.items] == ["Liver", "Spleen", "Aorta"]
    assert widget.ui.allOrgansCheckBox.checked and widget.ui.segmentButton.enabled
    assert parameters.GetNodeReference("InputVolume") is widget.ui.inputVolumeSelector.node
    widget.ui.organsListWidget.items[1].setCheckState(0)  # the user unchecks the spleen
    widget.onOrganChanged()
    assert not widget.ui.allOrgansCheckBox.checked and parameters.GetParameter("UncheckedOrgans") == "spleen"
    widget.onSegment()
    assert widget.started == [["liver", "aorta"]] and widget.timer.active and widget.ui.cancelButton.enabled
    _poll_until_done(widget)
    assert widget.ui.statusLabel.text == "Done: 1 organs."
    node = widget.ui.outputSegmentationSelector.node
    assert node.GetSegmentation().GetNthSegment(0).GetName() == "Liver"
    # select all again: no --organs; the choices come back from the parameter node (as after loading a scene)
    widget.onAllOrgans(True)
    assert parameters.GetParameter("UncheckedOrgans") == ""
    parameters.SetParameter("UncheckedOrgans", "aorta")
    parameters.SetParameter("Fast", "true")
    widget.updateGUIFromParameterNode()
    assert [i.state for i in widget.ui.organsListWidget.items] == [2, 2, 0] and widget.ui.fastCheckBox.checked
    assert widget.ui.show3DCheckBox.checked  # 3D surfaces: on unless the scene says otherwise
    parameters.SetParameter("Show3D", "false")
    widget.updateGUIFromParameterNode()
    assert not widget.ui.show3DCheckBox.checked
    # another model: all of its organs checked, whatever was unchecked for the first one
    second = _model(Path(widget.ui.modelComboBox.currentData).parent / "second")
    widget.ui.modelComboBox.addItem("second", second)
    widget.ui.modelComboBox.setCurrentIndex(1)
    widget.onModelChanged()
    assert [i.state for i in widget.ui.organsListWidget.items] == [2, 2, 2]
    assert parameters.GetParameter("Model") == second and parameters.GetParameter("UncheckedOrgans") == ""
    widget.onAllOrgans(False)
    widget.onSegment()  # nothing checked: refused with a message, no engine
    assert widget.run is None and len(widget.started) == 1
    assert widget.errors == ["choose at least one organ to segment"]


def test_cancel_and_cleanup_stop_the_engine(segment_widget, monkeypatch):
    widget, scene, _ = segment_widget
    widget.hang_s = 60.0
    widget.onSegment()
    run = widget.run
    deadline = time.monotonic() + 20
    while run.progress is None and time.monotonic() < deadline:
        widget.onPoll()
        time.sleep(0.05)
    widget.onCancel()
    assert widget.ui.statusLabel.text == "Cancelling..." and not widget.ui.cancelButton.enabled
    _poll_until_done(widget)
    assert widget.ui.statusLabel.text == "Cancelled; the scene is unchanged."
    assert run.process.poll() is not None and not run.workdir.exists()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    # closing the module while the engine runs stops it
    widget.onSegment()
    run = widget.run
    widget.cleanup()
    assert widget.run is None and run.process.poll() is not None and not run.workdir.exists()


def test_trainer_stop_offers_the_partial_model(monkeypatch, tmp_path):
    mod = import_module_without_qt(monkeypatch, "MaskSAMTrainer")
    monkeypatch.setattr(mod, "qt", _fake_qt())
    out = tmp_path / "model-2"
    out.mkdir()
    (out / "model.json").write_text(json.dumps({"name": "m", "training": {"stopped": {"step": 5, "max_steps": 40}}}))
    asked, registered, errors = [], [], []
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: asked.append(text) or True)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text))
    widget = mod.MaskSAMTrainerWidget.__new__(mod.MaskSAMTrainerWidget)
    mod.MaskSAMTrainerWidget.__init__(widget)
    widget.removeObservers = lambda: None
    log = []
    widget.ui = types.SimpleNamespace(logTextEdit=Widget(append=log.append), trainButton=Widget(enabled=False),
                                      stopButton=Widget(), progressBar=Widget())
    widget.logic = mod.MaskSAMTrainerLogic(slicer.vtkMRMLScene())
    widget.logic.lastOutput = str(out)
    widget.logic.registerModel = registered.append
    code = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nprint('step', flush=True)\ntime.sleep(60)"
    widget.run = engine_process.EngineRun(lambda wd: [sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while "step" not in log and time.monotonic() < deadline:
        widget.onPoll()
        time.sleep(0.05)
    widget.onStop()
    assert widget.run.stop_grace_s == mod.train_process.STOP_GRACE_S
    while widget.run is not None and time.monotonic() < deadline:
        widget.onPoll()
        time.sleep(0.05)
    assert asked and "stopped at step 5 of 40" in asked[0] and registered == [str(out)] and errors == []
    assert widget.ui.trainButton.enabled and not widget.ui.stopButton.enabled


def test_trainer_choices_are_kept_in_the_parameter_node(monkeypatch, tmp_path):
    mod = import_module_without_qt(monkeypatch, "MaskSAMTrainer")
    monkeypatch.setattr(mod, "qt", _fake_qt())
    scene = slicer.vtkMRMLScene()
    parameters = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    widget = mod.MaskSAMTrainerWidget.__new__(mod.MaskSAMTrainerWidget)
    mod.MaskSAMTrainerWidget.__init__(widget)
    widget.logic = types.SimpleNamespace(getParameterNode=lambda: parameters)
    widget.ui = types.SimpleNamespace(
        baseModelComboBox=ComboBox([("a", "/a"), ("b", "/b")]), stepsSpinBox=Widget(value=40),
        deviceComboBox=ComboBox([("auto", "auto"), ("cpu", "cpu")]), outputPathLineEdit=Widget(currentPath="/out"),
        holdOutCheckBox=Widget(checked=True))
    widget.ui.baseModelComboBox.setCurrentIndex(1)
    widget.ui.deviceComboBox.setCurrentIndex(1)
    widget.updateParameterNodeFromGUI()
    assert parameters.GetParameter("BaseModel") == "/b" and parameters.GetParameter("Steps") == "40"
    # a scene loaded later brings them back
    widget.ui.baseModelComboBox.setCurrentIndex(0)
    widget.ui.stepsSpinBox.value, widget.ui.holdOutCheckBox.checked = 10, False
    widget.updateGUIFromParameterNode()
    assert widget.ui.baseModelComboBox.currentData == "/b" and widget.ui.stepsSpinBox.value == 40
    assert widget.ui.deviceComboBox.currentText == "cpu" and widget.ui.holdOutCheckBox.checked
    assert widget.ui.outputPathLineEdit.currentPath == "/out"
