"""End-to-end segmentation time (file in, labelmap out), slices per second and peak RSS on a CT-like volume.

    python benchmarks/bench_predict.py [--model DIR | --untrained] [--size 512 512 300] [--spacing 0.8 0.8 1.0]
        [--settings default,fast,no-prune,fp32,bf16,fast-bf16] [--device cpu|cuda]
        [--input CT [--ref LABELS --ref-labels MAP.json]]

Each setting runs ``python -m masksam_core.predict`` in its own process (so peak RSS is that run's); one JSON
line per setting. Without ``--model`` the bundled default model runs; ``--untrained`` makes an untrained LiteMedSAM
model folder instead (its pruning depends on random auxiliary masks: it decodes nearly every query). ``--input`` benchmarks a
real volume instead of the synthetic one; with ``--ref`` (a labelmap on the same grid) and ``--ref-labels``
({value: name}) each setting also reports its Dice per organ against it, so a speed-up's cost in Dice shows.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from masksam_core.demo import dice_by_name

SETTINGS = {"default": [], "fast": ["--fast"], "no-prune": ["--no-prune"], "fp32": ["--precision", "fp32"],
            "bf16": ["--precision", "bf16"], "fast-bf16": ["--fast", "--precision", "bf16"],
            "torch": ["--runtime", "torch"], "fast-torch": ["--fast", "--runtime", "torch"],
            "overlap25": ["--overlap", "0.25"], "overlap0": ["--overlap", "0"],
            "decode-background": ["--decode-background-query"], "no-atlas": ["--no-atlas"],
            "fast-no-atlas": ["--fast", "--no-atlas"]}


def ct_like(size, spacing) -> sitk.Image:
    """Air, a body ellipse of soft tissue, a liver-like blob, bright vertebrae: float32 HU on an LPS grid."""
    x, y, z = size
    yy, xx = np.mgrid[0:y, 0:x]
    sl = np.full((y, x), -1000, np.int16)
    body = ((xx - x / 2) / (x * 0.42)) ** 2 + ((yy - y / 2) / (y * 0.32)) ** 2 <= 1
    sl[body] = 40
    sl[((xx - x * 0.38) / (x * 0.12)) ** 2 + ((yy - y * 0.45) / (y * 0.1)) ** 2 <= 1] = 60
    sl[((xx - x / 2) / (x * 0.03)) ** 2 + ((yy - y * 0.7) / (y * 0.03)) ** 2 <= 1] = 700
    vol = np.broadcast_to(sl, (z, y, x)).copy()
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(spacing)
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the bundled default model)")
    ap.add_argument("--untrained", action="store_true", help="an untrained LiteMedSAM model instead")
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0])
    ap.add_argument("--settings", default="default,fast")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--input", help="a real volume to segment instead of the synthetic one")
    ap.add_argument("--ref", help="reference labelmap on --input's grid")
    ap.add_argument("--ref-labels", help="JSON {value: name} of --ref")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="masksam-bench-"))
    model = args.model
    if model is None and not args.untrained:
        from masksam_core.predict import resolve_model_dir

        model = str(resolve_model_dir(None))
    if model is None:
        model = str(work / "untrained")
        subprocess.run([sys.executable, "-m", "masksam_core.model", "init", "--backbone", "litemedsam", "--classes",
                        "liver,spleen,aorta,kidney_left,kidney_right", "--out", model], check=True,
                       stdout=subprocess.DEVNULL)
    if args.input:
        src = Path(args.input)
        probe = sitk.ReadImage(str(src))
        args.size, args.spacing = list(probe.GetSize()), [round(v, 3) for v in probe.GetSpacing()]
    else:
        src = work / "ct.nii.gz"
        sitk.WriteImage(ct_like(args.size, args.spacing), str(src))
    ref = ref_names = None
    if args.ref:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(args.ref))
        ref_names = {int(k): v for k, v in json.loads(Path(args.ref_labels).read_text()).items()}
    for name in args.settings.split(","):
        out = work / f"{name}.nii.gz"
        cmd = [sys.executable, "-m", "masksam_core.predict", "-i", str(src), "-o", str(out), "--model", model,
               "--device", args.device, "--progress", "json", "--overwrite"] + SETTINGS[name]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if result.returncode:
            print(json.dumps({"setting": name, "error": result.stderr.strip().splitlines()[-1:]}))
            continue
        side = json.loads((work / f"{name}.json").read_text())
        z_mm = args.size[2] * args.spacing[2]
        row = {"bench": "predict", "setting": name, "input": str(src.name), "size": args.size,
               "spacing": args.spacing, "wall_s": round(wall, 1), "engine_s": side["runtime_s"],
               "encoder_runtime": side.get("encoder_runtime"),
               "decoded_queries": side.get("engine_stats", {}).get("decoded_queries"),  # (slab, query) pairs
               "input_slices_per_s": round(args.size[2] / wall, 2), "z_extent_mm": z_mm,
               "peak_rss_mb": round(max(peak, before) / 1024, 0)}
        if ref is not None:
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
            dice = dice_by_name(pred, {int(k): v for k, v in side["labels"].items()}, ref, ref_names)
            row["dice_mean"] = round(float(np.mean(list(dice.values()))), 3) if dice else None
            row["dice"] = {k: round(v, 3) for k, v in dice.items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
