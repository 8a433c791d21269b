"""Scene -> nnU-Net v2 raw dataset: (volume, segmentation) pairs with segments mapped to model classes.

Segments map to classes by MaskSAM's own tag (segments made by MaskSAMSegment), by name (class name or display
name, case and spaces/underscores ignored), by SNOMED CT terminology (type + laterality), or through a manual
mapping {segment name: class name}. Unmapped segments are reported, never silently dropped: the caller shows them
and writing refuses to proceed unless the user chose to ignore them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer

from masksam_core.fileutil import atomic_folder
from masksam_core.labels import ORGANS

from masksam_core.data.volume_io import CLASS_TAG  # noqa: E402  (the tag write_seg_nrrd and import_result set)


def _norm(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _tag(segment, name: str) -> str:
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


def class_for_segment(segment, class_names: Sequence[str], manual: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The model class a segment stands for, or None."""
    name = segment.GetName()
    if manual and name in manual:
        return manual[name] if manual[name] in class_names else None
    tagged = _tag(segment, CLASS_TAG)
    if tagged in class_names:
        return tagged
    by_norm = {}
    for cls in class_names:
        by_norm[_norm(cls)] = cls
        if cls in ORGANS:
            by_norm[_norm(ORGANS[cls][0])] = cls
    if _norm(name) in by_norm:
        return by_norm[_norm(name)]
    term = _tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName())
    if term:
        for cls in class_names:
            if cls in ORGANS:
                _, _, type_code, modifier = ORGANS[cls]
                if f"^{type_code[0]}^" in f"^{term}^".replace("~", "^") and (
                        modifier is None or modifier[0] in term):
                    return cls
    return None


def map_segments(segmentation_node, class_names: Sequence[str],
                 manual: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, str], List[str]]:
    """({segment id: class name}, [names of unmapped segments])."""
    seg = segmentation_node.GetSegmentation()
    mapping, unmapped = {}, []
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        cls = class_for_segment(seg.GetSegment(sid), class_names, manual)
        if cls is None:
            unmapped.append(seg.GetSegment(sid).GetName())
        else:
            mapping[sid] = cls
    return mapping, unmapped


def _labelmap_array(segmentation_node, segment_ids: List[str], volume_node) -> np.ndarray:
    """(z, y, x) array of segment indices 1..len(ids) on the volume's grid (resampled there by Slicer)."""
    import vtk

    scene = volume_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ids = vtk.vtkStringArray()
        for sid in segment_ids:
            ids.InsertNextValue(sid)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node)
        if not ok:
            raise RuntimeError("Slicer could not export the segments onto the volume's grid")
        arr = slicer.util.arrayFromVolume(labelmap).copy()
        dims = labelmap.GetImageData().GetDimensions()
        if tuple(arr.shape[::-1]) != tuple(volume_node.GetImageData().GetDimensions()) or dims is None:
            raise RuntimeError("the exported segmentation does not lie on the volume's grid")
        return arr
    finally:
        scene.RemoveNode(labelmap)


def write_dataset(cases: Sequence[Tuple[object, object]], class_names: Sequence[str], folder: str,
                  manual: Optional[Dict[str, str]] = None, ignore_unmapped: bool = False) -> Dict:
    """Write the cases as ``imagesTr/``, ``labelsTr/``, ``dataset.json`` into ``folder`` (atomically)."""
    import SimpleITK as sitk

    from MaskSAMSegmentLib.mrml_io import write_volume_node

    if not cases:
        raise ValueError("no training cases: add at least one (volume, segmentation) pair")
    report = {"cases": [], "unmapped": {}}
    with atomic_folder(Path(folder)) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for k, (volume, segmentation) in enumerate(cases):
            case = f"case{k:03d}"
            mapping, unmapped = map_segments(segmentation, class_names, manual)
            if unmapped:
                report["unmapped"][case] = unmapped
                if not ignore_unmapped:
                    raise ValueError(f"{segmentation.GetName()}: segments not mapped to a model class: "
                                     f"{', '.join(unmapped)}")
            image_path = tmp / "imagesTr" / f"{case}_0000.nii.gz"
            write_volume_node(volume, str(image_path))
            ids = list(mapping)
            arr = _labelmap_array(segmentation, ids, volume) if ids else None
            image = sitk.ReadImage(str(image_path))
            lut = np.zeros(len(ids) + 1, np.uint8)
            for i, sid in enumerate(ids):
                lut[i + 1] = list(class_names).index(mapping[sid]) + 1
            lab = lut[arr] if arr is not None else np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
            label = sitk.GetImageFromArray(lab.astype(np.uint8))
            label.CopyInformation(image)
            sitk.WriteImage(label, str(tmp / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
            report["cases"].append({"case": case, "volume": volume.GetName(), "segmentation": segmentation.GetName(),
                                    "classes": sorted(set(mapping.values()))})
        labels = {"background": 0, **{name: i + 1 for i, name in enumerate(class_names)}}
        (tmp / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz",
            "description": "Written by MaskSAMTrainer from a 3D Slicer scene"}, indent=2))
    return report


def absent_class_notes(report: Dict, class_names: Sequence[str]) -> List[str]:
    """One line per written case that has no segment for some of the model's classes: those voxels are background
    in its labelmap, so fine-tuning teaches the model to leave these organs out there (correct it, or add the
    missing segments, when the organ is in the scan)."""
    notes = []
    for case in report.get("cases", []):
        present = set(case.get("classes", []))
        absent = [c for c in class_names if c not in present]
        if absent:
            notes.append(f"{case['case']} ({case['volume']}): no segment for {', '.join(absent)}; where these "
                         f"organs are in the scan, fine-tuning learns them as background")
    return notes

