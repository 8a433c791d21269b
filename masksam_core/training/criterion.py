"""Set criterion (spec §2; the design of Mask2Former's ``SetCriterion``).

Unweighted terms returned by ``SetCriterion.forward``:

- ``loss_ce``: cross-entropy over all (decoded) queries, unmatched ones -> no object (index C); class weights 1,
  and ``eos_coef`` = 0.1 for no object; the weighted mean that ``F.cross_entropy(weight=...)`` computes, as in
  Mask2Former (not divided by the number of masks).
- ``loss_mask``, ``loss_dice``: BCE and Dice of matched (decoded) ``pred_masks`` at PointRend importance-sampled
  points (oversample 2.0, importance 0.75).
- ``loss_aux_mask``, ``loss_aux_dice``: BCE and Dice of matched ``aux_mask_logits`` (logits, not probabilities;
  spec §8.3) at points sampled the same way (``aux_importance_sampling=False``: uniform points).
- ``loss_bbox``, ``loss_giou``: L1 and 1 − GIoU of matched ``aux_boxes``.

``dense_aux=True`` (set for class-bound matching, where query q always answers for class q, so the auxiliary
masks are a semantic segmentation with one channel per class) computes the two auxiliary mask terms on every pixel
instead of at sampled points, and for every query: a matched query against its class's mask (BCE and Dice), an
unmatched one against an empty mask (BCE only). Measured on the default model trained without it (validation
slices of s1): channels of the organs it found fired on 71-100 % of the slices where their organ is absent (they
were never shown such slices), and the channels of 8 small organs never fired at all (point-sampled BCE and Dice
see too few of their pixels), so those organs were never decoded. Mask2Former has neither: there a query has no
fixed class, and its masks are large. ``forward(..., dense_aux=...)`` overrides the mode for one call (the training
loop's point-sampled start, ``LoopConfig.point_aux_steps``).

``aux_bce="balanced"`` (dense mode only) weighs a matched channel's BCE half on its organ's pixels and half on the
rest, instead of a plain mean over the slice, so that a small organ's pixels are not outweighed by the background
around it; a channel with no target pixels keeps the plain mean. Measured on s1 (dense auxiliary losses from step
0, 2 cores): the auxiliary channels' validation Dice reached 0.234 after 900 steps against 0.153 for the
point-sampled start; the aorta's and vena cava's channels fired from step 200, the spleen's and kidneys' by step 900.

The mask and box terms are sums over matched pairs divided by the number of target masks in the batch (mean over
processes under torch.distributed, at least 1), as in Mask2Former. ``decoded`` (S, N) restricts the class and
mask terms to queries that went through SAM's decoder (the auxiliary terms cover every matched query); without
``pred_logits``/``pred_masks`` only the four auxiliary terms are returned (prompt-generator-only stage).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .boxes import box_giou_paired
from .config import AUX_BCE_MODES
from .matcher import HungarianMatcher
from .points import point_sample, random_points, uncertain_point_coords

DEFAULT_WEIGHTS = {"loss_ce": 0.2, "loss_mask": 1.2, "loss_dice": 1.2, "loss_aux_mask": 0.5, "loss_aux_dice": 0.5,
                   "loss_bbox": 0.5, "loss_giou": 0.2}
AUX_TERMS = ("loss_aux_mask", "loss_aux_dice", "loss_bbox", "loss_giou")
PRED_TERMS = ("loss_ce", "loss_mask", "loss_dice")


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``inputs`` (M, P) logits, ``targets`` (M, P) in [0, 1] -> Dice loss (smoothing 1) summed over the M masks."""
    p = inputs.sigmoid()
    numerator = 2 * (p * targets).sum(-1)
    denominator = p.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def bce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``inputs`` (M, P) logits -> BCE averaged over the points, summed over the M masks."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum()


def prior_mask_losses(pred_masks: torch.Tensor, decoded: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = 255) -> Dict[str, torch.Tensor]:
    """Mask terms of a step whose queries were prompted by an atlas prior (query q answers for class q).

    pred_masks (S, N, h, w) logits; decoded (S, N) bool, the pairs that went through SAM's decoder; labels (S, H, W)
    int64 class indices, ``ignore_index`` = not labelled. Each decoded pair on a slice with labelled pixels is
    compared with its class's mask on that slice on every labelled pixel (logits resized to (H, W) if needed): an
    organ the prior put where the slice holds none is compared with an empty mask. Returns ``loss_mask`` (BCE, mean
    over the pixels) and ``loss_dice`` (Dice, smoothing 1), each averaged over the pairs; zero (without a gradient)
    when no decoded pair lies on a labelled slice.
    """
    s_idx, q_idx = torch.nonzero(decoded, as_tuple=True)
    lab = labels[s_idx]
    valid = (lab != ignore_index)
    has = valid.flatten(1).any(1)
    s_idx, q_idx, lab, valid = s_idx[has], q_idx[has], lab[has], valid[has]
    if s_idx.numel() == 0:  # nothing to learn from: zeros without a gradient, and the loop makes no update
        zero = pred_masks.new_zeros(()).detach()
        return {"loss_mask": zero, "loss_dice": zero}
    logits = pred_masks[s_idx, q_idx]
    if logits.shape[-2:] != lab.shape[-2:]:
        logits = F.interpolate(logits[:, None], size=lab.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    valid = valid.float()
    target = (lab == q_idx[:, None, None]).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid
    bce = bce.flatten(1).sum(1) / valid.flatten(1).sum(1)
    prob = logits.sigmoid() * valid
    inter = (prob * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    return {"loss_mask": bce.mean(), "loss_dice": dice.mean()}


class SetCriterion(nn.Module):
    """Losses of MaskSAM's outputs against per-slice targets. ``num_classes`` C counts background; class logits
    have C + 1 columns, index C = no object."""

    def __init__(self, num_classes: int, matcher: Optional[HungarianMatcher] = None,
                 weight_dict: Optional[Dict[str, float]] = None, eos_coef: float = 0.1, num_points: int = 12544,
                 oversample_ratio: float = 2.0, importance_sample_ratio: float = 0.75,
                 aux_importance_sampling: bool = True, dense_aux: bool = False, aux_bce: str = "mean") -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.matcher = matcher if matcher is not None else HungarianMatcher(num_points=num_points)
        self.weight_dict = dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict)
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.eos_coef = float(eos_coef)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.aux_importance_sampling = bool(aux_importance_sampling)
        self.dense_aux = bool(dense_aux)
        if aux_bce not in AUX_BCE_MODES:
            raise ValueError(f"aux_bce must be one of {', '.join(AUX_BCE_MODES)}, not {aux_bce!r}")
        self.aux_bce = aux_bce

    @staticmethod
    def default_weights() -> Dict[str, float]:
        return dict(DEFAULT_WEIGHTS)

    def loss_names(self) -> List[str]:
        return list(self.weight_dict)

    def weighted_total(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ weight·term over the terms present that have a weight."""
        terms = [self.weight_dict[k] * v for k, v in losses.items() if k in self.weight_dict]
        if not terms:
            raise ValueError("weighted_total: no weighted loss term in " + ", ".join(losses))
        return torch.stack([t.reshape(()) for t in terms]).sum()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _num_masks(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> float:
        n = torch.tensor(float(sum(int(t["labels"].shape[0]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return max(float(n), 1.0)

    def _mask_terms(self, src: torch.Tensor, tgt: torch.Tensor, importance: bool,
                    generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``src`` (M, h, w) logits, ``tgt`` (M, H, W) -> (BCE sum, Dice sum) at sampled points."""
        src = src[:, None].float()
        with torch.no_grad():
            if importance:
                coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                                self.importance_sample_ratio, generator)
            else:
                coords = random_points((src.shape[0], self.num_points, 2), src.device, generator)
            tgt_pts = point_sample(tgt[:, None].float(), coords)[:, 0]
        src_pts = point_sample(src, coords)[:, 0]
        return bce_loss(src_pts, tgt_pts), dice_loss(src_pts, tgt_pts)

    def _dense_aux_terms(self, aux: torch.Tensor, s_idx: torch.Tensor, q_idx: torch.Tensor,
                         tgt_masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every-pixel auxiliary terms. ``aux`` (S, N, h, w) logits; the M matched pairs ``(s_idx, q_idx)`` with
        ``tgt_masks`` (M, H, W). Returns (BCE summed over all S·N masks, each averaged over its pixels, or for
        ``aux_bce="balanced"`` the mean of its positive-pixel and negative-pixel averages when it has positives;
        Dice loss summed over the M matched masks)."""
        logits = aux.float()
        if tuple(tgt_masks.shape[-2:]) != tuple(logits.shape[-2:]):
            tgt_masks = F.interpolate(tgt_masks[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0]
        target = torch.zeros_like(logits)
        target[s_idx, q_idx] = tgt_masks.to(logits.dtype)
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (S, N, h, w)
        if self.aux_bce == "balanced":
            positives = target.sum((2, 3))
            negatives = target.shape[2] * target.shape[3] - positives
            pos_mean = (per_pixel * target).sum((2, 3)) / positives.clamp(min=1)
            neg_mean = (per_pixel * (1 - target)).sum((2, 3)) / negatives.clamp(min=1)
            bce = torch.where(positives > 0, 0.5 * (pos_mean + neg_mean), neg_mean).sum()
        else:
            bce = per_pixel.mean((2, 3)).sum()
        dice = dice_loss(logits[s_idx, q_idx].flatten(1), target[s_idx, q_idx].flatten(1))
        return bce, dice

    # ------------------------------------------------------------------ forward
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                indices: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
                generator: Optional[torch.Generator] = None,
                dense_aux: Optional[bool] = None) -> Dict[str, torch.Tensor]:
        """Loss terms (see the module docstring). ``dense_aux`` None: the criterion's own mode."""
        dense_aux = self.dense_aux if dense_aux is None else bool(dense_aux)
        aux = outputs["aux_mask_logits"]
        aux_boxes = outputs["aux_boxes"]
        n_slices, n_q = aux.shape[:2]
        if len(targets) != n_slices:
            raise ValueError(f"criterion: {len(targets)} targets for {n_slices} slices")
        if indices is None:
            indices = self.matcher(outputs, targets, generator=generator)
        device = aux.device
        num_masks = self._num_masks(targets, device)

        # matched pairs of the whole batch: slice, query, target-in-slice
        s_idx = torch.cat([torch.full((len(q),), s, dtype=torch.long) for s, (q, _) in enumerate(indices)]).to(device)
        q_idx = torch.cat([q.long().cpu() for q, _ in indices]).to(device)
        matched = [(t, j.long()) for t, (_, j) in zip(targets, indices) if len(j)]
        m = int(q_idx.numel())
        if m:
            tgt_masks = torch.cat([t["masks"][j.to(t["masks"].device)].to(device) for t, j in matched]).float()
            tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)].to(device) for t, j in matched]).float()
            tgt_labels = torch.cat([t["labels"][j.to(t["labels"].device)].to(device) for t, j in matched]).long()

        losses: Dict[str, torch.Tensor] = {}
        # auxiliary masks and boxes: every matched query
        if m:
            if dense_aux:
                bce, dice = self._dense_aux_terms(aux, s_idx, q_idx, tgt_masks)
            else:
                bce, dice = self._mask_terms(aux[s_idx, q_idx], tgt_masks, self.aux_importance_sampling, generator)
            src_boxes = aux_boxes[s_idx, q_idx].float()
            losses["loss_aux_mask"] = bce / num_masks
            losses["loss_aux_dice"] = dice / num_masks
            losses["loss_bbox"] = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_masks
            losses["loss_giou"] = (1 - box_giou_paired(src_boxes, tgt_boxes)).sum() / num_masks
        else:  # zeros that stay in the graph (DDP and GradScaler expect every output to be used)
            zero = aux.float().sum() * 0.0 + aux_boxes.float().sum() * 0.0
            for name in AUX_TERMS:
                losses[name] = zero

        if "pred_logits" not in outputs or "pred_masks" not in outputs:
            return losses

        logits = outputs["pred_logits"].float()  # (S, N, C + 1)
        pred_masks = outputs["pred_masks"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"criterion: pred_logits has {logits.shape[-1]} columns, expected "
                             f"{self.num_classes + 1} (C classes + no object)")
        decoded = outputs.get("decoded")
        decoded = (torch.ones((n_slices, n_q), dtype=torch.bool, device=device) if decoded is None
                   else decoded.to(device=device, dtype=torch.bool))

        # class: every decoded query; unmatched ones -> no object
        target_classes = torch.full((n_slices, n_q), self.num_classes, dtype=torch.long, device=device)
        if m:
            target_classes[s_idx, q_idx] = tgt_labels
        weight = self.empty_weight.to(device)
        ce = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")  # (S, N), unweighted
        w = weight[target_classes] * decoded.float()
        losses["loss_ce"] = (ce * w).sum() / w.sum().clamp(min=1e-6)

        # masks: matched and decoded
        keep = decoded[s_idx, q_idx] if m else torch.zeros(0, dtype=torch.bool, device=device)
        if bool(keep.any()):
            bce, dice = self._mask_terms(pred_masks[s_idx[keep], q_idx[keep]], tgt_masks[keep], True, generator)
            losses["loss_mask"] = bce / num_masks
            losses["loss_dice"] = dice / num_masks
        else:
            zero = pred_masks.float().sum() * 0.0
            losses["loss_mask"] = zero
            losses["loss_dice"] = zero
        return losses
