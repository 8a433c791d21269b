"""Box helpers for the auxiliary-box cost and loss: generalised IoU of xyxy boxes and boxes of binary masks.

The GIoU here is differentiable and total: an inverted box (x2 < x1 or y2 < y1) is read as the degenerate box
x2 = max(x2, x1), y2 = max(y2, y1) instead of failing an assertion (its GIoU gradient then moves x1, y1), and zero
denominators are clamped, so degenerate pairs give a finite value (never NaN). For valid boxes it equals
``torchvision.ops.generalized_box_iou``.
"""
from __future__ import annotations

import torch

_EPS = 1e-7


def _area(boxes: torch.Tensor) -> torch.Tensor:
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _ordered(boxes: torch.Tensor) -> torch.Tensor:
    x1y1 = boxes[..., :2]
    return torch.cat([x1y1, torch.maximum(boxes[..., 2:], x1y1)], dim=-1)


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of broadcast-compatible (..., 4) boxes."""
    a, b = _ordered(a), _ordered(b)
    area_a, area_b = _area(a), _area(b)
    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=_EPS)
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=_EPS)


def box_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU: ``a`` (N, 4), ``b`` (M, 4) xyxy -> (N, M), in [-1, 1]."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"box_giou: expected (N,4) and (M,4), got {tuple(a.shape)} and {tuple(b.shape)}")
    return _giou(a[:, None, :], b[None, :, :])


def box_giou_paired(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matched pairs: ``a`` (K, 4), ``b`` (K, 4) xyxy -> (K,)."""
    if a.shape != b.shape or a.dim() != 2 or a.shape[-1] != 4:
        raise ValueError(f"box_giou_paired: expected two (K,4), got {tuple(a.shape)} and {tuple(b.shape)}")
    return _giou(a, b)


def masks_to_boxes_normalized(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) binary masks -> (K, 4) float32 normalised xyxy in [0, 1].

    x1 = min column / W, y1 = min row / H, x2 = (max column + 1) / W, y2 = (max row + 1) / H, so the box
    covers the mask's pixels edge to edge; an empty mask gives zeros.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks_to_boxes_normalized: expected (K,H,W), got {tuple(masks.shape)}")
    k, h, w = masks.shape
    if k == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    m = masks != 0
    rows = m.any(dim=2)  # (K, H)
    cols = m.any(dim=1)  # (K, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, h).amin(1)
    y2 = torch.where(rows, ar_h, -1).amax(1) + 1
    x1 = torch.where(cols, ar_w, w).amin(1)
    x2 = torch.where(cols, ar_w, -1).amax(1) + 1
    boxes = torch.stack([x1 / w, y1 / h, x2 / w, y2 / h], dim=1).float()
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))
