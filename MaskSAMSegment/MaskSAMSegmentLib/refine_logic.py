"""Refine one segment with a box (a markups ROI) and/or points (a markups point list): MRML in,
``python -m masksam_core.refine`` as a child process, that segment's new content back, undoable.

Plain Python on MRML (no Qt), so that it is tested against slicer-core; Slicer is imported only by the functions
that touch MRML, so that the ROI conversion and the command line are tested without it. The steps:

1. :func:`roi_box_lps`: the ROI's world bounds (RAS) as the engine's box, ``x0,y0,z0,x1,y1,z1`` in LPS mm
   (x and y negated); :func:`points_lps`: the point list's control points in world coordinates, each as
   ``x,y,z`` in LPS mm (x and y negated) with its sign: a selected point (Slicer's default for a placed point) is
   inside the organ, an unselected one outside it;
2. :func:`write_refine_inputs`: the volume, and the segmentation as a labelmap on exactly the volume's grid, with
   the chosen segment at its organ's class value and every other segment at :data:`OTHER_VALUE` (another organ:
   refine keeps it);
3. :func:`start_refine`: the engine runs in an :class:`engine_process.EngineRun` (progress, cancel, no ``select``);
4. :func:`apply_refined`: the chosen segment's content is replaced by the result's voxels of its class value;
   the segment's previous content is pushed on a :class:`RefineUndo` stack first, which :meth:`RefineUndo.undo`
   restores. Other segments are never written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from . import engine_process, models

OTHER_VALUE = 255  # label of "another organ" in the labelmap refine reads (never a class value: at most 254)
CLASS_TAG = "MaskSAM.ClassName"


def roi_box_lps(roi_node) -> Tuple[float, float, float, float, float, float]:
    """The ROI's axis-aligned world bounds as (x0, y0, z0, x1, y1, z1) in LPS mm: Slicer's RAS with x and y
    negated (each pair ordered low to high). A ValueError for an ROI without extent in R and A (not placed yet:
    its bounds are all zero); one flat along S (drawn on one axial slice) is a box on that slice."""
    import math

    b = [math.nan] * 6
    roi_node.GetRASBounds(b)  # [R min, R max, A min, A max, S min, S max], world coordinates
    if not all(math.isfinite(v) for v in b) or not (b[1] - b[0] > 0 and b[3] - b[2] > 0 and b[5] >= b[4]):
        raise ValueError("the box (ROI) has not been placed yet, or is flat across the slices: place it over the "
                         "organ in an axial slice view")
    return (-b[1], -b[3], b[4], -b[0], -b[2], b[5])


Point = Tuple[float, float, float, bool]


def points_lps(points_node) -> List[Point]:
    """The point list's placed control points as (x, y, z, positive) in LPS mm: world RAS with x and y negated;
    positive for a selected point (a newly placed point is selected), negative (outside the organ) for an
    unselected one. Points not placed yet (their position undefined) are left out."""
    out: List[Point] = []
    defined = getattr(points_node, "PositionDefined", 2)
    for i in range(points_node.GetNumberOfControlPoints()):
        if points_node.GetNthControlPointPositionStatus(i) != defined:
            continue
        ras = [0.0, 0.0, 0.0]
        points_node.GetNthControlPointPositionWorld(i, ras)
        out.append((-float(ras[0]), -float(ras[1]), float(ras[2]), bool(points_node.GetNthControlPointSelected(i))))
    return out


def point_arguments(points: Sequence[Point]) -> List[str]:
    """``--point=x,y,z,+`` (or ``,-``) of ``masksam_core.refine`` per point, to 0.001 mm, each in one argument (a
    point starting with a negative number must be)."""
    return ["--point=" + ",".join(f"{float(v):.3f}" for v in p[:3]) + (",+" if p[3] else ",-") for p in points]


def box_argument(box: Sequence[float]) -> str:
    """``--box`` of ``masksam_core.refine``: six numbers, comma-separated, to 0.001 mm."""
    return ",".join(f"{float(v):.3f}" for v in box)


def segment_organ(segmentation_node, segment_id: str, model_dir: str) -> Tuple[str, int]:
    """(class name, class value) of a segment for the model in ``model_dir``: by the segment's MaskSAM class tag
    (set when MaskSAM made it), else by its name against the model's class and display names (any case). A
    ValueError naming the model's organs when neither matches."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise ValueError(f"no segment {segment_id!r} in {segmentation_node.GetName()}")
    import vtk

    tag = vtk.reference("")
    wanted = [str(tag)] if segment.GetTag(CLASS_TAG, tag) and str(tag) else []
    wanted.append(segment.GetName())
    organs = models.model_organs(model_dir)
    for text in wanted:
        for value, (name, display) in enumerate(organs, start=1):
            if text.lower() in (name.lower(), display.lower()):
                return name, value
    raise ValueError(f"segment {segment.GetName()!r} is not an organ of this model ("
                     + ", ".join(display for _, display in organs) + ")")


def write_refine_inputs(volume_node, segmentation_node, segment_id: str, value: int, workdir: Path) -> Tuple[str, str]:
    """Write ``input.nrrd`` (the volume) and ``segmentation.nrrd`` (a labelmap on exactly its grid: ``value`` where
    the chosen segment is, :data:`OTHER_VALUE` where another segment is and the chosen one is not) in ``workdir``;
    returns their paths."""
    import numpy as np
    import slicer

    from . import mrml_io

    workdir = Path(workdir)
    src = mrml_io.write_volume_node(volume_node, str(workdir / "input.nrrd"))
    labels = None
    for sid, mask in mrml_io.segment_masks_on_volume_grid(segmentation_node, volume_node):
        if labels is None:
            labels = np.zeros(mask.shape, np.uint8)
        labels[mask & (labels != value)] = value if sid == segment_id else OTHER_VALUE
    if labels is None:
        labels = np.zeros(slicer.util.arrayFromVolume(volume_node).shape, np.uint8)
    scene = volume_node.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        node.CopyOrientation(volume_node)
        slicer.util.updateVolumeFromArray(node, labels)
        seg = mrml_io.write_volume_node(node, str(workdir / "segmentation.nrrd"))
    finally:
        scene.RemoveNode(node)
    return src, seg


def refine_command(python: str, input_path: str, segmentation_path: str, organ: str,
                   box: Optional[Sequence[float]], output_path: str, model_dir: Optional[str] = None,
                   device: str = "auto", points: Sequence[Point] = ()) -> List[str]:
    """The refine command line, with JSON progress (the output goes to a fresh temporary folder); ``--box=...``
    (when there is a box) and each ``--point=...`` in one argument, as a value starting with a negative number
    must be."""
    cmd = [python, "-m", "masksam_core.refine", "-i", input_path, "-s", segmentation_path, "--organ", organ]
    if box is not None:
        cmd.append("--box=" + box_argument(box))
    cmd += point_arguments(points)
    cmd += ["-o", output_path, "--device", device, "--progress", "json"]
    if model_dir:
        cmd += ["--model", model_dir]
    return cmd


def start_refine(volume_node, segmentation_node, segment_id: str, roi_node, model_dir: str, device: str = "auto",
                 engine: Optional[Callable[..., List[str]]] = None, points_node=None):
    """Write the inputs and start the engine; returns (the running :class:`engine_process.EngineRun`, the class
    value whose voxels :func:`apply_refined` takes). ``roi_node`` (the box) or ``points_node`` (a markups point
    list, :func:`points_lps`) may be None, not both (a ValueError). ``engine``: a command builder with
    :func:`refine_command`'s arguments (tests pass a fake; ``points=`` only when there are points), default the
    real one."""
    organ, value = segment_organ(segmentation_node, segment_id, model_dir)
    box = roi_box_lps(roi_node) if roi_node is not None else None
    points = points_lps(points_node) if points_node is not None else []
    if box is None and not points:
        raise ValueError("place a box (ROI) or points on the organ first")
    extra = {"points": points} if points else {}

    def build(workdir: Path) -> List[str]:
        src, seg = write_refine_inputs(volume_node, segmentation_node, segment_id, value, workdir)
        return (engine or refine_command)(engine_process.slicer_python(), src, seg, organ, box,
                                          str(workdir / "refined.nrrd"), model_dir, device, **extra)

    return engine_process.EngineRun(build), value


class RefineUndo:
    """The segments' contents before each refinement (a copy on the volume's grid), newest last."""

    def __init__(self, depth: int = 5) -> None:
        self.depth = depth
        self.states: List[Tuple[object, str, object, object]] = []  # (segmentation node, segment id, volume, mask)

    def push(self, segmentation_node, segment_id: str, volume_node) -> None:
        self.states.append((segmentation_node, segment_id, volume_node,
                            segment_mask(segmentation_node, segment_id, volume_node)))
        del self.states[:-self.depth]

    def __len__(self) -> int:
        return len(self.states)

    def undo(self) -> bool:
        """Restore the segment the last refinement changed; False when there is nothing to undo (or its nodes
        were removed from the scene)."""
        while self.states:
            segmentation_node, segment_id, volume_node, mask = self.states.pop()
            if segmentation_node.GetScene() is None or segmentation_node.GetSegmentation().GetSegment(segment_id) \
                    is None:
                continue
            _set_segment(segmentation_node, segment_id, volume_node, mask)
            return True
        return False


def segment_mask(segmentation_node, segment_id: str, volume_node):
    """The segment as a bool (k, j, i) array on the volume's grid."""
    from . import mrml_io

    return next(mrml_io.segment_masks_on_volume_grid(segmentation_node, volume_node, [segment_id]))[1]


def _set_segment(segmentation_node, segment_id: str, volume_node, mask) -> None:
    """Replace the segment's content with ``mask`` ((k, j, i) on the volume's grid)."""
    import numpy as np
    import slicer

    scene = volume_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        labelmap.CopyOrientation(volume_node)
        slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(mask, np.uint8))
        _set_segment_from_labelmap(segmentation_node, segment_id, labelmap)
    finally:
        scene.RemoveNode(labelmap)


def _set_segment_from_labelmap(segmentation_node, segment_id: str, labelmap) -> None:
    """Replace the segment's content with a binary labelmap node's, through the Segmentations logic, which maps
    the labelmap's own geometry onto the segmentation's (Slicer may read a file onto a flipped index grid: a
    left-handed one is made right-handed). ``slicer.util``'s helper needs ``slicer.modules``, which only the
    application has."""
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = logic.CreateOrientedImageDataFromVolumeNode(labelmap)
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE,
                                            image.GetExtent()):
        raise RuntimeError(f"Slicer could not replace the content of segment {segment_id}")


def apply_refined(result_path: str, volume_node, segmentation_node, segment_id: str, value: int,
                  undo: Optional[RefineUndo] = None) -> int:
    """Replace the segment's content with the voxels of ``value`` in the refine result (a labelmap on the volume's
    grid); the previous content goes on ``undo`` first. Returns the segment's voxel count."""
    import numpy as np
    import slicer

    from . import mrml_io

    scene = volume_node.GetScene()
    labelmap = mrml_io.read_labelmap_node(scene, result_path, "MaskSAM refined")
    try:
        mask = (slicer.util.arrayFromVolume(labelmap) == value).astype(np.uint8)
        if mask.size != slicer.util.arrayFromVolume(volume_node).size:
            raise RuntimeError("the refined segmentation does not lie on the volume's grid")
        if undo is not None:
            undo.push(segmentation_node, segment_id, volume_node)
        slicer.util.updateVolumeFromArray(labelmap, mask)  # in the file's own index grid and geometry
        _set_segment_from_labelmap(segmentation_node, segment_id, labelmap)
    finally:
        scene.RemoveNode(labelmap)
    return int(mask.sum())
