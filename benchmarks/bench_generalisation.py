"""How well a model finds the organs on patients it was not trained on: proxy cases, and real cases you name.

    python benchmarks/bench_generalisation.py [--model DIR] [--proxies 4] [--settings default,no-atlas]
        [--case NAME=IMAGE,LABELS[,LABELS_JSON]] ...

Proxy cases (``masksam_core/evaluation/proxy.py``) are s1 (``../shared/data``) strongly deformed, re-scanned and
cropped: another "patient" whose labels are exact. ``--case`` adds a real scan with reference labels (a NIfTI/NRRD
file or DICOM folder, its labelmap, and the labelmap's {value: name} JSON; TotalSegmentator's numbering by
default), for instance TotalSegmentator's DICOM example CT, which this project never trains or tunes on. Each
setting is an :class:`InferenceOptions` variant: ``default``, ``no-atlas`` (prompt generator only), ``model-class``
(the class head names the prior's masks) or ``k=v`` pairs joined by ``+`` (``prior_weight=0.3``).

Prints one line per case and setting (mean Dice over the organs present in the reference, per organ, and the
organs painted that the reference does not hold, in ml) and a JSON summary at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from masksam_core import load_model  # noqa: E402
from masksam_core.data.volume_io import read_volume  # noqa: E402
from masksam_core.evaluation.proxy import make_proxy_case  # noqa: E402
from masksam_core.inference.engine import InferenceOptions, prepare_input, segment_prepared  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "totalseg-example"
NAMED = {"default": {}, "no-atlas": {"atlas_prior": False}, "model-class": {"prior_class": "model"}}


def parse_setting(text: str) -> dict:
    if text in NAMED:
        return NAMED[text]
    out = {}
    for part in text.split("+"):
        key, _, value = part.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "masksam_core" / "models" / "default"))
    p.add_argument("--proxies", type=int, default=4, help="proxy cases made from s1 (seeds 0..N-1)")
    p.add_argument("--settings", default="default,no-atlas")
    p.add_argument("--case", action="append", default=[], help="NAME=IMAGE,LABELS[,LABELS_JSON]")
    p.add_argument("--min-voxels", type=int, default=50, help="organs with fewer reference voxels are not scored")
    args = p.parse_args()

    model, card = load_model(args.model)
    value_of = {c["name"]: c["value"] for c in card.classes}
    ts_names = json.loads((SHARED / "labels_total.json").read_text()) if (SHARED / "labels_total.json").exists() \
        else None
    cases = []
    if args.proxies:
        if not (SHARED / "s1_ct.nii.gz").exists():
            print(f"no s1 at {SHARED}: proxy cases skipped", file=sys.stderr)
        else:
            image = sitk.ReadImage(str(SHARED / "s1_ct.nii.gz"), sitk.sitkFloat32)
            labels = sitk.ReadImage(str(SHARED / "s1_labels.nii.gz"))
            for seed in range(args.proxies):
                scan, ref, drawn = make_proxy_case(image, labels, seed)
                cases.append((f"proxy{seed}", scan, ref, ts_names, drawn))
    for spec in args.case:
        name, _, paths = spec.partition("=")
        parts = paths.split(",")
        names = json.loads(Path(parts[2]).read_text()) if len(parts) > 2 else ts_names
        scan = read_volume(parts[0])
        ref = sitk.Resample(sitk.ReadImage(parts[1]), scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        cases.append((name, scan, ref, names, {}))

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    summary = {}
    for name, scan, ref, names, drawn in cases:
        r = sitk.GetArrayFromImage(ref)
        ref_value = {n: int(v) for v, n in names.items()}
        organs = [n for n in value_of if n in ref_value and (r == ref_value[n]).sum() >= args.min_voxels]
        if drawn:
            print(f"{name}: {json.dumps(drawn)}")
        for setting in settings:
            options = dataclasses.replace(InferenceOptions(), **parse_setting(setting))
            start = time.perf_counter()
            volume = prepare_input(scan, card, options)
            labelmap, sidecar = segment_prepared(volume, model, card, options)
            seconds = time.perf_counter() - start
            pred = sitk.GetArrayFromImage(labelmap)
            scores = {n: round(dice(pred == value_of[n], r == ref_value[n]), 3) for n in organs}
            mean = round(float(np.mean(list(scores.values()))), 3) if scores else None
            # organs painted where the reference has none (another body region, a thin slab): should be empty
            spurious = {n: o["volume_ml"] for n, o in sidecar["organs"].items()
                        if n not in organs and n in ref_value and o["volume_ml"] >= 1.0}
            summary.setdefault(setting, {})[name] = mean
            print(f"{name:10s} {setting:14s} mean {mean} ({len(organs)} organs, {seconds:.1f} s, "
                  f"{sidecar['prompts']}) {json.dumps(scores)} absent but painted (ml): {json.dumps(spurious)}",
                  flush=True)
            for message in sidecar.get("warnings", []):
                print(f"    warning: {message}")
    for setting, per_case in summary.items():
        proxies = [v for k, v in per_case.items() if k.startswith("proxy") and v is not None]
        if proxies:
            per_case["proxy_mean"] = round(float(np.mean(proxies)), 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
