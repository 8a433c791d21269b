"""The slab engine returns labels on exactly the input grid, in the right physical place, in any orientation.

The network is replaced by an oracle that labels bright voxels, so what is tested is the engine's geometry:
reorientation, resampling, body cropping, tiling, slab blending and resampling back.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

from masksam_core.inference.engine import InferenceOptions, segment
from masksam_core.model.card import make_card
from masksam_core.model.masksam import MaskSAMConfig


class BrightOracle(nn.Module):
    """Stands in for MaskSAM: query 0 = background where the slice is dark, query 1 = class 1 where bright."""

    def __init__(self, depth: int = 4, size: int = 64, threshold: float = 0.5) -> None:
        super().__init__()
        self.config = MaskSAMConfig(num_classes=2, slab_depth=depth, num_queries=2)
        self.input_size = size
        self.threshold = threshold
        self.dummy = nn.Parameter(torch.zeros(1))
        self.encoder = lambda x: [x]

    slab_depth = property(lambda self: self.config.slab_depth)
    num_classes = property(lambda self: self.config.num_classes)
    encoder_is_per_slice = True

    def apply_stem(self, slab, check_depth=True):
        return slab.expand(-1, 3, -1, -1, -1)

    def encode(self, stem_out, encoder=None):
        g, c, d, s, _ = stem_out.shape
        return (encoder or self.encoder)(stem_out.transpose(1, 2).reshape(g * d, c, s, s))

    def forward_features(self, feats, stem_out, decode=None, decoder=None, prompt_generator=None, skip_queries=(),
                         prior=None):
        img = feats[0][:, 0].float()
        fg = (img - self.threshold) * 40
        masks = torch.stack([-fg, fg], dim=1)
        logits = torch.tensor([[20.0, -20.0, -20.0], [-20.0, 20.0, -20.0]]).expand(img.shape[0], 2, 3)
        decoded = torch.ones(img.shape[0], 2, dtype=torch.bool)
        decoded[:, list(skip_queries)] = False
        return {"pred_logits": logits, "pred_masks": masks, "decoded": decoded}


def oracle_card(spacing=(1.0, 1.0, 2.0), window=(0.0, 1.0)):
    config = MaskSAMConfig(num_classes=2, slab_depth=4, num_queries=2)
    return make_card("oracle", "litemedsam", "", 64, config, [{"value": 1, "name": "cube", "color": [1, 2, 3]}],
                     spacing, {"mode": "ct_window", "window": list(window)})


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def orientations():
    """(name, direction 3x3) for 9 orientations: identity, permutations, flips, oblique."""
    perms = list(itertools.permutations(range(3)))
    out = [("identity", np.eye(3))]
    for name, perm, signs in [("permuted_yzx", perms[3], (1, 1, 1)), ("flipped_x", perms[0], (-1, 1, 1)),
                              ("flipped_yz", perms[0], (1, -1, -1)), ("permuted_flipped", perms[5], (-1, 1, -1)),
                              ("sagittal_like", perms[4], (1, -1, 1))]:
        m = np.zeros((3, 3))
        for col, row in enumerate(perm):
            m[row, col] = signs[col]
        out.append((name, m))
    out.append(("oblique_small", _rotation(0.1, -0.15, 0.2)))
    out.append(("oblique_large", _rotation(0.5, 0.3, -0.6)))
    out.append(("oblique_flipped", _rotation(0.3, 0.0, 0.4) @ np.diag([1, -1, 1])))
    return out


def cube_image(direction, size=(40, 36, 30), spacing=(0.9, 1.3, 2.1), origin=(-17.3, 41.9, 203.7),
               centre_offset=(3.0, -4.0, 5.0), half=9.0):
    img = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.asarray(direction, float).ravel()))
    centre_index = [(n - 1) / 2 for n in size]
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint(centre_index)) + np.array(centre_offset)
    pts = _physical_points(img)
    inside = np.all(np.abs(pts - centre) <= half, axis=-1)
    arr = inside.astype(np.float32)  # (z, y, x)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out, inside, centre


def _physical_points(img):
    size = img.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), axis=-1)[..., ::-1]  # (z,y,x,3) xyz
    d = np.array(img.GetDirection()).reshape(3, 3)
    return np.array(img.GetOrigin()) + (idx * np.array(img.GetSpacing())) @ d.T


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("name,direction", orientations(), ids=[o[0] for o in orientations()])
def test_cube_comes_back_in_place_on_the_input_grid(name, direction):
    image, inside, centre = cube_image(direction)
    labels, info = segment(image, BrightOracle(), oracle_card(), InferenceOptions(overlap=0.5))
    assert labels.GetSize() == image.GetSize()
    assert labels.GetSpacing() == image.GetSpacing()
    assert labels.GetOrigin() == image.GetOrigin()
    assert labels.GetDirection() == image.GetDirection()
    found = sitk.GetArrayFromImage(labels) == 1
    assert _dice(found, inside) > 0.85, name
    centroid = _physical_points(image)[found].mean(axis=0)
    assert np.linalg.norm(centroid - centre) < 1.5, name
    assert info["organs"]["cube"]["volume_ml"] == pytest.approx(18 ** 3 / 1000, rel=0.25)


@pytest.mark.parametrize("fast", [False, True])
def test_tiles_thin_volumes_and_fast_mode(fast):
    # wider than one 64-px tile in-plane, thinner than the slab depth
    image, inside, _ = cube_image(np.eye(3), size=(150, 90, 3), spacing=(1.0, 1.0, 2.0), half=15.0)
    labels, _ = segment(image, BrightOracle(), oracle_card(), InferenceOptions(fast=fast))
    assert labels.GetSize() == image.GetSize()
    assert _dice(sitk.GetArrayFromImage(labels) == 1, inside) > 0.85


def test_real_ct_in_many_orientations(totalseg_dir):
    """Bone (> 300 HU) of the real CT, re-labelled by the engine in 8 orientations, matches direct thresholding."""
    ct = sitk.ReadImage(str(totalseg_dir / "s1_ct.nii.gz"), sitk.sitkFloat32)[20:100, 10:90, 60:76]
    arr = sitk.GetArrayFromImage(ct)
    for name, direction in orientations()[:8]:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(ct.GetSpacing())
        img.SetOrigin((12.5, -80.25, 301.0))
        img.SetDirection(tuple(np.asarray(direction, float).ravel()))
        card = oracle_card(spacing=ct.GetSpacing(), window=(-1000.0, 1000.0))
        oracle = BrightOracle(threshold=0.65)  # (300 + 1000) / 2000
        labels, _ = segment(img, oracle, card, InferenceOptions(skip_outside_body=False))
        assert labels.GetDirection() == img.GetDirection() and labels.GetOrigin() == img.GetOrigin()
        assert _dice(sitk.GetArrayFromImage(labels) == 1, arr > 300) > 0.8, name
