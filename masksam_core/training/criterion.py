"""Set criterion (spec §2; Mask2Former's ``SetCriterion`` design): class CE, mask BCE + Dice at importance-sampled
points, auxiliary mask BCE + Dice (on logits), auxiliary box L1 + GIoU.

Each term is normalised by the number of target masks in the batch (all processes under torch.distributed).
``decoded`` (S, N) restricts the class and mask terms to queries that went through SAM's decoder; without
``pred_logits``/``pred_masks`` only the auxiliary terms are returned (prompt-generator-only stage).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou

from .matcher import HungarianMatcher, _valid_boxes
from .points import point_sample, uncertain_point_coords

DEFAULT_WEIGHTS = {"loss_ce": 0.2, "loss_mask": 1.2, "loss_dice": 1.2, "loss_aux_mask": 0.5, "loss_aux_dice": 0.5,
                   "loss_bbox": 0.5, "loss_giou": 0.2}


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs (M, P) logits, targets (M, P) -> summed Dice loss over the M masks."""
    p = inputs.sigmoid()
    numerator = 2 * (p * targets).sum(-1)
    denominator = p.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def bce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs (M, P) logits -> BCE averaged over points, summed over masks."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum()


class SetCriterion(nn.Module):
    """Losses of MaskSAM's outputs against per-slice targets. C = ``num_classes`` including background."""

    def __init__(self, num_classes: int, matcher: Optional[HungarianMatcher] = None,
                 weight_dict: Optional[Dict[str, float]] = None, eos_coef: float = 0.1, num_points: int = 12544,
                 oversample_ratio: float = 2.0, importance_sample_ratio: float = 0.75) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(num_points=num_points)
        self.weight_dict = dict(weight_dict or DEFAULT_WEIGHTS)
        weights = torch.ones(num_classes + 1)
        weights[-1] = eos_coef
        self.register_buffer("empty_weight", weights)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    @staticmethod
    def default_weights() -> Dict[str, float]:
        return dict(DEFAULT_WEIGHTS)

    def loss_names(self) -> List[str]:
        return list(self.weight_dict)

    def weighted_total(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weight_dict[k] * v for k, v in losses.items() if k in self.weight_dict)

    def _num_masks(self, targets: List[Dict], device) -> float:
        n = torch.tensor(float(sum(t["labels"].shape[0] for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return max(float(n), 1.0)

    def _mask_terms(self, src: torch.Tensor, tgt: torch.Tensor, generator, importance: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """src (M, h, w) logits, tgt (M, H, W) -> (BCE sum, Dice sum) at sampled points."""
        src = src[:, None].float()
        tgt = tgt[:, None].float()
        with torch.no_grad():
            if importance:
                coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                                self.importance_sample_ratio, generator)
            else:
                coords = torch.rand(src.shape[0], self.num_points, 2, generator=generator).to(src.device)
            tgt_pts = point_sample(tgt, coords)[:, 0]
        src_pts = point_sample(src, coords)[:, 0]
        return bce_loss(src_pts, tgt_pts), dice_loss(src_pts, tgt_pts)

    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                indices: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        if indices is None:
            indices = self.matcher(outputs, targets, generator=generator)
        aux = outputs["aux_mask_logits"]
        device = aux.device
        num_masks = self._num_masks(targets, device)
        s_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        q_idx = torch.cat([src for src, _ in indices]).to(device)
        tgt_masks = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)]).to(device) \
            if len(q_idx) else aux.new_zeros((0,) + aux.shape[-2:])
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(device).float() \
            if len(q_idx) else aux.new_zeros((0, 4))
        tgt_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(device) \
            if len(q_idx) else torch.zeros(0, dtype=torch.long, device=device)
        losses: Dict[str, torch.Tensor] = {}
        zero = aux.sum() * 0.0

        # auxiliary masks and boxes (every matched query)
        if len(q_idx):
            bce, dice = self._mask_terms(aux[s_idx, q_idx], tgt_masks, generator, importance=False)
            src_boxes = outputs["aux_boxes"][s_idx, q_idx].float()
            losses["loss_aux_mask"] = bce / num_masks
            losses["loss_aux_dice"] = dice / num_masks
            losses["loss_bbox"] = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_masks
            giou = torch.diag(generalized_box_iou(_valid_boxes(src_boxes), _valid_boxes(tgt_boxes)))
            losses["loss_giou"] = (1 - giou).sum() / num_masks
        else:
            for k in ("loss_aux_mask", "loss_aux_dice", "loss_bbox", "loss_giou"):
                losses[k] = zero + outputs["aux_boxes"].sum() * 0.0

        if "pred_logits" not in outputs or "pred_masks" not in outputs:
            return losses
        logits = outputs["pred_logits"].float()
        n_slices, n_q = logits.shape[:2]
        decoded = outputs.get("decoded")
        decoded = torch.ones(n_slices, n_q, dtype=torch.bool, device=device) if decoded is None else decoded.to(device)
        target_classes = torch.full((n_slices, n_q), self.num_classes, dtype=torch.long, device=device)
        if len(q_idx):
            target_classes[s_idx, q_idx] = tgt_labels
        ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(device), reduction="none")
        w = self.empty_weight.to(device)[target_classes] * decoded.float()
        losses["loss_ce"] = (ce * w).sum() / w.sum().clamp_min(1e-6) if bool(decoded.any()) else logits.sum() * 0.0
        keep = decoded[s_idx, q_idx] if len(q_idx) else torch.zeros(0, dtype=torch.bool, device=device)
        if bool(keep.any()):
            src = outputs["pred_masks"][s_idx[keep], q_idx[keep]]
            bce, dice = self._mask_terms(src, tgt_masks[keep], generator, importance=True)
            losses["loss_mask"] = bce / num_masks
            losses["loss_dice"] = dice / num_masks
        else:
            losses["loss_mask"] = outputs["pred_masks"].sum() * 0.0
            losses["loss_dice"] = outputs["pred_masks"].sum() * 0.0
        return losses
