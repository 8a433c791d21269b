"""Model-space reorientation and resampling, and resampling back onto a reference grid.

Physical space is the only link between grids: an image is reoriented (axes permuted/flipped to the closest to
LPS, obliquity kept) and resampled to the model's spacing over the same physical extent; results are resampled
onto the input image itself, so they carry exactly its size, spacing, origin and direction.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk


def to_model_space(image: sitk.Image, spacing_xyz: Sequence[float], interpolator=sitk.sitkLinear,
                   default_value: float = 0.0) -> sitk.Image:
    """Reorient ``image`` to LPS axes (``sitk.DICOMOrient``) and resample it to ``spacing_xyz`` (mm).

    The output covers the same physical extent: same direction as the reoriented image, the same corner of the
    first voxel, size = max(1, round(size * old_spacing / new_spacing)) per axis.
    """
    oriented = sitk.DICOMOrient(image, "LPS")
    old_size = np.array(oriented.GetSize(), float)
    old_spacing = np.array(oriented.GetSpacing(), float)
    new_spacing = np.array([float(s) for s in spacing_xyz], float)
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    direction = np.array(oriented.GetDirection()).reshape(3, 3)
    # keep the outer corner of the first voxel fixed: origin moves by half the spacing difference
    corner = np.array(oriented.GetOrigin()) - direction @ (old_spacing / 2.0)
    new_origin = corner + direction @ (new_spacing / 2.0)
    return sitk.Resample(oriented, [int(v) for v in new_size], sitk.Transform(), interpolator,
                         tuple(new_origin), tuple(new_spacing), oriented.GetDirection(), float(default_value),
                         oriented.GetPixelID())


def resample_to_reference(image: sitk.Image, reference: sitk.Image, interpolator=sitk.sitkNearestNeighbor,
                          default_value: float = 0) -> sitk.Image:
    """Resample ``image`` onto exactly ``reference``'s grid (size, spacing, origin, direction)."""
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, float(default_value), image.GetPixelID())
    out.CopyInformation(reference)
    return out


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """Whether two images share size, spacing, origin and direction (within ``tol``)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * max(1.0, float(np.max(np.abs(a.GetOrigin())))))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))
