"""What a user sees during training: a CSV of every loss term and validation Dice, progress, curves.

- ``train_log.csv``: one row per step (loss terms) and one per validation (Dice per organ); appended, and
  truncated to the resumed step on ``--resume`` so that it matches the weights.
- progress: a tqdm bar, or JSON lines (``{"stage": "train", "done": k, "total": n, "loss": ...}``) for Slicer.
- ``curves.png``: loss and validation Dice against steps.
- TensorBoard scalars (``tensorboard/``) when the ``tensorboard`` package is installed, purged likewise on resume.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

LOG_FILE = "train_log.csv"


class TrainingLog:
    """CSV log with a fixed header: step, epoch, lr, loss, loss terms, val_dice_mean, val_dice_<organ>,
    val_aux_dice_mean, val_aux_dice_<organ> (the auxiliary masks' Dice; class-bound matching only)."""

    def __init__(self, folder: Path, loss_terms: List[str], organs: List[str], resume_step: Optional[int] = None,
                 tensorboard: bool = True) -> None:
        self.path = Path(folder) / LOG_FILE
        self.columns = ["step", "epoch", "lr", "loss"] + list(loss_terms) + ["val_dice_mean"] + \
            [f"val_dice_{o}" for o in organs] + ["val_aux_dice_mean"] + [f"val_aux_dice_{o}" for o in organs]
        rows = []
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(float(r["step"])) <= resume_step]
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.columns} for r in rows)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on resume, events after the resumed step (written before the kill) are purged, as in the CSV
                self.writer = SummaryWriter(str(Path(folder) / "tensorboard"),
                                            purge_step=None if resume_step is None else resume_step + 1)
            except Exception:  # tensorboard not installed
                self.writer = None

    def write(self, row: Dict[str, float]) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow({k: _fmt(row.get(k)) for k in self.columns})
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and value is not None:
                    self.writer.add_scalar(key, value, int(row["step"]))

    def rows(self) -> List[Dict[str, str]]:
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class Progress:
    """tqdm bar on a terminal, or JSON lines on stdout with ``json_lines=True``."""

    def __init__(self, total: int, initial: int = 0, json_lines: bool = False, desc: str = "train",
                 disable: bool = False) -> None:
        self.json_lines = json_lines
        self.total = total
        self.done = initial
        self.disable = disable
        self.bar = None
        if not json_lines and not disable:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, stage: str = "train", **values) -> None:
        self.done += 1
        if self.disable:
            return
        if self.json_lines:
            print(json.dumps({"stage": stage, "done": self.done, "total": self.total, **_round(values)}), flush=True)
        elif self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if isinstance(v, float)})

    def event(self, stage: str, **values) -> None:
        if self.disable:
            return
        if self.json_lines:
            print(json.dumps({"stage": stage, "done": self.done, "total": self.total, **_round(values)}), flush=True)
        elif self.bar is not None:
            self.bar.write(f"{stage}: " + ", ".join(f"{k}={_round1(v)}" for k, v in values.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _round1(v):
    return round(v, 4) if isinstance(v, float) else v


def _round(values: Dict) -> Dict:
    return {k: _round1(v) for k, v in values.items()}


def plot_curves(log_path: Path, out_png: Path) -> Optional[Path]:
    """Loss and validation Dice (decoded masks; auxiliary masks dashed, where logged) against steps, from the CSV
    log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Path(log_path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    loss = [(float(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    dice = [(float(r["step"]), float(r["val_dice_mean"])) for r in rows if r.get("val_dice_mean")]
    aux = [(float(r["step"]), float(r["val_aux_dice_mean"])) for r in rows if r.get("val_aux_dice_mean")]
    if not loss and not dice and not aux:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if loss:
        ax[0].plot(*zip(*loss), lw=0.8)
    ax[0].set(xlabel="step", ylabel="training loss", title="loss")
    if dice:
        ax[1].plot(*zip(*dice), marker="o", label="decoded masks")
    if aux:
        ax[1].plot(*zip(*aux), ls="--", marker=".", label="auxiliary masks (prompt generator)")
        ax[1].legend(loc="lower right", fontsize=8)
    ax[1].set(xlabel="step", ylabel="mean Dice", title="validation Dice", ylim=(0, 1))
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return Path(out_png)
