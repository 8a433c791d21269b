"""Point sampling for mask losses (PointRend / Mask2Former): losses on a few thousand points, not full masks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """inputs (N, C, H, W), coords (N, P, 2) as (x, y) in [0, 1] -> (N, C, P), bilinear (align_corners=False)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(inputs.dtype)  # (N, P, 1, 2)
    return F.grid_sample(inputs, grid, mode="bilinear", align_corners=False).squeeze(3)


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float = 2.0,
                           importance_sample_ratio: float = 0.75,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """PointRend importance sampling. logits (N, 1, H, W) -> coords (N, num_points, 2) in [0, 1].

    ``importance_sample_ratio`` of the points are the most uncertain (|logit| smallest) of
    ``oversample_ratio * num_points`` random candidates; the rest are uniform.
    """
    n = logits.shape[0]
    n_sampled = int(num_points * oversample_ratio)
    cand = torch.rand(n, n_sampled, 2, generator=generator).to(logits.device)
    uncertainty = -point_sample(logits.detach().float(), cand).abs()[:, 0]  # (N, n_sampled)
    n_imp = int(importance_sample_ratio * num_points)
    n_rand = num_points - n_imp
    idx = torch.topk(uncertainty, k=n_imp, dim=1).indices
    chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
    if n_rand > 0:
        chosen = torch.cat([chosen, torch.rand(n, n_rand, 2, generator=generator).to(logits.device)], dim=1)
    return chosen
