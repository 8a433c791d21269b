"""Segmentation metrics on boolean masks with physical spacing: Dice, HD95 and surface Dice.

Surface distances are computed between the surface voxels of the two masks (voxels of the mask with a
6-neighbour outside it), with Euclidean distance transforms in millimetres, on the union bounding box plus a
margin so that large volumes stay fast. Both masks empty: Dice, HD95 and surface Dice are None (undefined);
one of them empty: Dice 0, surface Dice 0, HD95 None.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, ref: np.ndarray) -> Optional[float]:
    p, r = pred.astype(bool), ref.astype(bool)
    total = p.sum() + r.sum()
    if total == 0:
        return None
    return float(2.0 * np.logical_and(p, r).sum() / total)


def _crop(pred: np.ndarray, ref: np.ndarray, margin: int = 2) -> Tuple[np.ndarray, np.ndarray]:
    union = pred | ref
    box = ndimage.find_objects(union.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, union.shape))
    return pred[box], ref[box]


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to ``ref``'s surface, and back."""
    p, r = _crop(pred.astype(bool), ref.astype(bool))
    sp, sr = _surface(p), _surface(r)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing_zyx)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing_zyx)
    return to_ref[sp], to_pred[sr]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> Optional[float]:
    """95th percentile of the symmetric surface distances (mm); None when either mask is empty."""
    if not pred.any() or not ref.any():
        return None
    a, b = surface_distances(pred, ref, spacing_zyx)
    return float(np.percentile(np.concatenate([a, b]), 95))


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float = 2.0) -> Optional[float]:
    """Fraction of both surfaces lying within ``tolerance_mm`` of the other (surface voxels, not areas)."""
    if not pred.any() and not ref.any():
        return None
    if not pred.any() or not ref.any():
        return 0.0
    a, b = surface_distances(pred, ref, spacing_zyx)
    return float(((a <= tolerance_mm).sum() + (b <= tolerance_mm).sum()) / (len(a) + len(b)))
