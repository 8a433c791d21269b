"""Model-space reorientation and resampling, and resampling back onto a reference grid.

Physical space is the only link between grids: an image is reoriented (axes permuted/flipped to the closest to
LPS, obliquity kept) and resampled to the model's spacing over the same physical extent; results are resampled
onto the input image itself, so they carry exactly its size, spacing, origin and direction.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import ModelError


def to_model_space(image: sitk.Image, spacing_xyz: Sequence[float], interpolator=sitk.sitkLinear,
                   pixel_type: Optional[int] = None) -> sitk.Image:
    """Reorient ``image`` to LPS axes (``sitk.DICOMOrient``) and resample it to ``spacing_xyz`` (mm).

    Reorientation only permutes and flips axes (an oblique image stays oblique); an image already on LPS axes is
    not copied for it. The output covers the same physical extent: the direction of the reoriented image, the
    same outer corner of the first voxel, and ``size = max(1, round(size * old_spacing / new_spacing))`` per
    axis. The rounding can put the last new voxel centre up to half an old voxel beyond the last old centre, on
    the outer face of the old voxel box when the extent is an odd number of half new voxels (3 slices of 2 mm at
    4 mm, an odd number of 1.5-mm slices at 3 mm): such points take the nearest old voxel's value (ITK counts the
    face as outside, and a fill value there emptied the volume's last slice, and with it, after resampling back,
    the labels of the input's last slice). The output has ``pixel_type`` (a ``sitk.sitkFloat32``-style id), by
    default the input's: ask for a float type to interpolate an integer image linearly (the filter interpolates in
    double precision, so this equals casting first, without the full-resolution float copy).
    """
    try:
        new_spacing = np.array([float(s) for s in spacing_xyz], float)
    except (TypeError, ValueError):
        new_spacing = np.zeros(0)
    if new_spacing.shape != (3,) or not np.all(np.isfinite(new_spacing)) or np.any(new_spacing <= 0):
        raise ModelError(f"target spacing must be three positive numbers, got {list(spacing_xyz)}")
    lps = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == "LPS"
    oriented = image if lps else sitk.DICOMOrient(image, "LPS")
    old_size = np.array(oriented.GetSize(), float)
    old_spacing = np.array(oriented.GetSpacing(), float)
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    direction = np.array(oriented.GetDirection(), float).reshape(3, 3)
    # keep the outer corner of the first voxel fixed: the first centre moves by half the spacing difference
    corner = np.array(oriented.GetOrigin(), float) - direction @ (old_spacing / 2.0)
    new_origin = corner + direction @ (new_spacing / 2.0)
    return sitk.Resample(oriented, [int(v) for v in new_size], sitk.Transform(), interpolator,
                         [float(v) for v in new_origin], [float(v) for v in new_spacing],
                         oriented.GetDirection(), 0.0,
                         oriented.GetPixelID() if pixel_type is None else pixel_type,
                         True)  # useNearestNeighborExtrapolator: see the docstring


def resample_to_reference(image: sitk.Image, reference: sitk.Image, interpolator=sitk.sitkNearestNeighbor,
                          default_value: float = 0, extrapolate: bool = False) -> sitk.Image:
    """Resample ``image`` onto exactly ``reference``'s grid (size, spacing, origin and direction copied); the
    output keeps ``image``'s pixel type. Points outside ``image`` get ``default_value``, or with ``extrapolate``
    the nearest voxel's value: for results on a :func:`to_model_space` grid of ``reference``, whose box can end up
    to half a model voxel short of the reference's (rounding; a 1-mm CT of 31 slices at 3 mm lost its last
    slice's labels without it)."""
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, float(default_value), image.GetPixelID(),
                        extrapolate)
    out.CopyInformation(reference)  # exact copy, no round-off from the filter
    return out


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """Whether two images share size, spacing, origin and direction.

    Spacing and origin are compared with a tolerance of ``tol`` relative to their magnitude (at least ``tol``
    mm), direction cosines with ``tol``.
    """
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing(), float), np.array(b.GetSpacing(), float)
    oa, ob = np.array(a.GetOrigin(), float), np.array(b.GetOrigin(), float)
    return (np.allclose(sa, sb, rtol=tol, atol=tol)
            and np.allclose(oa, ob, rtol=0, atol=tol * max(1.0, float(np.max(np.abs(np.r_[oa, ob])))))
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol))


def physical_corners(image: sitk.Image) -> np.ndarray:
    """(8, 3) LPS coordinates of the outer corners of the image's voxel box (not the corner voxel centres)."""
    size = np.array(image.GetSize(), float)
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), float)
    first = np.array(image.GetOrigin(), float) - direction @ (spacing / 2.0)
    corners = []
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                corners.append(first + direction @ (spacing * size * np.array([i, j, k], float)))
    return np.array(corners)


def index_to_physical(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    """LPS coordinates (N, 3) of continuous voxel indices ``index_xyz`` (N, 3) in (x, y, z) order."""
    idx = np.atleast_2d(np.asarray(index_xyz, float))
    m = np.array(image.GetDirection(), float).reshape(3, 3) @ np.diag(image.GetSpacing())
    return idx @ m.T + np.array(image.GetOrigin(), float)


def body_bbox(array_zyx: np.ndarray, threshold: float = -500.0) -> Optional[Tuple[slice, slice, slice]]:
    """(z, y, x) slices bounding the largest connected region of voxels above ``threshold`` (HU for CT), to skip
    the air around the patient; None when no voxel is above the threshold."""
    from scipy import ndimage

    fg = np.asarray(array_zyx) > threshold
    if not fg.any():
        return None
    return ndimage.find_objects(largest_component(fg).astype(np.uint8))[0]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected region (face connectivity) of a bool mask; the mask itself when it has one or none."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))
