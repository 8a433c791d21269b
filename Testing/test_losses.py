"""Matcher and criterion on hand-made cases."""
from __future__ import annotations

import torch

from masksam_core.training.criterion import SetCriterion
from masksam_core.training.matcher import HungarianMatcher
from masksam_core.training.targets import masks_to_boxes_normalized, slice_targets

C = 4  # classes incl. background


def _label():
    lab = torch.zeros(1, 32, 32, dtype=torch.long)
    lab[0, 4:12, 4:14] = 1
    lab[0, 20:30, 6:16] = 2
    lab[0, 8:20, 20:28] = 3
    return lab


def _perfect_outputs(targets, n_q=6, perm=None):
    """Outputs whose first K queries (optionally permuted) reproduce the targets exactly."""
    t = targets[0]
    k = t["labels"].shape[0]
    perm = list(range(k)) if perm is None else perm
    masks = torch.full((1, n_q, 32, 32), -20.0)
    boxes = torch.zeros(1, n_q, 4)
    logits = torch.full((1, n_q, C + 1), -20.0)
    logits[0, :, C] = 20.0  # no object
    for j in range(k):
        q = perm[j]
        masks[0, q] = torch.where(t["masks"][j] > 0, 20.0, -20.0)
        boxes[0, q] = t["boxes"][j]
        logits[0, q] = -20.0
        logits[0, q, t["labels"][j]] = 20.0
    return {"aux_mask_logits": masks.clone(), "aux_boxes": boxes, "pred_logits": logits, "pred_masks": masks.clone()}


def test_targets_hold_one_mask_per_present_class_with_its_box():
    t = slice_targets(_label(), C)[0]
    assert t["labels"].tolist() == [0, 1, 2, 3]
    assert t["masks"].shape == (4, 32, 32)
    assert torch.allclose(t["boxes"][1], torch.tensor([4 / 32, 4 / 32, 14 / 32, 12 / 32]))
    ignored = torch.full((1, 8, 8), 255)
    assert slice_targets(ignored, C)[0]["labels"].numel() == 0
    assert masks_to_boxes_normalized(torch.zeros(1, 5, 5)).tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_perfect_prediction_matches_identity_and_gives_near_zero_loss():
    targets = slice_targets(_label(), C)
    out = _perfect_outputs(targets)
    gen = torch.Generator().manual_seed(0)
    idx = HungarianMatcher(num_points=2000)(out, targets, generator=gen)
    assert idx[0][0].tolist() == [0, 1, 2, 3] and idx[0][1].tolist() == [0, 1, 2, 3]
    crit = SetCriterion(C, num_points=2000)
    losses = crit(out, targets, generator=gen)
    assert set(losses) == set(crit.weight_dict)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[name].item() < 0.02, name
    assert losses["loss_aux_dice"].item() < 0.1 and losses["loss_dice"].item() < 0.15  # importance sampling puts 75 % of the points on the boundaries
    # BCE at points sampled bilinearly across a boundary cannot reach 0 (the target itself is fractional
    # there); the perfect masks must still be the minimum: any shift of them costs more
    for shift in (1, 2):
        moved = _perfect_outputs(targets)
        for key in ("aux_mask_logits", "pred_masks"):
            moved[key] = torch.roll(moved[key], shifts=shift, dims=-1)
        worse = crit(moved, targets, indices=idx, generator=torch.Generator().manual_seed(0))
        for name in ("loss_mask", "loss_aux_mask", "loss_dice", "loss_aux_dice"):
            assert worse[name] > losses[name], (name, shift)


def test_permuted_queries_match_back():
    targets = slice_targets(_label(), C)
    perm = [3, 0, 5, 1]
    out = _perfect_outputs(targets, perm=perm)
    src, tgt = HungarianMatcher(num_points=2000)(out, targets, generator=torch.Generator().manual_seed(1))[0]
    assert dict(zip(tgt.tolist(), src.tolist())) == {j: perm[j] for j in range(4)}


def test_wrong_prediction_costs_more_than_a_perfect_one():
    targets = slice_targets(_label(), C)
    crit = SetCriterion(C, num_points=2000)
    good = crit.weighted_total(crit(_perfect_outputs(targets), targets, generator=torch.Generator().manual_seed(0)))
    bad_out = _perfect_outputs(targets)
    bad_out["pred_masks"] = -bad_out["pred_masks"]
    bad_out["pred_logits"][0, :4] = bad_out["pred_logits"][0, :4].flip(-1)
    bad = crit.weighted_total(crit(bad_out, targets, generator=torch.Generator().manual_seed(0)))
    assert bad > good + 1.0


def test_gradients_flow_and_decoded_restricts_terms():
    torch.manual_seed(0)
    targets = slice_targets(_label(), C)
    out = {"aux_mask_logits": torch.randn(1, 6, 32, 32, requires_grad=True),
           "aux_boxes": torch.rand(1, 6, 4, requires_grad=True),
           "pred_logits": torch.randn(1, 6, C + 1, requires_grad=True),
           "pred_masks": torch.randn(1, 6, 16, 16, requires_grad=True),
           "decoded": torch.tensor([[True, True, True, True, False, False]])}
    crit = SetCriterion(C, num_points=500)
    total = crit.weighted_total(crit(out, targets, generator=torch.Generator().manual_seed(0)))
    total.backward()
    for key in ("aux_mask_logits", "aux_boxes", "pred_logits", "pred_masks"):
        assert out[key].grad is not None and out[key].grad.abs().sum() > 0, key
    assert out["pred_logits"].grad[0, 4:].abs().sum() == 0  # undecoded queries: no class gradient


def test_prompt_only_outputs_give_aux_terms_and_empty_slices_work():
    targets = slice_targets(torch.cat([_label(), torch.full((1, 32, 32), 255)]), C)
    out = {"aux_mask_logits": torch.randn(2, 6, 32, 32), "aux_boxes": torch.rand(2, 6, 4)}
    losses = SetCriterion(C, num_points=500)(out, targets, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss_aux_mask", "loss_aux_dice", "loss_bbox", "loss_giou"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_matching_is_reproducible_with_a_generator():
    targets = slice_targets(_label(), C)
    out = {"aux_mask_logits": torch.randn(1, 6, 32, 32), "aux_boxes": torch.rand(1, 6, 4)}
    m = HungarianMatcher(num_points=300)
    a = m(out, targets, generator=torch.Generator().manual_seed(3))
    b = m(out, targets, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
