"""``python -m masksam_core.evaluate``: Dice, HD95 and surface Dice per organ, matching organs by name.

    python -m masksam_core.evaluate --pred P --ref R [--labels MAP.json] --out report.json [--resample-ref]
        [--tolerance-mm 2]

P and R are labelmap files, or folders of them (paired by file name). Label names come from ``--labels``: either
``{"pred": {...}, "ref": {...}}``, or one ``{value: name}`` map, which names the reference's values and the
prediction's only when the prediction has no JSON sidecar (a prediction's own sidecar, written with it by
``predict``, always names its values: one map for both would silently mislabel a prediction whose numbering
differs from the reference's). Without ``--labels`` each file's sidecar is used, and the reference falls back to
the prediction's names. Predictions and references on different grids are refused
unless ``--resample-ref`` (nearest neighbour onto the prediction's grid). Writes report.json, report.csv and a
PNG bar chart of Dice per organ, each atomically.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .cli_util import run_cli
from .errors import InputError, MaskSAMError
from .evaluation.metrics import dice, hd95, surface_dice

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _stem(name: str) -> str:
    lower = name.lower()
    for s in (".seg.nrrd",) + VOLUME_SUFFIXES:
        if lower.endswith(s):
            return name[: -len(s)]
    return name


LabelMap = Optional[Dict[int, str]]  # {value: organ name}


def _sidecar_labels(path: Path) -> LabelMap:
    side = path.with_name(_stem(path.name) + ".json")
    if side.exists():
        try:
            data = json.loads(side.read_text())
        except json.JSONDecodeError:
            return None
        if isinstance(data.get("labels"), dict):
            return {int(k): v for k, v in data["labels"].items()}
    return None


def _label_maps(labels_file: Optional[str]) -> Tuple[LabelMap, LabelMap, LabelMap]:
    """From ``--labels``: (the prediction's map, the reference's map, the prediction's fallback map, used only when
    the prediction has no sidecar: the one map given for both)."""
    if not labels_file:
        return None, None, None
    p = Path(labels_file)
    if not p.exists():
        raise InputError(f"labels file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if "pred" in data or "ref" in data:
            conv = {k: ({int(v): str(n) for v, n in data[k].items()} if k in data else None) for k in ("pred", "ref")}
            return conv["pred"], conv["ref"], None
        both = {int(v): str(n) for v, n in data.items()}
    except (UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise InputError(f"--labels {p.name} must be a JSON object {{\"value\": \"name\"}} (or {{\"pred\": {{...}}, "
                         f"\"ref\": {{...}}}}): {str(exc).splitlines()[0][:120]}") from None
    return None, both, both


def _read(path: Path) -> sitk.Image:
    if not path.exists():
        raise InputError(f"file not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"cannot read {path.name} as an image") from None


def evaluate_case(pred_path: Path, ref_path: Path, pred_labels: LabelMap, ref_labels: LabelMap, resample_ref: bool,
                  tolerance: float, fallback_pred_labels: LabelMap = None) -> Dict:
    """Metrics of one case. The prediction's names: ``pred_labels``, else its own sidecar, else
    ``fallback_pred_labels``; the reference's: ``ref_labels``, else its sidecar, else the prediction's."""
    from .data.geometry import resample_to_reference, same_grid

    pred_img, ref_img = _read(pred_path), _read(ref_path)
    if not same_grid(pred_img, ref_img, tol=1e-3):
        if not resample_ref:
            raise InputError(f"{pred_path.name} and {ref_path.name} are on different grids (size, spacing, origin "
                             f"or direction); use --resample-ref to resample the reference onto the prediction")
        ref_img = resample_to_reference(ref_img, pred_img, sitk.sitkNearestNeighbor, 0)
    pl = pred_labels or _sidecar_labels(pred_path) or fallback_pred_labels
    rl = ref_labels or _sidecar_labels(ref_path) or pl
    if not pl:
        raise InputError(f"no label names for {pred_path.name}: give --labels or keep its JSON sidecar")
    ref_by_name = {n: v for v, n in rl.items()}
    common = [(v, n) for v, n in sorted(pl.items()) if n in ref_by_name]
    if not common:
        raise InputError(f"no organ names in common between {pred_path.name} and {ref_path.name}")
    pred = sitk.GetArrayViewFromImage(pred_img)
    ref = sitk.GetArrayViewFromImage(ref_img)
    spacing = pred_img.GetSpacing()[::-1]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    organs = {}
    for value, name in common:
        p = pred == value
        r = ref == ref_by_name[name]
        organs[name] = {"dice": dice(p, r), "hd95_mm": hd95(p, r, spacing),
                        f"surface_dice_{tolerance:g}mm": surface_dice(p, r, spacing, tolerance),
                        "pred_volume_ml": round(float(p.sum()) * voxel_ml, 3),
                        "ref_volume_ml": round(float(r.sum()) * voxel_ml, 3)}
    return {"pred": str(pred_path), "ref": str(ref_path), "organs": organs, "mean": _means(organs)}


def _means(organs: Dict[str, Dict]) -> Dict[str, Optional[float]]:
    out = {}
    present = [o for o in organs.values() if o["ref_volume_ml"] > 0]
    keys = [k for k in (present[0] if present else {}) if not k.endswith("_ml")]
    for k in keys:
        vals = [o[k] for o in present if o[k] is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def pair_cases(pred: Path, ref: Path) -> List[Tuple[Path, Path]]:
    if pred.is_dir():
        if not ref.is_dir():
            raise InputError("--pred is a folder, so --ref must be a folder too")
        refs = {_stem(p.name): p for p in ref.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES)}
        pairs = [(p, refs[_stem(p.name)]) for p in sorted(pred.iterdir())
                 if p.name.lower().endswith(VOLUME_SUFFIXES) and _stem(p.name) in refs]
        if not pairs:
            raise InputError(f"no predictions in {pred} have a reference of the same name in {ref}")
        return pairs
    return [(pred, ref)]


def write_report(report: Dict, out: Path, overwrite: bool = True) -> None:
    from .data.volume_io import atomic_output

    with atomic_output(out, overwrite) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    metric_keys = None
    for case in report["cases"]:
        for organ, values in case["organs"].items():
            if metric_keys is None:
                metric_keys = list(values)
                writer.writerow(["case", "organ"] + metric_keys)
            writer.writerow([Path(case["pred"]).name, organ] + ["" if values[k] is None else values[k] for k in metric_keys])
    with atomic_output(out.with_suffix(".csv"), overwrite) as tmp:
        tmp.write_text(buf.getvalue())
    _plot(report, out.with_suffix(".png"), overwrite)


def _plot(report: Dict, png: Path, overwrite: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.volume_io import atomic_output

    per_organ: Dict[str, List[float]] = {}
    for case in report["cases"]:
        for organ, values in case["organs"].items():
            if values["dice"] is not None and values["ref_volume_ml"] > 0:
                per_organ.setdefault(organ, []).append(values["dice"])
    names = list(per_organ)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 1), 3.5))
    ax.bar(range(len(names)), [float(np.mean(per_organ[n])) for n in names], color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    fig.tight_layout()
    with atomic_output(png, overwrite) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m masksam_core.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--pred", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--labels", help="JSON label map(s)")
    ap.add_argument("--out", required=True, help="report .json (a .csv and a .png are written beside it)")
    ap.add_argument("--resample-ref", action="store_true")
    ap.add_argument("--tolerance-mm", type=float, default=2.0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise MaskSAMError("--out must end with .json")
    pred_labels, ref_labels, fallback = _label_maps(args.labels)
    cases = [evaluate_case(p, r, pred_labels, ref_labels, args.resample_ref, args.tolerance_mm, fallback)
             for p, r in pair_cases(Path(args.pred), Path(args.ref))]
    keys = list(cases[0]["mean"])
    mean = {k: (float(np.mean([c["mean"][k] for c in cases if c["mean"].get(k) is not None]))
                if any(c["mean"].get(k) is not None for c in cases) else None) for k in keys}
    report = {"cases": cases, "mean_over_cases": mean, "tolerance_mm": args.tolerance_mm}
    write_report(report, out)
    print(json.dumps({"cases": len(cases), **mean}))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
