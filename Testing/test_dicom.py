"""DICOM series input and DICOM SEG output."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_fixture import write_series
from masksam_core.data.volume_io import list_dicom_series, read_volume, write_dicom_seg
from masksam_core.errors import InputError
from masksam_core.labels import class_entries


@pytest.fixture()
def series(tmp_path):
    arr = (np.random.default_rng(0).random((5, 32, 40)) * 100).astype(np.int16)
    small = (np.random.default_rng(1).random((3, 32, 40)) * 100).astype(np.int16)
    write_series(tmp_path / "dicom", small, series_suffix="2")
    img = write_series(tmp_path / "dicom", arr, series_suffix="1")
    return tmp_path / "dicom", img, arr


def test_largest_series_is_read_with_its_geometry(series):
    folder, img, arr = series
    assert [n for _, n in list_dicom_series(folder)] == [5, 3]
    vol = read_volume(folder)
    assert vol.GetSize() == img.GetSize()
    assert np.allclose(vol.GetSpacing(), img.GetSpacing()) and np.allclose(vol.GetOrigin(), img.GetOrigin())
    assert np.array_equal(sitk.GetArrayFromImage(vol), arr.astype(np.float32))
    other = read_volume(folder, series_uid=list_dicom_series(folder)[1][0])
    assert other.GetSize()[2] == 3
    with pytest.raises(InputError, match="no DICOM series with SeriesInstanceUID"):
        read_volume(folder, series_uid="1.2.3")


def test_dicom_seg_references_the_series(series, tmp_path):
    import highdicom as hd
    import pydicom

    folder, _, _ = series
    uid = list_dicom_series(folder)[0][0]
    vol = read_volume(folder, series_uid=uid)
    lab = np.zeros(sitk.GetArrayFromImage(vol).shape, np.uint8)
    lab[1:4, 5:20, 5:20] = 1
    lab[2, 22:30, 22:35] = 2
    labelmap = sitk.GetImageFromArray(lab)
    labelmap.CopyInformation(vol)
    out = tmp_path / "seg.dcm"
    write_dicom_seg(labelmap, folder, out, class_entries(["liver", "spleen", "aorta"]), series_uid=uid)
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Liver", "Spleen"]
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    refs = {r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence}
    assert refs == {uid}
    seg = hd.seg.Segmentation.from_dataset(ds)
    assert seg.number_of_segments == 2
    wrong = sitk.GetImageFromArray(lab[:, :, :30].copy())
    with pytest.raises(InputError, match="grid"):
        write_dicom_seg(wrong, folder, tmp_path / "x.dcm", class_entries(["liver"]), series_uid=uid)
