"""Between MRML nodes and the engine's files, with exact geometry.

Slicer stores volumes in RAS; files are LPS. All conversions go through Slicer's own storage nodes, so the
physical geometry (origin, spacing, direction) survives exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import slicer

from masksam_core.labels import terminology_tag


def write_volume_node(volume_node, path: str) -> str:
    """Write a scalar volume node to ``path`` (NRRD or NIfTI) with its geometry."""
    scene = volume_node.GetScene()
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(str(path))
        storage.SetUseCompression(False)
        if not storage.WriteData(volume_node):
            raise RuntimeError(f"could not write {volume_node.GetName()} to {path}")
    finally:
        scene.RemoveNode(storage)
    return str(path)


def read_labelmap_node(scene, path: str, name: str = "MaskSAM labels"):
    """Load a labelmap file into a new vtkMRMLLabelMapVolumeNode."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            scene.RemoveNode(node)
            raise RuntimeError(f"could not read the labelmap {path}")
    finally:
        scene.RemoveNode(storage)
    return node


def classes_from_sidecar(sidecar: Dict) -> List[Dict]:
    """The model card's class entries recorded in a prediction sidecar."""
    return list(sidecar.get("model", {}).get("classes", []))


def place_beside(volume_node, node) -> None:
    """Put ``node`` in the subject hierarchy under the item that holds ``volume_node`` (its study), as Slicer's own
    segmentation and DICOM modules do, so that the result stays with its patient and study."""
    scene = volume_node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_item = sh.GetItemByDataNode(volume_node) if sh is not None else 0
    if not volume_item:
        return
    parent = sh.GetItemParent(volume_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


def import_result(volume_node, labelmap_path: str, sidecar_path: str, segmentation_node=None,
                  show_3d: bool = False):
    """Engine output -> a segmentation node with one named, coloured, terminology-tagged segment per organ.

    ``segmentation_node`` is replaced in place when given (the widget asks the user first); otherwise a new node
    is created. The segmentation's reference geometry is the source volume's (parameter and node reference role),
    it sits under the volume's study in the subject hierarchy, and with ``show_3d`` its closed surfaces are built
    for the 3D view.
    """
    scene = volume_node.GetScene()
    sidecar = json.loads(Path(sidecar_path).read_text())
    by_value = {int(c["value"]): c for c in classes_from_sidecar(sidecar)}
    labelmap = read_labelmap_node(scene, labelmap_path)
    try:
        if segmentation_node is None:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                        f"{volume_node.GetName()} organs")
        else:
            segmentation_node.GetSegmentation().RemoveAllSegments()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(),
                                             volume_node.GetID())
        place_beside(volume_node, segmentation_node)
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise RuntimeError("Slicer could not import the labelmap into the segmentation")
    finally:
        scene.RemoveNode(labelmap)
    seg = segmentation_node.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        entry = by_value.get(int(segment.GetLabelValue()))
        if entry is None:
            continue
        segment.SetName(entry.get("display_name") or entry["name"])
        segment.SetColor(*[c / 255.0 for c in entry.get("color", (128, 128, 128))])
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology_tag(entry))
        segment.SetTag("MaskSAM.ClassName", entry["name"])
    segmentation_node.SetAttribute("MaskSAM.Model", json.dumps(sidecar.get("model", {}).get("name")))
    if show_3d:
        segmentation_node.CreateClosedSurfaceRepresentation()
    return segmentation_node


def organ_table(sidecar_path: str) -> List[Dict]:
    """Rows for the results table: organ, volume (ml), confidence."""
    sidecar = json.loads(Path(sidecar_path).read_text())
    return [{"organ": name, "volume_ml": o.get("volume_ml"), "confidence": o.get("confidence")}
            for name, o in sidecar.get("organs", {}).items()]


def sidecar_warnings(sidecar_path: str) -> List[str]:
    """The engine's warnings for the user (modality, registration) from a result's sidecar."""
    sidecar = json.loads(Path(sidecar_path).read_text())
    return [str(w) for w in sidecar.get("warnings", [])]


def dicom_modality(volume_node) -> Optional[str]:
    """The DICOM Modality (0008,0060) of the series a volume was loaded from, or None (not from DICOM, or no
    DICOM database): the exported NRRD loses it, so the engine is told with ``--modality``."""
    try:
        uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids:
            return None
        db = slicer.dicomDatabase
        value = db.fileValue(db.fileForInstance(uids[0]), "0008,0060")
        return value.strip() or None
    except Exception:  # no database, or an instance it no longer holds: the engine tells by the intensities
        return None


def export_labelmap(segmentation_node, volume_node, path: str) -> str:
    """All segments as a labelmap on the volume's grid (NIfTI or NRRD by extension); label values are the
    segments' MaskSAM values where known."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        if not logic.ExportAllSegmentsToLabelmapNode(segmentation_node, labelmap,
                                                     slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise RuntimeError("Slicer could not export the segments")
        write_volume_node(labelmap, path)
    finally:
        scene.RemoveNode(labelmap)
    return str(path)


def _segments_to_labelmap_node(segmentation_node, volume_node, segment_ids, labelmap) -> None:
    import vtk

    ids = vtk.vtkStringArray()
    for sid in segment_ids:
        ids.InsertNextValue(sid)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node):
        raise RuntimeError("Slicer could not export the segments onto the volume's grid")
    if labelmap.GetImageData() is None or \
            tuple(labelmap.GetImageData().GetDimensions()) != tuple(volume_node.GetImageData().GetDimensions()):
        raise RuntimeError("the exported segmentation does not lie on the volume's grid")


def _all_segment_ids(segmentation_node) -> List[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def export_segments_on_volume_grid(segmentation_node, volume_node, path: str, segment_ids=None) -> str:
    """Segments ``segment_ids`` (default: all, in order) as a labelmap file on exactly the volume's grid (size,
    spacing, origin, direction), label value k+1 for the k-th id; Slicer resamples segments stored on another
    grid. Where segments overlap, the later one wins."""
    scene = volume_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ids = _all_segment_ids(segmentation_node) if segment_ids is None else segment_ids
        _segments_to_labelmap_node(segmentation_node, volume_node, ids, labelmap)
        write_volume_node(labelmap, path)
    finally:
        scene.RemoveNode(labelmap)
    return str(path)


def segment_masks_on_volume_grid(segmentation_node, volume_node, segment_ids=None):
    """Yield ``(segment id, boolean (z, y, x) mask on the volume's grid)`` one segment at a time (overlaps kept)."""
    scene = volume_node.GetScene()
    for sid in (_all_segment_ids(segmentation_node) if segment_ids is None else segment_ids):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            _segments_to_labelmap_node(segmentation_node, volume_node, [sid], labelmap)
            mask = slicer.util.arrayFromVolume(labelmap) > 0
        finally:
            scene.RemoveNode(labelmap)
        yield sid, mask


def export_seg_nrrd(segmentation_node, path: str) -> str:
    """The segmentation with names, colours and terminology as a ``.seg.nrrd``."""
    scene = segmentation_node.GetScene()
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.WriteData(segmentation_node):
            raise RuntimeError(f"could not write {path}")
    finally:
        scene.RemoveNode(storage)
    return str(path)
