"""Refine one organ of a segmentation with a box or points: the organ is re-decoded with them as SAM's prompt.

API: :func:`refine`; command line: ``python -m masksam_core.refine`` (or ``masksam refine``)::

    python -m masksam_core.refine -i CT -s SEG --organ liver [--box x0,y0,z0,x1,y1,z1] [--point x,y,z[,+|-] ...]
        -o OUT [--model DIR] [--overwrite] [--take-from-others] [--progress json]

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

Points: each is (x, y, z) in LPS mm, positive (inside the organ) or negative (outside it), and prompts the
model-space slice nearest it (the one within half a slice). SAM's prompt encoder embeds them (labels 1 and 0) and
their tokens follow the box's two (:class:`PointDecoder`; the decoder then runs in torch). With a box, the
re-decoded slices are the box's; the points must lie on them, the positive ones inside the box. With points alone,
the re-decoded slices run from the lowest point's to the highest point's (a slice between them takes the points of
the nearest slice holding some), and each slice's box is the organ's current extent there together with its
positive points, padded by :data:`POINT_BOX_PAD_MM` (MaskSAM's decoder was trained with a box on every slice); a
slice with neither the organ nor a positive point is left as it is. So a positive point grows the organ toward it,
a negative one takes SAM's mask away from it.

What points bring, on s1 with the bundled model (optimistic, as below): the liver's (spleen's) half beyond its
median column removed on 5 slices, Dice there 0.588 (0.690); two positive points, at the removed part's centre on
the first and the last of those slices, gave 0.724 (0.894); a box around the truth 0.895 (0.942), the box and the
points 0.882 (0.918). Points alone mend a partly missing organ; a good box does better, and points add nothing to
it (the decoder was trained with box prompts only).

Coordinates: ``box_mm`` is (x0, y0, z0, x1, y1, z1) in physical LPS millimetres, as ITK, SimpleITK and the engine's
files use them (x grows to the patient's left, y to posterior, z to superior); the order of each pair does not
matter. Slicer shows RAS: a point (R, A, S) there is (-R, -A, S) here. On an oblique image the box is the model
grid's index bounding box of the physical box's eight corners.

What changes (and nothing else): only organ c, only on the re-decoded slices (with a box, the model-space slices
whose centre lies within the box's z extent; mapped onto the input grid by nearest neighbour as the engine maps its
labels). There, organ c's voxels outside the new mask are cleared, and the new mask, confined to the slice's box
(SAM's box prompt says the object lies in it), is set to c on background voxels. Another organ's voxels are kept even inside the new mask,
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
Point = Tuple[float, float, float, bool]  # x, y, z in LPS mm; True: inside the organ (positive), False: outside
ProgressFn = Callable[[str, int, int], None]
DEFAULT_THRESHOLD = 0.5
POINT_BOX_PAD_MM = 10.0  # with points alone: the margin of each slice's box around the organ and the positive points


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


def parse_point(text: str) -> Point:
    """``x,y,z`` or ``x,y,z,+`` (LPS mm, a point inside the organ) or ``x,y,z,-`` (outside it) -> (x, y, z,
    positive); an InputError (one line) for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    positive = True
    if len(parts) == 4 and parts[3] in ("+", "-"):
        positive = parts.pop() == "+"
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise InputError(f"--point needs x,y,z in LPS mm, optionally followed by ,+ (inside the organ, the default) "
                         f"or ,- (outside it), got {text!r}")
    return values[0], values[1], values[2], positive


def check_points(points: Sequence[Sequence[Any]]) -> List[Point]:
    """Points as (x, y, z, positive) tuples: (x, y, z) alone is positive; an InputError for anything else."""
    out: List[Point] = []
    for p in points:
        p = tuple(p)
        if len(p) not in (3, 4) or not all(isinstance(v, (int, float, np.number)) and math.isfinite(float(v))
                                             for v in p[:3]):
            raise InputError(f"a point must be (x, y, z[, positive]) in LPS mm, got {p!r}")
        out.append((float(p[0]), float(p[1]), float(p[2]), bool(p[3]) if len(p) == 4 else True))
    return out


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
        raise InputError(f"the box {[round(float(v), 1) for v in box]} lies outside the image, {_extent_text(grid)} "
                         f"(Slicer's RAS: negate x and y)")
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
                    value: int, box_mm: Optional[Sequence[float]] = None,
                    options: Optional["InferenceOptions"] = None, take_from_others: bool = False,
                    progress: Optional[ProgressFn] = None,
                    points: Optional[Sequence[Sequence[Any]]] = None) -> Tuple[sitk.Image, Dict[str, Any]]:
    """:func:`refine` on a volume from ``engine.prepare_input`` (made with :func:`refine_options`) and an organ
    value; returns the new segmentation and a summary (``organ``, ``value``, ``model_slices``, ``added``,
    ``removed``, ``voxels``: organ voxels after, ``points``: how many points prompted)."""
    from .data.geometry import resample_to_reference
    from .inference.engine import SlabEngine

    options = refine_options(options)
    check_class_bound(model, card, value)
    pts = check_points(points or [])
    if box_mm is None and not pts:
        raise InputError("refining an organ needs a box, points or both")
    seg = _label_array(segmentation, volume.image)
    body = volume.box  # (z, y, x) slices
    b_lo = np.array([body[2].start, body[1].start, body[0].start])
    b_hi = np.array([body[2].stop, body[1].stop, body[0].stop]) - 1
    on_region = _points_on_region(volume, pts, b_lo, b_hi)  # (K, 4): x, y, z in the body region's indices, label
    if box_mm is not None:
        boxes, slice_points = _box_prompts(volume, box_mm, b_lo, b_hi, on_region)
    else:
        organ = _organ_on_model_grid(seg == value, volume, resample_to_reference)[body]
        boxes, slice_points = _point_prompts(volume, organ, on_region)
    # the refined slices with up to a slab of context on each side: the slabs that decode them see what they saw
    depth = model.slab_depth
    nzb = volume.region.shape[0]
    z_first, z_last = min(boxes), max(boxes)
    z_from, z_to = max(0, z_first - (depth - 1)), min(nzb, z_last + depth)
    prompt = np.zeros((z_to - z_from,) + volume.region.shape[1:], np.uint8)
    for z, (y0, y1, x0, x1) in boxes.items():
        prompt[z - z_from, y0:y1 + 1, x0:x1 + 1] = value
    engine = SlabEngine(model, options)
    if len(on_region):
        engine.decode_items = PointDecoder(engine, model.decode_items, model.prompt_encoder, slice_points, z_from,
                                           volume.region.shape, model.input_size)
    probs = engine.run(np.ascontiguousarray(volume.region[z_from:z_to]), volume.pad_value, progress, prior=prompt,
                       prior_pad_px=0.0)
    threshold = card.background_threshold if card.background_threshold is not None else DEFAULT_THRESHOLD
    new_box = (probs[value] > threshold) & (prompt == value)
    del probs
    # onto the full model grid: the new mask, and the refined slices (whole slices: the organ is cleared there)
    nz, ny, nx = volume.shape
    new_model = np.zeros((nz, ny, nx), np.uint8)
    new_model[body[0].start + z_from: body[0].start + z_to, body[1], body[2]] = new_box
    slices_model = np.zeros((nz, ny, nx), np.uint8)
    slices_model[[body[0].start + z for z in boxes]] = 1
    new = _to_input_grid(new_model, volume, resample_to_reference) > 0
    region = _to_input_grid(slices_model, volume, resample_to_reference) > 0
    out = seg.copy()
    organ_in = seg == value
    removed = region & organ_in & ~new
    out[removed] = 0
    writable = np.ones_like(organ_in) if take_from_others else (seg == 0) | organ_in
    added = region & new & writable & ~organ_in
    out[region & new & writable] = value
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(volume.image)
    info = {"organ": card.labels()[value], "value": value,
            "model_slices": [int(body[0].start + z_first), int(body[0].start + z_last)],
            "added": int(added.sum()), "removed": int(removed.sum()), "voxels": int((out == value).sum()),
            "points": len(on_region), "decoded_queries": engine.stats["decoded_queries"],
            "runtime": "torch" if len(on_region) else engine.decoder_runtime}
    return result, info


SliceBox = Tuple[int, int, int, int]  # y0, y1, x0, x1 (inclusive) in the body region's indices


def _points_on_region(volume: "ModelSpaceVolume", points: Sequence[Point], b_lo: np.ndarray,
                      b_hi: np.ndarray) -> np.ndarray:
    """(K, 4) float: each point's continuous (x, y, z) index in the body region of the model grid and its label (1
    inside the organ, 0 outside); an InputError naming the point when it lies outside the image or the body."""
    rows = []
    size = np.array(volume.grid.GetSize())
    for x, y, z, positive in points:
        idx = np.array(volume.grid.TransformPhysicalPointToContinuousIndex([x, y, z]))
        where = f"the point ({x:g}, {y:g}, {z:g})"
        if np.any(idx < -0.5) or np.any(idx > size - 0.5):
            raise InputError(f"{where} lies outside the image, {_extent_text(volume.grid)} (LPS mm; Slicer's RAS: "
                             f"negate x and y)")
        if np.any(idx < b_lo - 0.5) or np.any(idx > b_hi + 0.5):
            raise InputError(f"{where} lies outside the body the engine segments (the air around the patient is "
                             f"skipped): place it on or beside the organ")
        rows.append(list(idx - b_lo) + [1.0 if positive else 0.0])
    return np.array(rows, float).reshape(-1, 4)


def _extent_text(grid: sitk.Image) -> str:
    from .data.geometry import physical_corners

    pts = physical_corners(grid)
    return "which spans LPS mm " + ", ".join(f"{a} {pts[:, k].min():.1f}..{pts[:, k].max():.1f}"
                                             for k, a in enumerate("xyz"))


def _box_prompts(volume: "ModelSpaceVolume", box_mm: Sequence[float], b_lo: np.ndarray, b_hi: np.ndarray,
                 points: np.ndarray) -> Tuple[Dict[int, SliceBox], Dict[int, np.ndarray]]:
    """With a box: the box on each of its slices (body region indices), and each slice's points (those nearest it);
    an InputError for a box outside the body or too small, a point off the box's slices or a positive one outside
    the box."""
    from .atlas.prior import MIN_AREA_PX

    lo, hi = box_index_range(volume.grid, box_mm)  # (x, y, z) on the model grid
    r_lo, r_hi = np.maximum(lo, b_lo) - b_lo, np.minimum(hi, b_hi) - b_lo  # in the body region's indices
    if np.any(r_lo > r_hi):
        raise InputError("the box lies outside the body the engine segments (the air around the patient is "
                         "skipped): draw it on the organ")
    if (r_hi[0] - r_lo[0] + 1) * (r_hi[1] - r_lo[1] + 1) < MIN_AREA_PX:
        raise InputError(f"the box is too small: it covers fewer than {MIN_AREA_PX} voxels of "
                         f"{volume.spacing[0]:g} x {volume.spacing[1]:g} mm on a slice")
    slices = range(int(r_lo[2]), int(r_hi[2]) + 1)
    for x, y, z, label in points:
        if not int(round(z)) in slices:
            raise InputError(f"a point lies {abs(z - np.clip(z, slices[0], slices[-1])) * volume.spacing[2]:.1f} mm "
                             f"beyond the box's slices: with a box, place the points on the slices it covers")
        if label and not (r_lo[0] - 0.5 <= x <= r_hi[0] + 0.5 and r_lo[1] - 0.5 <= y <= r_hi[1] + 0.5):
            raise InputError("a positive point (inside the organ) lies outside the box, where the refined organ "
                             "cannot reach: enlarge the box or move the point")
    box = (int(r_lo[1]), int(r_hi[1]), int(r_lo[0]), int(r_hi[0]))
    return {z: box for z in slices}, {z: points[np.round(points[:, 2]) == z] for z in slices}


def _point_prompts(volume: "ModelSpaceVolume", organ: np.ndarray,
                   points: np.ndarray) -> Tuple[Dict[int, SliceBox], Dict[int, np.ndarray]]:
    """With points alone: the slices from the lowest to the highest point's, each prompted with the points nearest
    it (its own, else those of the nearest slices holding points) and a box around the organ's current extent there
    and those positive points, padded by :data:`POINT_BOX_PAD_MM`. A slice with neither the organ nor a positive
    point is left as it is (nothing says where the organ is); an InputError when that leaves none."""
    from .atlas.prior import MIN_AREA_PX

    _, ny, nx = organ.shape
    held = np.round(points[:, 2]).astype(int)
    holding = np.unique(held)
    pad_x, pad_y = POINT_BOX_PAD_MM / volume.spacing[0], POINT_BOX_PAD_MM / volume.spacing[1]
    boxes: Dict[int, SliceBox] = {}
    slice_points: Dict[int, np.ndarray] = {}
    for z in range(int(holding.min()), int(holding.max()) + 1):
        gap = np.abs(holding - z).min()
        on = points[np.isin(held, holding[np.abs(holding - z) == gap])]
        ys, xs = np.nonzero(organ[z])
        pos = on[on[:, 3] > 0]
        xs = np.concatenate([xs, pos[:, 0]])
        ys = np.concatenate([ys, pos[:, 1]])
        if not len(xs):
            continue
        box = (max(0, int(math.floor(ys.min() - pad_y))), min(ny - 1, int(math.ceil(ys.max() + pad_y))),
               max(0, int(math.floor(xs.min() - pad_x))), min(nx - 1, int(math.ceil(xs.max() + pad_x))))
        if (box[1] - box[0] + 1) * (box[3] - box[2] + 1) >= MIN_AREA_PX:
            boxes[z], slice_points[z] = box, on
    if not boxes:
        raise InputError("the points say nothing about where the organ is: on their slices it is absent and no "
                         "point is positive (inside the organ); add a positive point or draw a box")
    return boxes, slice_points


def _organ_on_model_grid(mask: np.ndarray, volume: "ModelSpaceVolume", resample) -> np.ndarray:
    """A bool (z, y, x) mask on the input's grid -> (Z, Y, X) on the model grid (nearest neighbour)."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(volume.image)
    return sitk.GetArrayFromImage(resample(image, volume.grid, sitk.sitkNearestNeighbor, 0)) > 0


class PointDecoder:
    """The model's decoder with each slice's points after its box: SAM's prompt encoder embeds them (label 1 inside
    the organ, 0 outside; slots a slice does not use are SAM's "not a point") and the tokens follow the two box
    tokens. Called by :class:`~masksam_core.inference.engine.SlabEngine` like ``MaskSAM.decode_items``; it reads the
    engine's ``slab_origin`` to lay the points out on the slab's canvas as the engine lays out the image (body
    crop, tile, centring). Always the torch decoder: the OpenVINO one takes exactly two prompt tokens.

    slice_points: {slice of the body region: (K, 4) points (x, y in the region's indices, z, label)} for every
    refined slice; a slab's other slices (context for the depth adapters; their outputs are discarded) take the
    nearest refined slice's points. z_from: the region slice at which the engine's volume starts. A point off a
    tile's canvas is left out of that tile.
    """

    def __init__(self, engine: Any, decode: Callable, prompt_encoder: Any, slice_points: Dict[int, np.ndarray],
                 z_from: int, region_shape: Sequence[int], canvas: int) -> None:
        self.engine, self.decode, self.prompt_encoder = engine, decode, prompt_encoder
        self.slice_points, self.z_from = slice_points, z_from
        self.refined = np.array(sorted(slice_points))
        self.region_shape, self.canvas = tuple(region_shape), canvas
        self.last_points: List[np.ndarray] = []  # each item's canvas points (x, y, label) in the last call (tests)

    def points_for(self, z: int) -> np.ndarray:
        """The points prompting region slice ``z``: its own when refined, else the nearest refined slice's."""
        if z not in self.slice_points:
            z = int(self.refined[np.abs(self.refined - z).argmin()])
        return self.slice_points[z]

    def __call__(self, embeddings, item_embedding, slice_index, sparse, mask_prompts, aux_tokens):
        import torch

        z0, y0, x0, oy, ox = self.engine.slab_origin
        _, ny, nx = self.region_shape
        hy, wx = min(self.canvas, ny - y0), min(self.canvas, nx - x0)
        items = []
        for d in slice_index.tolist():
            pts = self.points_for(self.z_from + z0 + int(d))
            cx, cy = pts[:, 0] - x0, pts[:, 1] - y0
            keep = (cx >= -0.5) & (cx < wx - 0.5) & (cy >= -0.5) & (cy < hy - 0.5)
            items.append(np.stack([cx[keep] + ox, cy[keep] + oy, pts[keep, 3]], axis=1))
        self.last_points = items
        k = max(len(p) for p in items)
        if k == 0:
            return self.decode(embeddings, item_embedding, slice_index, sparse, mask_prompts, aux_tokens)
        coords = torch.zeros(len(items), k, 2)
        labels = -torch.ones(len(items), k, dtype=torch.long)
        for i, p in enumerate(items):
            coords[i, :len(p)] = torch.from_numpy(p[:, :2]).float()
            labels[i, :len(p)] = torch.from_numpy(p[:, 2]).long()
        with torch.no_grad():
            tokens, _ = self.prompt_encoder(points=(coords.to(sparse.device), labels.to(sparse.device)), boxes=None,
                                            masks=None)
        sparse = torch.cat([sparse, tokens[:, :k].to(sparse.dtype)], dim=1)  # SAM's pad point (the last) left out
        return self.decode(embeddings, item_embedding, slice_index, sparse, mask_prompts, aux_tokens)


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


def refine(image: sitk.Image, segmentation: sitk.Image, organ: Union[str, int],
           box_mm: Optional[Sequence[float]] = None,
           model: Union[None, str, os.PathLike, "MaskSAM"] = None, card: Optional["ModelCard"] = None,
           options: Optional["InferenceOptions"] = None, take_from_others: bool = False,
           progress: Optional[ProgressFn] = None,
           points: Optional[Sequence[Sequence[Any]]] = None) -> sitk.Image:
    """Re-decode ``organ`` of ``segmentation`` with the user's box and/or points as SAM's prompt (see the module's
    docstring for what changes); returns the new label image on ``image``'s grid.

    image: the scan (any orientation); segmentation: its labelmap (the card's class values) on the same grid;
    organ: a class name, display name or value of the model's card; box_mm: (x0, y0, z0, x1, y1, z1) in physical
    LPS mm (ITK's convention; from Slicer's RAS negate x and y), or None; points: (x, y, z[, positive]) in LPS
    mm, positive (True, the default) inside the organ, negative (False) outside it; at least a box or a point.
    model: a model folder, None for the bundled default, or a loaded MaskSAM with its ``card``. MaskSAMError (one
    line) for an unknown organ, a box or point outside the image or the body, a segmentation on another grid, or a
    model that is not class-bound.
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
    pts = check_points(points or [])
    if box_mm is None and not pts:
        raise InputError("refining an organ needs a box, points or both")
    volume = prepare_input(image, card, refine_options(options))
    result, _ = refine_prepared(volume, segmentation, model, card, value, box_mm, options, take_from_others,
                                progress, pts)
    return result


def _device(options: Optional["InferenceOptions"]) -> str:
    from .inference.engine import resolve_device

    return str(resolve_device(options.device if options else "auto"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m masksam_core.refine", description=__doc__.splitlines()[0])
    p.add_argument("-i", "--input", required=True, help="the scan (a volume file or a DICOM series folder)")
    p.add_argument("-s", "--segmentation", required=True, help="its labelmap (the model's class values)")
    p.add_argument("--organ", required=True, help="the organ to refine: a class name or value of the model")
    p.add_argument("--box", type=parse_box, metavar="x0,y0,z0,x1,y1,z1",
                   help="the box around the organ, in physical LPS mm (ITK's convention; Slicer's RAS: negate x "
                        "and y); the organ changes only on the slices the box covers")
    p.add_argument("--point", action="append", default=[], metavar="x,y,z[,+|-]",
                   help="a point in physical LPS mm, + inside the organ (the default) or - outside it; repeat for "
                        "more. With a box, on the box's slices; alone, the organ changes on the slices from the "
                        "lowest point's to the highest's")
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
    """``--box -12,3,...`` as ``--box=-12,3,...`` (and ``--point`` alike): argparse takes a value that starts with
    "-" and is not a plain number for an option, and an LPS coordinate is often negative."""
    out: List[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        if items[i] in ("--box", "--point") and i + 1 < len(items):
            out.append(f"{items[i]}={items[i + 1]}")
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
    points = [parse_point(text) for text in args.point]
    if args.box is None and not points:
        raise InputError("give the organ's --box, one or more --point, or both")
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
                                       args.take_from_others, report, points)
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
