"""The overlay picture: radiological orientation whatever the file's axes, and a real PNG written atomically."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from masksam_core.evaluation.figure import (_lps_arrays, organ_surfaces, overlay_rgb, save_overlay_figure,
                                           save_surface_figure)


def _volume_with_left_anterior_cube(direction):
    """A 40^3 volume whose label marks a cube in the patient's LEFT, ANTERIOR, SUPERIOR corner (physical LPS)."""
    img = sitk.Image(40, 40, 40, sitk.sitkInt16)
    img.SetSpacing((1.0, 1.0, 2.0))
    img.SetDirection(direction)
    img.SetOrigin((0.0, 0.0, 0.0))
    lab = sitk.Image(40, 40, 40, sitk.sitkUInt8)
    lab.CopyInformation(img)
    # physical centre of the volume, then a point left (+x), anterior (-y), superior (+z) of it
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint((19.5, 19.5, 19.5)))
    target = centre + np.array([12.0, -12.0, 12.0])
    idx = np.round(img.TransformPhysicalPointToContinuousIndex(tuple(target))).astype(int)
    arr = np.zeros((40, 40, 40), np.uint8)
    arr[idx[2] - 2:idx[2] + 3, idx[1] - 2:idx[1] + 3, idx[0] - 2:idx[0] + 3] = 3
    lab_img = sitk.GetImageFromArray(arr)
    lab_img.CopyInformation(img)
    return img, lab_img


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),          # LPS
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),        # RAS
    (0, 1, 0, 1, 0, 0, 0, 0, -1),         # permuted in-plane, z flipped
    (1, 0, 0, 0, 0, 1, 0, -1, 0),         # coronal acquisition
])
def test_slices_are_shown_in_radiological_convention(direction):
    img, lab = _volume_with_left_anterior_cube(direction)
    _, arr, _ = _lps_arrays(img, lab)
    z, y, x = [int(np.mean(v)) for v in np.nonzero(arr == 3)]
    assert x > arr.shape[2] // 2, "patient left must be on the image's right"
    assert y < arr.shape[1] // 2, "anterior must be up"
    assert z > arr.shape[0] // 2, "superior must be the high z (drawn at the top of the coronal view)"


def test_overlay_colours_and_png(tmp_path):
    gray = np.full((10, 10), 0.5, np.float32)
    label = np.zeros((10, 10), np.int64)
    label[3:7, 3:7] = 1
    rgb = overlay_rgb(gray, label, {1: (255, 0, 0)})
    assert rgb.shape == (10, 10, 3)
    assert rgb[5, 5, 0] > rgb[5, 5, 1] and np.allclose(rgb[0, 0], 0.5)
    img, lab = _volume_with_left_anterior_cube((1, 0, 0, 0, 1, 0, 0, 0, 1))
    out = save_overlay_figure(img, lab, {3: "liver"}, {3: (221, 130, 101)}, tmp_path / "fig.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]  # no temporary file left


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 1, 0, 1, 0, 0, 0, 0, -1)])
def test_surfaces_lie_where_the_organ_is_in_the_patient(direction):
    img, lab = _volume_with_left_anterior_cube(direction)
    surfaces = organ_surfaces(lab, [3, 7])
    assert list(surfaces) == [3], "only labels present are meshed"
    verts, faces = surfaces[3]
    assert faces.shape[1] == 3 and faces.max() < len(verts)
    lps = sitk.DICOMOrient(lab, "LPS")
    arr_spacing = lps.GetSpacing()
    extent = np.array(lps.GetSize()) * np.array(arr_spacing)
    centre = verts.mean(axis=0)
    assert centre[0] > extent[0] / 2, "x must grow towards the patient's left"
    assert centre[1] < extent[1] / 2, "the cube is anterior (small y)"
    assert centre[2] > extent[2] / 2, "the cube is superior (large z)"
    # a 5-voxel cube: its surface spans about 5 voxels in each LPS axis
    span = verts.max(axis=0) - verts.min(axis=0)
    assert np.allclose(span, 5 * np.array(arr_spacing), atol=1.01 * max(arr_spacing))


def test_surface_png(tmp_path):
    _, lab = _volume_with_left_anterior_cube((1, 0, 0, 0, 1, 0, 0, 0, 1))
    out = save_surface_figure(lab, {3: "liver"}, {3: (221, 130, 101)}, tmp_path / "organs_3d.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["organs_3d.png"]
