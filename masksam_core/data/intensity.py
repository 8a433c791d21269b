"""Intensity normalisation from a model card's ``preprocessing.normalization`` spec."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ModelError

MODES = ("ct_window", "ct_zscore", "mr_percentile")
DEFAULT_PERCENTILES = (0.5, 99.5)


def _pair(spec: Dict[str, Any], key: str, mode: str, default: Optional[Sequence[float]] = None) -> Tuple[float, float]:
    value = spec.get(key, default)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ModelError(f"intensity normalisation {mode!r} needs {key!r} as [low, high], got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ModelError(f"intensity normalisation {mode!r}: {key!r} must have low < high, got {value!r}")
    return lo, hi


def _number(spec: Dict[str, Any], key: str, mode: str) -> float:
    try:
        value = float(spec[key])
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"intensity normalisation {mode!r} needs a number {key!r}, got {spec.get(key)!r}") from None
    if not np.isfinite(value):
        raise ModelError(f"intensity normalisation {mode!r}: {key!r} must be finite")
    return value


def _rescale(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip float32 ``a`` to [lo, hi] and map it linearly onto [0, 1] (both ends exact, in float32)."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if not hi32 > lo32:
        return np.zeros(a.shape, np.float32)
    return ((np.clip(a, lo32, hi32) - lo32) / (hi32 - lo32)).astype(np.float32, copy=False)


def normalize_intensity(array: np.ndarray, spec: Dict[str, Any]) -> np.ndarray:
    """Normalise ``array`` (any shape) as ``spec`` says; returns a new float32 array of the same shape.

    - ``ct_window``: clip to ``window`` = [low, high] (HU), rescale to [0, 1];
    - ``ct_zscore``: clip to ``clip`` = [low, high] (HU), then (x - ``mean``) / ``std``;
    - ``mr_percentile``: clip to the ``percentiles`` (default [0.5, 99.5]) of the non-zero voxels, rescale to
      [0, 1]; an all-zero or constant volume gives zeros.

    Raises :class:`ModelError` for an unknown mode or a malformed spec.
    """
    if not isinstance(spec, dict):
        raise ModelError(f"intensity normalisation spec must be a mapping, got {type(spec).__name__}")
    mode = spec.get("mode")
    a = np.asarray(array, dtype=np.float32)
    if mode == "ct_window":
        lo, hi = _pair(spec, "window", mode)
        return _rescale(a, lo, hi)
    if mode == "ct_zscore":
        lo, hi = _pair(spec, "clip", mode)
        mean, std = _number(spec, "mean", mode), _number(spec, "std", mode)
        if std <= 0:
            raise ModelError(f"intensity normalisation 'ct_zscore': 'std' must be positive, got {std}")
        return ((np.clip(a, lo, hi) - mean) / std).astype(np.float32)
    if mode == "mr_percentile":
        p_lo, p_hi = _pair(spec, "percentiles", mode, DEFAULT_PERCENTILES)
        if p_lo < 0 or p_hi > 100:
            raise ModelError(f"intensity normalisation 'mr_percentile': percentiles must lie in [0, 100], "
                             f"got {[p_lo, p_hi]}")
        nonzero = a[a != 0]
        if nonzero.size == 0:
            return np.zeros(a.shape, np.float32)
        lo, hi = (float(v) for v in np.percentile(nonzero, [p_lo, p_hi]))
        return _rescale(a, lo, hi)  # a constant volume (hi == lo) gives zeros
    raise ModelError(f"unknown intensity normalisation {mode!r}; expected one of {', '.join(MODES)}")
