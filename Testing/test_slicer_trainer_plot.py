"""MaskSAMTrainer's live training curves: the train process's JSON progress lines -> an MRML table and plot chart.

The progress lines are produced by the engine's own ``Progress`` class (what ``python -m masksam_core.train
--progress json`` prints), so the parser is checked against the real format, not a copy of it.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module is not slicer-core", allow_module_level=True)

from slicer_stubs import import_module_without_qt as _import_module_without_qt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MaskSAMSegment"))
sys.path.insert(0, str(ROOT / "MaskSAMTrainer"))
from MaskSAMTrainerLib import progress_rows, training_plot  # noqa: E402

from masksam_core.training.progress_log import Progress  # noqa: E402

NAN = float("nan")


def _train_output(capsys):
    """What a 6-step run with 3 steps per epoch prints: log lines, a loss per step, a validation per epoch (the
    first without any scorable organ, so NaN), and the closing summary line."""
    print("MaskSAM training: recipe cpu (cached frozen-encoder features), 6 steps", flush=True)
    print("encoding 12 slices once into the feature cache", flush=True)
    progress = Progress(6, json_lines=True)
    for loss in (1.53125, 1.25, 0.875):
        progress.update("train", loss=loss)
    progress.event("validation", step=3, dice_mean=float("nan"))
    print("\rcache: 12/12", flush=True)
    for loss in (0.75, 0.6875, 0.625):
        progress.update("train", loss=loss)
    progress.event("validation", step=6, dice_mean=0.61234567)
    print(json.dumps({"stage": "done", "best_step": 6, "best_dice_mean": 0.6123}), flush=True)
    lines = capsys.readouterr().out.splitlines()
    assert any('"dice_mean": NaN' in line for line in lines)  # what json.dumps writes for a missing Dice
    return lines


EXPECTED = [(1, 1.5312, NAN), (2, 1.25, NAN), (3, 0.875, NAN), (4, 0.75, NAN), (5, 0.6875, NAN), (6, 0.625, NAN),
            (6, NAN, 0.6123)]  # Progress rounds to 4 decimals


def _assert_rows(rows, expected=EXPECTED):
    assert np.array_equal(np.array(rows, float), np.array(expected, float), equal_nan=True), rows


def test_progress_lines_become_plot_rows(capsys):
    lines = _train_output(capsys)
    _assert_rows(progress_rows.rows_from_lines(lines))
    row = progress_rows.row_from_line('{"stage": "train", "done": 7, "total": 9, "loss": Infinity}\n')
    assert row.step == 7 and math.isinf(row.loss) and math.isnan(row.dice_mean)
    for other in ("", "done: 6 steps in 12 s", "{not json", '{"stage": "train", "done": 3, "total": 9}',
                  '{"stage": "train", "done": true, "total": 9, "loss": 1.0}',
                  '{"stage": "train", "done": 2, "total": 9, "loss": "1.0"}',
                  '{"stage": "validation", "done": 3, "total": 9, "step": 3}', '[1, 2]',
                  '{"stage": "segment", "done": 1, "total": 4}'):
        assert progress_rows.row_from_line(other) is None, other
    # a validation line without "step" falls back to the step counter
    row = progress_rows.row_from_line('{"stage": "validation", "done": 4, "total": 9, "dice_mean": 0.5}')
    assert row.step == 4 and math.isnan(row.loss) and row.dice_mean == 0.5


def _check_nodes(scene, curves):
    table, chart = curves.tableNode, curves.chartNode
    assert scene.IsNodePresent(table) and scene.IsNodePresent(chart)
    vtable = table.GetTable()
    assert [vtable.GetColumnName(i) for i in range(vtable.GetNumberOfColumns())] == ["step", "loss", "val_dice_mean"]
    assert table.GetColumnTitle("val_dice_mean") == "Validation Dice (mean)"
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = {chart.GetNthPlotSeriesNode(i).GetName(): chart.GetNthPlotSeriesNode(i) for i in range(2)}
    assert sorted(series) == ["Training loss", "Validation Dice (mean)"]
    loss, dice = series["Training loss"], series["Validation Dice (mean)"]
    for node, y in ((loss, "loss"), (dice, "val_dice_mean")):
        assert node.GetTableNodeID() == table.GetID() and node.GetTableNode() is table
        assert node.GetXColumnName() == "step" and node.GetYColumnName() == y
        assert node.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter
    assert loss.GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleSolid
    assert loss.GetMarkerStyle() == slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone
    assert dice.GetMarkerStyle() == slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle
    assert dice.GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleNone
    assert not np.allclose(loss.GetColor(), dice.GetColor())
    assert chart.GetXAxisTitle() == "Step" and "Dice" in chart.GetYAxisTitle() and "Loss" in chart.GetYAxisTitle()
    assert curves.plotViewNode.GetPlotChartNodeID() == chart.GetID()


def _table_rows(table):
    """The table's rows read back through MRML's own column access."""
    step = slicer.util.arrayFromTableColumn(table, "step")
    loss = slicer.util.arrayFromTableColumn(table, "loss")
    dice = slicer.util.arrayFromTableColumn(table, "val_dice_mean")
    return list(zip(step.tolist(), loss.tolist(), dice.tolist()))


def test_fine_tuning_verdict_compares_the_held_out_dice_before_and_after():
    better = progress_rows.fine_tuning_verdict({"stage": "done", "best_step": 40, "best_dice_mean": 0.5071,
                                                "dice_mean_before": 0.4929})
    assert better == ("Mean Dice on the held-out slices: 0.493 before fine-tuning, 0.507 after.", False)
    message, worse = progress_rows.fine_tuning_verdict({"stage": "done", "best_dice_mean": 0.41,
                                                        "dice_mean_before": 0.49})
    assert worse and "lowered" in message and "0.490 to 0.410" in message
    # nothing to compare: no validation (best -1), a new model (no before), not the done line
    for event in ({"stage": "done", "best_step": None, "best_dice_mean": -1.0, "dice_mean_before": 0.4},
                  {"stage": "done", "best_step": 6, "best_dice_mean": 0.61},
                  {"stage": "done", "best_dice_mean": float("nan"), "dice_mean_before": 0.4},
                  {"stage": "validation", "dice_mean": 0.5, "dice_mean_before": 0.4}, None):
        assert progress_rows.fine_tuning_verdict(event) is None


def test_curves_table_and_chart_in_a_real_scene(capsys):
    scene = slicer.vtkMRMLScene()
    curves = training_plot.TrainingCurves(scene)
    lines = _train_output(capsys)
    for line in lines:
        curves.addLine(line)
    _check_nodes(scene, curves)
    _assert_rows(_table_rows(curves.tableNode))
    _assert_rows(curves.rows())
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 2
    # a new training: same nodes, empty table
    table, chart = curves.tableNode, curves.chartNode
    curves.reset()
    assert curves.tableNode is table and curves.chartNode is chart and curves.rows() == []
    curves.addLine(lines[2])
    _assert_rows(curves.rows(), [EXPECTED[0]])
    # the scene was closed: everything is made again and wired to the new table
    scene.Clear(0)
    curves.addLine(lines[3])
    _check_nodes(scene, curves)
    assert curves.tableNode is not table
    _assert_rows(_table_rows(curves.tableNode), [EXPECTED[1]])
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1


def test_trainer_logic_plots_progress_and_resets_on_new_training(capsys, monkeypatch, tmp_path):
    mod = _import_module_without_qt(monkeypatch, "MaskSAMTrainer")
    started = []

    class FakeRun:  # the logic starts the train process through EngineRun; record the command instead
        def __init__(self, builder, **kwargs):
            self.command = builder(tmp_path)
            started.append(self.command)

    monkeypatch.setattr(mod.engine_process, "EngineRun", FakeRun)
    scene = slicer.vtkMRMLScene()
    logic = mod.MaskSAMTrainerLogic(scene)
    lines = _train_output(capsys)
    logic.startTraining(str(tmp_path / "ds"), str(tmp_path / "out"), None, 6, "cpu", ["liver"])
    assert started and started[0][1:3] == ["-m", "masksam_core.train"] and "json" in started[0]
    # by default a quarter of the slices is held out, so the chart shows the Dice before and after
    assert started[0][started[0].index("--val-slices") + 1] == "auto"
    added = [logic.recordLine(line) for line in lines]
    assert sum(r is not None for r in added) == len(EXPECTED)
    assert logic.curves.tableNode.GetScene() is scene
    _check_nodes(scene, logic.curves)
    _assert_rows(_table_rows(logic.curves.tableNode))
    # decoded progress objects (what the widget passes) give the same rows
    logic.startTraining(str(tmp_path / "ds"), str(tmp_path / "out2"), None, 6, "cpu", ["liver"], holdOut=False)
    assert logic.curves.rows() == [] and "--val-slices" not in started[1]
    for line in lines:
        data = progress_rows.parse_line(line)
        if data is not None:
            logic.recordProgress(data)
    _assert_rows(logic.curves.rows())
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
