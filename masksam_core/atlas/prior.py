"""The atlas prior in model space, and the prompts it gives SAM's decoder.

After registration (``registration.py``) each atlas case's labels are resampled onto the engine's model-space grid;
with several cases the prior is their majority vote. Per slab and organ the prior then gives, on each slice where
it holds the organ, a box (the prior mask's bounding box, padded) and the mask itself: :func:`slab_prompts`. The
engine decodes an organ's query only on slabs where the prior holds the organ, with these prompts in place of the
prompt generator's (``MaskSAM.forward_features(..., prior=...)``); by default the prior also names the class
(``InferenceOptions.prior_class``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Tuple

import numpy as np
import SimpleITK as sitk

from .registration import Registration, register, warp_labels
from .store import Atlas

if TYPE_CHECKING:
    import torch

MIN_AREA_PX = 10  # prior masks smaller than this on a slice give no box (a sliver of a mis-registered organ)


@dataclass
class AtlasPrior:
    """The registered atlas on the engine's model-space volume.

    labels: (Z, Y, X) uint8 on the model-space grid (the card's class values), 0 where no atlas case puts an organ.
    registrations: one :class:`Registration` per atlas case (in the atlas's order).
    seconds: registration and warping time.
    """

    labels: np.ndarray
    registrations: List[Registration] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> Dict[str, object]:
        """The sidecar's ``atlas_prior`` record."""
        return {"cases": [r.summary() for r in self.registrations], "seconds": round(self.seconds, 3)}


def fuse_votes(warped: List[np.ndarray], num_classes: int) -> np.ndarray:
    """Majority vote of label arrays (the same shape, values 0..num_classes); ties go to the lower value and a
    single array is returned as it is."""
    if len(warped) == 1:
        return warped[0]
    votes = np.zeros((num_classes + 1,) + warped[0].shape, np.uint16)
    for w in warped:
        for c in range(num_classes + 1):
            votes[c] += w == c
    return np.argmax(votes, axis=0).astype(np.uint8)


def build_prior(scan: sitk.Image, grid: sitk.Image, atlas: Atlas, num_classes: int,
                modality: str = "CT") -> AtlasPrior:
    """Register each atlas case onto ``scan`` (the input, any orientation) and warp its labels onto ``grid`` (the
    engine's model-space image); cases whose registration is implausible are left out of the vote."""
    start = time.perf_counter()
    regs = [register(scan, case.image, modality) for case in atlas.cases]
    warped = [sitk.GetArrayFromImage(warp_labels(case.labels, grid, reg.transform))
              for case, reg in zip(atlas.cases, regs) if reg.plausible]
    z, y, x = sitk.GetArrayViewFromImage(grid).shape
    labels = fuse_votes(warped, num_classes) if warped else np.zeros((z, y, x), np.uint8)
    return AtlasPrior(labels.astype(np.uint8), regs, time.perf_counter() - start)


def slab_prompts(labels: np.ndarray, num_queries: int, pad_px: float,
                 min_area: int = MIN_AREA_PX) -> Dict[str, "torch.Tensor"]:
    """Prompts of a class-bound model (query c answers for class c) from a slab's prior labels.

    labels: (D, S, S) uint8, the prior on the slab's slices on the model's canvas (0 outside the volume).
    Returns ``present`` (D, N) bool: the prior holds class c on slice d with at least ``min_area`` pixels;
    ``boxes`` (D, N, 4) normalised xyxy, the prior mask's box padded by ``pad_px`` (zeros where not present);
    ``masks`` (D, N, S, S) float {0, 1}, the prior masks. Query 0 (background) is never present.
    """
    import torch

    d, s, _ = labels.shape
    lab = torch.from_numpy(np.ascontiguousarray(labels)).long()
    onehot = torch.zeros(d, num_queries, s, s, dtype=torch.float32)
    valid = lab < num_queries
    onehot.scatter_(1, torch.where(valid, lab, 0)[:, None], 1.0)
    onehot[:, 0] = 0.0
    area = onehot.sum(dim=(2, 3))
    present = area >= min_area
    rows = onehot.amax(dim=3) > 0  # (D, N, S)
    cols = onehot.amax(dim=2) > 0
    ar = torch.arange(s)
    y1 = torch.where(rows, ar, s).amin(dim=2).float()
    y2 = torch.where(rows, ar, -1).amax(dim=2).float() + 1
    x1 = torch.where(cols, ar, s).amin(dim=2).float()
    x2 = torch.where(cols, ar, -1).amax(dim=2).float() + 1
    boxes = torch.stack([x1 - pad_px, y1 - pad_px, x2 + pad_px, y2 + pad_px], dim=-1).clamp(0, s) / s
    boxes = torch.where(present[..., None], boxes, torch.zeros_like(boxes))
    return {"present": present, "boxes": boxes, "masks": onehot}


def fill_absent_slices(boxes: "torch.Tensor", present: "torch.Tensor") -> "torch.Tensor":
    """Boxes (G, D, N, 4) where slices without the organ take the box of the nearest slice with it (the decoder's
    depth adapters see all D slices of a decoded query; those slices' outputs are discarded)."""
    import torch

    g, d, n, _ = boxes.shape
    out = boxes.clone()
    idx = torch.arange(d)
    for gi in range(g):
        for q in range(n):
            have = present[gi, :, q]
            if not have.any() or have.all():
                continue
            src = idx[have]
            nearest = src[(idx[:, None] - src[None, :]).abs().argmin(dim=1)]
            out[gi, :, q] = boxes[gi, nearest, q]
    return out


def crop_slab(labels: np.ndarray, z0: int, depth: int, y0: int, x0: int, size: int,
              offset: Tuple[int, int]) -> np.ndarray:
    """The prior on one slab and tile of the engine: (D, S, S) uint8, as the engine lays out the image (region
    ``labels[z0:z0+D, y0:y0+S, x0:x0+S]`` placed at ``offset`` (oy, ox) in the tile, 0 elsewhere)."""
    nz, ny, nx = labels.shape
    out = np.zeros((depth, size, size), np.uint8)
    nvalid = max(0, min(depth, nz - z0))
    hy, wx = min(size, ny - y0), min(size, nx - x0)
    oy, ox = offset
    out[:nvalid, oy:oy + hy, ox:ox + wx] = labels[z0:z0 + nvalid, y0:y0 + hy, x0:x0 + wx]
    return out
