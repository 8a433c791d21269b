"""Hungarian matching of queries to per-slice targets (spec §2; Mask2Former's ``HungarianMatcher`` design).

Cost of assigning query q to target k on one slice (all mask terms at one shared set of random points):

    0.2·(−p_cls) + 1.2·BCE + 1.2·Dice (pred_masks) + 0.5·L1 + 0.2·(−GIoU) (aux box) + 0.5·BCE + 0.5·Dice (aux mask)

The auxiliary masks enter as logits (the official code applies sigmoid twice). ``pred_logits``/``pred_masks``
may be absent (prompt-generator-only training): their terms are skipped. With ``decoded`` given, queries that
were not decoded get only the auxiliary terms plus a large class cost, so a decoded query wins when one fits.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou

from .points import point_sample

LARGE = 1e5


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs (Q, P) logits, targets (K, P) {0,1} -> (Q, K) Dice loss."""
    p = inputs.sigmoid()
    numerator = 2 * p @ targets.t()
    denominator = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_bce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs (Q, P) logits, targets (K, P) -> (Q, K) mean binary cross-entropy."""
    pts = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.t() + neg @ (1 - targets).t()) / pts


class HungarianMatcher(nn.Module):
    """Per-slice optimal assignment of queries to targets."""

    def __init__(self, cost_class: float = 0.2, cost_mask: float = 1.2, cost_dice: float = 1.2,
                 cost_bbox: float = 0.5, cost_giou: float = 0.2, cost_aux_mask: float = 0.5,
                 cost_aux_dice: float = 0.5, num_points: int = 12544) -> None:
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.cost_bbox, self.cost_giou = cost_bbox, cost_giou
        self.cost_aux_mask, self.cost_aux_dice = cost_aux_mask, cost_aux_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                generator: Optional[torch.Generator] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        aux = outputs["aux_mask_logits"]
        n_slices, n_q = aux.shape[:2]
        has_pred = "pred_logits" in outputs and "pred_masks" in outputs
        decoded = outputs.get("decoded")
        indices = []
        for s in range(n_slices):
            tgt = targets[s]
            k = tgt["labels"].shape[0]
            if k == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            coords = torch.rand(1, self.num_points, 2, generator=generator).to(aux.device)
            tgt_pts = point_sample(tgt["masks"][:, None].float(), coords.expand(k, -1, -1))[:, 0]  # (K, P)
            aux_pts = point_sample(aux[s][:, None].float(), coords.expand(n_q, -1, -1))[:, 0]  # (Q, P)
            cost = self.cost_aux_mask * batch_bce_cost(aux_pts, tgt_pts) + \
                self.cost_aux_dice * batch_dice_cost(aux_pts, tgt_pts)
            boxes = outputs["aux_boxes"][s].float()
            cost = cost + self.cost_bbox * torch.cdist(boxes, tgt["boxes"].float(), p=1)
            cost = cost - self.cost_giou * generalized_box_iou(_valid_boxes(boxes), _valid_boxes(tgt["boxes"].float()))
            if has_pred:
                prob = outputs["pred_logits"][s].float().softmax(-1)  # (Q, C+1)
                pred_pts = point_sample(outputs["pred_masks"][s][:, None].float(), coords.expand(n_q, -1, -1))[:, 0]
                pred_cost = -self.cost_class * prob[:, tgt["labels"]] + \
                    self.cost_mask * batch_bce_cost(pred_pts, tgt_pts) + \
                    self.cost_dice * batch_dice_cost(pred_pts, tgt_pts)
                if decoded is not None:
                    dec = decoded[s].to(cost.device)[:, None]
                    pred_cost = torch.where(dec, pred_cost, torch.full_like(pred_cost, 10.0))
                cost = cost + pred_cost
            cost = torch.nan_to_num(cost, nan=LARGE, posinf=LARGE, neginf=-LARGE).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def _valid_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Make x2 >= x1 and y2 >= y1 (GIoU asserts it) without changing valid boxes."""
    x1y1 = boxes[:, :2]
    x2y2 = torch.maximum(boxes[:, 2:], x1y1)
    return torch.cat([x1y1, x2y2], dim=1)
