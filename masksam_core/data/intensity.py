"""Intensity normalisation from a model card's ``preprocessing.normalization`` spec."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..errors import ModelError

MODES = ("ct_window", "ct_zscore", "mr_percentile")


def normalize_intensity(array: np.ndarray, spec: Dict[str, Any]) -> np.ndarray:
    """Normalise ``array`` (any shape) as ``spec`` says; returns float32.

    - ``ct_window``: clip to ``window`` (HU), rescale to [0, 1];
    - ``ct_zscore``: clip to ``clip`` (HU), then (x - ``mean``) / ``std``;
    - ``mr_percentile``: clip to the ``percentiles`` of the non-zero voxels, rescale to [0, 1]
      (a constant volume gives zeros).
    """
    mode = spec.get("mode")
    a = np.asarray(array, dtype=np.float32)
    if mode == "ct_window":
        lo, hi = (float(v) for v in spec["window"])
        return ((np.clip(a, lo, hi) - lo) / max(hi - lo, 1e-6)).astype(np.float32)
    if mode == "ct_zscore":
        lo, hi = (float(v) for v in spec["clip"])
        return ((np.clip(a, lo, hi) - float(spec["mean"])) / max(float(spec["std"]), 1e-6)).astype(np.float32)
    if mode == "mr_percentile":
        p_lo, p_hi = spec.get("percentiles", (0.5, 99.5))
        nonzero = a[a != 0]
        if nonzero.size == 0:
            return np.zeros_like(a)
        lo, hi = np.percentile(nonzero, [p_lo, p_hi])
        if hi <= lo:
            return np.zeros_like(a)
        return ((np.clip(a, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    raise ModelError(f"unknown intensity normalisation {mode!r}; expected one of {', '.join(MODES)}")
