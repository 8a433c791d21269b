"""Reading volumes with validation; atomic writers for labelmaps, .seg.nrrd and DICOM SEG."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_fixture import write_series
from masksam_core.data.volume_io import (CLASS_TAG, atomic_output, list_dicom_series, read_volume, validate_volume,
                                         write_dicom_seg, write_labelmap, write_seg_nrrd)
from masksam_core.errors import InputError, OutputError
from masksam_core.labels import class_entries

def _oblique_direction():
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


def _image(arr, spacing=(0.8, 1.1, 2.5), origin=(-12.5, 40.25, 300.0), direction=None):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction or _oblique_direction())
    return img


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp" in p.name]


def _message(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ reading files

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_reads_volume_formats_as_float32_with_geometry(tmp_path, suffix):
    arr = (np.arange(4 * 5 * 6).reshape(4, 5, 6) - 50).astype(np.int16)
    img = _image(arr)
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(img, str(path))
    vol = read_volume(path)
    assert vol.GetPixelID() == sitk.sitkFloat32
    assert vol.GetSize() == (6, 5, 4)
    assert np.allclose(vol.GetSpacing(), img.GetSpacing()) and np.allclose(vol.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.allclose(vol.GetDirection(), img.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(vol), arr.astype(np.float32))


def test_constant_volume_and_singleton_time_axis_are_accepted(tmp_path):
    sitk.WriteImage(_image(np.full((3, 4, 5), 7, np.uint8)), str(tmp_path / "c.nrrd"))
    assert np.all(sitk.GetArrayFromImage(read_volume(tmp_path / "c.nrrd")) == 7)
    four = sitk.GetImageFromArray(np.ones((1, 3, 4, 5), np.float32), isVector=False)  # (t, z, y, x) with t = 1
    sitk.WriteImage(four, str(tmp_path / "t1.nii.gz"))
    assert read_volume(tmp_path / "t1.nii.gz").GetSize() == (5, 4, 3)


def test_missing_path(tmp_path):
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / "nope.nii.gz")
    assert "not found" in _message(e) and "nope.nii.gz" in _message(e)


@pytest.mark.parametrize("name,content", [("junk.nii.gz", b"not an image at all"),
                                          ("junk.nrrd", b"NRRD0004\ntype: what\n\n"),
                                          ("notes.txt", b"hello"),
                                          ("trunc.nii.gz", None)])
def test_unreadable_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:  # a real NIfTI cut in half
        sitk.WriteImage(_image(np.zeros((8, 8, 8), np.float32)), str(tmp_path / "full.nii"))
        raw = (tmp_path / "full.nii").read_bytes()
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    else:
        path.write_bytes(content)
    with pytest.raises(InputError) as e:
        read_volume(path)
    assert "cannot read" in _message(e) and name in _message(e)


def test_2d_image(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7), np.uint8)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / "flat.nii.gz")
    assert "2D" in _message(e)
    sitk.WriteImage(_image(np.zeros((1, 6, 7), np.int16)), str(tmp_path / "one_slice.nrrd"))
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / "one_slice.nrrd")
    assert "2D" in _message(e) and "one_slice.nrrd" in _message(e)


def test_4d_image(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False),
                    str(tmp_path / "dyn.nii.gz"))
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / "dyn.nii.gz")
    assert "4D" in _message(e)


def test_vector_image(tmp_path):
    vec = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / "rgb.nrrd")
    assert "vector" in _message(e) and "3 components" in _message(e)


def test_complex_image():
    with pytest.raises(InputError) as e:
        validate_volume(sitk.Image([4, 4, 4], sitk.sitkComplexFloat32), "c.mha")
    assert "complex" in _message(e)


def test_empty_volume(tmp_path):
    with pytest.raises(InputError) as e:
        validate_volume(sitk.Image([0, 0, 0], sitk.sitkInt16), "empty.nrrd")
    assert "empty" in _message(e)
    (tmp_path / "empty.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 0 4 4\nencoding: raw\n\n")
    with pytest.raises(InputError):
        read_volume(tmp_path / "empty.nrrd")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])  # ITK's NIfTI reader turns NaN into 0 by itself
def test_nan_or_inf_voxels(tmp_path, bad, suffix):
    arr = np.zeros((3, 4, 5), np.float32)
    arr[1, 2, 3] = bad
    sitk.WriteImage(_image(arr), str(tmp_path / f"bad{suffix}"))
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / f"bad{suffix}")
    assert "NaN or infinite" in _message(e)


def test_truncated_nifti_is_refused(tmp_path):
    sitk.WriteImage(_image(np.ones((8, 9, 10), np.int16)), str(tmp_path / "full.nii"))
    raw = (tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-7])
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[:-7]))
    (tmp_path / "ok.nii.gz").write_bytes(gzip.compress(raw) + gzip.compress(b""))  # two gzip members: still whole
    for name in ("cut.nii", "cut.nii.gz"):
        with pytest.raises(InputError) as e:
            read_volume(tmp_path / name)
        assert "truncated" in _message(e) and name in _message(e)
    broken = gzip.compress(raw)
    (tmp_path / "broken.nii.gz").write_bytes(broken[: len(broken) // 2])
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / "broken.nii.gz")
    assert "broken.nii.gz" in _message(e)
    assert np.all(sitk.GetArrayFromImage(read_volume(tmp_path / "ok.nii.gz")) == 1)
    assert np.all(sitk.GetArrayFromImage(read_volume(tmp_path / "full.nii")) == 1)


# ------------------------------------------------------------------------------------------------ DICOM series

@pytest.fixture()
def dicom_folder(tmp_path):
    rng = np.random.default_rng(0)
    arr = (rng.random((6, 24, 20)) * 200 - 100).astype(np.int16)
    folder = tmp_path / "dicom"
    write_series(folder / "b", (rng.random((3, 24, 20)) * 50).astype(np.int16), series_suffix="2")
    img = write_series(folder / "a", arr, spacing=(0.7, 0.9, 3.0), origin=(-5.0, 12.0, -300.0), series_suffix="1")
    (folder / "README.txt").write_text("not DICOM")
    return folder, img, arr


def test_dicom_series_is_read_largest_first_or_by_uid(dicom_folder):
    folder, img, arr = dicom_folder
    series = list_dicom_series(folder)
    assert [n for _, n in series] == [6, 3]
    assert series[0][0].endswith(".1")
    vol = read_volume(folder)
    assert vol.GetPixelID() == sitk.sitkFloat32 and vol.GetSize() == (20, 24, 6)
    assert np.allclose(vol.GetSpacing(), (0.7, 0.9, 3.0)) and np.allclose(vol.GetOrigin(), (-5.0, 12.0, -300.0))
    assert np.array_equal(sitk.GetArrayFromImage(vol), arr.astype(np.float32))
    small = read_volume(folder, series_uid=series[1][0])
    assert small.GetSize() == (20, 24, 3)


def test_dicom_unknown_uid_and_folders_without_series(dicom_folder, tmp_path):
    folder, _, _ = dicom_folder
    with pytest.raises(InputError) as e:
        read_volume(folder, series_uid="1.2.3.4")
    assert "no DICOM series with SeriesInstanceUID 1.2.3.4" in _message(e)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(InputError) as e:
        read_volume(empty)
    assert "no DICOM image series" in _message(e)
    junk = tmp_path / "junk_folder"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(b"\0" * 200)
    (junk / "b.txt").write_text("hello")
    with pytest.raises(InputError) as e:
        read_volume(junk)
    assert "no DICOM image series" in _message(e)
    assert list_dicom_series(junk) == []


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    write_series(tmp_path / "gap", np.zeros((6, 8, 8), np.int16))
    (tmp_path / "gap" / "1_003.dcm").unlink()
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / "gap")
    assert "missing slices or uneven slice spacing" in _message(e)


def test_single_slice_dicom_series_is_2d(tmp_path):
    write_series(tmp_path / "one", np.zeros((1, 8, 8), np.int16))
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / "one")
    assert "2D" in _message(e)


# ------------------------------------------------------------------------------------------------ atomic output

def test_atomic_output_renames_on_success_with_same_suffix(tmp_path):
    target = tmp_path / "sub" / "deeper" / "out.nii.gz"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        sitk.WriteImage(_image(np.ones((2, 3, 4), np.uint8)), str(tmp))
    assert target.exists() and _no_temp_files(target.parent)
    assert sitk.ReadImage(str(target)).GetSize() == (4, 3, 2)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_output_refuses_existing_output_unless_overwrite(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(OutputError) as e:
        with atomic_output(target):
            pytest.fail("must not get here")
    assert "exists" in _message(e) and "overwrite" in _message(e)
    assert target.read_text() == "old"
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and _no_temp_files(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_leaves_nothing_on_failure(tmp_path, error):
    target = tmp_path / "out.nrrd"
    with pytest.raises(error):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"partial")
            raise error("boom")
    assert not target.exists() and _no_temp_files(tmp_path)
    target.write_text("old")
    with pytest.raises(error):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_bytes(b"partial")
            raise error("boom")
    assert target.read_text() == "old" and _no_temp_files(tmp_path)


def test_atomic_output_unwritable_places(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as e:
        with atomic_output(blocker / "out.nii.gz"):
            pass
    assert "cannot write" in _message(e)
    (tmp_path / "folder.nii.gz").mkdir()
    with pytest.raises(OutputError) as e:
        with atomic_output(tmp_path / "folder.nii.gz", overwrite=True):
            pass
    assert "folder" in _message(e)
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError):
                with atomic_output(ro / "out.nii.gz"):
                    pass
        finally:
            ro.chmod(0o700)


# ------------------------------------------------------------------------------------------------ labelmaps

def _labelmap(values=(0, 1, 2, 5), shape=(5, 6, 7), seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(values), size=shape).astype(np.uint16)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_labelmap_round_trip(tmp_path, suffix):
    arr = _labelmap()
    img = _image(arr)
    out = write_labelmap(img, tmp_path / f"labels{suffix}")
    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(back), arr)
    assert np.allclose(back.GetSpacing(), img.GetSpacing())
    assert np.allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    assert _no_temp_files(tmp_path)
    if suffix == ".nrrd":
        assert b"encoding: gzip" in out.read_bytes()[:1000]


def test_labelmap_uint16_above_255_and_checks(tmp_path):
    arr = _labelmap(values=(0, 3, 300))
    back = sitk.ReadImage(str(write_labelmap(_image(arr.astype(np.float32)), tmp_path / "big.nrrd")))
    assert back.GetPixelID() == sitk.sitkUInt16 and np.array_equal(sitk.GetArrayFromImage(back), arr)
    with pytest.raises(OutputError) as e:
        write_labelmap(_image(arr), tmp_path / "big.nrrd")
    assert "exists" in _message(e)
    write_labelmap(_image(np.zeros_like(arr)), tmp_path / "big.nrrd", overwrite=True)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "big.nrrd"))).max() == 0
    with pytest.raises(OutputError) as e:
        write_labelmap(_image(arr), tmp_path / "labels.png")
    assert "labels.png" in _message(e)
    with pytest.raises(InputError) as e:
        write_labelmap(_image(np.full((2, 3, 4), -1, np.int16)), tmp_path / "neg.nii.gz")
    assert "non-negative integer" in _message(e)
    with pytest.raises(InputError):
        write_labelmap(_image(np.full((2, 3, 4), 1.5, np.float32)), tmp_path / "frac.nii.gz")
    assert not (tmp_path / "neg.nii.gz").exists() and _no_temp_files(tmp_path)


# ------------------------------------------------------------------------------------------------ .seg.nrrd

CLASSES = class_entries(["liver", "spleen", "kidney_right", "inferior_vena_cava", "my_structure"])


def test_seg_nrrd_round_trip_with_slicerio(tmp_path):
    import slicerio

    arr = np.zeros((6, 7, 8), np.uint8)
    arr[1:4, 2:5, 1:6] = 1
    arr[4, 5:7, 6:8] = 3
    arr[0, 0, 0:3] = 5
    arr[5, 6, 7] = 9  # not a class: written as background
    img = _image(arr)
    out = write_seg_nrrd(img, tmp_path / "out.seg.nrrd", CLASSES)
    seg = slicerio.read_segmentation(str(out))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["Liver", "Right kidney", "My structure"]  # spleen and IVC absent
    kidney = slicerio.segment_from_name(seg, "Right kidney")
    assert kidney["labelValue"] == 3
    assert np.allclose(kidney["color"], np.array([185, 102, 83]) / 255.0, atol=1e-5)
    assert kidney["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert kidney["terminology"]["type"] == ["SCT", "64033007", "Kidney"]
    assert kidney["terminology"]["typeModifier"] == ["SCT", "24028007", "Right"]
    assert kidney["tags"][CLASS_TAG] == "kidney_right"
    liver = slicerio.segment_from_name(seg, "Liver")
    assert liver["terminology"]["type"][1] == "10200004" and "typeModifier" not in liver["terminology"]
    # geometry equal to the labelmap's
    expected = np.eye(4)
    expected[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    expected[:3, 3] = img.GetOrigin()
    assert np.allclose(seg["ijkToLPS"], expected, atol=1e-6)
    voxels = np.asarray(seg["voxels"])  # (i, j, k)
    expected_arr = np.where(arr == 9, 0, arr)
    assert np.array_equal(voxels.transpose(2, 1, 0), expected_arr)
    extracted = slicerio.extract_segments(seg, [("Liver", 1), ("Right kidney", 2)])
    assert int((np.asarray(extracted["voxels"]) == 2).sum()) == int((arr == 3).sum())
    assert _no_temp_files(tmp_path)
    with pytest.raises(OutputError):
        write_seg_nrrd(img, out, CLASSES)


def test_seg_nrrd_loads_in_slicer(tmp_path):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLSegmentationStorageNode"):
        pytest.skip("slicer-core without the Segmentations module")
    import vtk
    from vtk.util import numpy_support

    arr = np.zeros((6, 7, 8), np.uint8)
    arr[1:4, 2:5, 1:6] = 1
    arr[4, 5:7, 6:8] = 3
    img = _image(arr, direction=(0, 0, 1, 1, 0, 0, 0, 1, 0))
    out = write_seg_nrrd(img, tmp_path / "s.seg.nrrd", CLASSES)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(out))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    kidney = segmentation.GetSegment("Segment_3")
    assert kidney.GetName() == "Right kidney" and kidney.GetLabelValue() == 3
    assert np.allclose(kidney.GetColor(), np.array([185, 102, 83]) / 255.0, atol=1e-5)
    tag = vtk.reference("")
    assert kidney.GetTag("TerminologyEntry", tag) and "SCT^64033007^Kidney~SCT^24028007^Right" in str(tag)
    labelmap = kidney.GetRepresentation("Binary labelmap")
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    expected = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    assert np.allclose(lps[:3, :3], expected, atol=1e-6) and np.allclose(lps[:3, 3], img.GetOrigin(), atol=1e-6)
    scalars = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    assert int((scalars == 3).sum()) == int((arr == 3).sum())


# ------------------------------------------------------------------------------------------------ DICOM SEG

def test_dicom_seg_round_trip(dicom_folder, tmp_path):
    import highdicom as hd
    import pydicom

    folder, _, _ = dicom_folder
    uid = list_dicom_series(folder)[0][0]
    vol = read_volume(folder)
    lab = np.zeros(sitk.GetArrayFromImage(vol).shape, np.uint8)
    lab[1:4, 3:12, 2:9] = 1   # liver
    lab[2:5, 14:20, 10:18] = 3  # right kidney
    lab[5, 0:2, 0:2] = 5  # my_structure (no SNOMED code)
    labelmap = sitk.GetImageFromArray(lab)
    labelmap.CopyInformation(vol)
    out = write_dicom_seg(labelmap, folder, tmp_path / "seg.dcm", CLASSES)
    assert _no_temp_files(tmp_path)
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert {r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence} == {uid}
    labels = [s.SegmentLabel for s in ds.SegmentSequence]
    assert labels == ["Liver", "Right kidney", "My structure"]
    kidney = ds.SegmentSequence[1]
    assert kidney.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    prop = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("64033007", "SCT")
    assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert ds.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # generic tissue
    assert len(kidney.RecommendedDisplayCIELabValue) == 3
    seg = hd.seg.Segmentation.from_dataset(ds)
    assert seg.number_of_segments == 3
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((folder / "a").iterdir())]
    sources.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    pixels = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in sources], segment_numbers=[1, 2, 3],
                                               assert_missing_frames_are_empty=True)
    for k, value in enumerate([1, 3, 5]):
        assert np.array_equal(pixels[..., k] > 0, lab == value), value


def test_dicom_seg_errors(dicom_folder, tmp_path):
    folder, _, _ = dicom_folder
    vol = read_volume(folder)
    lab = np.zeros(sitk.GetArrayFromImage(vol).shape, np.uint8)
    lab[2, 3:6, 3:6] = 1
    good = sitk.GetImageFromArray(lab)
    good.CopyInformation(vol)
    shifted = sitk.GetImageFromArray(lab)
    shifted.CopyInformation(vol)
    shifted.SetOrigin(tuple(np.array(vol.GetOrigin()) + (0, 0, 1.5)))
    with pytest.raises(InputError) as e:
        write_dicom_seg(shifted, folder, tmp_path / "x.dcm", CLASSES)
    assert "grid" in _message(e)
    with pytest.raises(InputError) as e:
        write_dicom_seg(sitk.GetImageFromArray(lab[:, :, :-1].copy()), folder, tmp_path / "x.dcm", CLASSES)
    assert "grid" in _message(e)
    with pytest.raises(InputError) as e:
        write_dicom_seg(good, tmp_path / "nowhere", tmp_path / "x.dcm", CLASSES)
    empty = tmp_path / "no_dicom"
    empty.mkdir()
    with pytest.raises(InputError) as e:
        write_dicom_seg(good, empty, tmp_path / "x.dcm", CLASSES)
    assert "no DICOM image series" in _message(e)
    with pytest.raises(InputError) as e:
        write_dicom_seg(good, folder, tmp_path / "x.dcm", CLASSES, series_uid="9.9.9")
    assert "9.9.9" in _message(e)
    with pytest.raises(InputError) as e:
        write_dicom_seg(good, folder, tmp_path / "x.dcm", [dict(CLASSES[1], value=7)])
    assert "at least one segment" in _message(e)
    assert not (tmp_path / "x.dcm").exists() and _no_temp_files(tmp_path)
    write_dicom_seg(good, folder, tmp_path / "x.dcm", CLASSES)
    with pytest.raises(OutputError):
        write_dicom_seg(good, folder, tmp_path / "x.dcm", CLASSES)
    write_dicom_seg(good, folder, tmp_path / "x.dcm", CLASSES, overwrite=True)
