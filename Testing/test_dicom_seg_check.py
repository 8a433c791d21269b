"""DICOM SEG from real-world series: a source a SEG cannot reference is refused before any model work, and every
SEG written is checked by an independent validator (dicom3tools' ``dciodvfy``) and against its source."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_fixture import anonymise_series, check_seg_references, dciodvfy_errors, write_series
from masksam_core.cli_util import run_cli
from masksam_core.data.dicom_seg_check import built_seg_problem, check_seg_source
from masksam_core.data.volume_io import read_volume, write_dicom_seg
from masksam_core.errors import InputError
from masksam_core.labels import class_entries

WORKING = "write nii.gz, nrrd or seg.nrrd instead"


def _series(folder):
    arr = (np.random.default_rng(0).random((5, 32, 40)) * 100).astype(np.int16)
    write_series(folder, arr)
    return folder


def _labelmap(folder):
    vol = read_volume(folder)
    lab = np.zeros(sitk.GetArrayFromImage(vol).shape, np.uint8)
    lab[1:4, 5:20, 5:20] = 1
    lab[2, 22:30, 22:35] = 2
    labelmap = sitk.GetImageFromArray(lab)
    labelmap.CopyInformation(vol)
    return labelmap


def _require_dciodvfy():
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools, `apt-get install dicom3tools`) is not installed: the independent DICOM "
                    "validator is needed for this check")


@pytest.mark.parametrize("blank, reason", [
    (("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"), "all of its 5 images have no SOP Instance UID"),
    (("SOPInstanceUID", "StudyInstanceUID"), "all of its 5 images have no SOP Instance UID"),  # SOP class filled in
    (("StudyInstanceUID",), "all of its 5 images have no Study Instance UID"),
    (("FrameOfReferenceUID",), "all of its 5 images have no Frame of Reference UID"),
])
def test_an_anonymised_series_is_refused_in_one_line_with_the_formats_that_work(tmp_path, blank, reason):
    folder = _series(tmp_path / "dicom")
    anonymise_series(folder, blank)
    with pytest.raises(InputError) as info:
        check_seg_source(folder)
    message = str(info.value)
    assert reason in message and "anonymised" in message and message.endswith(WORKING)
    assert len(message.splitlines()) == 1
    with pytest.raises(InputError, match="no SOP Instance UID|no Study Instance UID|no Frame of Reference UID"):
        write_dicom_seg(_labelmap(folder), folder, tmp_path / "seg.dcm", class_entries(["liver", "spleen"]))
    assert not (tmp_path / "seg.dcm").exists() and not list(tmp_path.glob(".seg*"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's, about the UID made invalid on purpose
def test_other_unreferenceable_sources_are_refused(tmp_path):
    import pydicom

    folder = _series(tmp_path / "dicom")
    files = sorted(folder.glob("*.dcm"))
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = pydicom.dcmread(files[0]).SOPInstanceUID  # two images, one UID
    ds.save_as(files[1])
    with pytest.raises(InputError, match="1 of its images repeat another image's SOP Instance UID"):
        check_seg_source(folder)
    ds.SOPInstanceUID = "1.2.3.abc"  # not a UID
    ds.save_as(files[1])
    with pytest.raises(InputError, match="1 of its 5 images have no valid SOP Instance UID"):
        check_seg_source(folder)
    volume = tmp_path / "ct.nii.gz"
    sitk.WriteImage(read_volume(_series(tmp_path / "good")), str(volume))
    with pytest.raises(InputError, match="needs a DICOM series folder as input, and ct.nii.gz is a volume file") as info:
        check_seg_source(volume)
    assert str(info.value).endswith(WORKING)
    check_seg_source(tmp_path / "good")  # a complete series passes


def test_the_seg_written_passes_an_independent_validator_and_references_its_source(tmp_path):
    folder = _series(tmp_path / "dicom")
    out = tmp_path / "seg.dcm"
    write_dicom_seg(_labelmap(folder), folder, out, class_entries(["liver", "spleen"]))
    check_seg_references(out, folder)
    _require_dciodvfy()
    assert dciodvfy_errors(out) == []


def test_a_source_without_the_patient_and_study_attributes_gives_a_valid_seg(tmp_path):
    """Anonymisers also remove the Type 2 patient and study attributes a SEG copies: they are written empty, as the
    standard allows, instead of failing after the segmentation."""
    import pydicom

    from masksam_core.data.dicom_seg_check import TYPE2_COPIED

    folder = _series(tmp_path / "dicom")
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for attribute in TYPE2_COPIED:
            delattr(ds, attribute)
        ds.save_as(path)
    check_seg_source(folder)
    out = tmp_path / "seg.dcm"
    write_dicom_seg(_labelmap(folder), folder, out, class_entries(["liver", "spleen"]))
    seg = pydicom.dcmread(out)
    assert all(attribute in seg and not seg.get(attribute) for attribute in TYPE2_COPIED)
    assert "PatientID" not in pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])  # the source is left as it was
    check_seg_references(out, folder)
    _require_dciodvfy()
    assert dciodvfy_errors(out) == []


def test_the_validator_and_the_reference_check_catch_a_seg_with_empty_references(tmp_path):
    """What the unchecked writer produced from a series with only its SOP class filled in: the validator used above
    is not blind to it, and neither is the writer's own last check."""
    import pydicom

    folder = _series(tmp_path / "dicom")
    out = tmp_path / "seg.dcm"
    write_dicom_seg(_labelmap(folder), folder, out, class_entries(["liver"]))
    seg = pydicom.dcmread(out)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    assert built_seg_problem(seg, sources) is None
    for group in seg.PerFrameFunctionalGroupsSequence:
        group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = ""
    assert "names no source image" in built_seg_problem(seg, sources)
    for series in seg.ReferencedSeriesSequence:
        for item in series.ReferencedInstanceSequence:
            item.ReferencedSOPInstanceUID = ""
    assert "references an image (empty UID)" in built_seg_problem(seg, sources)
    seg.save_as(tmp_path / "broken.dcm")
    _require_dciodvfy()
    errors = dciodvfy_errors(tmp_path / "broken.dcm")
    assert any("ReferencedSOPInstanceUID" in e and "Empty attribute" in e for e in errors), errors


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from masksam_core.model.__main__ import main

    out = tmp_path_factory.mktemp("models") / "untrained"
    assert main(["init", "--classes", "liver,spleen", "--out", str(out), "--slab-depth", "2", "--num-queries", "3",
                 "--spacing", "6,6,6"]) == 0
    return out


def test_predict_refuses_before_any_model_work(model_dir, tmp_path, capsys, monkeypatch):
    """An anonymised series, or a NIfTI volume, with a DICOM SEG asked for: one line, exit code 2, before the
    volume is read or the model loaded, and nothing written."""
    import masksam_core
    import masksam_core.data.volume_io as volume_io
    from masksam_core.predict import main

    def not_now(*args, **kwargs):
        raise AssertionError("model work started")

    monkeypatch.setattr(masksam_core, "load_model", not_now)
    monkeypatch.setattr(volume_io, "read_volume", not_now)
    folder = _series(tmp_path / "dicom")
    anonymise_series(folder)
    volume = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 16, 16), np.float32)), str(volume))
    for source, out, extra, reason in (
            (folder, tmp_path / "seg.dcm", [], "no SOP Instance UID"),
            (folder, tmp_path / "seg", ["--format", "dicom-seg"], "no SOP Instance UID"),
            (volume, tmp_path / "seg.dcm", [], "needs a DICOM series folder as input")):
        code = run_cli(main, ["-i", str(source), "-o", str(out), "--model", str(model_dir)] + extra)
        err = capsys.readouterr().err
        assert code == 2 and reason in err and WORKING in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not out.with_suffix(".json").exists()


def test_predict_writes_a_valid_seg_of_a_complete_series(model_dir, tmp_path, capsys, monkeypatch):
    """predict end to end on a complete series (the untrained model's labels replaced by known ones): the SEG has a
    segment per organ found, references its source and passes the validator."""
    import masksam_core.inference.engine as engine
    from masksam_core.predict import main

    def two_organs(probs):
        labels = np.zeros(probs.shape[1:], np.uint8)
        labels[:, : labels.shape[1] // 2] = 1
        labels[:, labels.shape[1] // 2:, : labels.shape[2] // 2] = 2
        return labels, np.ones(probs.shape[1:], np.float32)

    monkeypatch.setattr(engine, "fuse_labels", two_organs)
    arr = np.full((4, 40, 48), -1000, np.int16)
    arr[:, 8:32, 8:40] = 40
    folder = tmp_path / "dicom"
    write_series(folder, arr)
    out = tmp_path / "seg.dcm"
    code = run_cli(main, ["-i", str(folder), "-o", str(out), "--model", str(model_dir), "--progress", "json",
                         "--runtime", "torch"])  # no OpenVINO conversion: this test is about the SEG
    assert code == 0, capsys.readouterr().err
    import pydicom

    ds = pydicom.dcmread(out)
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Liver", "Spleen"] == [
        {"liver": "Liver", "spleen": "Spleen"}[n] for n in sidecar["organs"]]
    check_seg_references(out, folder)
    _require_dciodvfy()
    assert dciodvfy_errors(out) == []
