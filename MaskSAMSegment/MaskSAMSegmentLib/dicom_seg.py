"""Segmentation node -> DICOM SEG that references the DICOM series its volume was loaded from (MRML, no Qt).

The segments go onto the volume's grid as a labelmap (:func:`mrml_io.export_segments_on_volume_grid`), and the
engine's own writer (:func:`masksam_core.data.volume_io.write_dicom_seg`, highdicom) turns that labelmap, the
source series and the segments' names, colours and terminology into a binary DICOM SEG, written atomically.

:func:`export_dicom_seg` takes the source files as a list (testable without a DICOM database);
:func:`export_dicom_seg_for_volume` finds them through Slicer's DICOM database from the volume's
``DICOM.instanceUIDs`` attribute, which Slicer's DICOM loader sets.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import slicer

from masksam_core.data.volume_io import CLASS_TAG
from masksam_core.errors import InputError

from . import mrml_io

#: node attribute Slicer's DICOM loader sets on a volume: the SOP Instance UIDs of its files, space-separated
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
NOT_FROM_DICOM = "DICOM SEG export needs a volume loaded from DICOM"

BASE_FILTERS = "Labelmap (*.nii.gz *.nrrd);;Slicer segmentation (*.seg.nrrd)"
DICOM_SEG_FILTER = "DICOM SEG (*.dcm)"


def missing_packages() -> List[str]:
    """pip names of the packages DICOM SEG export needs that cannot be imported."""
    return [pip for module, pip in (("highdicom", "highdicom"), ("pydicom", "pydicom"))
            if importlib.util.find_spec(module) is None]


def has_dicom_source(volume_node) -> bool:
    """Whether the volume was loaded from DICOM (so that a DICOM SEG can reference its series)."""
    return volume_node is not None and bool((volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split())


def export_file_filters(volume_node) -> str:
    """File-dialog filters of the Export button: DICOM SEG only for a volume loaded from DICOM."""
    return BASE_FILTERS + (";;" + DICOM_SEG_FILTER if has_dicom_source(volume_node) else "")


# ------------------------------------------------------------------------------------------------ segments

def _tag(segment, name: str) -> str:
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


def _code(text: str) -> Optional[List[str]]:
    """``scheme^value^meaning`` -> ``[value, scheme, meaning]`` (the order of masksam_core's class entries)."""
    parts = text.split("^")
    if len(parts) < 3 or not parts[0].strip() or not parts[1].strip():
        return None
    return [parts[1].strip(), parts[0].strip(), "^".join(parts[2:]).strip() or parts[1].strip()]


def snomed_from_terminology(tag: str) -> Optional[Dict]:
    """Slicer's terminology tag (``context~category~type~typeModifier~...``) -> a class entry's ``snomed``
    (``{"category", "type", "modifier"}``), or None without a type code (the writer then uses Tissue)."""
    fields = tag.split("~") if tag else []
    if len(fields) < 3:
        return None
    category, type_ = _code(fields[1]), _code(fields[2])
    if type_ is None:
        return None
    modifier = _code(fields[3]) if len(fields) > 3 else None
    return {"category": category, "type": type_, "modifier": modifier}


def segment_class_entries(segmentation_node, segment_ids: Sequence[str]) -> List[Dict]:
    """Class entries (masksam_core's model-card form) for the segments, value k+1 for the k-th id: the segment's
    name as label, its colour, and the SNOMED CT codes of its terminology tag."""
    seg = segmentation_node.GetSegmentation()
    entries = []
    for k, sid in enumerate(segment_ids):
        segment = seg.GetSegment(sid)
        name = segment.GetName() or f"Segment {k + 1}"
        entries.append({
            "value": k + 1,
            "name": _tag(segment, CLASS_TAG) or name,
            "display_name": name,
            "color": [int(round(255 * min(max(c, 0.0), 1.0))) for c in segment.GetColor()],
            "snomed": snomed_from_terminology(_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName())),
        })
    return entries


def overlapping_voxels(segmentation_node, volume_node, segment_ids: Sequence[str]) -> int:
    """Voxels of the volume's grid claimed by more than one segment (0 when the segments cannot overlap)."""
    import numpy as np

    seg = segmentation_node.GetSegmentation()
    source = (seg.GetSourceRepresentationName() if hasattr(seg, "GetSourceRepresentationName")
              else seg.GetMasterRepresentationName())
    if source == slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName() \
            and seg.GetNumberOfLayers() <= 1:
        return 0  # one shared labelmap layer: a voxel holds one segment at most
    count = None
    for _sid, mask in mrml_io.segment_masks_on_volume_grid(segmentation_node, volume_node, segment_ids):
        count = mask.astype(np.uint16) if count is None else count + mask
    return int((count > 1).sum()) if count is not None else 0


def _link_or_copy(src: str, dst: Path) -> None:
    try:
        os.symlink(os.path.abspath(src), dst)
    except (OSError, NotImplementedError):  # no symlinks (Windows without the privilege)
        shutil.copyfile(src, dst)


# -------------------------------------------------------------------------------------------------- export

def export_dicom_seg(segmentation_node, volume_node, source_files: Sequence[str], path: str,
                     overwrite: bool = True) -> Path:
    """Write the segmentation as a DICOM SEG referencing ``source_files`` (the DICOM series of ``volume_node``).

    All segments are written (empty ones are left out by the writer), each with its name, colour and
    terminology. Raises :class:`InputError` with a one-line message when files are missing, the segmentation is
    empty, segments overlap (a DICOM SEG from one labelmap cannot hold both), or the volume's grid is not the
    series' grid (a resampled or cropped volume).
    """
    import pydicom
    import SimpleITK as sitk

    from masksam_core.data.volume_io import write_dicom_seg

    files = [str(f) for f in source_files]
    if not files:
        raise InputError("no source DICOM files: a DICOM SEG must reference the series the volume came from")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise InputError(f"{len(missing)} of {len(files)} source DICOM files are missing (first: {missing[0]})")
    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("DICOM SEG export needs the volume the segmentation was made on")
    seg = segmentation_node.GetSegmentation()
    segment_ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    if not segment_ids:
        raise InputError(f"'{segmentation_node.GetName()}' has no segments: nothing to export")
    try:
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True,
                                         specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        raise InputError(f"{files[0]} is not a readable DICOM file ({exc})") from None
    overlap = overlapping_voxels(segmentation_node, volume_node, segment_ids)
    if overlap:
        raise InputError(f"{overlap} voxels belong to more than one segment; a DICOM SEG written from one "
                         "labelmap cannot keep both: remove the overlap in Segment Editor first")
    classes = segment_class_entries(segmentation_node, segment_ids)
    with tempfile.TemporaryDirectory(prefix="masksam-dicomseg-") as tmp_name:
        tmp = Path(tmp_name)
        series = tmp / "series"  # exactly the volume's files, whatever else lies beside them
        series.mkdir()
        for k, f in enumerate(files):
            _link_or_copy(f, series / f"{k:06d}.dcm")
        labelmap = sitk.ReadImage(mrml_io.export_segments_on_volume_grid(
            segmentation_node, volume_node, str(tmp / "labels.nrrd"), segment_ids))
        return write_dicom_seg(labelmap, series, path, classes, overwrite=overwrite, series_uid=series_uid)


def source_files_from_database(volume_node, database) -> List[str]:
    """The volume's DICOM files, from its ``DICOM.instanceUIDs`` through ``database.fileForInstance``."""
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split() if volume_node is not None else []
    if not uids:
        name = volume_node.GetName() if volume_node is not None else "no volume"
        raise InputError(f"{NOT_FROM_DICOM} ('{name}' has no {INSTANCE_UIDS_ATTRIBUTE} attribute): load the series "
                         "with the DICOM module, or export as .seg.nrrd or a labelmap")
    if database is None or (hasattr(database, "isOpen") and not database.isOpen):
        raise InputError("DICOM SEG export needs Slicer's DICOM database, which is not open: open the DICOM module")
    files, missing = [], []
    for uid in uids:
        found = database.fileForInstance(uid)
        if found and os.path.isfile(found):
            files.append(found)
        else:
            missing.append(found or uid)
    if missing:
        raise InputError(f"{len(missing)} of {len(uids)} DICOM files of '{volume_node.GetName()}' are missing from "
                         f"the DICOM database or from disk (first: {missing[0]}); re-import the series")
    return files


def export_dicom_seg_for_volume(segmentation_node, volume_node, path: str, database=None,
                                overwrite: bool = True) -> Path:
    """:func:`export_dicom_seg` with the source files found in Slicer's DICOM database (default
    ``slicer.dicomDatabase``)."""
    if database is None:
        database = getattr(slicer, "dicomDatabase", None)
    files = source_files_from_database(volume_node, database)
    return export_dicom_seg(segmentation_node, volume_node, files, path, overwrite=overwrite)
