"""``python -m masksam_core.predict --demo``: segment TotalSegmentator's example CT and compare with its labels.

The sample is fetched once at run time (``masksam_core.sample_data``) and cached. The comparison is labelled
"training subject": the bundled model was trained on this very patient, so the Dice shows that the pipeline
works end to end, not how well the model generalises.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Dict

import numpy as np
import SimpleITK as sitk

from .errors import MaskSAMWarning


BOWEL = ("colon", "small_bowel", "duodenum", "stomach")


def dice_by_name(pred: np.ndarray, pred_labels: Dict[int, str], ref: np.ndarray, ref_labels: Dict[int, str]) -> Dict[str, float]:
    """Dice per organ name present in both label maps (reference-present organs only)."""
    ref_by_name = {name: int(v) for v, name in ref_labels.items()}
    out = {}
    for value, name in pred_labels.items():
        rv = ref_by_name.get(name)
        if rv is None:
            continue
        p = pred == int(value)
        r = ref == rv
        if r.any():
            out[name] = float(2 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return out


def run_demo(args: argparse.Namespace) -> int:
    from . import load_model, segment
    from .cli_util import resume_garbage_collector
    from .data.volume_io import read_volume
    from .evaluation.figure import save_overlay_figure, save_surface_figure
    from .inference.engine import InferenceOptions, resolve_device
    from .predict import make_progress, resolve_model_dir, strip_volume_suffix, write_outputs
    from .sample_data import get_sample

    model_dir = resolve_model_dir(args.model)  # fails fast, before any download, when there is no model
    out = Path(args.output or "masksam_demo/example_ct_organs.nii.gz")
    device = resolve_device(args.device)
    model, card = load_model(model_dir, device=str(device), sam_checkpoint=args.sam_checkpoint)
    resume_garbage_collector()  # paused while starting, when run as a command (see cli_util)
    sample = get_sample()
    image = read_volume(sample["ct"])
    report, close = make_progress(args.progress)
    options = InferenceOptions(device=str(device), fast=args.fast, cleanup=args.cleanup, precision=args.precision,
                               runtime=args.runtime, atlas_prior=not args.no_atlas)
    try:
        with warnings.catch_warnings():  # the sidecar holds them; printed below as one line each, as predict does
            warnings.simplefilter("ignore", MaskSAMWarning)
            labels, sidecar = segment(image, model, card, options, progress=report)
    finally:
        close()
    for message in sidecar.get("warnings", []):
        print(f"warning: {message}", file=sys.stderr, flush=True)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(sample["labels"])))
    dice = dice_by_name(sitk.GetArrayFromImage(labels), card.labels(), ref, sample["label_names"])
    sidecar["input"] = str(sample["ct"])
    sidecar["dice_vs_reference_training_subject"] = dice
    write_outputs(labels, sidecar, out, "nii.gz", card, Path(sample["ct"]), overwrite=True)
    figure = out.with_name(strip_volume_suffix(out.name) + ".png")  # beside the labelmap and its sidecar
    colours = {int(c["value"]): tuple(c["color"]) for c in card.classes}
    title = f"MaskSAM ({card.name}) on TotalSegmentator's example CT (training subject)"
    save_overlay_figure(image, labels, card.labels(), colours, figure, title=title)
    figure_3d = figure.with_name(figure.stem + "_3d.png")
    bowel = [int(c["value"]) for c in card.classes if c["name"] in BOWEL]  # drawn see-through: it hides the rest
    save_surface_figure(labels, card.labels(), colours, figure_3d, title=title, translucent=bowel)
    print(f"Segmented {sample['ct'].name} in {sidecar['runtime_s']:.1f} s -> {out} "
          f"(pictures: {figure}, {figure_3d})")
    print("Dice is against TotalSegmentator's labels of the TRAINING SUBJECT (not a generalisation measure).")
    print(f"{'organ':32s} {'volume (ml)':>12s} {'confidence':>11s} {'Dice (training subject)':>24s}")
    for name, organ in sidecar["organs"].items():
        d = dice.get(name)
        print(f"{name:32s} {organ['volume_ml']:12.1f} {organ['confidence'] or 0:11.3f} "
              f"{'-' if d is None else f'{d:.3f}':>24s}")
    missing = [n for n in dice if n not in sidecar["organs"]]
    for name in missing:
        print(f"{name:32s} {'not found':>12s} {'':>11s} {dice[name]:24.3f}")
    if dice:
        print(f"mean Dice (training subject): {np.mean(list(dice.values())):.3f}")
    if args.progress == "json":
        print(json.dumps({"stage": "done", "dice": dice}))
    return 0
