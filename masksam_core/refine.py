"""Refine one organ of a segmentation with a box: the organ is re-decoded there with the box as SAM's prompt.

API: :func:`refine`; command line: ``python -m masksam_core.refine`` (or ``masksam refine``)::

    python -m masksam_core.refine -i CT -s SEG --organ liver --box x0,y0,z0,x1,y1,z1 -o OUT [--model DIR]
        [--overwrite] [--take-from-others] [--progress json]

SAM is promptable: after a prompt-free run the user can say "the liver is in this box" and have the same decoder
re-decode that organ with the user's box as its prompt, in place of the prompt generator's (or the atlas's). A
class-bound model (card ``training.matching`` "class_bound": query c answers class c) is prompted through the same
path the atlas prior takes (``MaskSAM.forward_features(prior=...)``, see docs/design.md "The atlas prior"): a prior
in which only organ c is present, as the box's rectangle, on the model-space slices the box covers; ``mask_prompt``
"none" (SAM gets the box alone) and ``class`` "prior" (query c's mask is organ c). The slab engine lays the prompt
out exactly as it lays out the image (body crop, tiles, the centring of small regions on the canvas), blends the
organ's mask over overlapping slabs, and the organ is where the blended score exceeds the card's background
threshold (0.5 without one, i.e. SAM's sigmoid > 0.5).

Why no mask prompt: on TotalSegmentator's example CT (s1, the bundled model's training subject, so the numbers are
optimistic) with the liver, spleen or left kidney deleted on 5 slices at two heights each and a box around the
truth there, the organ's mean Dice on those slices was 0.948 with the box alone, 0.949 with the prompt generator's
mask as SAM's mask prompt and 0.952 with the box's rectangle as the mask prompt: no difference worth a choice, so
SAM gets what the user gave, the box. Each refinement took about 12 s on 2 CPU cores with the model loaded.

Coordinates: ``box_mm`` is (x0, y0, z0, x1, y1, z1) in physical LPS millimetres, as ITK, SimpleITK and the engine's
files use them (x grows to the patient's left, y to posterior, z to superior); the order of each pair does not
matter. Slicer shows RAS: a point (R, A, S) there is (-R, -A, S) here. On an oblique image the box is the model
grid's index bounding box of the physical box's eight corners.

What changes (and nothing else): only organ c, only on the box's slices (the model-space slices whose centre lies
within the box's z extent, mapped onto the input grid by nearest neighbour as the engine maps its labels). There,
organ c's voxels outside the new mask are cleared, and the new mask, confined to the box (SAM's box prompt says the
object lies in it), is set to c on background voxels. Another organ's voxels are kept even inside the new mask,
unless ``take_from_others`` (the user then says the box's organ wins where SAM's new mask covers them). Outside
the box's slices the segmentation is returned voxel for voxel; the output has the input's grid and pixel type.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .cli_util import run_cli
from .errors import InputError, MaskSAMError, ModelError

if TYPE_CHECKING:
    from .inference.engine import InferenceOptions
    from .inference.preprocess import ModelSpaceVolume
    from .model.card import ModelCard
    from .model.masksam import MaskSAM

Box = Tuple[float, float, float, float, float, float]
ProgressFn = Callable[[str, int, int], None]
DEFAULT_THRESHOLD = 0.5


def organ_value(card: "ModelCard", organ: Union[str, int]) -> int:
    """The card's class value for ``organ``: a value (int or digits), a class name or a display name (any case);
    a MaskSAMError naming the model's organs for anything else."""
    values = {int(c["value"]) for c in card.classes}
    if isinstance(organ, (int, np.integer)) and not isinstance(organ, bool):
        if int(organ) in values:
            return int(organ)
    elif isinstance(organ, str):
        text = organ.strip()
        if text.isdigit() and int(text) in values:
            return int(text)
        for entry in card.classes:
            names = {str(entry["name"]).lower(), str(entry.get("display_name", entry["name"])).lower()}
            if text.lower() in names:
                return int(entry["value"])
    known = ", ".join(f"{c['name']} ({c['value']})" for c in card.classes)
    raise InputError(f"unknown organ {organ!r}: model {card.name!r} has {known}")


def check_class_bound(model: "MaskSAM", card: "ModelCard", value: int) -> None:
    """A ModelError unless query ``value`` answers for class ``value`` (a class-bound model with enough queries):
    only then can the user's box be given to that organ's query."""
    if card.training.get("matching") != "class_bound":
        raise ModelError(f"model {card.name!r} is not class-bound (its card's training.matching is "
                         f"{card.training.get('matching')!r}): refining an organ with a box needs a model whose "
                         f"query c answers for class c")
    if model.config.num_queries <= value or model.config.num_queries < model.num_classes:
        raise ModelError(f"model {card.name!r} has {model.config.num_queries} queries, too few for one per class")


def parse_box(text: str) -> Box:
    """``x0,y0,z0,x1,y1,z1`` (LPS mm) -> six floats; an argparse error for anything else."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"needs six numbers x0,y0,z0,x1,y1,z1 in LPS mm, got {text!r}")
    return tuple(values)  # type: ignore[return-value]


def box_index_range(grid: sitk.Image, box_mm: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Inclusive voxel index ranges (lo, hi), each (x, y, z), of ``grid`` voxels whose centre lies in the box.

    The box's eight corners are mapped to continuous indices and bounded; along an axis where the box holds no
    voxel centre (a flat box drawn on one slice) the nearest voxel is taken. The range is clipped to the grid; an
    InputError when the box misses the grid entirely.
    """
    box = np.asarray(box_mm, float)
    if box.shape != (6,) or not np.all(np.isfinite(box)):
        raise InputError(f"the box must be six finite numbers x0,y0,z0,x1,y1,z1 in LPS mm, got {list(box_mm)}")
    low, high = np.minimum(box[:3], box[3:]), np.maximum(box[:3], box[3:])
    corners = [(x, y, z) for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]
    idx = np.array([grid.TransformPhysicalPointToContinuousIndex([float(v) for v in c]) for c in corners])
    lo_c, hi_c = idx.min(axis=0), idx.max(axis=0)
    size = np.array(grid.GetSize())
    if np.any(hi_c < -0.5) or np.any(lo_c > size - 0.5):
        from .data.geometry import physical_corners

        pts = physical_corners(grid)
        extent = ", ".join(f"{a} {pts[:, k].min():.1f}..{pts[:, k].max():.1f}" for k, a in enumerate("xyz"))
        raise InputError(f"the box {[round(float(v), 1) for v in box]} lies outside the image, which spans LPS mm "
                         f"{extent} (Slicer's RAS: negate x and y)")
    lo = np.ceil(lo_c - 1e-6).astype(int)
    hi = np.floor(hi_c + 1e-6).astype(int)
    flat = lo > hi
    lo[flat] = hi[flat] = np.round((lo_c[flat] + hi_c[flat]) / 2.0).astype(int)
    return np.clip(lo, 0, size - 1), np.clip(hi, 0, size - 1)


def refine_options(options: Optional["InferenceOptions"] = None) -> "InferenceOptions":
    """The engine's options for a refinement: ``options`` (default ones) with the atlas off (the user's box is
    the prompt), the box as the prior with no mask prompt, the prior naming the class, and no prior blending."""
    from .inference.engine import InferenceOptions

    return dataclasses.replace(options or InferenceOptions(), atlas_prior=False, prior_mask_prompt="none",
                               prior_class="prior", prior_weight=0.0)


def refine_prepared(volume: "ModelSpaceVolume", segmentation: sitk.Image, model: "MaskSAM", card: "ModelCard",
                    value: int, box_mm: Sequence[float], options: Optional["InferenceOptions"] = None,
                    take_from_others: bool = False,
                    progress: Optional[ProgressFn] = None) -> Tuple[sitk.Image, Dict[str, Any]]:
    """:func:`refine` on a volume from ``engine.prepare_input`` (made with :func:`refine_options`) and an organ
    value; returns the new segmentation and a summary (``organ``, ``value``, ``model_slices``, ``added``,
    ``removed``, ``voxels``: organ voxels after)."""
    from .atlas.prior import MIN_AREA_PX
    from .data.geometry import resample_to_reference
    from .inference.engine import SlabEngine

    options = refine_options(options)
    check_class_bound(model, card, value)
    seg = _label_array(segmentation, volume.image)
    lo, hi = box_index_range(volume.grid, box_mm)  # (x, y, z) on the model grid
    body = volume.box  # (z, y, x) slices
    b_lo = np.array([body[2].start, body[1].start, body[0].start])
    b_hi = np.array([body[2].stop, body[1].stop, body[0].stop]) - 1
    r_lo, r_hi = np.maximum(lo, b_lo) - b_lo, np.minimum(hi, b_hi) - b_lo  # in the body region's indices
    if np.any(r_lo > r_hi):
        raise InputError("the box lies outside the body the engine segments (the air around the patient is "
                         "skipped): draw it on the organ")
    if (r_hi[0] - r_lo[0] + 1) * (r_hi[1] - r_lo[1] + 1) < MIN_AREA_PX:
        raise InputError(f"the box is too small: it covers fewer than {MIN_AREA_PX} voxels of "
                         f"{volume.spacing[0]:g} x {volume.spacing[1]:g} mm on a slice")
    # the box's slices with up to a slab of context on each side: the slabs that decode them see what they saw
    depth = model.slab_depth
    nzb = volume.region.shape[0]
    z_from, z_to = max(0, int(r_lo[2]) - (depth - 1)), min(nzb, int(r_hi[2]) + depth)
    prompt = np.zeros((z_to - z_from,) + volume.region.shape[1:], np.uint8)
    in_box = (slice(int(r_lo[2]) - z_from, int(r_hi[2]) - z_from + 1), slice(int(r_lo[1]), int(r_hi[1]) + 1),
              slice(int(r_lo[0]), int(r_hi[0]) + 1))
    prompt[in_box] = value
    engine = SlabEngine(model, options)
    probs = engine.run(np.ascontiguousarray(volume.region[z_from:z_to]), volume.pad_value, progress, prior=prompt,
                       prior_pad_px=0.0)
    threshold = card.background_threshold if card.background_threshold is not None else DEFAULT_THRESHOLD
    new_box = (probs[value] > threshold) & (prompt == value)
    del probs
    # onto the full model grid: the new mask, and the box's slices (whole slices: the organ is cleared there)
    nz, ny, nx = volume.shape
    new_model = np.zeros((nz, ny, nx), np.uint8)
    new_model[body[0].start + z_from: body[0].start + z_to, body[1], body[2]] = new_box
    slices_model = np.zeros((nz, ny, nx), np.uint8)
    slices_model[body[0].start + int(r_lo[2]): body[0].start + int(r_hi[2]) + 1] = 1
    new = _to_input_grid(new_model, volume, resample_to_reference) > 0
    region = _to_input_grid(slices_model, volume, resample_to_reference) > 0
    out = seg.copy()
    organ = seg == value
    removed = region & organ & ~new
    out[removed] = 0
    writable = np.ones_like(organ) if take_from_others else (seg == 0) | organ
    added = region & new & writable & ~organ
    out[region & new & writable] = value
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(volume.image)
    info = {"organ": card.labels()[value], "value": value,
            "model_slices": [int(body[0].start + r_lo[2]), int(body[0].start + r_hi[2])],
            "added": int(added.sum()), "removed": int(removed.sum()), "voxels": int((out == value).sum()),
            "decoded_queries": engine.stats["decoded_queries"], "runtime": engine.decoder_runtime}
    return result, info


def _to_input_grid(array_zyx: np.ndarray, volume: "ModelSpaceVolume", resample) -> np.ndarray:
    """A uint8 (Z, Y, X) array on the model grid -> (z, y, x) on the input's grid, by nearest neighbour (as the
    engine maps its labels back)."""
    image = sitk.GetImageFromArray(array_zyx)
    image.CopyInformation(volume.grid)
    return sitk.GetArrayFromImage(resample(image, volume.image, sitk.sitkNearestNeighbor, 0, extrapolate=True))


def check_segmentation_grid(segmentation: sitk.Image, image: sitk.Image) -> None:
    """An InputError unless ``segmentation`` is a 3D scalar labelmap on exactly ``image``'s grid (size, spacing,
    origin and direction, to ``geometry.same_grid``'s tolerance)."""
    from .data.geometry import same_grid

    if segmentation.GetDimension() != 3 or segmentation.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the segmentation must be a 3D scalar labelmap")
    if not same_grid(segmentation, image):
        raise InputError(f"the segmentation's grid (size {list(segmentation.GetSize())}, spacing "
                         f"{[round(v, 4) for v in segmentation.GetSpacing()]}, origin "
                         f"{[round(v, 2) for v in segmentation.GetOrigin()]}) differs from the image's (size "
                         f"{list(image.GetSize())}, spacing {[round(v, 4) for v in image.GetSpacing()]}, origin "
                         f"{[round(v, 2) for v in image.GetOrigin()]}): give the segmentation made for this image")


def _label_array(segmentation: sitk.Image, image: sitk.Image) -> np.ndarray:
    """The segmentation's integer (z, y, x) array, after checking that it lies on ``image``'s grid."""
    check_segmentation_grid(segmentation, image)
    arr = sitk.GetArrayFromImage(segmentation)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.array_equal(arr, np.round(arr)):
            raise InputError("the segmentation must hold integer label values")
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise InputError("the segmentation must hold non-negative label values")
    return arr


def refine(image: sitk.Image, segmentation: sitk.Image, organ: Union[str, int], box_mm: Sequence[float],
           model: Union[None, str, os.PathLike, "MaskSAM"] = None, card: Optional["ModelCard"] = None,
           options: Optional["InferenceOptions"] = None, take_from_others: bool = False,
           progress: Optional[ProgressFn] = None) -> sitk.Image:
    """Re-decode ``organ`` of ``segmentation`` inside ``box_mm`` with the box as SAM's prompt (see the module's
    docstring for what changes); returns the new label image on ``image``'s grid.

    image: the scan (any orientation); segmentation: its labelmap (the card's class values) on the same grid;
    organ: a class name, display name or value of the model's card; box_mm: (x0, y0, z0, x1, y1, z1) in physical
    LPS mm (ITK's convention; from Slicer's RAS negate x and y); model: a model folder, None for the bundled
    default, or a loaded MaskSAM with its ``card``. MaskSAMError (one line) for an unknown organ, a box outside the
    image or the body, a segmentation on another grid, or a model that is not class-bound.
    """
    from .inference.engine import prepare_input
    from .model.folder import load_model
    from .predict import resolve_model_dir

    if model is None or isinstance(model, (str, os.PathLike)):
        model, card = load_model(resolve_model_dir(None if model is None else str(model)),
                                 device=_device(options))
    elif card is None:
        raise MaskSAMError("a loaded model needs its card: refine(..., model=model, card=card)")
    value = organ_value(card, organ)
    check_class_bound(model, card, value)
    check_segmentation_grid(segmentation, image)  # before the work of preparing the volume
    volume = prepare_input(image, card, refine_options(options))
    result, _ = refine_prepared(volume, segmentation, model, card, value, box_mm, options, take_from_others,
                                progress)
    return result


def _device(options: Optional["InferenceOptions"]) -> str:
    from .inference.engine import resolve_device

    return str(resolve_device(options.device if options else "auto"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m masksam_core.refine", description=__doc__.splitlines()[0])
    p.add_argument("-i", "--input", required=True, help="the scan (a volume file or a DICOM series folder)")
    p.add_argument("-s", "--segmentation", required=True, help="its labelmap (the model's class values)")
    p.add_argument("--organ", required=True, help="the organ to refine: a class name or value of the model")
    p.add_argument("--box", required=True, type=parse_box, metavar="x0,y0,z0,x1,y1,z1",
                   help="the box around the organ, in physical LPS mm (ITK's convention; Slicer's RAS: negate x "
                        "and y); the organ changes only on the slices the box covers")
    p.add_argument("-o", "--output", required=True, help="the new labelmap (.nii.gz, .nii, .nrrd or .mha)")
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint file, for models on a ViT backbone")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--runtime", choices=("auto", "torch", "openvino"), default="auto",
                   help="CPU runtime of the image encoder, prompt generator and SAM's decoder")
    p.add_argument("--take-from-others", action="store_true",
                   help="let the refined organ take other organs' voxels inside its new mask (kept by default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--progress", choices=("bar", "json"), default="bar", help="progress as a bar or JSON lines")
    return p


def join_box_value(argv: Sequence[str]) -> List[str]:
    """``--box -12,3,...`` as ``--box=-12,3,...``: argparse takes a value that starts with "-" and is not a plain
    number for an option, and an LPS box often starts with a negative coordinate."""
    out: List[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        if items[i] == "--box" and i + 1 < len(items):
            out.append(f"--box={items[i + 1]}")
            i += 2
            continue
        out.append(items[i])
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    args = build_parser().parse_args(join_box_value(sys.argv[1:] if argv is None else argv))
    from .data.volume_io import LABELMAP_SUFFIXES, read_volume, write_labelmap
    from .inference.engine import InferenceOptions, prepare_input, resolve_device
    from .model.folder import load_model
    from .predict import _install_term_handler, make_progress, resolve_model_dir

    _install_term_handler()
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise MaskSAMError(f"{output} exists; use --overwrite to replace it")
    if not output.name.lower().endswith(LABELMAP_SUFFIXES) or output.name.lower().endswith(".seg.nrrd"):
        raise MaskSAMError(f"cannot write a labelmap as {output.name}: use one of {', '.join(LABELMAP_SUFFIXES)}")
    image = read_volume(args.input)
    seg_path = Path(args.segmentation)
    if not seg_path.is_file():
        raise InputError(f"segmentation not found: {seg_path}")
    try:
        segmentation = sitk.ReadImage(str(seg_path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {seg_path.name} as a labelmap ({str(exc).strip().splitlines()[-1]})") from None
    check_segmentation_grid(segmentation, image)
    device = resolve_device(args.device)
    model, card = load_model(resolve_model_dir(args.model), device=str(device), sam_checkpoint=args.sam_checkpoint)
    value = organ_value(card, args.organ)
    check_class_bound(model, card, value)
    options = refine_options(InferenceOptions(device=str(device), runtime=args.runtime))
    volume = prepare_input(image, card, options)
    report, close = make_progress(args.progress)
    try:
        result, info = refine_prepared(volume, segmentation, model, card, value, args.box, options,
                                       args.take_from_others, report)
    finally:
        close()
    write_labelmap(result, output, overwrite=args.overwrite)
    if args.progress == "json":
        import json

        print(json.dumps({"stage": "write", "done": 1, "total": 1}), flush=True)
    print(f"{output}: {info['organ']} refined on model slices {info['model_slices'][0]}..{info['model_slices'][1]}"
          f" (+{info['added']} / -{info['removed']} voxels, {info['voxels']} now)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
