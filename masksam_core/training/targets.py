"""Per-slice training targets: one binary mask per class present (background included) and its box."""
from __future__ import annotations

from typing import Dict, List

import torch

from .boxes import masks_to_boxes_normalized


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
