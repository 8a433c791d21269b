"""MaskSAMSegment's DICOM SEG export against real MRML (slicer-core) and a synthetic DICOM series.

The volume is loaded from the DICOM files the way Slicer's DICOM plugin does (an archetype storage node given the
file list) and tagged with ``DICOM.instanceUIDs``; the SEG written through the engine's highdicom writer is read
back with pydicom/highdicom and compared, frame by frame, with the labelmap the segmentation was made from.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module is not slicer-core", allow_module_level=True)
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from slicer_stubs import import_module_without_qt as _import_module_without_qt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MaskSAMSegment"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_fixture import write_series  # noqa: E402
from MaskSAMSegmentLib import dicom_seg, mrml_io  # noqa: E402

from masksam_core.errors import InputError  # noqa: E402
from masksam_core.labels import class_entries  # noqa: E402

SHAPE = (5, 24, 32)  # (z, y, x): not square, so that a row/column swap or a flip shows


class FakeDicomDatabase:
    """The one call the export makes on ``slicer.dicomDatabase``."""

    def __init__(self, files_by_uid):
        self.files_by_uid = dict(files_by_uid)
        self.isOpen = True

    def fileForInstance(self, uid):
        return self.files_by_uid.get(uid, "")


@pytest.fixture()
def case(tmp_path):
    """A 5-slice CT series next to a larger unrelated series in the same folder, loaded as Slicer would, and a
    segmentation with two MaskSAM organs and a user-made segment without terminology."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "dicom"
    write_series(folder, (rng.random((7, 24, 32)) * 50).astype(np.int16), series_suffix="2",
                 origin=(0.0, 0.0, 0.0))
    image = write_series(folder, (rng.random(SHAPE) * 100).astype(np.int16), series_suffix="1")
    files = sorted(str(f) for f in folder.glob("1_*.dcm"))
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]

    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT from DICOM")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(files[0])
    for f in files:
        storage.AddFileName(f)
    storage.SetSingleFile(False)
    assert storage.ReadData(volume)
    scene.RemoveNode(storage)
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))

    lab = np.zeros(SHAPE, np.uint8)
    lab[1:4, 2:10, 3:20] = 1      # liver
    lab[0:2, 14:22, 20:30] = 2    # right kidney
    lab[4, 5:9, 25:31] = 3        # drawn by the user
    lab[3, 20, 1] = 3
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(image)
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    (tmp_path / "labels.json").write_text(json.dumps({"labels": {}, "organs": {}, "model": {
        "name": "test", "classes": class_entries(["liver", "kidney_right"])}}))
    segmentation = mrml_io.import_result(volume, str(tmp_path / "labels.nrrd"), str(tmp_path / "labels.json"))
    seg = segmentation.GetSegmentation()
    user = next(seg.GetNthSegment(i) for i in range(seg.GetNumberOfSegments())
                if seg.GetNthSegment(i).GetLabelValue() == 3)
    user.SetName("Lesion")
    user.SetColor(0.9, 0.9, 0.1)
    return {"scene": scene, "volume": volume, "segmentation": segmentation, "files": files, "uids": uids,
            "lab": lab, "series_uid": str(pydicom.dcmread(files[0]).SeriesInstanceUID), "folder": folder}


def _segment_names(segmentation):
    seg = segmentation.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def test_labelmap_on_volume_grid_matches_the_source_voxels(case, tmp_path):
    seg = case["segmentation"].GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    assert _segment_names(case["segmentation"]) == ["Liver", "Right kidney", "Lesion"]
    out = sitk.ReadImage(mrml_io.export_segments_on_volume_grid(case["segmentation"], case["volume"],
                                                                str(tmp_path / "l.nrrd")))
    assert np.array_equal(sitk.GetArrayFromImage(out), case["lab"])
    # label value = position in the given id list
    out = sitk.ReadImage(mrml_io.export_segments_on_volume_grid(case["segmentation"], case["volume"],
                                                                str(tmp_path / "r.nrrd"), ids[::-1]))
    assert np.array_equal(sitk.GetArrayFromImage(out), np.where(case["lab"] > 0, 4 - case["lab"], 0))


def test_dicom_seg_export_reads_back_frame_by_frame(case, tmp_path):
    out = tmp_path / "export" / "organs.dcm"
    written = dicom_seg.export_dicom_seg(case["segmentation"], case["volume"], case["files"], str(out))
    assert Path(written) == out and [p.name for p in out.parent.iterdir()] == ["organs.dcm"]  # no temp file left
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.PatientID == "P1" and ds.StudyInstanceUID == pydicom.dcmread(case["files"][0]).StudyInstanceUID
    assert {r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence} == {case["series_uid"]}
    assert {i.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence
            for i in r.ReferencedInstanceSequence} == set(case["uids"])
    segments = list(ds.SegmentSequence)
    assert [s.SegmentLabel for s in segments] == ["Liver", "Right kidney", "Lesion"]
    types_ = [s.SegmentedPropertyTypeCodeSequence[0] for s in segments]
    assert types_[0].CodeValue == "10200004" and types_[0].CodingSchemeDesignator == "SCT"
    assert types_[1].CodeValue == "64033007"
    assert types_[1].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"  # right
    assert types_[2].CodeValue == "85756007"  # no terminology on the user's segment: Slicer's generic Tissue
    assert segments[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert all(hasattr(s, "RecommendedDisplayCIELabValue") for s in segments)
    assert segments[2].RecommendedDisplayCIELabValue != segments[0].RecommendedDisplayCIELabValue

    seg = hd.seg.Segmentation.from_dataset(ds)
    assert seg.number_of_segments == 3
    # the source instances in the volume's slice order (the fixture wrote them along z)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=case["uids"], segment_numbers=[1, 2, 3],
                                               assert_missing_frames_are_empty=True)
    assert pixels.shape == SHAPE + (3,)
    for k in range(3):
        assert np.array_equal(pixels[..., k] > 0, case["lab"] == k + 1), f"segment {k + 1}"

    # the same through the Slicer-database wrapper
    db = FakeDicomDatabase(zip(case["uids"], case["files"]))
    again = dicom_seg.export_dicom_seg_for_volume(case["segmentation"], case["volume"], str(tmp_path / "b.dcm"), db)
    assert [s.SegmentLabel for s in pydicom.dcmread(again).SegmentSequence] == ["Liver", "Right kidney", "Lesion"]


def test_clear_errors_before_anything_is_written(case, tmp_path):
    scene, volume, segmentation = case["scene"], case["volume"], case["segmentation"]
    out = tmp_path / "x.dcm"
    plain = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "from NRRD")
    plain.SetAndObserveImageData(volume.GetImageData())
    with pytest.raises(InputError, match="DICOM SEG export needs a volume loaded from DICOM"):
        dicom_seg.export_dicom_seg_for_volume(segmentation, plain, str(out), FakeDicomDatabase({}))
    with pytest.raises(InputError, match="DICOM SEG export needs a volume loaded from DICOM"):
        dicom_seg.export_dicom_seg_for_volume(segmentation, plain, str(out))  # and no database at all
    closed = FakeDicomDatabase(zip(case["uids"], case["files"]))
    closed.isOpen = False
    with pytest.raises(InputError, match="database, which is not open"):
        dicom_seg.export_dicom_seg_for_volume(segmentation, volume, str(out), closed)
    partial = FakeDicomDatabase(list(zip(case["uids"], case["files"]))[1:])
    with pytest.raises(InputError, match=r"1 of 5 DICOM files .* missing from the DICOM database"):
        dicom_seg.export_dicom_seg_for_volume(segmentation, volume, str(out), partial)
    with pytest.raises(InputError, match="source DICOM files are missing"):
        dicom_seg.export_dicom_seg(segmentation, volume, case["files"] + [str(tmp_path / "gone.dcm")], str(out))
    # a volume that is not on the series' grid (resampled): the writer refuses
    moved = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
    moved.SetAndObserveImageData(volume.GetImageData())
    moved.CopyOrientation(volume)
    moved.SetSpacing(1.0, 1.0, 2.0)
    with pytest.raises(InputError, match="grid"):
        dicom_seg.export_dicom_seg(segmentation, moved, case["files"], str(out))
    # overlapping segments cannot go through one labelmap
    overlap = np.zeros(SHAPE, np.uint8)
    overlap[2, 4:8, 5:12] = 1  # inside the liver
    image = sitk.ReadImage(mrml_io.write_volume_node(volume, str(tmp_path / "v.nrrd")))
    extra = sitk.GetImageFromArray(overlap)
    extra.CopyInformation(image)
    sitk.WriteImage(extra, str(tmp_path / "extra.nrrd"))
    labelmap = mrml_io.read_labelmap_node(scene, str(tmp_path / "extra.nrrd"))
    ids = [segmentation.GetSegmentation().GetNthSegmentID(i) for i in range(3)]
    assert dicom_seg.overlapping_voxels(segmentation, volume, ids) == 0
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    ids = [segmentation.GetSegmentation().GetNthSegmentID(i) for i in range(4)]
    assert dicom_seg.overlapping_voxels(segmentation, volume, ids) == 4 * 7
    with pytest.raises(InputError, match="more than one segment"):
        dicom_seg.export_dicom_seg(segmentation, volume, case["files"], str(out))
    assert not out.exists() and not list(tmp_path.glob(".x.dcm*"))


def test_terminology_tag_parsing():
    tag = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
           "SCT^64033007^Kidney~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^")
    assert dicom_seg.snomed_from_terminology(tag) == {"category": ["123037004", "SCT", "Anatomical Structure"],
                                                      "type": ["64033007", "SCT", "Kidney"],
                                                      "modifier": ["7771000", "SCT", "Left"]}
    assert dicom_seg.snomed_from_terminology("") is None
    assert dicom_seg.snomed_from_terminology("ctx~^^~^^~^^~x~^^~^^") is None


class _Selector:
    def __init__(self, node):
        self.node = node

    def currentNode(self):
        return self.node


def test_export_button_offers_dicom_seg_only_for_a_dicom_volume(case, tmp_path, monkeypatch):
    mod = _import_module_without_qt(monkeypatch, "MaskSAMSegment")
    asked, errors = [], []
    answer = {"path": ""}

    class FileDialog:
        @staticmethod
        def getSaveFileName(parent, caption, folder, filters):
            asked.append(filters)
            return answer["path"]

    monkeypatch.setattr(mod.qt, "QFileDialog", FileDialog, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text), raising=False)
    monkeypatch.setattr(slicer, "dicomDatabase", FakeDicomDatabase(zip(case["uids"], case["files"])), raising=False)
    widget = mod.MaskSAMSegmentWidget.__new__(mod.MaskSAMSegmentWidget)  # the Qt parts are not needed here
    widget.logic = mod.MaskSAMSegmentLogic()
    plain = case["scene"].AddNewNodeByClass("vtkMRMLScalarVolumeNode", "from NRRD")
    plain.SetAndObserveImageData(case["volume"].GetImageData())

    def click(volume, path):
        widget.ui = types.SimpleNamespace(outputSegmentationSelector=_Selector(case["segmentation"]),
                                          inputVolumeSelector=_Selector(volume),
                                          statusLabel=types.SimpleNamespace(text=""))
        answer["path"] = path
        widget.onExport()
        return asked[-1]

    filters = click(case["volume"], str(tmp_path / "seg.dcm"))
    assert "DICOM SEG (*.dcm)" in filters and "*.seg.nrrd" in filters
    assert errors == [] and pydicom.dcmread(tmp_path / "seg.dcm").Modality == "SEG"
    assert str(tmp_path / "seg.dcm") in widget.ui.statusLabel.text

    filters = click(plain, str(tmp_path / "typed.dcm"))  # not offered, but typed by hand: a clear error
    assert "DICOM" not in filters and "*.nii.gz" in filters
    assert len(errors) == 1 and "DICOM SEG export needs a volume loaded from DICOM" in errors[0]
    assert not (tmp_path / "typed.dcm").exists()

    click(plain, str(tmp_path / "seg.seg.nrrd"))  # the other formats still work for any volume
    assert (tmp_path / "seg.seg.nrrd").exists() and len(errors) == 1
