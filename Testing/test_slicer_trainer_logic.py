"""MaskSAMTrainer's logic against real MRML: scene -> nnU-Net dataset, class mapping, model registration."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module is not slicer-core", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MaskSAMSegment"))
sys.path.insert(0, str(ROOT / "MaskSAMTrainer"))
from MaskSAMSegmentLib import mrml_io  # noqa: E402
from MaskSAMTrainerLib import scene_dataset, train_process  # noqa: E402

from masksam_core.labels import class_entries  # noqa: E402

CLASSES = ["liver", "spleen", "kidney_left"]


def _case(scene, tmp_path):
    import vtk

    arr = np.zeros((6, 8, 10), np.int16)
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(vol, arr)
    vol.SetSpacing(0.8, 1.1, 2.5)
    vol.SetOrigin(-5.0, 12.0, 40.0)
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 0, -1.0)
    vol.SetIJKToRASDirectionMatrix(m)
    img = sitk.ReadImage(mrml_io.write_volume_node(vol, str(tmp_path / "in.nrrd")))
    lab = np.zeros(arr.shape, np.uint8)
    lab[1:4, 2:5, 2:6] = 1   # liver (engine value 1)
    lab[2:5, 5:7, 6:9] = 2   # spleen
    lab[0:2, 0:2, 0:2] = 3   # kidney_left, later renamed by the user
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(tmp_path / "labels.nrrd"))
    (tmp_path / "labels.json").write_text(json.dumps({"labels": {}, "organs": {},
                                                      "model": {"name": "m", "classes": class_entries(CLASSES)}}))
    seg = mrml_io.import_result(vol, str(tmp_path / "labels.nrrd"), str(tmp_path / "labels.json"))
    return vol, seg, img, lab


def test_segments_map_by_tag_name_and_terminology(tmp_path):
    scene = slicer.vtkMRMLScene()
    vol, seg, _, _ = _case(scene, tmp_path)
    s = seg.GetSegmentation()
    kidney = next(s.GetNthSegment(i) for i in range(s.GetNumberOfSegments()) if s.GetNthSegment(i).GetName() == "Left kidney")
    kidney.RemoveTag("MaskSAM.ClassName")
    kidney.SetName("my kidney")  # only its terminology (kidney + left) identifies it now
    extra = s.AddEmptySegment("", "tumour")
    mapping, unmapped = scene_dataset.map_segments(seg, CLASSES)
    assert sorted(mapping.values()) == sorted(CLASSES)
    assert unmapped == ["tumour"]
    mapping, unmapped = scene_dataset.map_segments(seg, CLASSES, {"tumour": "spleen"})
    assert unmapped == [] and list(mapping.values()).count("spleen") == 2
    assert extra


def test_scene_to_dataset_with_exact_geometry(tmp_path):
    scene = slicer.vtkMRMLScene()
    vol, seg, img, lab = _case(scene, tmp_path)
    seg.GetSegmentation().AddEmptySegment("", "unknown thing")
    with pytest.raises(ValueError, match="unknown thing"):
        scene_dataset.write_dataset([(vol, seg)], CLASSES, str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()  # nothing half-written
    report = scene_dataset.write_dataset([(vol, seg)], CLASSES, str(tmp_path / "ds"), ignore_unmapped=True)
    assert report["unmapped"] == {"case000": ["unknown thing"]}
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3}
    image = sitk.ReadImage(str(tmp_path / "ds" / "imagesTr" / "case000_0000.nii.gz"))
    label = sitk.ReadImage(str(tmp_path / "ds" / "labelsTr" / "case000.nii.gz"))
    assert np.allclose(image.GetOrigin(), img.GetOrigin()) and np.allclose(image.GetDirection(), img.GetDirection())
    assert np.allclose(label.GetOrigin(), img.GetOrigin()) and label.GetSize() == img.GetSize()
    assert np.array_equal(sitk.GetArrayFromImage(label), lab)
    # the written dataset passes the engine's own checks
    from masksam_core.data.dataset import check_dataset, discover_dataset, select_classes

    spec = discover_dataset(tmp_path / "ds")
    check_dataset(spec, select_classes(spec, CLASSES))
    # every class has a segment in this case: nothing to warn about; a class without one is named
    assert scene_dataset.absent_class_notes(report, CLASSES) == []
    notes = scene_dataset.absent_class_notes(report, CLASSES + ["aorta", "stomach"])
    assert len(notes) == 1 and notes[0].startswith("case000 (CT): no segment for aorta, stomach;")
    cmd = train_process.train_command("py", str(tmp_path / "ds"), str(tmp_path / "m"), "/base", 50, "cpu", CLASSES)
    assert "--init-from" in cmd and cmd[cmd.index("--classes") + 1] == "liver,spleen,kidney_left"


FAKE_TRAIN = """
import json, os, signal, sys, time
out = sys.argv[1]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
for step in range(1, 41):
    print(json.dumps({"stage": "train", "done": step, "total": 40, "loss": 1.0 / step}), flush=True)
    time.sleep(0.05)
    if stop:
        os.makedirs(out)
        with open(os.path.join(out, "model.json"), "w") as f:
            json.dump({"name": "m", "training": {"stopped": {"step": step, "max_steps": 40}}}, f)
        print(f"Stopped at step {step} of 40; model saved to {out}", flush=True)
        sys.exit(0)
sys.exit(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal to a real process")
def test_trainer_stop_keeps_a_partial_model_in_a_fresh_folder(monkeypatch, tmp_path):
    """Stop asks train to save (SIGTERM); the partial model it wrote is what the Trainer offers, and a model name
    already used goes to name-2 instead of failing."""
    import time

    from slicer_stubs import import_module_without_qt

    mod = import_module_without_qt(monkeypatch, "MaskSAMTrainer")
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    commands = []
    real_command = train_process.train_command

    def fake_command(python, dataset, out, *args, **kwargs):
        commands.append(real_command(python, dataset, out, *args, **kwargs))
        return [sys.executable, str(script), out]

    monkeypatch.setattr(mod.train_process, "train_command", fake_command)
    (tmp_path / "model").mkdir()  # a first training used this name
    logic = mod.MaskSAMTrainerLogic(slicer.vtkMRMLScene())
    run = logic.startTraining(str(tmp_path / "ds"), str(tmp_path / "model"), "/base", 40, "cpu", CLASSES)
    assert logic.lastOutput == str(tmp_path / "model-2")
    assert commands[0][commands[0].index("--checkpoint-every") + 1] == "10"
    assert commands[0][commands[0].index("--val-slices") + 1] == "auto"  # hold-out ticked by default
    deadline = time.monotonic() + 20
    while run.poll() is None and not any('"done": 3' in line for line in run.log) and time.monotonic() < deadline:
        time.sleep(0.02)
    run.request_stop(train_process.STOP_GRACE_S)
    while (code := run.poll()) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert code == 0 and not run.killed
    result = logic.finishTraining(run, code)
    assert result.kind == "stopped" and result.model == str(tmp_path / "model-2")
    assert train_process.parse_stopped_line(run.log[-1])["folder"] == str(tmp_path / "model-2")
    run.cleanup()
    # hold-out unticked: no validation asked for explicitly (train would otherwise pick its default one)
    second = logic.startTraining(str(tmp_path / "ds"), str(tmp_path / "model"), "/base", 40, "cpu", CLASSES,
                                 holdOut=False)
    second.request_stop(0.0)
    while second.poll() is None and time.monotonic() < deadline + 20:
        time.sleep(0.02)
    second.cleanup()
    assert commands[1][commands[1].index("--val-fraction") + 1] == "0.0" and "--val-slices" not in commands[1]
