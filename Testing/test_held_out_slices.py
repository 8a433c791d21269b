"""Held-out slices of a within-case split are not seen by training in any form (#34: labels, images as context of a
slab, or prompts of a perturbed prior)."""
from __future__ import annotations

import numpy as np
import torch

from masksam_core.training.feature_cache import CachedVolume
from masksam_core.training.sources import CachedSource, PriorTraining


def _volume(z=40, s=16):
    image = np.arange(z, dtype=np.float16)[:, None, None] * np.ones((1, s, s), np.float16)  # slice z holds z
    label = np.zeros((z, s, s), np.uint8)
    label[:, 4:12, 4:12] = 1
    return CachedVolume("c__c0", "c", 0, image, label, [np.zeros((z, 2, 2, 2), np.float16)])


def test_training_slabs_never_hold_a_held_out_slice():
    vol = _volume()
    held = set(range(10, 16)) | set(range(30, 36))
    prior = PriorTraining(fraction=1.0, num_queries=2, pad_px=1.0, spacing=(1.6, 1.6, 3.0), margin=3)
    source = CachedSource([vol], 4, 0.0, train_z={"c": set(range(40)) - held}, val_z={"c": held}, prior=prior)
    rng, gen = np.random.default_rng(0), torch.Generator()
    seen = set()
    for _ in range(300):
        batch = source.train_batch(rng, gen)
        zs = {int(round(float(v))) for v in batch.slab[0, 0, :, 0, 0]}
        seen |= zs
        assert not zs & held, zs
    assert seen == set(range(40)) - held  # every training slice is still used
    # validation still covers the held-out slices, with training slices only as unscored context
    val = list(source.val_batches())
    assert {int(round(float(v))) for b in val for v in b.slab[0, 0, :, 0, 0]} >= held


def test_without_held_out_slices_sampling_is_unchanged():
    vol = _volume()
    a = CachedSource([vol], 4, 0.0)
    starts = [a._start(vol, np.random.default_rng(k)) for k in range(50)]
    assert min(starts) == 0 or max(starts) == 36
    assert a.clear_starts["c__c0"] is None
