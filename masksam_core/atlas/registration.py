"""Atlas-to-scan registration: where the atlas's organs lie in a new scan.

One labelled case (the atlas) is registered onto the scan with SimpleITK: both on LPS axes at a coarse isotropic
spacing, a robust initialisation (body centroids in-plane; an exhaustive search of the z offset, since the scan may
hold only a few centimetres of the atlas or extend far beyond it), then an affine stage maximising Mattes mutual
information (works for CT to CT and across modalities) inside the scan's body; across modalities the similarity
stage starts from several z offsets (:func:`z_start_candidates`). A deformable stage (demons; for an MR on a
pseudo-CT, :func:`pseudo_ct`) refines a plausible affine. The result carries its quality
(the affine's scales, the overlap of the two bodies, the final metric, the share of the scan the atlas covers) so
that an implausible registration can be refused instead of placing organs where they are not.

Transforms follow ITK: :attr:`Registration.transform` maps a physical point of the scan to the atlas point it
corresponds to, which is what ``sitk.Resample(atlas_labels, scan_grid, transform, ...)`` needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..data.geometry import largest_component

REGISTRATION_SPACING = 3.0  # mm, isotropic: the atlas's own spacing; finer measured no better and slower
CT_BODY_HU = -300.0
CT_CLAMP = (-200.0, 400.0)
# plausibility limits (see :func:`assess`): patients differ in size, so the scale limits are wide; a registration
# outside them, or one whose bodies barely overlap, has failed
SCALE_LIMITS = (0.6, 1.6)
MIN_BODY_DICE = 0.7
MIN_OVERLAP_SLICES = 4
METRIC_SAMPLING = 0.1  # share of the scan's body voxels sampled by Mattes MI per iteration
THIN_SCAN_MM = 120.0  # below: the affine stage keeps the similarity's z scale and tilt


@dataclass
class Registration:
    """The outcome of :func:`register`.

    transform: scan point -> atlas point (ITK convention): the affine, followed (applied first) by the deformable
        stage's displacement field where it ran.
    affine: the affine stage alone.
    quality: ``metric`` (final Mattes MI, lower is better), ``scales`` (singular values of the affine's matrix),
        ``body_dice`` (the warped atlas body against the scan's body, on the scan slices the atlas covers),
        ``coverage`` (share of the scan's slices the atlas covers), ``z_offset_mm`` (initial z shift), ``seconds``.
    plausible: whether the quality is within the limits (:func:`assess`); ``reason`` says why not.
    """

    transform: sitk.Transform
    affine: Optional[sitk.AffineTransform] = None
    quality: Dict[str, object] = field(default_factory=dict)
    plausible: bool = True
    reason: str = ""

    def summary(self) -> Dict[str, object]:
        """JSON-ready record for a sidecar: the transform's parameters, the quality and the verdict."""
        t = self.affine or sitk.AffineTransform(3)
        method = "affine (SimpleITK, Mattes mutual information)"
        if self.quality.get("deformable"):
            method += " + symmetric-forces demons" + ("" if self.quality.get("modality", "CT") == "CT"
                                                       else " on a pseudo-CT")
        return {"method": method,
                "matrix": [round(v, 5) for v in t.GetMatrix()],
                "translation_mm": [round(v, 3) for v in t.GetTranslation()],
                "center_mm": [round(v, 3) for v in t.GetCenter()],
                **{k: _rounded(v) for k, v in self.quality.items()},
                "plausible": self.plausible, "reason": self.reason}


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def to_registration_grid(image: sitk.Image, spacing: float = REGISTRATION_SPACING) -> sitk.Image:
    """``image`` on LPS axes at ``spacing`` mm isotropic, float32 (linear interpolation; the same physical box)."""
    from ..data.geometry import to_model_space

    return to_model_space(image, [spacing] * 3, sitk.sitkLinear, pixel_type=sitk.sitkFloat32)


def body_mask(array: np.ndarray, modality: str) -> np.ndarray:
    """(Z, Y, X) bool: the largest connected region of the body, holes filled slice by slice.

    CT: voxels above -300 HU; MR: above half an Otsu threshold of the volume (air is dark in both).
    """
    from scipy import ndimage

    if modality == "CT":
        fg = array > CT_BODY_HU
    else:
        thr = _otsu(array[np.isfinite(array)])
        fg = array > 0.5 * thr
    if not fg.any():
        return fg
    fg = largest_component(fg)
    for z in range(fg.shape[0]):
        fg[z] = ndimage.binary_fill_holes(fg[z])
    return fg


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def _intensity_for_matching(array: np.ndarray, modality: str) -> np.ndarray:
    if modality == "CT":
        return np.clip(array, *CT_CLAMP).astype(np.float32)
    lo, hi = np.percentile(array[array > 0] if (array > 0).any() else array, [0.5, 99.5])
    return np.clip(array, lo, hi).astype(np.float32)


def _centroid_mm(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Physical centroid (x, y, z) of a (Z, Y, X) mask on ``image``'s grid."""
    zyx = np.argwhere(mask).mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(zyx[2]), float(zyx[1]), float(zyx[0])]))


def search_z_offset(scan: np.ndarray, scan_body: np.ndarray, atlas: np.ndarray, atlas_body: np.ndarray,
                    min_overlap: int = MIN_OVERLAP_SLICES) -> Tuple[int, float, int]:
    """The z shift k (in slices) that best matches scan slice i with atlas slice i + k.

    scan, atlas: (Zs, Y, X) and (Za, Y, X) intensities on one in-plane grid (the atlas moved in-plane onto the
    scan's), bodies as bool masks. Every shift with at least ``max(min_overlap, min(Zs, Za) // 4)`` overlapping
    slices is scored by the normalised correlation of the intensities inside the union of the two bodies; a scan
    may hold a few centimetres of the atlas (a thin slab) or extend beyond it (a chest-to-pelvis CT).
    Returns (k, its correlation, the number of overlapping slices).
    """
    zs, za = scan.shape[0], atlas.shape[0]
    need = max(min(min_overlap, zs, za), min(zs, za) // 4)
    best = (0, -np.inf, 0)
    for k in range(-(zs - need), za - need + 1):
        i0, i1 = max(0, -k), min(zs, za - k)
        if i1 - i0 < need:
            continue
        f = scan[i0:i1]
        a = atlas[i0 + k:i1 + k]
        m = scan_body[i0:i1] | atlas_body[i0 + k:i1 + k]
        if m.sum() < 100:
            continue
        fv, av = f[m], a[m]
        fv = fv - fv.mean()
        av = av - av.mean()
        denom = float(np.sqrt((fv * fv).sum() * (av * av).sum()))
        ncc = float((fv * av).sum() / denom) if denom > 0 else -1.0
        if ncc > best[1]:
            best = (k, ncc, i1 - i0)
    return best


def _shift_atlas_in_plane(atlas: sitk.Image, scan: sitk.Image, shift_xy: np.ndarray) -> sitk.Image:
    """The atlas on a grid with the scan's in-plane geometry and the atlas's own z extent, moved by ``shift_xy``
    (atlas point = grid point + shift)."""
    size = list(scan.GetSize()[:2]) + [atlas.GetSize()[2]]
    origin = list(scan.GetOrigin()[:2]) + [atlas.GetOrigin()[2]]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(scan.GetSpacing())
    ref.SetOrigin(origin)
    ref.SetDirection(scan.GetDirection())
    t = sitk.TranslationTransform(3, [float(shift_xy[0]), float(shift_xy[1]), 0.0])
    return sitk.Resample(atlas, ref, t, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def initial_transform(scan: sitk.Image, scan_body: np.ndarray, atlas: sitk.Image, atlas_body: np.ndarray,
                      modality: str) -> Tuple[sitk.AffineTransform, Dict[str, float]]:
    """A translation (as an affine centred on the scan's body) from body centroids in-plane and
    :func:`search_z_offset` along z; both images on LPS axes at the same isotropic spacing."""
    scan_c = _centroid_mm(scan, scan_body)
    atlas_c = _centroid_mm(atlas, atlas_body)
    shift = atlas_c - scan_c
    moved = _shift_atlas_in_plane(atlas, scan, shift[:2])
    moved_arr = sitk.GetArrayFromImage(moved)
    moved_body = body_mask(moved_arr, "CT") if modality == "CT" else moved_arr > CT_BODY_HU
    scan_arr = _intensity_for_matching(sitk.GetArrayFromImage(scan), modality)
    if modality == "CT":
        k, score, overlap = search_z_offset(scan_arr, scan_body, np.clip(moved_arr, *CT_CLAMP), moved_body)
    else:  # across modalities intensities do not correlate: match the body outlines
        k, score, overlap = search_z_offset(scan_body.astype(np.float32), scan_body,
                                            moved_body.astype(np.float32), moved_body)
    dz = atlas.GetOrigin()[2] - scan.GetOrigin()[2] + k * scan.GetSpacing()[2]
    # refine the in-plane shift on the matched slices only (the atlas's centroid over its whole extent is not the
    # centroid of the part the scan holds)
    i0, i1 = max(0, -k), min(scan_body.shape[0], atlas_body.shape[0] - k)
    if i1 > i0:
        part = np.zeros_like(moved_body)
        part[i0 + k:i1 + k] = moved_body[i0 + k:i1 + k]
        if part.any():
            sub_c = _centroid_mm(moved, part)
            scan_part = np.zeros_like(scan_body)
            scan_part[i0:i1] = scan_body[i0:i1]
            scan_sub = _centroid_mm(scan, scan_part) if scan_part.any() else scan_c
            shift[:2] = shift[:2] + (sub_c[:2] - scan_sub[:2])
    t = sitk.AffineTransform(3)
    t.SetCenter([float(v) for v in scan_c])
    t.SetTranslation([float(shift[0]), float(shift[1]), float(dz)])
    return t, {"z_offset_mm": float(dz), "z_match_score": float(score), "z_overlap_slices": int(overlap)}


def register(scan: sitk.Image, atlas_image: sitk.Image, modality: str = "CT", iterations: int = 100,
             deformable: bool = True) -> Registration:
    """Register ``atlas_image`` (a CT) onto ``scan`` (``modality`` "CT" or "MR"); see the module docstring.
    ``deformable``: refine a plausible affine with :func:`demons_stage` (across modalities on :func:`pseudo_ct`)."""
    start = time.perf_counter()
    fixed = to_registration_grid(scan)
    moving = to_registration_grid(atlas_image)
    fixed_arr = sitk.GetArrayFromImage(fixed)
    moving_arr = sitk.GetArrayFromImage(moving)
    fixed_body = body_mask(fixed_arr, modality)
    moving_body = body_mask(moving_arr, "CT")
    if not fixed_body.any() or not moving_body.any():
        t = sitk.AffineTransform(3)
        return Registration(t, t, {"seconds": time.perf_counter() - start}, False, "no body found in the scan")
    init, init_quality = initial_transform(fixed, fixed_body, moving, moving_body, modality)
    init_quality["modality"] = modality

    fixed_m = sitk.GetImageFromArray(_intensity_for_matching(fixed_arr, modality))
    fixed_m.CopyInformation(fixed)
    moving_m = sitk.GetImageFromArray(np.clip(moving_arr, *CT_CLAMP).astype(np.float32))
    moving_m.CopyInformation(moving)
    from scipy import ndimage

    mask = sitk.GetImageFromArray(ndimage.binary_dilation(fixed_body, iterations=2).astype(np.uint8))
    mask.CopyInformation(fixed)

    # stage 1, similarity (rotation, one scale, translation): robust; stage 2, affine. A thin scan (a few
    # centimetres) cannot tell the atlas's z scale or its tilt out of the axial plane, which the affine then drifts
    # on (a 40-mm slab had its z axis scaled by 0.03): there the z row and column keep the similarity's values
    init_quality["stages"] = []
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(init.GetCenter())
    similarity.SetTranslation(init.GetTranslation())
    metric = float("nan")
    thin = fixed.GetSize()[2] * fixed.GetSpacing()[2] < THIN_SCAN_MM
    # similarity parameters: versor (x, y, z), translation (3), scale; a thin scan rotates in-plane only
    sim_weights = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0] if thin else None
    try:
        if modality != "CT":
            similarity, metric, start, starts = _multi_start_similarity(fixed_m, moving_m, mask, fixed_body,
                                                                        init, iterations, sim_weights)
            init_quality["z_starts_mm"] = starts
            init_quality["z_offset_mm"] = start
        else:
            metric = _run_stage(fixed_m, moving_m, mask, similarity, iterations, sim_weights)
        init_quality["stages"].append("similarity")
        transform = _as_affine(similarity)
        weights = [1.0] * 12
        if thin:
            for i in (2, 5, 6, 7, 8):  # matrix entries m02, m12, m20, m21, m22 (row-major)
                weights[i] = 0.0
        metric = _run_stage(fixed_m, moving_m, mask, transform, iterations, weights)
        init_quality["stages"].append("affine (z fixed by the similarity)" if thin else "affine")
    except RuntimeError as exc:  # e.g. too few samples inside the mask: keep what the last stage gave
        init_quality["registration_error"] = str(exc).strip().splitlines()[-1][:200]
        if not init_quality["stages"]:
            transform = sitk.AffineTransform(init)
        elif len(init_quality["stages"]) == 1:
            transform = _as_affine(similarity)
    body_img = moving_body_image(moving, moving_body)
    quality = {**init_quality, "metric": metric, "scales": affine_scales(transform),
               **body_overlap(transform, fixed, fixed_body, body_img)}
    plausible, reason = assess(quality)
    full: sitk.Transform = transform
    quality["deformable"] = False
    if plausible and deformable:
        # demons matches intensities: across modalities it runs on the scan mapped to CT values (pseudo_ct)
        target = fixed_m if modality == "CT" else pseudo_ct(fixed_m, fixed_body, moving_m, transform)
        field_t, stats = demons_stage(target, moving_m, transform)
        full = sitk.CompositeTransform([transform, field_t])
        quality.update(stats)
        quality["deformable"] = True
        quality["body_dice_deformable"] = body_overlap(full, fixed, fixed_body, body_img)["body_dice"]
    quality["seconds"] = time.perf_counter() - start
    return Registration(full, transform, quality, plausible, reason)


PSEUDO_CT_BINS = 64


def pseudo_ct(fixed: sitk.Image, fixed_body: np.ndarray, moving: sitk.Image, affine: sitk.Transform) -> sitk.Image:
    """The scan (an MR, on the registration grid) mapped to CT values for demons: each of ``PSEUDO_CT_BINS``
    intensity bins of the scan's body takes the median of the affinely warped atlas CT (clamped) over that bin's
    voxels; outside the body, the clamp's floor. A joint-histogram intensity mapping: after a good affine most
    voxels of a bin lie in one tissue, so the map is that tissue's CT value, and demons then matches shapes."""
    arr = np.asarray(sitk.GetArrayViewFromImage(fixed))
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, affine, sitk.sitkLinear, float(CT_CLAMP[0])))
    inside = arr[fixed_body]
    bins = _bin(arr, PSEUDO_CT_BINS, (float(inside.min()), float(inside.max())))
    body_bins, body_ct = bins[fixed_body], warped[fixed_body]
    lut = np.full(PSEUDO_CT_BINS, float(CT_CLAMP[0]), np.float32)
    for b in range(PSEUDO_CT_BINS):
        values = body_ct[body_bins == b]
        if values.size >= 20:
            lut[b] = np.median(values)
    out = sitk.GetImageFromArray(np.where(fixed_body, lut[bins], np.float32(CT_CLAMP[0])).astype(np.float32))
    out.CopyInformation(fixed)
    return out


DEMONS_ITERATIONS = 50  # at half resolution
DEMONS_FINE_ITERATIONS = 15  # then at the 3-mm grid
DEMONS_SIGMA = 2.0  # voxels of the 3-mm grid: the displacement field's Gaussian regularisation


def demons_stage(fixed: sitk.Image, moving: sitk.Image,
                 affine: sitk.Transform) -> Tuple[sitk.DisplacementFieldTransform, Dict[str, float]]:
    """A deformable refinement after ``affine``: symmetric-forces demons (SimpleITK) between the scan and the
    affinely warped atlas, both clamped CT on the 3-mm grid, at half and then full resolution (z kept whole for a
    thin scan). On the proxy cases (``evaluation/proxy.py``, 5 cases) the warped labels' Dice was 0.79 with the
    affine alone and 0.88 with this stage (docs/benchmarks.md)."""
    warped = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, float(CT_CLAMP[0]))
    shrink = [2, 2, 2 if fixed.GetSize()[2] > 30 else 1]
    coarse_fixed = sitk.Shrink(fixed, shrink)
    coarse_moving = sitk.Resample(warped, coarse_fixed)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(DEMONS_ITERATIONS)
    demons.SetStandardDeviations(DEMONS_SIGMA)
    coarse = demons.Execute(coarse_fixed, coarse_moving)
    field = sitk.Resample(coarse, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, coarse.GetPixelID())
    demons.SetNumberOfIterations(DEMONS_FINE_ITERATIONS)
    field = demons.Execute(fixed, warped, field)
    disp = sitk.GetArrayViewFromImage(field)
    stats = {"max_displacement_mm": float(np.sqrt((np.asarray(disp) ** 2).sum(-1)).max())}
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)), stats


MULTI_START_SAMPLE = 4  # every 4th body voxel of the scan enters the z sweep's MI
MULTI_START_SEPARATION_MM = 30.0  # distinct starts lie at least this far apart
MULTI_STARTS = 5


def z_start_candidates(fixed: sitk.Image, fixed_body: np.ndarray, moving: sitk.Image,
                       init: sitk.AffineTransform, count: int = MULTI_STARTS) -> List[float]:
    """Up to ``count`` z translations (mm) to start the similarity stage from: ``init``'s own, then the local
    maxima of the mutual information over every z shift of ``init`` that keeps the shorter of scan and atlas
    within the longer (a partial overlap samples fewer voxels, which MI rewards), best first, at least
    ``MULTI_START_SEPARATION_MM`` apart.

    fixed, moving: the scan and the atlas as matched for registration (on the isotropic registration grid);
    fixed_body: (Z, Y, X) the scan's body, where MI is measured (a joint histogram, 32 bins).

    Across modalities neither intensities nor body outlines (an MR's field of view often cuts the body at the
    sides) tell the z offset, and the MI of the unoptimised overlap prefers high-contrast regions (the pelvis's
    bones and gas) over the right one; optimising from each local maximum and keeping the best final metric does
    not (:func:`_multi_start_similarity`)."""
    tx, ty, tz0 = init.GetTranslation()
    moved = sitk.GetArrayFromImage(_shift_atlas_in_plane(moving, fixed, np.array([tx, ty])))
    scan = sitk.GetArrayViewFromImage(fixed)
    zs, za = scan.shape[0], moved.shape[0]
    step = fixed.GetSpacing()[2]
    base = moving.GetOrigin()[2] - fixed.GetOrigin()[2]
    lo, hi = sorted((0, za - zs))
    flat = np.flatnonzero(fixed_body)[::MULTI_START_SAMPLE]
    zi, rest = np.divmod(flat, scan.shape[1] * scan.shape[2])
    f_bins = _bin(np.asarray(scan).reshape(zs, -1)[zi, rest])
    moved = moved.reshape(za, -1)
    ks = list(range(lo, hi + 1))
    scores = []
    for k in ks:
        j = zi + k
        inside = (j >= 0) & (j < za)
        a = np.full(flat.shape, np.nan, np.float32)
        a[inside] = moved[j[inside], rest[inside]]
        scores.append(_mutual_information(f_bins, _bin(a)))
    scores = np.asarray(scores)
    maxima = [i for i in range(len(ks)) if scores[i] >= scores[max(0, i - 1)]
              and scores[i] >= scores[min(len(ks) - 1, i + 1)]]
    maxima.sort(key=lambda i: -scores[i])
    chosen: List[float] = [float(tz0)]
    for i in maxima:
        dz = base + ks[i] * step
        if len(chosen) >= count:
            break
        if all(abs(dz - c) >= MULTI_START_SEPARATION_MM for c in chosen):
            chosen.append(float(dz))
    return chosen


def _bin(values: np.ndarray, bins: int = 32, value_range: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """Histogram bin index (0..bins-1) of each finite value, ``value_range`` (default: the values' own min and
    max) split into ``bins`` equal bins, values outside it in the end bins; -1 for NaN."""
    out = np.full(values.shape, -1, np.int64)
    ok = np.isfinite(values)
    if ok.any():
        v = values[ok]
        lo, hi = value_range if value_range is not None else (float(v.min()), float(v.max()))
        out[ok] = np.clip(((v - lo) / max(hi - lo, 1e-6) * bins).astype(np.int64), 0, bins - 1)
    return out


def _mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Mutual information (nats) of two binned samples (:func:`_bin`), over the pairs where both are valid."""
    ok = (a >= 0) & (b >= 0)
    if ok.sum() < 100:
        return -np.inf
    joint = np.bincount(a[ok] * bins + b[ok], minlength=bins * bins).reshape(bins, bins).astype(float)
    p = joint / joint.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (px @ py)[nz])).sum())


def _multi_start_similarity(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, body: np.ndarray,
                            init: sitk.AffineTransform, iterations: int, weights: Optional[List[float]]
                            ) -> Tuple[sitk.Similarity3DTransform, float, float, List[Tuple[float, float]]]:
    """The similarity stage run from each of :func:`z_start_candidates`: the one with the best (lowest) final
    metric, that metric, the z shift it started from, and every start's (z shift, final metric), best first."""
    results = []
    tx, ty, _ = init.GetTranslation()
    for dz in z_start_candidates(fixed, body, moving, init):
        sim = sitk.Similarity3DTransform()
        sim.SetCenter(init.GetCenter())
        sim.SetTranslation([tx, ty, dz])
        try:
            m = _run_stage(fixed, moving, mask, sim, iterations, weights)
        except RuntimeError:
            continue
        results.append((m, dz, sim))
    if not results:
        raise RuntimeError("no start of the similarity stage converged")
    results.sort(key=lambda r: r[0])
    best_metric, best_start, best = results[0]
    return best, best_metric, best_start, [(round(dz, 1), round(m, 4)) for m, dz, _ in results]


def _as_affine(similarity: sitk.Similarity3DTransform) -> sitk.AffineTransform:
    """The same mapping as an affine (centre, matrix and translation copied)."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    return affine


def _run_stage(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, transform: sitk.Transform,
               iterations: int, weights: Optional[List[float]] = None) -> float:
    """One multi-resolution stage of Mattes MI registration, updating ``transform`` in place; its final metric."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(METRIC_SAMPLING, seed=7)
    reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    if weights is not None:
        reg.SetOptimizerWeights(weights)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    return float(reg.GetMetricValue())


def moving_body_image(moving: sitk.Image, body: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(body.astype(np.uint8))
    img.CopyInformation(moving)
    return img


def affine_scales(affine: sitk.Transform) -> List[float]:
    """How much the affine scales the scan relative to the atlas along its principal axes (ascending): the
    inverses of the singular values of its (scan -> atlas) matrix."""
    matrix = np.array(sitk.AffineTransform(affine).GetMatrix()).reshape(3, 3)
    return sorted(1.0 / float(v) for v in np.linalg.svd(matrix, compute_uv=False))


def body_overlap(transform: sitk.Transform, fixed: sitk.Image, fixed_body: np.ndarray,
                 moving_body: sitk.Image) -> Dict[str, float]:
    """The Dice of the warped atlas body and the scan's body on the scan slices the atlas covers, and the covered
    share of the scan's slices."""
    warped = sitk.GetArrayFromImage(sitk.Resample(moving_body, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0
    covered = _covered_slices(transform, fixed, moving_body)
    if covered.any():
        w, f = warped[covered], fixed_body[covered]
        dice = float(2 * (w & f).sum() / max(1, w.sum() + f.sum()))
    else:
        dice = 0.0
    return {"body_dice": dice, "coverage": float(covered.mean())}


def _covered_slices(transform: sitk.Transform, fixed: sitk.Image, moving: sitk.Image) -> np.ndarray:
    """(Zs,) bool: scan slices whose centre maps inside the atlas's z extent."""
    nx, ny, nz = fixed.GetSize()
    lo, hi = -0.5, moving.GetSize()[2] - 0.5
    out = np.zeros(nz, bool)
    for z in range(nz):
        p = fixed.TransformContinuousIndexToPhysicalPoint([(nx - 1) / 2.0, (ny - 1) / 2.0, float(z)])
        q = moving.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(p))
        out[z] = lo <= q[2] <= hi
    return out


def assess(quality: Dict[str, object]) -> Tuple[bool, str]:
    """Whether a registration's quality is plausible, and if not why (one line for the user)."""
    scales = quality.get("scales") or [1.0]
    lo, hi = SCALE_LIMITS
    if min(scales) < lo or max(scales) > hi:
        return False, (f"the registration scaled the atlas by {min(scales):.2f}-{max(scales):.2f} "
                       f"(plausible: {lo}-{hi})")
    if float(quality.get("coverage", 0.0)) <= 0.0:
        return False, "the scan does not overlap the atlas's body region"
    dice = float(quality.get("body_dice", 0.0))
    if dice < MIN_BODY_DICE:
        return False, f"the atlas's body outline overlaps the scan's by only {dice:.2f} (Dice; needs {MIN_BODY_DICE})"
    return True, ""


def warp_labels(atlas_labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """The atlas's labels (nearest neighbour) on ``reference``'s grid through ``transform``; 0 outside."""
    return sitk.Resample(atlas_labels, reference, transform, sitk.sitkNearestNeighbor, 0, atlas_labels.GetPixelID())

