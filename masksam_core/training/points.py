"""Point sampling for the mask costs and losses (PointRend / Mask2Former): a few thousand points, not full masks.

Coordinates are (x, y) in [0, 1] over the whole image, so masks of different resolutions (targets at the input
size, decoder masks at 1/4 of it or less) are compared at the same physical points. Every random draw takes an
optional ``torch.Generator``; draws happen on the generator's device and are then moved, so a CPU generator gives
the same points whatever device the tensors live on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def random_points(shape: Sequence[int], device: torch.device | str | None = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform float32 points in [0, 1) of ``shape`` (..., 2) on ``device``, drawn with ``generator``."""
    gen_device = generator.device if generator is not None else device
    pts = torch.rand(tuple(shape), generator=generator, device=gen_device)
    return pts.to(device) if device is not None else pts


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``inputs`` (N, C, H, W) at ``coords`` (N, P, 2) = (x, y) in [0, 1] -> (N, C, P).

    ``grid_sample`` with ``align_corners=False``: (0, 0) is the top-left corner of the top-left pixel, pixel
    centres lie at ((j + 0.5) / W, (i + 0.5) / H); outside the centres the border values are blended with zeros,
    as in Mask2Former.
    """
    if inputs.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[0] != inputs.shape[0]:
        raise ValueError(f"point_sample: expected inputs (N,C,H,W) and coords (N,P,2), got "
                         f"{tuple(inputs.shape)} and {tuple(coords.shape)}")
    n, c = inputs.shape[:2]
    p = coords.shape[1]
    if n == 0 or p == 0:
        return inputs.new_zeros((n, c, p))
    grid = (2.0 * coords.to(device=inputs.device, dtype=inputs.dtype) - 1.0).unsqueeze(2)  # (N, P, 1, 2)
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float = 2.0,
                           importance_sample_ratio: float = 0.75,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """PointRend importance sampling: ``logits`` (N, 1, H, W) -> coords (N, num_points, 2) in [0, 1].

    Draws ``int(oversample_ratio * num_points)`` uniform candidates, keeps the
    ``int(importance_sample_ratio * num_points)`` most uncertain (uncertainty = -|logit| at the candidate) and
    fills the rest with fresh uniform points. No gradient flows through the choice.
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"uncertain_point_coords: expected logits (N,1,H,W), got {tuple(logits.shape)}")
    if oversample_ratio < 1:
        raise ValueError("uncertain_point_coords: oversample_ratio must be >= 1")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError("uncertain_point_coords: importance_sample_ratio must be in [0, 1]")
    n = logits.shape[0]
    device = logits.device
    n_cand = int(num_points * oversample_ratio)
    n_imp = min(int(importance_sample_ratio * num_points), n_cand)
    n_rand = num_points - n_imp
    with torch.no_grad():
        cand = random_points((n, n_cand, 2), device, generator)
        uncertainty = -point_sample(logits.detach().float(), cand)[:, 0].abs()  # (N, n_cand)
        idx = torch.topk(uncertainty, k=n_imp, dim=1).indices
        chosen = torch.gather(cand, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
        if n_rand > 0:
            chosen = torch.cat([chosen, random_points((n, n_rand, 2), device, generator)], dim=1)
    return chosen
