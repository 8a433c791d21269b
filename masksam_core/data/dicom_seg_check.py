"""Can a DICOM SEG reference this source? Checked before any model work (``predict --format dicom-seg``) and again
on the SEG built, before it is written: a SEG is only valid when it names, by UID, the study, series, frame of
reference and every image it segments.

Real-world series often cannot be referenced: anonymisers blank the SOP Instance, SOP Class and Study Instance UIDs
(TotalSegmentator's DICOM example CT has all three empty), which highdicom either fails on deep inside (``KeyError:
''``) or turns into a SEG whose references are empty. Such a source is refused with one line that says why and
which formats work instead; the DICOM standard offers no way to reference an image without its UID. What the
standard does allow is handled: the Patient and General Study attributes a SEG copies from its source are Type 2
(present, possibly empty), so when an anonymiser removed them they are copied as empty (:func:`fill_type2`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import InputError, OutputError

#: the formats that need no DICOM references, named in every refusal
OTHER_FORMATS = "nii.gz, nrrd or seg.nrrd"

#: (attribute, how a message names it): the UIDs a SEG copies from or references in its source images
REQUIRED_UIDS = (
    ("SOPInstanceUID", "SOP Instance UID"),
    ("SOPClassUID", "SOP Class UID"),
    ("StudyInstanceUID", "Study Instance UID"),
    ("SeriesInstanceUID", "Series Instance UID"),
    ("FrameOfReferenceUID", "Frame of Reference UID"),
)
#: the geometry a SEG's plane positions and orientation are taken from
REQUIRED_GEOMETRY = (
    ("ImagePositionPatient", "Image Position (Patient)"),
    ("ImageOrientationPatient", "Image Orientation (Patient)"),
    ("PixelSpacing", "Pixel Spacing"),
)
#: the Type 2 attributes of the Patient and General Study modules that a SEG copies from its source (highdicom
#: fails on a source without them); empty is valid
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: one value shared by every image of a series that one SEG can reference
SHARED = (("StudyInstanceUID", "studies"), ("SeriesInstanceUID", "series"),
          ("FrameOfReferenceUID", "frames of reference"), ("SOPClassUID", "SOP classes"))


def is_valid_uid(value) -> bool:
    """A non-empty DICOM UID of valid syntax (digits and dots, no leading zeros, at most 64 characters)."""
    from pydicom.uid import UID

    return bool(value) and UID(str(value)).is_valid


def _is_image_storage(sop_class: str) -> bool:
    from pydicom.uid import UID

    return UID(str(sop_class)).name.endswith("Image Storage")


def reference_problem(datasets: Sequence) -> Optional[str]:
    """Why a DICOM SEG cannot reference the images ``datasets`` (pydicom headers), or None when it can."""
    n = len(datasets)
    if n == 0:
        return "the series holds no images"
    for attribute, label in REQUIRED_UIDS:
        bad = [ds for ds in datasets if not is_valid_uid(ds.get(attribute))]
        if bad:
            empty = sum(1 for ds in bad if not ds.get(attribute))
            what = "no" if empty == len(bad) else "no valid"
            return (f"{'all' if len(bad) == n else len(bad)} of its {n} images have {what} {label}"
                    + (" (an anonymised series?)" if empty else ""))
    for attribute, plural in SHARED:
        values = {str(ds.get(attribute)) for ds in datasets}
        if len(values) > 1:
            return f"its images belong to {len(values)} different {plural}"
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if len(set(uids)) != n:
        return f"{n - len(set(uids))} of its images repeat another image's SOP Instance UID"
    sop_class = str(datasets[0].SOPClassUID)
    if not _is_image_storage(sop_class):
        return f"its SOP Class UID {sop_class} is not a DICOM image storage class"
    multiframe = n == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1
    if not multiframe:  # an enhanced multi-frame image keeps its geometry in functional groups
        for attribute, label in REQUIRED_GEOMETRY:
            missing = sum(1 for ds in datasets if not ds.get(attribute))
            if missing:
                return f"{'all' if missing == n else missing} of its {n} images have no {label}"
    return None


def read_headers(files: Sequence[str], folder: Path) -> List:
    """The pydicom headers (no pixel data) of ``files``; an InputError when one cannot be read."""
    import pydicom

    try:
        return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        text = str(exc).strip().splitlines()
        raise InputError(f"cannot read the DICOM files in {folder} ({text[-1][:160] if text else type(exc).__name__})"
                         ) from None


def fill_type2(datasets: Sequence) -> None:
    """Give each header (in memory; the files are not touched) an empty value for each :data:`TYPE2_COPIED`
    attribute it lacks, so that the SEG copies it as the empty Type 2 value the standard allows."""
    for ds in datasets:
        for attribute in TYPE2_COPIED:
            if attribute not in ds:
                setattr(ds, attribute, "")


def check_seg_datasets(datasets: Sequence, folder: Path) -> None:
    """An InputError (one line: why, and the formats that work) when a SEG cannot reference ``datasets``."""
    problem = reference_problem(datasets)
    if problem:
        raise InputError(f"cannot write a DICOM SEG for the series in {folder}: {problem}, and a SEG must reference "
                         f"its images by UID; write {OTHER_FORMATS} instead")


def check_seg_source(source: os.PathLike, series_uid: Optional[str] = None) -> None:
    """Before segmenting for ``--format dicom-seg``: ``source`` must be a DICOM series folder (the series
    ``read_volume`` reads: the largest, or ``series_uid``) whose images a SEG can reference
    (:func:`reference_problem`); otherwise a one-line InputError naming the formats that work."""
    from .volume_io import _series_files

    src = Path(source)
    if not src.is_dir():
        raise InputError(f"--format dicom-seg needs a DICOM series folder as input, and {src.name} is a volume "
                         f"file: a DICOM SEG references the DICOM images it segments; write {OTHER_FORMATS} instead")
    check_seg_datasets(read_headers(_series_files(src, series_uid), src), src)


def built_seg_problem(seg, datasets: Sequence) -> Optional[str]:
    """Why the built SEG ``seg`` (a pydicom dataset) does not reference ``datasets`` properly, or None: its study,
    frame of reference and referenced series are the source's, every referenced image exists in the source (none
    empty), and it has one per-frame functional group, with a source image, for each of its frames."""
    source = {str(ds.SOPInstanceUID): ds for ds in datasets}
    first = datasets[0]
    for attribute in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if str(seg.get(attribute, "")) != str(first.get(attribute, "")) or not is_valid_uid(seg.get(attribute)):
            return f"its {attribute} is not the source's"
    referenced = [(str(series.SeriesInstanceUID), str(item.ReferencedSOPInstanceUID))
                  for series in seg.get("ReferencedSeriesSequence", [])
                  for item in series.get("ReferencedInstanceSequence", [])]
    if not referenced:
        return "it references no source image"
    for series_uid, uid in referenced:
        if series_uid != str(first.SeriesInstanceUID) or uid not in source:
            return f"it references an image ({uid or 'empty UID'}) that is not in the source series"
    frames = int(seg.get("NumberOfFrames", 0) or 0)
    groups = seg.get("PerFrameFunctionalGroupsSequence", [])
    if frames < 1 or len(groups) != frames:
        return f"it has {frames} frames but {len(groups)} per-frame functional groups"
    for group in groups:
        derivations = group.get("DerivationImageSequence", [])
        sources = [str(s.ReferencedSOPInstanceUID) for d in derivations for s in d.get("SourceImageSequence", [])]
        if not sources or any(uid not in source for uid in sources):
            return "a frame names no source image, or one that is not in the source series"
    return None


def check_built_seg(seg, datasets: Sequence, target: Path) -> None:
    """An OutputError (nothing is written) when :func:`built_seg_problem` finds one: never an invalid file."""
    problem = built_seg_problem(seg, datasets)
    if problem:
        raise OutputError(f"not writing {target.name}: the DICOM SEG built is invalid ({problem}); write "
                          f"{OTHER_FORMATS} instead")
