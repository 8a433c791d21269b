"""``python -m masksam_core.train --progress json`` output -> rows of the training-curves table (no Slicer, no Qt).

The train process prints one JSON object per line on stdout (``masksam_core.training.progress_log.Progress``):

- after every step: ``{"stage": "train", "done": <step>, "total": <max steps>, "loss": <float>}``
- after every validation: ``{"stage": "validation", "done": <step>, "total": ..., "step": <step>,
  "dice_mean": <float>, "aux_dice_mean": <float>}``, with ``null`` when no organ could be scored (no decoded masks
  in the prompt-generator stage; ``NaN``, as older versions wrote it, is read the same way); when fine-tuning, a
  first one at step 0 scores the base model
- at the end: ``{"stage": "done", "best_step": ..., "best_dice_mean": ...}``, with ``"dice_mean_before"`` (the
  base model's) when fine-tuning with validation

interleaved with plain log lines. A train line becomes a row ``(step, loss, NaN)``, a validation line a row
``(step, NaN, dice_mean)``; everything else (including a validation without any Dice) gives no row.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

NAN = float("nan")


class PlotRow(NamedTuple):
    """One row of the curves table; NaN marks the value the row does not carry."""

    step: int
    loss: float
    dice_mean: float


def _number(value: Any) -> Optional[float]:
    """A JSON number as float (NaN and infinities included); None for anything else (bool, str, null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _step(value: Any) -> Optional[int]:
    number = _number(value)
    if number is None or not math.isfinite(number) or number < 0 or number != int(number):
        return None
    return int(number)


def row_from_progress(data: Dict[str, Any]) -> Optional[PlotRow]:
    """The plot row of one decoded progress object, or None when it carries no point for the curves."""
    if not isinstance(data, dict):
        return None
    stage = data.get("stage")
    if stage == "train":
        step, loss = _step(data.get("done")), _number(data.get("loss"))
        if step is None or loss is None:
            return None
        return PlotRow(step, loss, NAN)
    if stage == "validation":
        step = _step(data.get("step", data.get("done")))
        dice = _number(data.get("dice_mean"))
        if step is None or dice is None or math.isnan(dice):
            return None
        return PlotRow(step, NAN, dice)
    return None


def fine_tuning_verdict(done: Dict[str, Any]) -> Optional[Tuple[str, bool]]:
    """(message, worse) from the train process's ``done`` object: the held-out Dice of the base model and of the
    tuned one, ``worse`` when fine-tuning lowered it; None without both numbers (no validation, or not fine-tuning)."""
    if not isinstance(done, dict) or done.get("stage") != "done":
        return None
    before, after = _number(done.get("dice_mean_before")), _number(done.get("best_dice_mean"))
    if before is None or after is None or math.isnan(before) or math.isnan(after) or after < 0:
        return None
    if after < before:
        return (f"Fine-tuning lowered the mean Dice on the held-out slices from {before:.3f} to {after:.3f}: keep "
                f"using the base model, or train with more or better-corrected cases.", True)
    return f"Mean Dice on the held-out slices: {before:.3f} before fine-tuning, {after:.3f} after.", False


def parse_line(line: str) -> Optional[Dict[str, Any]]:
    """A progress line decoded (``NaN``/``Infinity`` accepted, as ``json.dumps`` writes them); None for other
    output."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "stage" in data else None


def row_from_line(line: str) -> Optional[PlotRow]:
    """The plot row of one line the train process printed, or None."""
    data = parse_line(line)
    return row_from_progress(data) if data is not None else None


def rows_from_lines(lines: Iterable[str]) -> List[PlotRow]:
    """The plot rows of a sequence of output lines, in order."""
    return [row for row in (row_from_line(line) for line in lines) if row is not None]
