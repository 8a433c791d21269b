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
