"""Hungarian matching of queries to per-slice targets (spec §2; the design of Mask2Former's ``HungarianMatcher``).

Cost of assigning query q to target k on one slice, every mask term at one shared set of random points:

    cost_class·(−p_q(label_k)) + cost_mask·BCE + cost_dice·Dice          (pred_logits, pred_masks)
  + cost_bbox·L1 + cost_giou·(−GIoU)                                      (aux_boxes)
  + cost_aux_mask·BCE + cost_aux_dice·Dice                                (aux_mask_logits)

with the AMOS weights 0.2, 1.2, 1.2, 0.5, 0.2, 0.5, 0.5 as defaults. The auxiliary masks enter as logits (the
official code applies the sigmoid twice; spec §8.3).

- Without ``pred_logits``/``pred_masks`` (prompt-generator-only stage) the class and mask terms are skipped.
- With ``decoded`` (S, N) bool, a query that was not decoded has no real class or mask prediction. Its class and
  mask terms are replaced by the constant ``undecoded_cost`` (default 1000): the assignment then uses as many
  decoded queries as it can (a constant per query-target pair changes nothing among assignments that use the
  same number of undecoded queries), and whenever it must use undecoded queries it picks them by the auxiliary
  terms alone. A zero instead would favour undecoded queries, which then get no class or mask supervision.
- Non-finite costs become ``LARGE`` (1e5) before SciPy's ``linear_sum_assignment``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .boxes import box_giou
from .points import point_sample, random_points

LARGE = 1e5


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``inputs`` (Q, P) logits, ``targets`` (K, P) in [0, 1] -> (Q, K) Dice loss (smoothing 1)."""
    p = inputs.sigmoid()
    numerator = 2 * (p @ targets.t())
    denominator = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_bce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``inputs`` (Q, P) logits, ``targets`` (K, P) in [0, 1] -> (Q, K) BCE averaged over the points."""
    n_pts = max(inputs.shape[1], 1)
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.t() + neg @ (1 - targets).t()) / n_pts


def _sample_all(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``masks`` (S, N, h, w) treated as N channels, ``coords`` (S, P, 2) -> (S, N, P) float32."""
    return point_sample(masks.float(), coords)


class HungarianMatcher(nn.Module):
    """Per-slice optimal assignment of queries to targets; see the module docstring for the cost."""

    def __init__(self, cost_class: float = 0.2, cost_mask: float = 1.2, cost_dice: float = 1.2,
                 cost_bbox: float = 0.5, cost_giou: float = 0.2, cost_aux_mask: float = 0.5,
                 cost_aux_dice: float = 0.5, num_points: int = 12544, undecoded_cost: float = 1000.0) -> None:
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.cost_bbox, self.cost_giou = cost_bbox, cost_giou
        self.cost_aux_mask, self.cost_aux_dice = cost_aux_mask, cost_aux_dice
        self.num_points = int(num_points)
        self.undecoded_cost = float(undecoded_cost)

    @torch.no_grad()
    def cost_matrices(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                      generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """Per slice the (N, K) float32 cost (non-finite values already replaced), on the outputs' device."""
        aux = outputs["aux_mask_logits"]
        n_slices, n_q = aux.shape[:2]
        if len(targets) != n_slices:
            raise ValueError(f"matcher: {len(targets)} targets for {n_slices} slices")
        device = aux.device
        has_pred = "pred_logits" in outputs and "pred_masks" in outputs
        decoded = outputs.get("decoded") if has_pred else None

        # one shared set of points per slice, drawn for every slice (empty ones too) so draws do not depend on K
        coords = random_points((n_slices, self.num_points, 2), device, generator)
        aux_pts = _sample_all(aux, coords)  # (S, N, P)
        pred_pts = _sample_all(outputs["pred_masks"], coords) if has_pred else None
        boxes = outputs["aux_boxes"].float()
        probs = outputs["pred_logits"].float().softmax(-1) if has_pred else None

        costs = []
        for s in range(n_slices):
            tgt = targets[s]
            labels = tgt["labels"].to(device)
            k = labels.shape[0]
            if k == 0:
                costs.append(torch.zeros((n_q, 0), device=device))
                continue
            tgt_pts = point_sample(tgt["masks"].to(device).float()[None], coords[s:s + 1])[0]  # (K, P)
            tgt_boxes = tgt["boxes"].to(device).float()
            cost = self.cost_aux_mask * batch_bce_cost(aux_pts[s], tgt_pts) \
                + self.cost_aux_dice * batch_dice_cost(aux_pts[s], tgt_pts) \
                + self.cost_bbox * torch.cdist(boxes[s], tgt_boxes, p=1) \
                - self.cost_giou * box_giou(boxes[s], tgt_boxes)
            if has_pred:
                pred_cost = -self.cost_class * probs[s][:, labels] \
                    + self.cost_mask * batch_bce_cost(pred_pts[s], tgt_pts) \
                    + self.cost_dice * batch_dice_cost(pred_pts[s], tgt_pts)
                if decoded is not None:
                    dec = decoded[s].to(device=device, dtype=torch.bool)[:, None]
                    pred_cost = torch.where(dec, pred_cost, torch.full_like(pred_cost, self.undecoded_cost))
                cost = cost + pred_cost
            costs.append(torch.where(torch.isfinite(cost), cost, torch.full_like(cost, LARGE)))
        return costs

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                generator: Optional[torch.Generator] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """-> per slice (query indices, target indices), int64 on the CPU, sorted by query index.

        With K targets and N queries, min(N, K) pairs; a slice with K = 0 gives two empty tensors.
        """
        indices = []
        for cost in self.cost_matrices(outputs, targets, generator):
            if cost.shape[1] == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(cost.double().cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


class ClassBoundMatcher(nn.Module):
    """Fixed assignment: query c answers for class c (c < C, background included), so a query keeps one class
    for the whole run. Needs N >= C; queries >= C are never matched and learn "no object".

    The CPU recipe's lever (a documented deviation from the spec's Hungarian matching): with a few hundred steps
    on 2 cores, Hungarian matching re-assigns queries between classes from step to step (the slow start that DETR-
    style set prediction is known for) and the class head learned nothing but the class prior in our 550-step
    run (every voxel background or colon). Binding queries to classes makes each auxiliary-mask channel a class
    channel from the first step; the losses, the decoder and MaskFormer semantic inference are unchanged.
    """

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                generator: Optional[torch.Generator] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """-> per slice (query indices = class labels, target indices), int64 on the CPU, sorted by query."""
        n_q = outputs["aux_mask_logits"].shape[1]
        if len(targets) != outputs["aux_mask_logits"].shape[0]:
            raise ValueError(f"matcher: {len(targets)} targets for {outputs['aux_mask_logits'].shape[0]} slices")
        indices = []
        for tgt in targets:
            labels = tgt["labels"].detach().long().cpu()
            if labels.numel() and int(labels.max()) >= n_q:
                raise ValueError(f"class-bound matching needs a query per class: class {int(labels.max())} "
                                 f"but {n_q} queries")
            order = torch.argsort(labels)
            indices.append((labels[order], order))
        return indices


MATCHINGS = ("hungarian", "class_bound")


def make_matcher(kind: str, num_points: int = 12544) -> nn.Module:
    """The matcher called ``kind`` (one of :data:`MATCHINGS`)."""
    if kind == "hungarian":
        return HungarianMatcher(num_points=num_points)
    if kind == "class_bound":
        return ClassBoundMatcher()
    raise ValueError(f"matching must be one of {MATCHINGS}, not {kind!r}")
