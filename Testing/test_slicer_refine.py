"""MaskSAMSegment's "Refine with a box" logic against real MRML from the slicer-core wheel: the ROI becomes the
engine's LPS box, only the chosen segment changes (it moves into the box), and the change can be undone."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module is not slicer-core", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MaskSAMSegment"))
from MaskSAMSegmentLib import refine_logic  # noqa: E402

from masksam_core.labels import class_entries  # noqa: E402

ORGANS = ["liver", "spleen", "kidney_left"]

# a stand-in for ``masksam_core.refine`` with its command line: the chosen organ (the one value in the input
# other than 0 and 255) becomes exactly the box, on the box's slices, cleared elsewhere on them
FAKE_REFINE = textwrap.dedent("""
    import argparse, numpy as np, SimpleITK as sitk
    p = argparse.ArgumentParser()
    for a in ("-i", "-s", "--organ", "--box", "-o", "--device", "--progress", "--model"):
        p.add_argument(a)
    args = p.parse_args()
    seg = sitk.ReadImage(args.s)
    arr = sitk.GetArrayFromImage(seg)
    value = int(next(v for v in np.unique(arr) if v not in (0, 255)))
    box = np.array([float(v) for v in args.box.split(",")])
    lo, hi = box[:3], box[3:]
    size = seg.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)[..., ::-1].reshape(-1, 3)
    pts = np.array([seg.TransformIndexToPhysicalPoint([int(c) for c in i]) for i in idx]).reshape(arr.shape + (3,))
    inside = np.all((pts >= lo) & (pts <= hi), axis=-1)
    on_slices = (pts[..., 2] >= lo[2]) & (pts[..., 2] <= hi[2])
    out = arr.copy()
    out[on_slices & (arr == value)] = 0
    out[inside & (out == 0)] = value
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(seg)
    print('{"stage": "segment", "done": 1, "total": 1}', flush=True)
    sitk.WriteImage(img, args.o)
""")


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture()
def model_dir(tmp_path):
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"classes": class_entries(ORGANS)}))
    return str(folder)


def _volume(scene):
    """12 x 10 x 8 voxels of 2 x 2 x 3 mm, stored with a flipped, permuted direction (i -> P, j -> L, k -> S) and
    an arbitrary origin."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(node, np.zeros((8, 10, 12), np.int16))
    node.SetSpacing(2.0, 2.0, 3.0)
    node.SetOrigin(30.0, -12.5, 40.0)
    m = vtk.vtkMatrix4x4()
    for r, row in enumerate([[0, -1, 0], [-1, 0, 0], [0, 0, 1]]):
        for c, v in enumerate(row):
            m.SetElement(r, c, v)
    node.SetIJKToRASDirectionMatrix(m)
    return node


def _segmentation(scene, volume):
    """Liver on k 1-6, j 2-6, i 2-7; spleen on k 1-6, j 2-6, i 9-10 (voxel indices of the volume)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    labels = np.zeros((8, 10, 12), np.uint8)
    labels[1:7, 2:7, 2:8] = 1
    labels[1:7, 2:7, 9:11] = 2
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labelmap, labels)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
    scene.RemoveNode(labelmap)
    seg = node.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    for sid, name in zip(ids, ("Liver", "Spleen")):
        seg.GetSegment(sid).SetName(name)
    return node, ids


def _roi(scene, volume, ijk_lo, ijk_hi):
    """An ROI covering voxel index ranges (inclusive, i j k) of the volume to their faces, in RAS."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    corners = []
    for i in (ijk_lo[0] - 0.5, ijk_hi[0] + 0.5):
        for j in (ijk_lo[1] - 0.5, ijk_hi[1] + 0.5):
            for k in (ijk_lo[2] - 0.5, ijk_hi[2] + 0.5):
                corners.append(m.MultiplyPoint([i, j, k, 1.0])[:3])
    corners = np.array(corners)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*((corners.min(0) + corners.max(0)) / 2))
    roi.SetSize(*(corners.max(0) - corners.min(0)))
    return roi


def _mask(node, sid, volume):
    return refine_logic.segment_mask(node, sid, volume)


def test_the_roi_becomes_the_engines_lps_box(scene):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(10.0, -20.0, 30.0)
    roi.SetSize(4.0, 6.0, 8.0)
    box = refine_logic.roi_box_lps(roi)
    assert box == pytest.approx((-12.0, 17.0, 26.0, -8.0, 23.0, 34.0))  # R, A negated into L, P
    with pytest.raises(ValueError, match="not been placed"):
        refine_logic.roi_box_lps(scene.AddNewNodeByClass("vtkMRMLMarkupsROINode"))
    roi.SetSize(4.0, 6.0, 0.0)  # drawn on one axial slice
    assert refine_logic.roi_box_lps(roi) == pytest.approx((-12.0, 17.0, 30.0, -8.0, 23.0, 30.0))
    assert refine_logic.box_argument(box) == "-12.000,17.000,26.000,-8.000,23.000,34.000"
    cmd = refine_logic.refine_command("py", "in.nrrd", "seg.nrrd", "liver", box, "out.nrrd", "/m", "cpu")
    assert cmd[:3] == ["py", "-m", "masksam_core.refine"] and cmd[-2:] == ["--model", "/m"]
    assert "--box=-12.000,17.000,26.000,-8.000,23.000,34.000" in cmd  # one argument: it starts with a "-"


def test_segment_organ_by_tag_or_name(scene, model_dir):
    volume = _volume(scene)
    node, (liver, spleen) = _segmentation(scene, volume)
    assert refine_logic.segment_organ(node, liver, model_dir) == ("liver", 1)
    node.GetSegmentation().GetSegment(spleen).SetName("My segment")
    node.GetSegmentation().GetSegment(spleen).SetTag(refine_logic.CLASS_TAG, "kidney_left")
    assert refine_logic.segment_organ(node, spleen, model_dir) == ("kidney_left", 3)
    node.GetSegmentation().GetSegment(spleen).RemoveTag(refine_logic.CLASS_TAG)
    with pytest.raises(ValueError, match="not an organ of this model"):
        refine_logic.segment_organ(node, spleen, model_dir)


def test_the_refined_segment_moves_into_the_box_nothing_else_changes_and_undo_restores(scene, model_dir,
                                                                                      tmp_path):
    volume = _volume(scene)
    node, (liver, spleen) = _segmentation(scene, volume)
    liver_before, spleen_before = _mask(node, liver, volume), _mask(node, spleen, volume)
    roi = _roi(scene, volume, (4, 3, 2), (6, 8, 4))  # i 4-6, j 3-8, k 2-4: part of the liver, beyond it in j
    script = tmp_path / "fake_refine.py"
    script.write_text(FAKE_REFINE)
    seen = {}

    def fake(python, src, seg, organ, box, out, model, device):
        seen.update(organ=organ, seg=seg, box=box)
        return [sys.executable, str(script)] + refine_logic.refine_command(python, src, seg, organ, box, out, model,
                                                                           device)[3:]

    run, value = refine_logic.start_refine(volume, node, liver, roi, model_dir, "cpu", engine=fake)
    try:
        assert run.wait() == 0, run.log_text()
        # the labelmap refine read: the liver at its class value, the spleen as "another organ", on the grid
        written = sitk.GetArrayFromImage(sitk.ReadImage(seen["seg"]))
        assert seen["organ"] == "liver" and value == 1
        assert np.array_equal(written == 1, liver_before) and np.array_equal(written == 255, spleen_before)
        undo = refine_logic.RefineUndo()
        count = refine_logic.apply_refined(str(run.workdir / "refined.nrrd"), volume, node, liver, value, undo)
    finally:
        run.cleanup()
    after = _mask(node, liver, volume)
    expected = liver_before.copy()
    expected[2:5] = False  # the box's slices (k 2-4: the box's S range covers them, and only them)
    expected[2:5, 3:9, 4:7] = True  # there the liver is the box
    diff = np.argwhere(after != expected)
    assert not len(diff), (diff[:5], after.sum(), expected.sum())
    assert count == int(expected.sum())
    assert np.array_equal(_mask(node, spleen, volume), spleen_before)  # nothing else changes
    assert node.GetSegmentation().GetNumberOfSegments() == 2
    assert len(undo) == 1 and undo.undo()
    assert np.array_equal(_mask(node, liver, volume), liver_before)
    assert not undo.undo()


def test_the_real_refine_runs_on_a_tiny_model(scene, tmp_path, monkeypatch):
    """The real engine (a tiny random class-bound model in a child process) on a scene's volume: only the liver's
    segment changes, and only on the ROI's slices."""
    import json

    volume = _volume(scene)
    arr = np.zeros((8, 10, 12), np.int16)
    arr[1:7, 2:7, 2:8] = 200
    slicer.util.updateVolumeFromArray(volume, arr)
    node, (liver, spleen) = _segmentation(scene, volume)
    liver_before, spleen_before = _mask(node, liver, volume), _mask(node, spleen, volume)
    folder = tmp_path / "model"
    maker = tmp_path / "make_model.py"
    maker.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import torch
        from masksam_core.labels import class_entries
        from masksam_core.model.card import make_card
        from masksam_core.model.folder import save_model_folder
        from masksam_core.model.masksam import MaskSAM
        from masksam_core.model.recipes import architecture_for_recipe
        from tiny_backbones import tiny_tinyvit_backbone
        torch.manual_seed(0)
        config = architecture_for_recipe("cpu", 4, slab_depth=2, num_queries=4, prompt_channels=[8, 8, 8])
        card = make_card("tiny", "litemedsam", "random", 64, config, class_entries({ORGANS!r}), (2.0, 2.0, 3.0),
                         training={{"matching": "class_bound"}}, inference={{"background_threshold": 0.5}})
        save_model_folder(MaskSAM(tiny_tinyvit_backbone(), config), card, {str(folder)!r})
    """))
    import subprocess

    subprocess.run([sys.executable, str(maker)], check=True)
    runner = tmp_path / "run_refine.py"  # the engine with the tiny backbone in place of LiteMedSAM's
    runner.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import masksam_core.model.folder as folder
        from tiny_backbones import tiny_tinyvit_backbone
        folder.load_backbone = lambda *a, **k: tiny_tinyvit_backbone()
        from masksam_core.cli_util import run_cli
        from masksam_core.refine import main
        raise SystemExit(run_cli(main, sys.argv[1:] + ["--runtime", "torch"]))
    """))
    assert json.loads((folder / "model.json").read_text())["training"]["matching"] == "class_bound"
    roi = _roi(scene, volume, (1, 1, 2), (9, 8, 4))

    def engine(python, *args):
        return [sys.executable, str(runner)] + refine_logic.refine_command(python, *args)[3:]

    run, value = refine_logic.start_refine(volume, node, liver, roi, str(folder), "cpu", engine=engine)
    try:
        assert run.wait() == 0, run.log_text()
        refine_logic.apply_refined(str(run.workdir / "refined.nrrd"), volume, node, liver, value)
    finally:
        run.cleanup()
    after = _mask(node, liver, volume)
    assert np.array_equal(after[:2], liver_before[:2]) and np.array_equal(after[5:], liver_before[5:])
    assert np.array_equal(_mask(node, spleen, volume), spleen_before)


def test_the_widgets_refine_and_undo_buttons(monkeypatch, scene, model_dir, tmp_path):
    """The module's Refine section: the chosen segment is refined by a (fake) engine while the Qt timer polls,
    only it changes, and Undo refine puts it back; without a box nothing starts."""
    import time
    import types

    from slicer_stubs import import_module_without_qt
    from test_slicer_widgets import ComboBox, SegmentSelector, Selector, Widget, _fake_qt

    mod = import_module_without_qt(monkeypatch, "MaskSAMSegment")
    monkeypatch.setattr(mod, "qt", _fake_qt())
    monkeypatch.setattr(mod.dependencies, "ensure_in_slicer", lambda *a, **k: True)
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text))
    volume = _volume(scene)
    node, (liver, spleen) = _segmentation(scene, volume)
    liver_before, spleen_before = _mask(node, liver, volume), _mask(node, spleen, volume)
    roi = _roi(scene, volume, (4, 3, 2), (6, 8, 4))
    script = tmp_path / "fake_refine.py"
    script.write_text(FAKE_REFINE)

    def fake(python, *args):
        return [sys.executable, str(script)] + refine_logic.refine_command(python, *args)[3:]

    widget = mod.MaskSAMSegmentWidget.__new__(mod.MaskSAMSegmentWidget)
    mod.MaskSAMSegmentWidget.__init__(widget)
    widget.logic = mod.MaskSAMSegmentLogic()
    real_start = widget.logic.startRefine
    widget.logic.startRefine = lambda *a, **k: real_start(*a, **k, engine=fake)
    segment_selector = SegmentSelector(node, liver)
    widget.ui = types.SimpleNamespace(
        inputVolumeSelector=Selector(volume), refineSegmentSelector=segment_selector, refineRoiSelector=Selector(),
        refinePointsSelector=Selector(),
        modelComboBox=ComboBox([("m", model_dir)]), deviceComboBox=ComboBox([("cpu", "cpu")]),
        refineButton=Widget(), undoRefineButton=Widget(enabled=False), cancelButton=Widget(), statusLabel=Widget(),
        progressBar=Widget(), segmentButton=Widget())
    widget.onRefine()  # no box yet
    assert widget.refineRun is None and errors == ["To refine, choose a box (ROI) or points."]
    widget.ui.refineRoiSelector.setCurrentNode(roi)
    widget.onRefine()
    assert widget.refineRun is not None and widget.refineTimer.active and not widget.ui.refineButton.enabled
    deadline = time.monotonic() + 30
    while widget.refineRun is not None and time.monotonic() < deadline:
        widget.onRefinePoll()
        time.sleep(0.05)
    assert widget.refineRun is None and not widget.refineTimer.active, widget.ui.statusLabel.text
    assert widget.ui.statusLabel.text.startswith("Refined:") and widget.ui.undoRefineButton.enabled
    after = _mask(node, liver, volume)
    assert (after[2:5, 3:9, 4:7]).all() and not after[2:5, 2].any()  # into the box on its slices
    assert np.array_equal(after[5:], liver_before[5:]) and np.array_equal(_mask(node, spleen, volume), spleen_before)
    widget.onUndoRefine()
    assert np.array_equal(_mask(node, liver, volume), liver_before) and not widget.ui.undoRefineButton.enabled


# a stand-in for ``masksam_core.refine`` with points: the voxel nearest each positive LPS point becomes the chosen
# organ, the voxel nearest each negative one is cleared of it (so the test sees exactly where each point landed)
FAKE_POINTS_REFINE = textwrap.dedent("""
    import argparse, numpy as np, SimpleITK as sitk
    p = argparse.ArgumentParser()
    for a in ("-i", "-s", "--organ", "--box", "-o", "--device", "--progress", "--model"):
        p.add_argument(a)
    p.add_argument("--point", action="append", default=[])
    args = p.parse_args()
    seg = sitk.ReadImage(args.s)
    arr = sitk.GetArrayFromImage(seg)
    value = int(next(v for v in np.unique(arr) if v not in (0, 255)))
    out = arr.copy()
    for text in args.point:
        *xyz, sign = text.split(",")
        i, j, k = seg.TransformPhysicalPointToIndex([float(v) for v in xyz])
        if sign == "+" and out[k, j, i] == 0:
            out[k, j, i] = value
        elif sign == "-" and out[k, j, i] == value:
            out[k, j, i] = 0
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(seg)
    print('{"stage": "segment", "done": 1, "total": 1}', flush=True)
    sitk.WriteImage(img, args.o)
""")


def _voxel_ras(volume, ijk):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return m.MultiplyPoint(list(map(float, ijk)) + [1.0])[:3]


def test_a_point_list_becomes_lps_points_with_their_sign(scene):
    import vtk

    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    points.AddControlPoint(vtk.vtkVector3d(10.0, -20.0, 30.0))
    points.AddControlPoint(vtk.vtkVector3d(-1.5, 2.5, -3.0))
    points.SetNthControlPointSelected(1, False)  # unselected: outside the organ
    points.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0))
    points.UnsetNthControlPointPosition(2)  # not placed yet: left out
    assert refine_logic.points_lps(points) == [(-10.0, 20.0, 30.0, True), (1.5, -2.5, -3.0, False)]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 5.0)  # 5 mm to the right (R), i.e. -5 in L
    transform.SetMatrixTransformToParent(m)
    points.SetAndObserveTransformNodeID(transform.GetID())
    assert refine_logic.points_lps(points)[0] == pytest.approx((-15.0, 20.0, 30.0, True))  # world coordinates
    args = refine_logic.point_arguments(refine_logic.points_lps(points))
    assert args == ["--point=-15.000,20.000,30.000,+", "--point=-3.500,-2.500,-3.000,-"]
    cmd = refine_logic.refine_command("py", "i.nrrd", "s.nrrd", "liver", None, "o.nrrd", None, "cpu",
                                      points=refine_logic.points_lps(points))
    assert not any(a.startswith("--box") for a in cmd) and cmd.count("--point=-15.000,20.000,30.000,+") == 1


def test_points_refine_only_the_chosen_segment_where_they_were_placed(scene, model_dir, tmp_path):
    """A positive point beside the liver and a negative one inside it (RAS markups on a volume stored with a
    flipped, permuted direction) change exactly those two voxels of the liver's segment, and nothing else."""
    volume = _volume(scene)
    node, (liver, spleen) = _segmentation(scene, volume)
    liver_before, spleen_before = _mask(node, liver, volume), _mask(node, spleen, volume)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    import vtk

    points.AddControlPoint(vtk.vtkVector3d(*_voxel_ras(volume, (11, 4, 3))))  # beside the liver (i 2-7)
    points.AddControlPoint(vtk.vtkVector3d(*_voxel_ras(volume, (3, 3, 3))))  # inside it
    points.SetNthControlPointSelected(1, False)
    script = tmp_path / "fake_points.py"
    script.write_text(FAKE_POINTS_REFINE)
    seen = {}

    def fake(python, src, seg, organ, box, out, model, device, points=()):
        seen.update(box=box, points=points)
        return [sys.executable, str(script)] + refine_logic.refine_command(python, src, seg, organ, box, out, model,
                                                                           device, points)[3:]

    with pytest.raises(ValueError, match="place a box"):
        refine_logic.start_refine(volume, node, liver, None, model_dir, "cpu", engine=fake)
    run, value = refine_logic.start_refine(volume, node, liver, None, model_dir, "cpu", engine=fake,
                                           points_node=points)
    try:
        assert run.wait() == 0, run.log_text()
        refine_logic.apply_refined(str(run.workdir / "refined.nrrd"), volume, node, liver, value)
    finally:
        run.cleanup()
    assert seen["box"] is None and [p[3] for p in seen["points"]] == [True, False]
    expected = liver_before.copy()
    expected[3, 4, 11] = True  # (k, j, i)
    expected[3, 3, 3] = False
    assert np.array_equal(_mask(node, liver, volume), expected)
    assert np.array_equal(_mask(node, spleen, volume), spleen_before)
    assert node.GetSegmentation().GetNumberOfSegments() == 2


def test_the_refine_choices_are_kept_in_the_parameter_node(monkeypatch, scene, model_dir, tmp_path):
    """The refine section's segmentation, segment, box and point list go into the module's parameter node and come
    back from it (as after loading a scene); refining with points only goes through the widget."""
    import types

    from slicer_stubs import import_module_without_qt
    from test_slicer_widgets import ComboBox, ListWidget, SegmentSelector, Selector, Widget, _fake_qt

    mod = import_module_without_qt(monkeypatch, "MaskSAMSegment")
    monkeypatch.setattr(mod, "qt", _fake_qt())
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    volume = _volume(scene)
    node, (liver, spleen) = _segmentation(scene, volume)
    roi = _roi(scene, volume, (4, 3, 2), (6, 8, 4))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    parameters = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    widget = mod.MaskSAMSegmentWidget.__new__(mod.MaskSAMSegmentWidget)
    mod.MaskSAMSegmentWidget.__init__(widget)
    widget.logic = mod.MaskSAMSegmentLogic()
    widget.logic.getParameterNode = lambda: parameters
    widget.ui = types.SimpleNamespace(
        inputVolumeSelector=Selector(volume), outputSegmentationSelector=Selector(node),
        modelComboBox=ComboBox([("m", model_dir)]), deviceComboBox=ComboBox([("cpu", "cpu")]),
        fastCheckBox=Widget(), show3DCheckBox=Widget(), samCheckpointPathLineEdit=Widget(currentPath=""),
        allOrgansCheckBox=Widget(), organsListWidget=ListWidget(),
        refineSegmentSelector=SegmentSelector(node, spleen), refineRoiSelector=Selector(roi),
        refinePointsSelector=Selector(points), segmentButton=Widget(), refineButton=Widget(),
        undoRefineButton=Widget(enabled=False), cancelButton=Widget(), statusLabel=Widget(), progressBar=Widget())
    widget.updateParameterNodeFromGUI()
    assert parameters.GetNodeReference("RefineSegmentation") is node
    assert parameters.GetParameter("RefineSegment") == spleen
    assert parameters.GetNodeReference("RefineROI") is roi and parameters.GetNodeReference("RefinePoints") is points
    widget.ui.refineSegmentSelector = SegmentSelector()
    widget.ui.refineRoiSelector, widget.ui.refinePointsSelector = Selector(), Selector()
    widget.updateGUIFromParameterNode()
    assert widget.ui.refineSegmentSelector.currentNode() is node
    assert widget.ui.refineSegmentSelector.currentSegmentID() == spleen
    assert widget.ui.refineRoiSelector.currentNode() is roi and widget.ui.refinePointsSelector.currentNode() is points
    widget.ui.refineRoiSelector.setCurrentNode(None)  # the user clears the box
    widget.updateParameterNodeFromGUI()
    assert parameters.GetNodeReference("RefineROI") is None and parameters.GetNodeReference("RefinePoints") is points
    # an older scene without refine choices: the output segmentation is the one to refine
    fresh = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    fresh.SetNodeReferenceID("OutputSegmentation", node.GetID())
    fresh.SetNodeReferenceID("InputVolume", volume.GetID())
    widget.logic.getParameterNode = lambda: fresh
    widget.ui.refineSegmentSelector = SegmentSelector()
    widget.updateGUIFromParameterNode()
    assert widget.ui.refineSegmentSelector.currentNode() is node and widget.ui.refinePointsSelector.currentNode() \
        is None
    # an empty point list and no box: nothing starts, one message
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text))
    widget.ui.refineSegmentSelector = SegmentSelector(node, liver)
    widget.ui.refinePointsSelector = Selector(points)
    widget.onRefine()
    assert widget.refineRun is None and errors == ["To refine, choose a box (ROI) or points."]
    # a placed point: the widget refines with the points alone
    import time

    import vtk

    monkeypatch.setattr(mod.dependencies, "ensure_in_slicer", lambda *a, **k: True)
    script = tmp_path / "fake_points.py"
    script.write_text(FAKE_POINTS_REFINE)
    real_start = widget.logic.startRefine
    widget.logic.startRefine = lambda *a, **k: real_start(*a, **k, engine=lambda python, *args, **kw: [
        sys.executable, str(script)] + refine_logic.refine_command(python, *args, **kw)[3:])
    points.AddControlPoint(vtk.vtkVector3d(*_voxel_ras(volume, (11, 4, 3))))
    liver_before, spleen_before = _mask(node, liver, volume), _mask(node, spleen, volume)
    widget.onRefine()
    deadline = time.monotonic() + 30
    while widget.refineRun is not None and time.monotonic() < deadline:
        widget.onRefinePoll()
        time.sleep(0.05)
    assert widget.ui.statusLabel.text.startswith("Refined:"), widget.ui.statusLabel.text
    expected = liver_before.copy()
    expected[3, 4, 11] = True
    assert np.array_equal(_mask(node, liver, volume), expected)
    assert np.array_equal(_mask(node, spleen, volume), spleen_before)
