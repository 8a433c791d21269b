"""A stand-in for "another patient" made from a labelled case: strong deformation, another scanner, another field
of view.

With one labelled subject, validation inside it (held-out slices) says whether training converged, not whether a
model generalises. :func:`make_proxy_case` turns the subject into a plausible other patient whose labels are known
exactly: a random affine (body size per axis, rotation, position), a smooth random elastic deformation, other
intensities (gain and offset of the HU scale, as another scanner or contrast phase; noise; blur), another voxel
grid (in-plane and slice spacing) and a partial field of view along z (a few centimetres of the upper abdomen up to
most of the case). The image and its labels go through the same transform, so the labels stay exact.

It is easier than a real other patient (the anatomy is the subject's, deformed), and harder than held-out slices
(nothing lines up with the training grid); ``benchmarks/bench_generalisation.py`` reports both beside a real
other patient when one is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk


@dataclass
class ProxySettings:
    """Ranges the proxy draws from (uniformly, per case)."""

    scale: Tuple[float, float] = (0.85, 1.15)  # per axis
    rotation_z_deg: float = 10.0  # in-plane rotation
    rotation_xy_deg: float = 4.0  # tilt
    translation_mm: float = 15.0
    elastic_mm: float = 8.0  # standard deviation of the B-spline control point displacements
    elastic_mesh: int = 4  # control-point mesh size per axis
    gain: Tuple[float, float] = (0.9, 1.1)
    offset_hu: Tuple[float, float] = (-30.0, 30.0)
    noise_hu: Tuple[float, float] = (5.0, 25.0)
    blur_mm: Tuple[float, float] = (0.3, 1.2)
    inplane_mm: Tuple[float, float] = (0.7, 1.0)
    slice_mm: Tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 5.0)
    fov_z_mm: Tuple[float, float] = (40.0, 250.0)  # length of the field of view along z


def _random_transform(image: sitk.Image, rng: np.random.Generator, s: ProxySettings) -> sitk.Transform:
    """output point -> source point: an affine about the image centre, then a B-spline deformation."""
    size = np.array(image.GetSize(), float)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(list((size - 1) / 2.0)))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(list(centre))
    ax, ay = np.deg2rad(rng.uniform(-s.rotation_xy_deg, s.rotation_xy_deg, 2))
    az = np.deg2rad(rng.uniform(-s.rotation_z_deg, s.rotation_z_deg))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    scales = rng.uniform(*s.scale, 3)
    affine.SetMatrix(list((rz @ ry @ rx @ np.diag(1.0 / scales)).ravel()))
    affine.SetTranslation(list(rng.uniform(-s.translation_mm, s.translation_mm, 3)))
    bspline = sitk.BSplineTransformInitializer(image, [s.elastic_mesh] * 3)
    params = np.asarray(bspline.GetParameters(), float)
    bspline.SetParameters(list(rng.normal(0.0, s.elastic_mm, params.size)))
    return sitk.CompositeTransform([affine, bspline])


def make_proxy_case(image: sitk.Image, labels: sitk.Image, seed: int,
                    settings: ProxySettings = ProxySettings()) -> Tuple[sitk.Image, sitk.Image, Dict[str, object]]:
    """(image, labels, what was drawn): ``image`` (a CT in HU) and ``labels`` as another patient (see the module
    docstring). The same ``seed`` gives the same case."""
    s = settings
    rng = np.random.default_rng(seed)
    transform = _random_transform(image, rng, s)
    inplane = float(rng.uniform(*s.inplane_mm))
    slice_mm = float(rng.choice(s.slice_mm))
    size = np.array(image.GetSize(), float)
    spacing = np.array(image.GetSpacing(), float)
    extent = size * spacing
    fov = float(min(extent[2], rng.uniform(*s.fov_z_mm)))
    z_start = float(rng.uniform(0.0, extent[2] - fov))
    new_spacing = np.array([inplane, inplane, slice_mm])
    new_size = np.maximum(1, np.round(np.array([extent[0], extent[1], fov]) / new_spacing)).astype(int)
    corner = np.array(image.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    origin = corner + direction @ (np.array([0.0, 0.0, z_start]) + new_spacing / 2.0)
    ref = sitk.Image([int(v) for v in new_size], sitk.sitkFloat32)
    ref.SetSpacing([float(v) for v in new_spacing])
    ref.SetOrigin([float(v) for v in origin])
    ref.SetDirection(image.GetDirection())
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, transform, sitk.sitkLinear, -1024.0)
    out_labels = sitk.Resample(labels, ref, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    blur = float(rng.uniform(*s.blur_mm))
    out = sitk.SmoothingRecursiveGaussian(out, blur)
    gain, offset = float(rng.uniform(*s.gain)), float(rng.uniform(*s.offset_hu))
    noise = float(rng.uniform(*s.noise_hu))
    arr = sitk.GetArrayFromImage(out)
    body = arr > -500
    arr = np.where(body, arr * gain + offset, arr) + rng.normal(0.0, noise, arr.shape).astype(np.float32)
    result = sitk.GetImageFromArray(np.clip(arr, -1024, 3071).astype(np.float32))
    result.CopyInformation(out)
    drawn = {"seed": seed, "inplane_mm": round(inplane, 3), "slice_mm": slice_mm, "fov_z_mm": round(fov, 1),
             "z_start_mm": round(z_start, 1), "gain": round(gain, 3), "offset_hu": round(offset, 1),
             "noise_hu": round(noise, 1), "blur_mm": round(blur, 2)}
    return result, out_labels, drawn
