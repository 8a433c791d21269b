"""A small synthetic CT DICOM series written with SimpleITK (for DICOM input and DICOM SEG tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

UID_ROOT = "1.2.826.0.1.3680043.2.1125.77"


def write_series(folder: Path, arr: np.ndarray, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 30.0),
                 series_suffix: str = "1") -> sitk.Image:
    """Write (z, y, x) int16 ``arr`` as an axial CT series in ``folder``; returns the image it encodes."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    series = f"{UID_ROOT}.{series_suffix}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        s = img[:, :, k]
        tags = {
            "0010|0010": "Test^Patient", "0010|0020": "P1", "0020|000d": f"{UID_ROOT}.9", "0020|000e": series,
            "0020|0052": f"{UID_ROOT}.8", "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series}.2.{k}", "0020|0013": str(k + 1), "0020|0011": series_suffix,
            "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
            "0008|0020": "20240101", "0008|0030": "120000", "0008|0070": "MaskSAM tests",
        }
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_suffix}_{k:03d}.dcm"))
        writer.Execute(s)
    return img


def anonymise_series(folder: Path, blank=("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")) -> None:
    """Blank the ``blank`` attributes of every file in ``folder`` (and their file-meta copies), as anonymisers do:
    TotalSegmentator's DICOM example CT has empty SOP Class, SOP Instance and Study Instance UIDs."""
    import pydicom

    meta = {"SOPClassUID": "MediaStorageSOPClassUID", "SOPInstanceUID": "MediaStorageSOPInstanceUID"}
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for attribute in blank:
            setattr(ds, attribute, "")
            if attribute in meta:
                setattr(ds.file_meta, meta[attribute], "")
        ds.save_as(path)


def dciodvfy_errors(path: Path):
    """The ``Error`` lines of David Clunie's ``dciodvfy`` (dicom3tools) on ``path``, or None when it is not
    installed (``apt-get install dicom3tools``): an IOD validator independent of highdicom and pydicom."""
    import shutil
    import subprocess

    exe = shutil.which("dciodvfy")
    if exe is None:
        return None
    out = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def check_seg_references(seg_path: Path, source_folder: Path) -> None:
    """pydicom-level checks of a SEG against its source series (asserts): the Segmentation IOD's identity, the
    source's study, frame of reference and series, every referenced image present in the source, and one
    per-frame functional group, with a source image of the source and a segment (there or, with one segment, in the
    shared groups), per frame."""
    import pydicom

    seg = pydicom.dcmread(seg_path)
    source = {}
    for path in source_folder.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        source[str(ds.SOPInstanceUID)] = ds
    first = next(iter(source.values()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.file_meta.MediaStorageSOPInstanceUID == seg.SOPInstanceUID and seg.SOPInstanceUID not in source
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    refs = [(s.SeriesInstanceUID, i.ReferencedSOPInstanceUID, i.ReferencedSOPClassUID)
            for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
    assert refs and all(series == first.SeriesInstanceUID for series, _, _ in refs)
    assert all(uid in source and cls == source[uid].SOPClassUID for _, uid, cls in refs)
    assert len(seg.PerFrameFunctionalGroupsSequence) == int(seg.NumberOfFrames) > 0
    for group in seg.PerFrameFunctionalGroupsSequence:
        uids = [s.ReferencedSOPInstanceUID for d in group.DerivationImageSequence for s in d.SourceImageSequence]
        assert uids and all(uid in source for uid in uids)
        ident = group if "SegmentIdentificationSequence" in group else seg.SharedFunctionalGroupsSequence[0]
        assert 1 <= int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber) <= len(seg.SegmentSequence)
