"""Batch sources for the training loop.

- :class:`CachedSource` (CPU recipe): slabs of D consecutive slices from the frozen-encoder feature cache, a third
  of them centred on a foreground slice; slices outside the training split are labelled 255 (ignored), and a case
  with held-out slices gives only slabs that hold none of them (their images are not seen either).
- :class:`VolumeSource` (GPU recipe): slabs sampled from the preprocessed volumes and augmented on the device;
  the whole network runs on them.

Validation batches cover every validation slice once (slabs with stride D), labels outside the validation
slices set to 255, so Dice is measured on validation voxels only.

With :class:`PriorTraining` a share of the training batches (and every validation batch) carries a perturbed atlas
prior (``training.prior_perturb``) made from the slab's own labels: the decoder then learns from the prompts that
inference gives it when an atlas is registered.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Set

import numpy as np
import torch

from .feature_cache import CachedVolume, gather_slab
from .loop import IGNORE, Batch
from .prior_perturb import PriorPerturbation, prior_region, training_prior


def _mask_slices(label: np.ndarray, z_indices: Sequence[int], allowed: Optional[Set[int]]) -> np.ndarray:
    """Set the labels of slices whose z is not in ``allowed`` to 255 (None: all allowed)."""
    if allowed is None:
        return label
    label = label.copy()
    for d, z in enumerate(z_indices):
        if z not in allowed:
            label[d] = IGNORE
    return label


def _val_windows(z_values: Sequence[int], depth: int, length: int) -> List[int]:
    """Slab starts (stride D) covering every z in ``z_values``, the slab centred on them where possible."""
    starts: List[int] = []
    covered: Set[int] = set()
    for z in sorted(z_values):
        if z in covered:
            continue
        z0 = max(0, min(z - depth // 4, max(length - depth, 0)))
        starts.append(z0)
        covered.update(range(z0, z0 + depth))
    return starts


@dataclass
class PriorTraining:
    """How training batches get a perturbed prior: in a share ``fraction`` of the decoder-stage batches, with the
    engine's prompt layout (``num_queries``; boxes padded by ``pad_px``), the model's ``spacing`` (x, y, z mm) and
    ``margin`` slices of context on each side of the slab for shifts along z."""

    fraction: float
    num_queries: int
    pad_px: float
    spacing: Sequence[float]
    margin: int = 3
    perturbation: PriorPerturbation = field(default_factory=PriorPerturbation)


class CachedSource:
    """Slabs from cached encoder features.

    volumes: the cache entries (all copies of all training cases); train_z / val_z: {case: set of model-space z}
    (None for a case: every slice is training / no validation slices).
    """

    def __init__(self, volumes: List[CachedVolume], depth: int, pad_value: float, batch_size: int = 1,
                 train_z: Optional[Dict[str, Optional[Set[int]]]] = None,
                 val_z: Optional[Dict[str, Set[int]]] = None, foreground_fraction: float = 1 / 3,
                 prior: Optional[PriorTraining] = None) -> None:
        self.depth = depth
        self.prior = prior
        self.pad_value = pad_value
        self.batch_size = batch_size
        self.train_z = train_z or {}
        self.val_z = val_z or {}
        self.foreground_fraction = foreground_fraction
        self.train_volumes = [v for v in volumes if self._has_training(v)]
        if not self.train_volumes:
            raise ValueError("no training slices")
        self.val_volumes = [v for v in volumes if v.copy == 0 and self.val_z.get(v.case)]
        self.fg_slices = {v.name: self._foreground_slices(v) for v in self.train_volumes}
        self.clear_starts = {v.name: self._clear_starts(v) for v in self.train_volumes}

    def _has_training(self, vol: CachedVolume) -> bool:
        allowed = self.train_z.get(vol.case)
        return allowed is None or len(allowed) > 0

    def _foreground_slices(self, vol: CachedVolume) -> np.ndarray:
        allowed = self.train_z.get(vol.case)
        fg = np.flatnonzero(np.asarray(vol.label).reshape(vol.depth, -1).max(axis=1) > 0)
        if allowed is not None:
            fg = np.array([z for z in fg if z in allowed], dtype=np.int64)
        return fg

    def _clear_starts(self, vol: CachedVolume) -> Optional[np.ndarray]:
        """Slab starts whose D slices hold no validation slice of the case (None: the case has none), so that a
        held-out slice is never seen by training, not even as a neighbour's context in the depth adapters."""
        held = self.val_z.get(vol.case)
        if not held:
            return None
        d = self.depth
        starts = [z0 for z0 in range(max(vol.depth - d, 0) + 1) if not held.intersection(range(z0, z0 + d))]
        return np.array(starts, dtype=np.int64)

    def _start(self, vol: CachedVolume, rng: np.random.Generator) -> int:
        clear = self.clear_starts[vol.name]
        if clear is not None and clear.size:
            return self._clear_start(vol, clear, rng)
        d = self.depth
        high = max(vol.depth - d, 0)
        fg = self.fg_slices[vol.name]
        if fg.size and rng.random() < self.foreground_fraction:
            z = int(fg[rng.integers(fg.size)])
            return int(min(max(z - rng.integers(d), 0), high))
        allowed = self.train_z.get(vol.case)
        if allowed is not None:  # start near a training slice so that the slab carries some loss
            z = sorted(allowed)[rng.integers(len(allowed))]
            return int(min(max(z - rng.integers(d), 0), high))
        return int(rng.integers(high + 1))

    def _clear_start(self, vol: CachedVolume, clear: np.ndarray, rng: np.random.Generator) -> int:
        """A start among ``clear`` (see :meth:`_clear_starts`): a third of them on a slab holding a random
        foreground slice, the rest uniform."""
        fg = self.fg_slices[vol.name]
        if fg.size and rng.random() < self.foreground_fraction:
            z = int(fg[rng.integers(fg.size)])
            around = clear[(clear <= z) & (clear > z - self.depth)]
            if around.size:
                return int(around[rng.integers(around.size)])
        return int(clear[rng.integers(clear.size)])

    def _batch(self, items, priors: Optional[List[Dict[str, torch.Tensor]]] = None) -> Batch:
        imgs, labs, feats = zip(*items)
        slab = torch.from_numpy(np.stack(imgs))[:, None]
        label = torch.from_numpy(np.stack(labs).astype(np.int64))
        features = [torch.from_numpy(np.concatenate([f[k] for f in feats])) for k in range(len(feats[0]))]
        prior = None
        if priors:
            prior = {k: torch.stack([p[k] for p in priors]) for k in priors[0]}
            prior.update({"mask_prompt": "prior", "class": "prior"})
        return Batch(slab=slab, label=label, features=features, prior=prior)

    def _prior(self, vol: CachedVolume, z0: int, allowed: Optional[Set[int]],
               rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        p = self.prior
        region = prior_region(vol.label, z0, self.depth, p.margin, allowed)
        return training_prior(region, p.margin, p.perturbation, p.spacing, p.num_queries, p.pad_px, rng)

    def train_batch(self, rng: np.random.Generator, gen: torch.Generator) -> Batch:
        items, starts = [], []
        for _ in range(self.batch_size):
            vol = self.train_volumes[int(rng.integers(len(self.train_volumes)))]
            z0 = self._start(vol, rng)
            img, lab, feats = gather_slab(vol, z0, self.depth, self.pad_value)
            lab = _mask_slices(lab, range(z0, z0 + self.depth), self.train_z.get(vol.case))
            items.append((img, lab, feats))
            starts.append((vol, z0))
        priors = None
        if self.prior is not None and rng.random() < self.prior.fraction:
            priors = [self._prior(vol, z0, self.train_z.get(vol.case), rng) for vol, z0 in starts]
        return self._batch(items, priors)

    def val_batches(self) -> Iterator[Batch]:
        """Every validation slice once; with prior training, each slab with a perturbed prior of its own labels,
        the same at every validation (seeded by the case and the slab's start)."""
        for vol in self.val_volumes:
            zs = self.val_z[vol.case]
            for z0 in _val_windows(zs, self.depth, vol.depth):
                img, lab, feats = gather_slab(vol, z0, self.depth, self.pad_value)
                lab = _mask_slices(lab, range(z0, z0 + self.depth), zs)
                priors = None
                if self.prior is not None:
                    rng = np.random.default_rng(zlib.crc32(f"{vol.case}:{z0}".encode()))
                    priors = [self._prior(vol, z0, None, rng)]  # inputs, not targets: any slice
                yield self._batch([(img, lab, feats)], priors)
