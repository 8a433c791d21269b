"""The train process as MaskSAMTrainer runs it: its command line, where its model goes, and what its end means
(plain Python: no Slicer, no Qt, tested everywhere).

Stop contract with ``python -m masksam_core.train``: on SIGTERM / SIGINT (CTRL_BREAK on Windows) it finishes the
current step, writes a valid model folder whose ``model.json`` has ``training.stopped = {"step": k, "max_steps": n}``,
prints ``Stopped at step k of n; model saved to <dir>`` and exits 0. ``--checkpoint-every`` makes the checkpoints
frequent enough that a stop keeps recent work.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence

STOPPED_LINE = re.compile(r"^Stopped at step (\d+) of (\d+); model saved to (.+?)\s*$")
STOP_GRACE_S = 60.0  # how long Stop waits for train to finish its step and save before killing it


def checkpoint_every(max_steps: int) -> int:
    """A checkpoint interval that keeps a Stop useful: about four checkpoints per run (10 for 40 steps)."""
    return max(1, int(max_steps) // 4)


def train_command(python: str, dataset: str, out: str, init_from: Optional[str], max_steps: int, device: str,
                  classes: Sequence[str], val_fraction: Optional[float] = None,
                  val_slices: Optional[str] = None) -> list:
    """The ``python -m masksam_core.train`` command line; ``val_slices`` "auto" holds out a quarter of each case's
    slices (validated before the first step and after the last), ``val_fraction`` 0 validates nothing; with
    neither, train picks its default validation."""
    cmd = [python, "-m", "masksam_core.train", "--data", dataset, "--out", out, "--max-steps", str(max_steps),
           "--device", device, "--progress", "json", "--classes", ",".join(classes),
           "--checkpoint-every", str(checkpoint_every(max_steps))]
    if init_from:
        cmd += ["--init-from", init_from]
    if val_fraction is not None:  # 0: no validation (train's default would hold some out)
        cmd += ["--val-fraction", str(val_fraction)]
    if val_slices:
        cmd += ["--val-slices", val_slices]
    return cmd


def unique_output_dir(wanted: str) -> str:
    """``wanted`` when it is free, else ``wanted-2``, ``wanted-3``, ...: a second training with the same model name
    writes a new model instead of failing (the Slicer user cannot pass train's --resume / --overwrite)."""
    path = Path(wanted)
    if not path.exists():
        return str(path)
    k = 2
    while path.with_name(f"{path.name}-{k}").exists():
        k += 1
    return str(path.with_name(f"{path.name}-{k}"))


class Stopped(NamedTuple):
    step: int
    max_steps: int


def parse_stopped_line(line: str) -> Optional[Dict[str, Any]]:
    """``Stopped at step k of n; model saved to <dir>`` -> {"step", "max_steps", "folder"}; None for other lines."""
    match = STOPPED_LINE.match(line.strip())
    if not match:
        return None
    return {"step": int(match.group(1)), "max_steps": int(match.group(2)), "folder": match.group(3)}


def stopped_marker(model_dir: str) -> Optional[Stopped]:
    """``training.stopped`` of a model folder's card, or None (a complete model, or no readable card)."""
    try:
        card = json.loads((Path(model_dir) / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stopped = (card.get("training") or {}).get("stopped") if isinstance(card, dict) else None
    if not isinstance(stopped, dict):
        return None
    try:
        return Stopped(int(stopped["step"]), int(stopped["max_steps"]))
    except (KeyError, TypeError, ValueError):
        return None


class Outcome(NamedTuple):
    """What a finished train process left: ``kind`` is "complete", "stopped" (a valid partial model),
    "nothing" (stopped before anything was saved) or "failed"; ``model`` the folder to register, if any."""

    kind: str
    message: str
    model: Optional[str]


def outcome(exit_code: int, model_dir: str, stop_requested: bool) -> Outcome:
    """Interpret the end of a training run for the user (never CLI advice: the Slicer user cannot pass flags)."""
    has_model = (Path(model_dir) / "model.json").is_file()
    if has_model:
        stopped = stopped_marker(model_dir)
        if stopped is not None:
            return Outcome("stopped", f"Training stopped at step {stopped.step} of {stopped.max_steps}; the partial "
                                      f"model was saved to {model_dir}.", model_dir)
        if exit_code == 0:
            return Outcome("complete", f"Model saved to {model_dir}.", model_dir)
        return Outcome("complete", f"Model saved to {model_dir}, but training then ended with exit code "
                                   f"{exit_code}; see the log.", model_dir)
    if stop_requested:
        return Outcome("nothing", "Training stopped before its first checkpoint; no model was saved.", None)
    return Outcome("failed", f"Training failed (exit code {exit_code}); see the log.", None)
