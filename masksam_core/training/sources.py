"""Batch sources for the training loop.

- :class:`CachedSource` (CPU recipe): slabs of D consecutive slices from the frozen-encoder feature cache, a third
  of them centred on a foreground slice; slices outside the training split are labelled 255 (ignored).
- :class:`VolumeSource` (GPU recipe): slabs sampled from the preprocessed volumes and augmented on the device;
  the whole network runs on them.

Validation batches cover every validation slice once (slabs with stride D), labels outside the validation
slices set to 255, so Dice is measured on validation voxels only.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Set

import numpy as np
import torch

from .feature_cache import CachedVolume, gather_slab
from .loop import IGNORE, Batch


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


class CachedSource:
    """Slabs from cached encoder features.

    volumes: the cache entries (all copies of all training cases); train_z / val_z: {case: set of model-space z}
    (None for a case: every slice is training / no validation slices).
    """

    def __init__(self, volumes: List[CachedVolume], depth: int, pad_value: float, batch_size: int = 1,
                 train_z: Optional[Dict[str, Optional[Set[int]]]] = None,
                 val_z: Optional[Dict[str, Set[int]]] = None, foreground_fraction: float = 1 / 3) -> None:
        self.depth = depth
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

    def _has_training(self, vol: CachedVolume) -> bool:
        allowed = self.train_z.get(vol.case)
        return allowed is None or len(allowed) > 0

    def _foreground_slices(self, vol: CachedVolume) -> np.ndarray:
        allowed = self.train_z.get(vol.case)
        fg = np.flatnonzero(np.asarray(vol.label).reshape(vol.depth, -1).max(axis=1) > 0)
        if allowed is not None:
            fg = np.array([z for z in fg if z in allowed], dtype=np.int64)
        return fg

    def _start(self, vol: CachedVolume, rng: np.random.Generator) -> int:
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

    def _batch(self, items) -> Batch:
        imgs, labs, feats = zip(*items)
        slab = torch.from_numpy(np.stack(imgs))[:, None]
        label = torch.from_numpy(np.stack(labs).astype(np.int64))
        features = [torch.from_numpy(np.concatenate([f[k] for f in feats])) for k in range(len(feats[0]))]
        return Batch(slab=slab, label=label, features=features)

    def train_batch(self, rng: np.random.Generator, gen: torch.Generator) -> Batch:
        items = []
        for _ in range(self.batch_size):
            vol = self.train_volumes[int(rng.integers(len(self.train_volumes)))]
            z0 = self._start(vol, rng)
            img, lab, feats = gather_slab(vol, z0, self.depth, self.pad_value)
            lab = _mask_slices(lab, range(z0, z0 + self.depth), self.train_z.get(vol.case))
            items.append((img, lab, feats))
        return self._batch(items)

    def val_batches(self) -> Iterator[Batch]:
        for vol in self.val_volumes:
            zs = self.val_z[vol.case]
            for z0 in _val_windows(zs, self.depth, vol.depth):
                img, lab, feats = gather_slab(vol, z0, self.depth, self.pad_value)
                lab = _mask_slices(lab, range(z0, z0 + self.depth), zs)
                yield self._batch([(img, lab, feats)])
