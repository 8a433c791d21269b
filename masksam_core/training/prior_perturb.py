"""Perturbed atlas priors for training: the decoder learns to correct a registered prior instead of copying it.

At inference (``inference.engine``) a class-bound model's queries are prompted by a registered atlas: each organ's
warped mask and its padded box go to SAM's decoder. A registration is never exact: organs come out shifted by a
few millimetres, a little too large or too small, bent, sometimes missing or placed where the scan has none. A
decoder trained only on the prompt generator's prompts has never seen such prompts; trained on the training
labels perturbed in those ways, it learns to segment the organ that is there, around the prompt, and to return an
empty mask where the prior put an organ that is not there.

:class:`PriorPerturbation` makes such a prior from a slab's true labels (with a margin of slices on each side, so
that shifts along z bring in organs from neighbouring slices); :func:`training_prior` turns it into the prompts
``MaskSAM.forward_features(..., prior=...)`` takes, exactly as the engine builds them from a registration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..atlas.prior import slab_prompts


@dataclass
class PriorPerturbation:
    """Random errors of a registered atlas, in millimetres where physical.

    Global (the whole slab region): translation (normal, ``translate_mm`` per axis), in-plane rotation (uniform
    within ``rotate_deg``), per-axis scale (uniform within ``1 +- scale``) and a smooth elastic displacement (normal
    ``elastic_mm`` at the nodes of a ``elastic_grid_mm`` grid, interpolated). Per organ, each with its probability:
    a shift (normal, ``organ_shift_mm`` per axis), an erosion or dilation by up to ``morph_px`` pixels in-plane, a
    drop (the prior lacks the organ), or a spurious copy (the organ moved ``spurious_mm`` away, where the scan may
    hold none of it).
    """

    translate_mm: float = 4.0
    rotate_deg: float = 6.0
    scale: float = 0.1
    elastic_mm: float = 4.0
    elastic_grid_mm: float = 40.0
    organ_shift_p: float = 0.7
    organ_shift_mm: float = 4.0
    morph_p: float = 0.3
    morph_px: int = 2
    drop_p: float = 0.05
    spurious_p: float = 0.1
    spurious_mm: Tuple[float, float] = (20.0, 40.0)

    def __call__(self, labels: np.ndarray, spacing_xyz: Sequence[float], rng: np.random.Generator) -> np.ndarray:
        """labels (Z, S, S) uint8 (0 = background) -> a perturbed copy of the same shape and dtype."""
        warped = self.warp(labels, spacing_xyz, rng)
        return self.per_organ(warped, spacing_xyz, rng)

    def warp(self, labels: np.ndarray, spacing_xyz: Sequence[float], rng: np.random.Generator) -> np.ndarray:
        """The global affine and elastic part (nearest-neighbour resampling, zeros outside)."""
        z, y, x = labels.shape
        sx, sy, sz = (float(v) for v in spacing_xyz)
        spacing = np.array([sz, sy, sx])  # (z, y, x) order
        # output voxel -> physical offset from the region's centre (mm), (Z, Y, X, 3) in (z, y, x) order
        axes = [(np.arange(n) - (n - 1) / 2.0) * sp for n, sp in zip((z, y, x), spacing)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        theta = np.deg2rad(rng.uniform(-self.rotate_deg, self.rotate_deg))
        scales = rng.uniform(1 - self.scale, 1 + self.scale, size=3)
        rot = np.array([[1.0, 0.0, 0.0],
                        [0.0, np.cos(theta), -np.sin(theta)],
                        [0.0, np.sin(theta), np.cos(theta)]])
        matrix = rot * scales[None, :]
        src = grid @ matrix.T + rng.normal(0.0, self.translate_mm, size=3)
        if self.elastic_mm > 0:
            src = src + self._elastic(grid.shape[:3], spacing, rng)
        index = src / spacing + (np.array([z, y, x]) - 1) / 2.0  # source voxel index, (z, y, x)
        # grid_sample wants (x, y, z) normalised to [-1, 1] (align_corners=True: -1 and 1 are the end voxels)
        norm = 2.0 * index / np.maximum(np.array([z, y, x]) - 1, 1) - 1.0
        sample = torch.from_numpy(norm[..., ::-1].copy()).float()[None]
        vol = torch.from_numpy(labels.astype(np.float32))[None, None]
        out = F.grid_sample(vol, sample, mode="nearest", padding_mode="zeros", align_corners=True)
        return out[0, 0].round().numpy().astype(labels.dtype)

    def _elastic(self, shape: Tuple[int, int, int], spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(Z, Y, X, 3) smooth displacement in mm: random nodes every ``elastic_grid_mm``, trilinear between."""
        extent = np.array(shape) * spacing
        nodes = [max(2, int(np.ceil(e / self.elastic_grid_mm)) + 1) for e in extent]
        coarse = torch.from_numpy(rng.normal(0.0, self.elastic_mm, size=(3, *nodes))).float()[None]
        fine = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]
        return fine.permute(1, 2, 3, 0).numpy().astype(np.float64)

    def per_organ(self, labels: np.ndarray, spacing_xyz: Sequence[float], rng: np.random.Generator) -> np.ndarray:
        """Shifts, erosions/dilations, drops and spurious copies, organ by organ (painted in random order)."""
        sx, sy, sz = (float(v) for v in spacing_xyz)
        spacing = np.array([sz, sy, sx])
        out = np.zeros_like(labels)
        classes = [int(c) for c in np.unique(labels) if c != 0]
        for c in rng.permutation(classes) if classes else []:
            mask = labels == c
            if rng.random() < self.drop_p:
                continue
            if rng.random() < self.spurious_p:
                mask = _shift(mask, self._spurious_offset(spacing, rng))
            elif rng.random() < self.organ_shift_p:
                mask = _shift(mask, np.rint(rng.normal(0.0, self.organ_shift_mm, size=3) / spacing).astype(int))
            if self.morph_px > 0 and rng.random() < self.morph_p:
                iterations = int(rng.integers(1, self.morph_px + 1))
                op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
                mask = op(mask, structure=_INPLANE, iterations=iterations)
            out[mask] = c
        return out

    def _spurious_offset(self, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A large displacement in voxels: in-plane in a random direction, or along z."""
        dist = rng.uniform(*self.spurious_mm)
        if rng.random() < 0.3:
            return np.array([int(np.sign(rng.random() - 0.5) * max(1, round(dist / spacing[0]))), 0, 0])
        angle = rng.uniform(0, 2 * np.pi)
        return np.array([0, int(round(dist * np.sin(angle) / spacing[1])), int(round(dist * np.cos(angle) / spacing[2]))])


_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)


def _shift(mask: np.ndarray, offset: Sequence[int]) -> np.ndarray:
    """``mask`` moved by ``offset`` voxels (z, y, x), zeros where it comes from outside."""
    out = np.zeros_like(mask)
    src, dst = [], []
    for n, o in zip(mask.shape, offset):
        o = int(o)
        if abs(o) >= n:
            return out
        src.append(slice(max(0, -o), n - max(0, o)))
        dst.append(slice(max(0, o), n - max(0, -o)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def prior_region(label: np.ndarray, z0: int, depth: int, margin: int, allowed=None) -> np.ndarray:
    """The labels of slices ``z0 - margin .. z0 + depth + margin`` of a (Z, S, S) volume, (depth + 2·margin, S, S)
    uint8: zeros past the ends and on slices outside ``allowed`` (a set of z; None: all), so that no label of a
    held-out slice reaches training, even as a prompt."""
    nz = label.shape[0]
    out = np.zeros((depth + 2 * margin,) + label.shape[1:], np.uint8)
    for k in range(out.shape[0]):
        z = z0 - margin + k
        if 0 <= z < nz and (allowed is None or z in allowed):
            out[k] = label[z]
    return out


def training_prior(region: np.ndarray, margin: int, perturb: PriorPerturbation, spacing_xyz: Sequence[float],
                   num_queries: int, pad_px: float, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """A perturbed prior of one slab as ``atlas.prior.slab_prompts`` gives it: ``present`` (D, N), ``boxes``
    (D, N, 4), ``masks`` (D, N, S, S), from ``region`` (D + 2·margin, S, S) labels (:func:`prior_region`)."""
    noisy = perturb(region, spacing_xyz, rng)
    d = region.shape[0] - 2 * margin
    return slab_prompts(noisy[margin:margin + d], num_queries, pad_px)


def cap_prior(prior: Dict[str, torch.Tensor], max_queries: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """At most ``max_queries`` prior-present queries per slab (chosen at random), the others marked absent: bounds
    the decoder's time and memory in a training step. ``prior['present']`` is (G, D, N)."""
    present = prior["present"]
    if max_queries <= 0:
        return prior
    present = present.clone()
    for gi in range(present.shape[0]):
        queries = torch.nonzero(present[gi].any(0)).flatten()
        if queries.numel() > max_queries:
            drop = queries[torch.randperm(queries.numel(), generator=gen)[max_queries:]]
            present[gi, :, drop] = False
    return {**prior, "present": present}
