"""MaskSAMSegment's MRML logic against real MRML from the slicer-core wheel."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module is not slicer-core", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MaskSAMSegment"))
from MaskSAMSegmentLib import mrml_io  # noqa: E402
from slicer_stubs import import_module_without_qt  # noqa: E402

from masksam_core.labels import class_entries  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _tag(segment, name):
    import vtk

    value = vtk.reference("")
    segment.GetTag(name, value)
    return str(value)


def _volume_node(scene, arr, spacing, origin_ras, directions_ras):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(node, arr)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin_ras)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, directions_ras[r][c])
    node.SetIJKToRASDirectionMatrix(m)
    return node


def _oblique():
    a = 0.3
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, -1.0]])


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def test_volume_export_keeps_geometry_and_values(scene, tmp_path):
    arr = (np.arange(5 * 6 * 7) % 251).reshape(5, 6, 7).astype(np.int16)
    direction = _oblique()
    node = _volume_node(scene, arr, (0.7, 1.3, 2.5), (12.5, -40.25, 88.0), direction)
    path = mrml_io.write_volume_node(node, str(tmp_path / "in.nrrd"))
    img = sitk.ReadImage(path)
    assert np.array_equal(sitk.GetArrayFromImage(img), arr)
    assert np.allclose(img.GetSpacing(), (0.7, 1.3, 2.5))
    assert np.allclose(img.GetOrigin(), LPS_TO_RAS @ np.array((12.5, -40.25, 88.0)))
    assert np.allclose(np.array(img.GetDirection()).reshape(3, 3), LPS_TO_RAS @ direction)


def _engine_output(img, tmp_path):
    lab = np.zeros(sitk.GetArrayFromImage(img).shape, np.uint8)
    lab[1:3, 1:4, 2:5] = 2
    lab[3:5, 2:5, 0:2] = 1
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(tmp_path / "labels.nrrd"))
    classes = class_entries(["liver", "kidney_right"])
    sidecar = {"labels": {"1": "liver", "2": "kidney_right"},
               "organs": {"liver": {"volume_ml": 1.5, "confidence": 0.9}, "kidney_right": {"volume_ml": 0.5,
                                                                                           "confidence": 0.7}},
               "model": {"name": "test", "classes": classes}}
    (tmp_path / "labels.json").write_text(json.dumps(sidecar))
    return lab


def test_engine_output_becomes_named_coloured_tagged_segments(scene, tmp_path):
    arr = np.zeros((5, 6, 7), np.int16)
    node = _volume_node(scene, arr, (0.7, 1.3, 2.5), (12.5, -40.25, 88.0), _oblique())
    img = sitk.ReadImage(mrml_io.write_volume_node(node, str(tmp_path / "in.nrrd")))
    lab = _engine_output(img, tmp_path)
    seg = mrml_io.import_result(node, str(tmp_path / "labels.nrrd"), str(tmp_path / "labels.json"))
    segmentation = seg.GetSegmentation()
    names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments()))
    assert names == ["Liver", "Right kidney"]
    liver = next(segmentation.GetNthSegment(i) for i in range(2) if segmentation.GetNthSegment(i).GetName() == "Liver")
    assert np.allclose(liver.GetColor(), [c / 255 for c in class_entries(["liver"])[0]["color"]])
    tag = _tag(liver, slicer.vtkSegment.GetTerminologyEntryTagName())
    assert "10200004" in tag and "123037004" in tag
    kidney = next(segmentation.GetNthSegment(i) for i in range(2)
                  if segmentation.GetNthSegment(i).GetName() == "Right kidney")
    kidney_tag = _tag(kidney, slicer.vtkSegment.GetTerminologyEntryTagName())
    assert "24028007" in kidney_tag  # right
    # voxel-for-voxel: export back onto the volume grid and compare with what the engine wrote
    mrml_io.export_labelmap(seg, node, str(tmp_path / "back.nrrd"))
    back = sitk.ReadImage(str(tmp_path / "back.nrrd"))
    assert back.GetSize() == img.GetSize() and np.allclose(back.GetOrigin(), img.GetOrigin())
    back_arr = sitk.GetArrayFromImage(back)
    assert np.array_equal(back_arr > 0, lab > 0)
    assert mrml_io.organ_table(str(tmp_path / "labels.json"))[0]["organ"] == "liver"


def test_seg_nrrd_export_loads_back(scene, tmp_path):
    import slicerio

    node = _volume_node(scene, np.zeros((5, 6, 7), np.int16), (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3))
    img = sitk.ReadImage(mrml_io.write_volume_node(node, str(tmp_path / "in.nrrd")))
    lab = _engine_output(img, tmp_path)
    seg = mrml_io.import_result(node, str(tmp_path / "labels.nrrd"), str(tmp_path / "labels.json"))
    mrml_io.export_seg_nrrd(seg, str(tmp_path / "out.seg.nrrd"))
    loaded = slicerio.read_segmentation(str(tmp_path / "out.seg.nrrd"))
    assert sorted(s["name"] for s in loaded["segments"]) == ["Liver", "Right kidney"]
    liver = slicerio.segment_from_name(loaded, "Liver")
    assert "10200004" in liver["terminology"]["type"]
    mask = slicerio.extract_segments(loaded, [("Liver", 1)])["voxels"]
    assert int(mask.sum()) == int((lab == 1).sum())
    # replacing an existing segmentation keeps its node and swaps its segments
    again = mrml_io.import_result(node, str(tmp_path / "labels.nrrd"), str(tmp_path / "labels.json"), seg)
    assert again is seg and seg.GetSegmentation().GetNumberOfSegments() == 2


def test_the_result_sits_under_the_volumes_study_with_its_reference_geometry(scene, tmp_path):
    node = _volume_node(scene, np.zeros((5, 6, 7), np.int16), (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3))
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    volume_item = sh.GetItemByDataNode(node) or sh.CreateItem(study, node)
    sh.SetItemParent(volume_item, study)
    img = sitk.ReadImage(mrml_io.write_volume_node(node, str(tmp_path / "in.nrrd")))
    _engine_output(img, tmp_path)
    # Slicer's Segmentations module registers this conversion at start-up; the bare wheel does not
    slicer.vtkSegmentationConverterFactory.GetInstance().RegisterConverterRule(
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    seg = mrml_io.import_result(node, str(tmp_path / "labels.nrrd"), str(tmp_path / "labels.json"), show_3d=True)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == node.GetID()
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    plain = mrml_io.import_result(node, str(tmp_path / "labels.nrrd"), str(tmp_path / "labels.json"))
    assert not plain.GetSegmentation().ContainsRepresentation("Closed surface")


def test_the_engines_warnings_reach_the_module(tmp_path):
    sidecar = tmp_path / "labels.json"
    sidecar.write_text(json.dumps({"organs": {}, "warnings": ["this scan looks like MR"]}))
    assert mrml_io.sidecar_warnings(str(sidecar)) == ["this scan looks like MR"]
    sidecar.write_text(json.dumps({"organs": {}}))
    assert mrml_io.sidecar_warnings(str(sidecar)) == []
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    assert mrml_io.dicom_modality(node) is None  # not loaded from DICOM: the engine tells by the intensities


def test_the_in_slicer_self_test_runs_the_stub_engine_in_seconds(monkeypatch):
    """MaskSAMSegmentTest (what Slicer's self-test button runs): start, progress, result in the scene and cancel
    with the stub engine; the full inference only with MASKSAM_SELFTEST_FULL=1."""
    mod = import_module_without_qt(monkeypatch, "MaskSAMSegment")
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.delenv("MASKSAM_SELFTEST_FULL", raising=False)
    ran = []
    monkeypatch.setattr(mod.MaskSAMSegmentTest, "test_segment_sample", lambda self: ran.append("full"))
    t = time.monotonic()
    mod.MaskSAMSegmentTest("runTest").runTest()
    assert time.monotonic() - t < 60 and ran == []
    monkeypatch.setenv("MASKSAM_SELFTEST_FULL", "1")
    mod.MaskSAMSegmentTest("runTest").runTest()
    assert ran == ["full"]


def test_logic_passes_the_chosen_organs_to_predict(monkeypatch, tmp_path):
    mod = import_module_without_qt(monkeypatch, "MaskSAMSegment")
    started = []

    class FakeRun:
        def __init__(self, builder, **kwargs):
            started.append(builder(tmp_path))

    monkeypatch.setattr(mod.engine_process, "EngineRun", FakeRun)
    scene = slicer.vtkMRMLScene()
    node = _volume_node(scene, np.zeros((3, 4, 5), np.int16), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    mod.MaskSAMSegmentLogic().start(node, "/m", organs=["liver", "spleen"])
    cmd = started[0]
    assert cmd[cmd.index("--organs") + 1] == "liver,spleen" and (tmp_path / "input.nrrd").exists()
