"""Model-space geometry (reorientation, resampling, the way back), body box, and intensity normalisation.

Geometry is checked in physical space, independently of the code under test: a linear function of the LPS
position is exact under linear interpolation, so every interior voxel of the model-space image must hold the
function's value at its own physical position; and a cube placed in physical space must stay where it is
through the round trip.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from masksam_core.data.geometry import (body_bbox, index_to_physical, physical_corners, resample_to_reference,
                                        same_grid, to_model_space)
from masksam_core.data.intensity import normalize_intensity
from masksam_core.errors import ModelError

MODEL_SPACING = (1.6, 1.6, 3.0)


def _rot(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def _cols(*columns) -> np.ndarray:
    """Direction matrix whose columns are the LPS directions of the index axes i, j, k."""
    return np.array(columns, float).T


SAGITTAL = _cols((0, 1, 0), (0, 0, -1), (1, 0, 0))       # i -> P, j -> I, k -> L
ORIENTATIONS = {
    "lps": np.eye(3),
    "ras_nifti": np.diag([-1.0, -1.0, 1.0]),
    "sagittal": SAGITTAL,
    "coronal": _cols((1, 0, 0), (0, 0, -1), (0, 1, 0)),   # i -> L, j -> I, k -> P
    "permuted_flipped": _cols((0, 0, -1), (-1, 0, 0), (0, -1, 0)),
    "left_handed": np.diag([1.0, 1.0, -1.0]),
    "oblique_axial": _rot(2, 25) @ _rot(0, -15),
    "oblique_sagittal": _rot(1, 20) @ _rot(2, -12) @ SAGITTAL,
    "oblique_ras": _rot(2, -30) @ _rot(1, 12) @ np.diag([-1.0, -1.0, 1.0]),
}
GRIDS = {  # size (x, y, z), spacing, origin
    "lps": ((40, 34, 22), (0.9, 1.3, 2.5), (-123.4, 56.7, 890.1)),
    "ras_nifti": ((36, 40, 20), (1.25, 1.1, 3.3), (177.9, -11.3, 94.3)),
    "sagittal": ((38, 30, 26), (1.0, 1.4, 2.2), (0.05, -0.05, 1000.0)),
    "coronal": ((44, 18, 36), (0.8, 3.0, 1.2), (-250.0, -250.0, -250.0)),
    "permuted_flipped": ((20, 42, 34), (2.7, 0.85, 1.15), (13.37, 42.42, -7.77)),
    "left_handed": ((36, 36, 24), (1.05, 0.95, 2.4), (-1.5, 2.5, -3.5)),
    "oblique_axial": ((42, 38, 20), (0.95, 1.05, 2.8), (-80.0, 120.5, 33.3)),
    "oblique_sagittal": ((34, 28, 30), (1.3, 2.1, 1.1), (50.5, -60.25, 70.125)),
    "oblique_ras": ((40, 40, 18), (1.15, 1.2, 3.1), (201.0, 199.5, -600.0)),
}
_A = np.array([0.5, -0.3, 0.2])  # f(p) = A . p + 7, linear in LPS millimetres


def _grid_image(name: str, values=None, pixel=sitk.sitkFloat32) -> sitk.Image:
    size, spacing, origin = GRIDS[name]
    img = sitk.Image(size, pixel)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(ORIENTATIONS[name].ravel()))
    if values is not None:
        arr = values(img)
        out = sitk.GetImageFromArray(arr.astype(sitk.GetArrayViewFromImage(img).dtype))
        out.CopyInformation(img)
        img = out
    return img


def _physical_zyx(img: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS position of every voxel centre."""
    size = img.GetSize()
    k, j, i = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    idx = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    return index_to_physical(img, idx).reshape(size[2], size[1], size[0], 3)


def _linear(img: sitk.Image) -> np.ndarray:
    return _physical_zyx(img) @ _A + 7.0


def _box_centre(img: sitk.Image) -> np.ndarray:
    return physical_corners(img).mean(axis=0)


def _cube(img: sitk.Image, centre: np.ndarray, half: float) -> np.ndarray:
    """(z, y, x) uint8 mask of the voxels whose centre lies in the LPS-aligned cube."""
    return (np.abs(_physical_zyx(img) - centre).max(axis=-1) <= half).astype(np.uint8)


def _centroid(img: sitk.Image, mask_zyx: np.ndarray) -> np.ndarray:
    z, y, x = np.nonzero(mask_zyx)
    return index_to_physical(img, np.stack([x, y, z], axis=1)).mean(axis=0)


def _centroid_tolerance(img: sitk.Image) -> float:
    """Nearest-neighbour resampling may move a voxelised shape's centroid by up to half the coarser voxel (the
    exact physical mapping is checked by test_model_space_keeps_physical_positions)."""
    return 0.5 * max(max(img.GetSpacing()), max(MODEL_SPACING)) + 0.1


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _check_model_grid(src: sitk.Image, work: sitk.Image, spacing) -> None:
    d = np.array(src.GetDirection()).reshape(3, 3)
    d_new = np.array(work.GetDirection()).reshape(3, 3)
    perm = d.T @ d_new
    # only a permutation/flip of the source axes (obliquity kept) ...
    assert np.allclose(np.abs(perm).max(axis=0), 1.0, atol=1e-6)
    assert np.allclose(np.abs(perm).sum(axis=0), 1.0, atol=1e-6)
    # ... and the one closest to LPS: each axis points mostly along +L, +P, +S respectively
    for j in range(3):
        assert int(np.argmax(np.abs(d_new[:, j]))) == j and d_new[j, j] > 0
    assert np.allclose(work.GetSpacing(), spacing)
    # same physical extent: same first outer corner, size rounded
    src_axis = np.argmax(np.abs(perm), axis=0)
    for j in range(3):
        extent = src.GetSize()[src_axis[j]] * src.GetSpacing()[src_axis[j]]
        assert work.GetSize()[j] == max(1, int(round(extent / spacing[j])))
    proj_src = physical_corners(src) @ d_new
    proj_new = physical_corners(work) @ d_new
    assert np.allclose(proj_new.min(axis=0), proj_src.min(axis=0), atol=1e-4)
    assert np.all(np.abs(proj_new.max(axis=0) - proj_src.max(axis=0)) <= np.array(spacing) / 2 + 1e-4)


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_model_space_keeps_physical_positions(name):
    src = _grid_image(name, _linear)
    work = to_model_space(src, MODEL_SPACING, sitk.sitkLinear)
    _check_model_grid(src, work, MODEL_SPACING)
    # every model voxel whose centre lies inside the source's voxel centres holds f(its own position)
    values = sitk.GetArrayFromImage(work)
    points = _physical_zyx(work)
    m = np.array(src.GetDirection()).reshape(3, 3) @ np.diag(src.GetSpacing())
    cont = (points - np.array(src.GetOrigin())) @ np.linalg.inv(m).T
    inside = np.all((cont >= 1e-6) & (cont <= np.array(src.GetSize()) - 1 - 1e-6), axis=-1)
    assert inside.mean() > 0.5
    assert np.allclose(values[inside], (points @ _A + 7.0)[inside], atol=2e-3)
    outside_box = np.any((cont < -0.5 - 1e-6) | (cont > np.array(src.GetSize()) - 0.5 + 1e-6), axis=-1)
    assert np.all(values[outside_box] == -1000.0)
    # the way back lands exactly on the input grid
    back = resample_to_reference(work, src, sitk.sitkLinear, 0.0)
    assert back.GetSize() == src.GetSize() and back.GetSpacing() == src.GetSpacing()
    assert back.GetOrigin() == src.GetOrigin() and back.GetDirection() == src.GetDirection()
    assert same_grid(back, src, tol=1e-9)
    assert back.GetPixelID() == sitk.sitkFloat32


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_cube_stays_in_place_through_the_round_trip(name):
    ref = _grid_image(name)
    # a 30 mm cube towards the patient's right (-L), anterior (-P) and superior (+S) of the volume's centre
    centre = _box_centre(ref) + np.array([-4.0, -3.0, 5.0])
    label = _grid_image(name, lambda img: _cube(img, centre, 15.0), sitk.sitkUInt8)
    mask = sitk.GetArrayFromImage(label)
    assert mask.sum() > 500
    work = to_model_space(label, MODEL_SPACING, sitk.sitkNearestNeighbor)
    assert work.GetPixelID() == sitk.sitkUInt8
    work_mask = sitk.GetArrayFromImage(work)
    # same physical place in model space, and the display convention of design.md: column 0 is the patient's
    # right, row 0 anterior, slices go up
    tol = _centroid_tolerance(label)
    assert np.linalg.norm(_centroid(work, work_mask) - _centroid(label, mask)) < tol
    z, y, x = (np.array(np.nonzero(work_mask)).mean(axis=1) - (np.array(work_mask.shape) - 1) / 2)
    assert x < 0 and y < 0 and z > 0
    back = resample_to_reference(work, label, sitk.sitkNearestNeighbor, 0)
    assert same_grid(back, label, tol=1e-12) and back.GetPixelID() == sitk.sitkUInt8
    back_mask = sitk.GetArrayFromImage(back)
    assert _dice(back_mask, mask) > 0.9
    assert np.linalg.norm(_centroid(label, back_mask) - _centroid(label, mask)) < tol


# ------------------------------------------------------------------------------------------------ the real CT

@pytest.fixture(scope="module")
def real_ct(totalseg_dir):
    ct = sitk.ReadImage(str(totalseg_dir / "s1_ct.nii.gz"), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(totalseg_dir / "s1_labels.nii.gz"), sitk.sitkUInt8)
    # a small block (x, y, z) through the liver, the right kidney and the aorta, for speed
    box = (slice(55, 115), slice(20, 80), slice(72, 108))
    return (sitk.GetArrayFromImage(ct[box]), sitk.GetArrayFromImage(labels[box]), sitk.GetArrayFromImage(ct),
            sitk.GetArrayFromImage(labels))


REAL_CASES = ["ras_nifti", "lps", "sagittal", "coronal", "permuted_flipped", "left_handed", "oblique_axial",
              "oblique_ras"]


@pytest.mark.parametrize("name", REAL_CASES)
def test_real_ct_round_trip_in_many_orientations(real_ct, name):
    ct_arr, lab_arr = real_ct[:2]
    _, spacing, origin = GRIDS[name]
    ct = sitk.GetImageFromArray(ct_arr)
    ct.SetSpacing(spacing)
    ct.SetOrigin(origin)
    ct.SetDirection(tuple(ORIENTATIONS[name].ravel()))
    work = to_model_space(ct, MODEL_SPACING, sitk.sitkLinear)
    _check_model_grid(ct, work, MODEL_SPACING)
    back = resample_to_reference(work, ct, sitk.sitkLinear, float(ct_arr.min()))
    assert same_grid(back, ct, tol=1e-12)
    back_arr = sitk.GetArrayFromImage(back)
    inner = (slice(2, -2),) * 3
    assert np.corrcoef(back_arr[inner].ravel(), ct_arr[inner].ravel())[0, 1] > 0.95
    # the organs (labels of the real CT) and a cube placed in physical space come back where they were
    labels = sitk.GetImageFromArray(lab_arr)
    labels.CopyInformation(ct)
    centre = _box_centre(ct)
    cube = _cube(ct, centre, 20.0)
    for mask in (lab_arr == 5, lab_arr == 2, cube > 0):  # liver, right kidney, cube
        img = sitk.GetImageFromArray(mask.astype(np.uint8))
        img.CopyInformation(ct)
        work_mask = to_model_space(img, MODEL_SPACING, sitk.sitkNearestNeighbor)
        assert mask.sum() > 300
        tol = _centroid_tolerance(ct)
        assert np.linalg.norm(_centroid(work_mask, sitk.GetArrayFromImage(work_mask)) - _centroid(ct, mask)) < tol
        back_mask = sitk.GetArrayFromImage(resample_to_reference(work_mask, ct))
        assert _dice(back_mask, mask) > 0.9
        assert np.linalg.norm(_centroid(ct, back_mask) - _centroid(ct, mask)) < tol


def test_real_ct_model_space_is_radiological(totalseg_dir):
    """On the real (RAS-stored) CT: in model space the liver lies in the left columns (patient's right)."""
    full = sitk.ReadImage(str(totalseg_dir / "s1_labels.nii.gz"), sitk.sitkUInt8)
    work = sitk.GetArrayFromImage(to_model_space(full, MODEL_SPACING, sitk.sitkNearestNeighbor))
    liver_x = np.nonzero(work == 5)[2].mean()
    spleen_x = np.nonzero(work == 1)[2].mean()
    assert liver_x < spleen_x  # liver on the patient's right = image left in radiological display
    # the aorta lies posterior to (a larger row than) the front of the liver
    assert np.nonzero(work == 52)[1].mean() > np.nonzero(work == 5)[1].min()


# ------------------------------------------------------------------------------------------------ small parts

def test_same_grid_compares_every_part():
    a = _grid_image("oblique_axial")
    assert same_grid(a, sitk.Image(a))
    b = sitk.Image(a)
    b.SetOrigin(tuple(np.array(a.GetOrigin()) + 1e-7))
    assert same_grid(a, b)
    for change in ("origin", "spacing", "direction"):
        c = sitk.Image(a)
        if change == "origin":
            c.SetOrigin(tuple(np.array(a.GetOrigin()) + (0, 0.5, 0)))
        elif change == "spacing":
            c.SetSpacing(tuple(np.array(a.GetSpacing()) * (1, 1, 1.01)))
        else:
            c.SetDirection(tuple((_rot(2, 1.0) @ ORIENTATIONS["oblique_axial"]).ravel()))
        assert not same_grid(a, c), change
    assert not same_grid(a, _grid_image("lps"))


def test_resample_to_reference_keeps_the_input_pixel_type():
    label = _grid_image("coronal", lambda img: _cube(img, _box_centre(img), 8.0), sitk.sitkUInt8)
    ref = _grid_image("oblique_sagittal")
    ref.SetOrigin(tuple(_box_centre(label) - np.array(ref.GetDirection()).reshape(3, 3)
                        @ (np.array(ref.GetSize()) * ref.GetSpacing() / 2)))
    out = resample_to_reference(label, ref)
    assert out.GetPixelID() == sitk.sitkUInt8 and same_grid(out, ref, tol=1e-12)
    assert set(np.unique(sitk.GetArrayFromImage(out))) == {0, 1}


@pytest.mark.parametrize("name", ["lps", "oblique_axial", "ras_nifti", "permuted_flipped"])
def test_model_space_of_an_integer_image_in_float_equals_casting_first(name):
    """The engine resamples integer CTs straight to float32 (``pixel_type``) instead of casting the full-resolution
    volume first, and does not copy an image that already lies on LPS axes ("lps", "oblique_axial"): both give
    exactly what casting and reorienting first gave."""
    rng = np.random.default_rng(3)
    src = _grid_image(name, lambda img: rng.integers(-1024, 2000, sitk.GetArrayViewFromImage(img).shape),
                      sitk.sitkInt16)
    direct = to_model_space(src, MODEL_SPACING, sitk.sitkLinear, pixel_type=sitk.sitkFloat32)
    cast_first = sitk.Resample(sitk.DICOMOrient(sitk.Cast(src, sitk.sitkFloat32), "LPS"), direct, sitk.Transform(),
                               sitk.sitkLinear, -1024.0, sitk.sitkFloat32, True)  # edges: nearest, as to_model_space
    assert direct.GetPixelID() == sitk.sitkFloat32 and same_grid(direct, cast_first, tol=1e-12)
    assert np.array_equal(sitk.GetArrayViewFromImage(direct), sitk.GetArrayViewFromImage(cast_first))
    _check_model_grid(src, direct, MODEL_SPACING)
    assert to_model_space(src, MODEL_SPACING, sitk.sitkNearestNeighbor).GetPixelID() == sitk.sitkInt16


def test_to_model_space_edge_cases():
    thin = _grid_image("lps")[:, :, :1]  # one slice of 2.5 mm resampled to 3 mm: still one slice
    assert to_model_space(thin, MODEL_SPACING).GetSize()[2] == 1
    assert to_model_space(thin, (100.0, 100.0, 100.0)).GetSize() == (1, 1, 1)
    for bad in [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, float("nan"), 1.0), "abc"]:
        with pytest.raises(ModelError):
            to_model_space(thin, bad)


@pytest.mark.parametrize("slices,old_z,new_z", [(31, 1.0, 3.0), (30, 1.0, 3.0), (29, 1.0, 3.0), (3, 2.0, 4.0),
                                                 (7, 1.5, 3.0), (333, 1.0, 6.0)])
@pytest.mark.parametrize("name", ["lps", "flipped", "oblique"])
def test_every_input_slice_survives_the_round_trip_through_model_space(slices, old_z, new_z, name):
    """Slice counts whose extent is not a whole number of model slices: the model grid's last centre can lie on the
    input box's outer face (3 x 2 mm at 4 mm, 7 x 1.5 mm at 3 mm) and the input's last centre beyond the model box
    (31 x 1 mm at 3 mm). A volume that is organ everywhere must stay organ on every model voxel and, mapped back,
    on every input voxel; a fill value at either edge emptied the last slice."""
    direction = {"lps": np.eye(3), "flipped": np.diag([-1.0, 1.0, -1.0]), "oblique": _rot(0, 20) @ _rot(2, 10)}[name]
    img = sitk.GetImageFromArray(np.full((slices, 6, 5), 7.0, np.float32))
    img.SetSpacing((1.2, 0.9, old_z))
    img.SetOrigin((4.0, -3.0, 11.0))
    img.SetDirection(tuple(direction.ravel()))
    for interpolator in (sitk.sitkLinear, sitk.sitkNearestNeighbor):
        work = to_model_space(img, (1.6, 1.6, new_z), interpolator)
        assert np.all(sitk.GetArrayViewFromImage(work) == 7.0), (interpolator, sitk.GetArrayFromImage(work)[:, 0, 0])
    organ = sitk.GetImageFromArray(np.ones(sitk.GetArrayViewFromImage(work).shape, np.uint8))
    organ.CopyInformation(work)
    back = sitk.GetArrayFromImage(resample_to_reference(organ, img, sitk.sitkNearestNeighbor, 0, extrapolate=True))
    assert back.shape == (slices, 6, 5) and np.all(back == 1), back[:, 0, 0]


def test_body_bbox():
    arr = np.full((20, 30, 40), -1000.0, np.float32)
    arr[5:15, 8:25, 10:30] = 40.0     # the body
    arr[0:2, 0:2, 0:3] = 300.0        # a bit of the table, not connected
    box = body_bbox(arr, -500.0)
    assert box == (slice(5, 15), slice(8, 25), slice(10, 30))
    assert body_bbox(np.full((4, 4, 4), -1000.0), -500.0) is None


def test_body_bbox_on_the_real_ct(real_ct):
    ct_arr, lab_arr = real_ct[2:]
    box = body_bbox(ct_arr, -500.0)
    assert box is not None
    inside = np.zeros(ct_arr.shape, bool)
    inside[box] = True
    assert inside.sum() < inside.size  # air around the patient is skipped ...
    assert np.all(inside[lab_arr > 0])  # ... but no organ


# ------------------------------------------------------------------------------------------------ intensity

def test_ct_window():
    arr = np.array([[-1000.0, -160.0, 40.0], [240.0, 3000.0, 0.0]])
    out = normalize_intensity(arr, {"mode": "ct_window", "window": [-160, 240]})
    assert out.dtype == np.float32 and out.shape == arr.shape
    assert np.allclose(out, [[0, 0, 0.5], [1, 1, 0.4]])


def test_ct_zscore():
    arr = np.array([-2000.0, 100.0, 5000.0], np.float32)
    out = normalize_intensity(arr, {"mode": "ct_zscore", "clip": [-1000, 1000], "mean": 100, "std": 50})
    assert out.dtype == np.float32 and np.allclose(out, [-22, 0, 18])


def test_mr_percentile():
    rng = np.random.default_rng(0)
    arr = np.zeros((10, 10, 10), np.float32)
    arr[2:8, 2:8, 2:8] = rng.normal(500, 100, (6, 6, 6))
    out = normalize_intensity(arr, {"mode": "mr_percentile", "percentiles": [1, 99]})
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    lo, hi = np.percentile(arr[arr != 0], [1, 99])
    assert np.allclose(out[3, 3, 3], np.clip((arr[3, 3, 3] - lo) / (hi - lo), 0, 1), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero
        for const in (np.zeros((4, 4, 4)), np.full((4, 4, 4), 37.0)):
            z = normalize_intensity(const, {"mode": "mr_percentile", "percentiles": [0.5, 99.5]})
            assert z.dtype == np.float32 and not z.any()
        assert normalize_intensity(arr, {"mode": "mr_percentile"}).max() == 1  # default percentiles


@pytest.mark.parametrize("spec", [{"mode": "zscore"}, {}, {"mode": "ct_window"},
                                  {"mode": "ct_window", "window": [5, 5]},
                                  {"mode": "ct_window", "window": "wide"}, {"mode": "ct_zscore", "clip": [0, 1]},
                                  {"mode": "ct_zscore", "clip": [0, 1], "mean": 0, "std": 0},
                                  {"mode": "mr_percentile", "percentiles": [5, 150]}, "ct_window"])
def test_bad_normalisation_specs(spec):
    with pytest.raises(ModelError) as e:
        normalize_intensity(np.zeros(3), spec)
    assert "\n" not in str(e.value)
