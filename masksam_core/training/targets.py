"""Per-slice training targets: one binary mask per class present (background included) and its box."""
from __future__ import annotations

from typing import Dict, List

import torch


def masks_to_boxes_normalized(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) {0,1} -> (K, 4) normalised xyxy: x1 = min col / W, y1 = min row / H, x2 = (max col + 1) / W,
    y2 = (max row + 1) / H; an empty mask gives zeros."""
    k, h, w = masks.shape
    if k == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    rows = masks.bool().any(dim=2)
    cols = masks.bool().any(dim=1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, h).amin(1).float()
    y2 = torch.where(rows, ar_h, -1).amax(1).float() + 1
    x1 = torch.where(cols, ar_w, w).amin(1).float()
    x2 = torch.where(cols, ar_w, -1).amax(1).float() + 1
    boxes = torch.stack([x1 / w, y1 / h, x2 / w, y2 / h], dim=1)
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


def slice_targets(label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> List[Dict[str, torch.Tensor]]:
    """label (S, H, W) int64 with class indices in [0, C) -> per slice ``labels`` (K,), ``masks`` (K, H, W) float,
    ``boxes`` (K, 4). A slice that is entirely ``ignore_index`` gets no targets (the loop drops it)."""
    out = []
    for s in range(label.shape[0]):
        lab = label[s]
        valid = lab != ignore_index
        present = torch.unique(lab[valid]) if valid.any() else lab.new_zeros((0,))
        present = present[(present >= 0) & (present < num_classes)]
        masks = (lab[None] == present[:, None, None]).float()
        out.append({"labels": present.long(), "masks": masks, "boxes": masks_to_boxes_normalized(masks)})
    return out
