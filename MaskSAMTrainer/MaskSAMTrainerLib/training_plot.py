"""Live training curves as MRML nodes: a table (step, loss, validation Dice) shown by a plot chart (needs MRML, no Qt).

The table has one row per progress point of the train process (see :mod:`progress_rows`): a training step fills
``loss``, a validation fills ``val_dice_mean``, the other cell is NaN. The chart has two series on that table,
the loss as a line and the validation Dice as markers (validation rows are sparse and NaN-separated, so a line
through them would not be drawn anyway). A plot view node points at the chart for the module's plot widget.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import slicer

from .progress_rows import PlotRow, row_from_line, row_from_progress

STEP_COLUMN = "step"
LOSS_COLUMN = "loss"
DICE_COLUMN = "val_dice_mean"

TABLE_NAME = "MaskSAM training curves"
CHART_NAME = "MaskSAM training"
LOSS_SERIES_NAME = "Training loss"
DICE_SERIES_NAME = "Validation Dice (mean)"
PLOT_VIEW_LAYOUT_NAME = "MaskSAMTrainerPlot"

LOSS_COLOR = (0.17, 0.39, 0.75)
DICE_COLOR = (0.90, 0.45, 0.10)


class TrainingCurves:
    """Owns the curves' table, chart, series and plot view nodes in ``scene`` (default ``slicer.mrmlScene``).

    Nodes are created on first use and re-created when the scene lost them (scene closed); ``reset()`` empties
    the table for a new training.
    """

    def __init__(self, scene=None) -> None:
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.tableNode = None
        self.chartNode = None
        self.lossSeriesNode = None
        self.diceSeriesNode = None
        self.plotViewNode = None

    # ------------------------------------------------------------------------------------------------- nodes

    def _present(self, node) -> bool:
        return node is not None and bool(self.scene.IsNodePresent(node))

    def ensureNodes(self):
        """Create whatever node is missing from the scene; returns the plot view node (for qMRMLPlotWidget)."""
        if not self._present(self.tableNode):
            self.tableNode = self._newTable()
        if not self._present(self.lossSeriesNode):
            self.lossSeriesNode = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", LOSS_SERIES_NAME)
        if not self._present(self.diceSeriesNode):
            self.diceSeriesNode = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", DICE_SERIES_NAME)
        self._styleLoss(self.lossSeriesNode)
        self._styleDice(self.diceSeriesNode)
        if not self._present(self.chartNode):
            self.chartNode = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", CHART_NAME)
        self._styleChart(self.chartNode)
        if not self._present(self.plotViewNode):
            self.plotViewNode = self.scene.AddNewNodeByClass("vtkMRMLPlotViewNode")
            self.plotViewNode.SetLayoutName(PLOT_VIEW_LAYOUT_NAME)
            self.plotViewNode.SetLayoutLabel("T")
        if self.plotViewNode.GetPlotChartNodeID() != self.chartNode.GetID():
            self.plotViewNode.SetPlotChartNodeID(self.chartNode.GetID())
        return self.plotViewNode

    def _newTable(self):
        import vtk

        node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", TABLE_NAME)
        wasModifying = node.StartModify()
        table = node.GetTable()
        for name, array_class in ((STEP_COLUMN, vtk.vtkIntArray), (LOSS_COLUMN, vtk.vtkDoubleArray),
                                  (DICE_COLUMN, vtk.vtkDoubleArray)):
            array = array_class()
            array.SetName(name)
            table.AddColumn(array)
        node.SetColumnTitle(STEP_COLUMN, "Step")
        node.SetColumnTitle(LOSS_COLUMN, "Training loss")
        node.SetColumnTitle(DICE_COLUMN, "Validation Dice (mean)")
        node.SetColumnDescription(LOSS_COLUMN, "Training loss after the step; NaN on validation rows")
        node.SetColumnDescription(DICE_COLUMN, "Mean Dice over the validation organs; NaN on training rows")
        node.SetUseColumnTitleAsColumnHeader(True)
        node.EndModify(wasModifying)
        return node

    def _series(self, node, y_column: str, color: Tuple[float, float, float]) -> None:
        node.SetAndObserveTableNodeID(self.tableNode.GetID())
        node.SetXColumnName(STEP_COLUMN)
        node.SetYColumnName(y_column)
        node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)  # x from the step column
        node.SetColor(*color)

    def _styleLoss(self, node) -> None:
        self._series(node, LOSS_COLUMN, LOSS_COLOR)
        node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
        node.SetLineWidth(2)
        node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)

    def _styleDice(self, node) -> None:
        self._series(node, DICE_COLUMN, DICE_COLOR)
        node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
        node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        node.SetMarkerSize(8)

    def _styleChart(self, node) -> None:
        for series in (self.lossSeriesNode, self.diceSeriesNode):
            if not node.HasPlotSeriesNodeID(series.GetID()):
                node.AddAndObservePlotSeriesNodeID(series.GetID())
        node.SetTitle("MaskSAM fine-tuning")
        node.SetXAxisTitle("Step")
        node.SetYAxisTitle("Loss / validation Dice")
        node.SetLegendVisibility(True)
        node.SetGridVisibility(True)

    # -------------------------------------------------------------------------------------------------- rows

    def reset(self) -> None:
        """Empty the table (a new training starts); the nodes stay, so views showing them stay connected."""
        self.ensureNodes()
        table = self.tableNode.GetTable()
        for k in range(table.GetNumberOfColumns()):
            table.GetColumn(k).SetNumberOfTuples(0)
        table.Modified()
        self.tableNode.Modified()

    def addRows(self, rows: Iterable[PlotRow]) -> int:
        """Append rows to the table (one Modified for all); returns how many were added."""
        rows = list(rows)
        if not rows:
            return 0
        self.ensureNodes()
        table = self.tableNode.GetTable()
        step = table.GetColumnByName(STEP_COLUMN)
        loss = table.GetColumnByName(LOSS_COLUMN)
        dice = table.GetColumnByName(DICE_COLUMN)
        for row in rows:
            step.InsertNextValue(int(row.step))
            loss.InsertNextValue(float(row.loss))
            dice.InsertNextValue(float(row.dice_mean))
        for array in (step, loss, dice):
            array.Modified()
        table.Modified()
        self.tableNode.Modified()
        return len(rows)

    def addLine(self, line: str) -> Optional[PlotRow]:
        """Add the row of one output line of the train process, if it carries one."""
        row = row_from_line(line)
        if row is not None:
            self.addRows([row])
        return row

    def addProgress(self, progress: dict) -> Optional[PlotRow]:
        """Add the row of one decoded progress object, if it carries one."""
        row = row_from_progress(progress)
        if row is not None:
            self.addRows([row])
        return row

    def rows(self) -> List[PlotRow]:
        """The table's rows (NaN where a value is missing)."""
        if not self._present(self.tableNode):
            return []
        table = self.tableNode.GetTable()
        step = table.GetColumnByName(STEP_COLUMN)
        loss = table.GetColumnByName(LOSS_COLUMN)
        dice = table.GetColumnByName(DICE_COLUMN)
        return [PlotRow(int(step.GetValue(i)), loss.GetValue(i), dice.GetValue(i))
                for i in range(table.GetNumberOfRows())]
