"""Window placement and blending weights for the slab engine (pure numpy, no I/O)."""
from __future__ import annotations

from typing import List

import numpy as np


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """Start indices of windows of ``window`` covering ``[0, length)`` with step ``stride``.

    The last window is aligned to the end; a length shorter than the window gives ``[0]`` (the caller pads).
    """
    if window <= 0 or stride <= 0:
        raise ValueError("window and stride must be positive")
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def depth_weights(depth: int) -> np.ndarray:
    """(D,) blending weights along a slab: highest in the middle, never zero (tent + 1/D floor)."""
    if depth == 1:
        return np.ones(1, np.float32)
    centre = (depth - 1) / 2.0
    w = 1.0 - np.abs(np.arange(depth) - centre) / (centre + 1.0)
    return w.astype(np.float32)


def plane_weights(size: int, sigma_fraction: float = 0.125) -> np.ndarray:
    """(S, S) Gaussian in-plane blending weights (nnU-Net style), normalised to a maximum of 1, floor 1e-3."""
    ax = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(ax ** 2) / (2 * (sigma_fraction * size) ** 2))
    w = np.outer(g, g)
    w /= w.max()
    return np.maximum(w, 1e-3).astype(np.float32)
