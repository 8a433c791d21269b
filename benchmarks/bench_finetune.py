"""Fine-tuning time and what it buys: ``python -m masksam_core.train --init-from MODEL`` on one labelled case.

    python benchmarks/bench_finetune.py [--model DIR] [--data DATASET] [--val-slices auto|CASE:SPEC] [--steps 40]
        [--steps-per-epoch N] [--work DIR] [-- extra train options]

Runs the fine-tuning command the MaskSAM Trainer runs (its default 40 steps; the train command's fine-tuning
defaults: one cached copy, 3 decoded queries per step, validation before the first step and after the last), in
its own process (CPU recipe: cached frozen-encoder features), and prints one JSON line: the wall time from
command to tuned model and its parts (until the first step: loading, the feature cache and the base model's
validation; the steps; the later validations), seconds per step, peak RSS, and the mean validation Dice on the
held-out slices before fine-tuning (the base model, step 0) and after (the last step, and the best).

The held-out slices are ``--val-slices auto`` unless given: a quarter of each case's slices, in blocks of 6,
as the MaskSAM Trainer holds out. Without ``--data`` it builds an nnU-Net v2 folder from TotalSegmentator's
example CT in the shared data folder (``$MASKSAM_SHARED_DATA`` or ``../shared/data``;
``totalseg-example/s1_ct.nii.gz`` with its labels), where these are the slices the default model's validation
uses (18-23, 42-47, 66-71, 90-95). Note that the bundled default model was trained on the other slices of
that very subject; give a case of your own to measure what fine-tuning buys on a new patient.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VAL_SLICES = "auto"  # the MaskSAM Trainer's hold-out; on s1, the default model's validation slices (tested)


def totalseg_example_dataset(root: Path) -> Path:
    """An nnU-Net v2 raw folder (case "s1") from the shared data's TotalSegmentator example CT."""
    shared = Path(os.environ.get("MASKSAM_SHARED_DATA", REPO.parent / "shared" / "data")) / "totalseg-example"
    if not (shared / "s1_ct.nii.gz").is_file():
        sys.exit(f"bench_finetune: no --data and no example CT at {shared} (set MASKSAM_SHARED_DATA)")
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared / "s1_ct.nii.gz", root / "imagesTr" / "s1_0000.nii.gz")
    shutil.copyfile(shared / "s1_labels.nii.gz", root / "labelsTr" / "s1.nii.gz")
    names = json.loads((shared / "labels_total.json").read_text())
    labels = {"background": 0, **{name: int(value) for value, name in names.items()}}
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                   "numTraining": 1, "file_ending": ".nii.gz"}))
    return root


def run_fine_tuning(cmd: list) -> dict:
    """Run the training command; time its stages from the progress lines it prints."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step_stamps, validations, validation_s = [], [], 0.0
    last = t0
    for line in proc.stdout:
        now = time.perf_counter()
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event.get("stage") == "train":
            step_stamps.append(now)
        elif event.get("stage") == "validation":
            validations.append(event)
            if step_stamps:  # it ran between the step's line and this one (step 0's: before the first step)
                validation_s += now - last
        last = now
    stderr = proc.stderr.read()
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": stderr.strip().splitlines()[-1:] or f"exit code {proc.returncode}"}
    gaps = sorted(b - a for a, b in zip(step_stamps, step_stamps[1:]))
    dice = [v for v in validations if v.get("dice_mean") is not None]
    before = [v for v in dice if v.get("step") == 0]
    after = [v for v in dice if v.get("step") != 0]
    return {
        "wall_s": round(wall, 1),
        "until_first_step_s": round(step_stamps[0] - t0, 1) if step_stamps else None,  # cache, base validation
        "steps": len(step_stamps),
        "seconds_per_step_median": round(gaps[len(gaps) // 2], 2) if gaps else None,
        "validations_after_step_0_s": round(validation_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "val_dice_mean_before": before[0]["dice_mean"] if before else None,
        "val_dice_mean_after": after[-1]["dice_mean"] if after else None,
        "val_dice_mean_best": max(v["dice_mean"] for v in after) if after else None,
        "val_dice_curve": [(v["step"], v["dice_mean"]) for v in dice],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "masksam_core" / "models" / "default"),
                    help="model folder to fine-tune (default: the bundled default model)")
    ap.add_argument("--data", help="nnU-Net v2 or MSD dataset folder (default: the shared example CT)")
    ap.add_argument("--val-slices", default=DEFAULT_VAL_SLICES,
                    help=f"held-out slices, CASE:SPEC or auto (default: {DEFAULT_VAL_SLICES})")
    ap.add_argument("--steps", type=int, default=40, help="training steps (default 40, the MaskSAM Trainer's)")
    ap.add_argument("--steps-per-epoch", type=int,
                    help="validate every N steps (default: the train command's, 50: only before and after)")
    ap.add_argument("--work", help="folder for the dataset copy, cache and tuned model (default: a temporary one)")
    ap.add_argument("extra", nargs="*", help="more train options, after --")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="masksam_bench_ft_") as tmp:
        work = Path(args.work or tmp)
        data = Path(args.data) if args.data else totalseg_example_dataset(work / "data")
        out = work / "tuned"
        cmd = [sys.executable, "-m", "masksam_core.train", "--data", str(data), "--out", str(out), "--init-from",
               args.model, "--max-steps", str(args.steps), "--cache-dir", str(work / "cache"), "--progress", "json",
               "--overwrite", "--val-slices", args.val_slices] + \
            (["--steps-per-epoch", str(args.steps_per_epoch)] if args.steps_per_epoch else []) + list(args.extra)
        result = run_fine_tuning(cmd)
        print(json.dumps({"bench": "finetune", "model": args.model, "data": str(args.data or "totalseg-example s1"),
                          "val_slices": args.val_slices, "max_steps": args.steps, **result}), flush=True)


if __name__ == "__main__":
    main()
