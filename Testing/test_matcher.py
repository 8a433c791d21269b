"""Hungarian matcher, point sampling and box helpers on hand-made cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from masksam_core.training.boxes import box_giou, box_giou_paired, masks_to_boxes_normalized
from masksam_core.training.matcher import ClassBoundMatcher, HungarianMatcher, make_matcher
from masksam_core.training.points import point_sample, uncertain_point_coords

C = 4  # classes incl. background; logits have C + 1 columns


def make_targets(size: int = 64, empty: bool = False):
    """One slice: background + 3 rectangles (labels 0..3), or no target at all."""
    if empty:
        return {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, size, size),
                "boxes": torch.zeros(0, 4)}
    f = size // 32
    lab = torch.zeros(size, size, dtype=torch.long)
    lab[4 * f:12 * f, 4 * f:14 * f] = 1
    lab[20 * f:30 * f, 6 * f:16 * f] = 2
    lab[8 * f:20 * f, 20 * f:28 * f] = 3
    present = torch.unique(lab)
    masks = (lab[None] == present[:, None, None]).float()
    return {"labels": present, "masks": masks, "boxes": masks_to_boxes_normalized(masks)}


def perfect_outputs(targets, n_q: int = 6, perms=None, pred_size=None):
    """Outputs whose queries perms[s][j] reproduce target j of slice s (logits ±20); other queries: no object."""
    size = targets[0]["masks"].shape[-1]
    s_n = len(targets)
    aux = torch.full((s_n, n_q, size, size), -20.0)
    boxes = torch.zeros(s_n, n_q, 4)
    logits = torch.full((s_n, n_q, C + 1), -20.0)
    logits[..., C] = 20.0
    for s, t in enumerate(targets):
        k = t["labels"].shape[0]
        perm = list(range(k)) if perms is None else perms[s]
        for j in range(k):
            q = perm[j]
            aux[s, q] = torch.where(t["masks"][j] > 0, 20.0, -20.0)
            boxes[s, q] = t["boxes"][j]
            logits[s, q] = -20.0
            logits[s, q, t["labels"][j]] = 20.0
    pred = aux.clone()
    if pred_size is not None:
        pred = F.interpolate(aux, size=(pred_size, pred_size), mode="bilinear", align_corners=False)
    return {"aux_mask_logits": aux, "aux_boxes": boxes, "pred_logits": logits, "pred_masks": pred}


def as_dict(idx):
    src, tgt = idx
    return dict(zip(tgt.tolist(), src.tolist()))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- points
def test_point_sample_reads_pixel_centres_and_handles_other_resolutions():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    centres = torch.tensor([[[0.125, 0.125], [0.875, 0.125], [0.125, 0.875], [0.625, 0.375]]])  # (x, y)
    assert point_sample(img, centres)[0, 0].tolist() == [0.0, 3.0, 12.0, 6.0]
    # the same normalised point on a 2x-upsampled copy (nearest) gives the same value away from edges
    big = img.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert point_sample(big, centres)[0, 0].tolist() == [0.0, 3.0, 12.0, 6.0]
    assert point_sample(img[:0], torch.zeros(0, 5, 2)).shape == (0, 1, 5)


def test_uncertain_points_concentrate_on_boundaries_and_are_reproducible():
    logits = torch.full((2, 1, 32, 32), -20.0)
    logits[:, :, :, 16:] = 20.0  # a vertical edge at x = 0.5
    a = uncertain_point_coords(logits, 400, 3.0, 0.75, generator=gen(5))
    b = uncertain_point_coords(logits, 400, 3.0, 0.75, generator=gen(5))
    assert a.shape == (2, 400, 2) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    imp = a[:, :300]
    # the logits are not ±20 only within half a pixel of the edge (1/32 of the image, ~37 of the 1200 candidates,
    # all of them among the most uncertain) and, through grid_sample's zero padding, of the image border
    band = 1 / 64
    near = ((imp[..., 0] - 0.5).abs() < band).sum(1)
    uniform_near = ((torch.rand(2, 300, generator=gen(1)) - 0.5).abs() < band).sum(1)
    assert (near >= 25).all() and (near > 2 * uniform_near).all()
    assert (point_sample(logits, imp)[:, 0].abs() < 20 - 1e-3).sum(1).min() >= 60


# ---------------------------------------------------------------- boxes
def test_giou_identical_disjoint_and_torchvision_agreement():
    a = torch.tensor([[0.1, 0.2, 0.4, 0.5], [0.0, 0.0, 0.1, 0.1]])
    b = torch.tensor([[0.1, 0.2, 0.4, 0.5], [0.8, 0.8, 1.0, 1.0], [0.3, 0.3, 0.6, 0.9]])
    g = box_giou(a, b)
    assert g.shape == (2, 3)
    assert g[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert g[1, 1].item() < -0.5  # far apart: hull almost empty
    torchvision = pytest.importorskip("torchvision")
    assert torch.allclose(g, torchvision.ops.generalized_box_iou(a, b), atol=1e-6)
    assert torch.allclose(box_giou_paired(a, b[:2]), torch.diagonal(g[:, :2]))


def test_giou_is_finite_for_degenerate_and_inverted_boxes_and_has_gradients():
    a = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.6, 0.6, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    b = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]])
    g = box_giou_paired(a, b)
    assert torch.isfinite(g).all() and torch.isfinite(box_giou(a, b)).all()
    (1 - g).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_masks_to_boxes_normalized():
    m = torch.zeros(2, 8, 10)
    m[0, 2:5, 3:9] = 1
    boxes = masks_to_boxes_normalized(m)
    assert torch.allclose(boxes[0], torch.tensor([3 / 10, 2 / 8, 9 / 10, 5 / 8]))
    assert boxes[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert masks_to_boxes_normalized(torch.zeros(0, 8, 10)).shape == (0, 4)


# ---------------------------------------------------------------- matcher
def test_perfect_prediction_matches_identity():
    targets = [make_targets()]
    idx = HungarianMatcher(num_points=500)(perfect_outputs(targets), targets, generator=gen())
    assert idx[0][0].tolist() == [0, 1, 2, 3] and idx[0][1].tolist() == [0, 1, 2, 3]
    assert idx[0][0].dtype == torch.int64


def test_permuted_queries_match_back_with_low_resolution_pred_masks():
    targets = [make_targets(), make_targets()]
    perms = [[3, 0, 5, 1], [2, 4, 1, 0]]
    out = perfect_outputs(targets, perms=perms, pred_size=16)  # decoder masks at 1/4 of the target size
    idx = HungarianMatcher(num_points=500)(out, targets, generator=gen(1))
    for s in range(2):
        assert as_dict(idx[s]) == {j: perms[s][j] for j in range(4)}
    # the mask terms alone (class and box costs off) still find it
    only_masks = HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0, cost_aux_mask=0, cost_aux_dice=0,
                                  num_points=500)
    assert as_dict(only_masks(out, targets, generator=gen(2))[1]) == {j: perms[1][j] for j in range(4)}


def test_empty_slice_and_prompt_only_outputs():
    targets = [make_targets(empty=True), make_targets()]
    perms = [[], [1, 2, 3, 4]]
    out = perfect_outputs(targets, perms=perms)
    aux_only = {"aux_mask_logits": out["aux_mask_logits"], "aux_boxes": out["aux_boxes"]}
    idx = HungarianMatcher(num_points=300)(aux_only, targets, generator=gen())
    assert idx[0][0].numel() == 0 and idx[0][1].numel() == 0 and idx[0][0].dtype == torch.int64
    assert as_dict(idx[1]) == {0: 1, 1: 2, 2: 3, 3: 4}


def test_decoded_queries_are_preferred_and_undecoded_ones_use_aux_terms_only():
    targets = [make_targets()]
    out = perfect_outputs(targets, n_q=8)  # queries 0..3 perfect
    # queries 4..7: decoded, with the right class and mask but an aux prediction that is off
    for j in range(4):
        out["pred_logits"][0, 4 + j] = out["pred_logits"][0, j]
        out["pred_masks"][0, 4 + j] = out["pred_masks"][0, j]
        out["aux_mask_logits"][0, 4 + j] = torch.roll(out["aux_mask_logits"][0, j], 3, dims=-1)
        out["aux_boxes"][0, 4 + j] = out["aux_boxes"][0, j] * 0.9
    out["decoded"] = torch.tensor([[False] * 4 + [True] * 4])
    m = HungarianMatcher(num_points=500)
    assert as_dict(m(out, targets, generator=gen())[0]) == {0: 4, 1: 5, 2: 6, 3: 7}
    # only 2 decoded queries for 4 targets: the other two go to undecoded queries chosen by the aux terms,
    # even though their (constant, ignored) class logits and pred masks say "no object"
    out["decoded"] = torch.tensor([[False] * 4 + [True, True, False, False]])
    out["pred_logits"][0, :4] = out["pred_logits"][0, 7]
    out["pred_logits"][0, :4, :C] = -20.0
    out["pred_logits"][0, :4, C] = 20.0
    out["pred_masks"][0, :4] = -20.0
    assert as_dict(m(out, targets, generator=gen())[0]) == {0: 4, 1: 5, 2: 2, 3: 3}


def test_non_finite_costs_are_replaced():
    targets = [make_targets()]
    out = perfect_outputs(targets, n_q=6, perms=[[2, 3, 4, 5]])
    out["aux_mask_logits"][0, 0] = float("nan")
    out["aux_boxes"][0, 1] = float("inf")
    idx = HungarianMatcher(num_points=300)(out, targets, generator=gen())
    assert as_dict(idx[0]) == {0: 2, 1: 3, 2: 4, 3: 5}


def test_more_targets_than_queries():
    targets = [make_targets()]
    out = perfect_outputs(targets, n_q=4)
    for k in ("aux_mask_logits", "aux_boxes", "pred_logits", "pred_masks"):
        out[k] = out[k][:, :3]
    src, tgt = HungarianMatcher(num_points=300)(out, targets, generator=gen())[0]
    assert src.tolist() == [0, 1, 2] and tgt.tolist() == [0, 1, 2]


def test_matching_is_reproducible_with_a_generator_and_uses_shared_points():
    torch.manual_seed(0)
    targets = [make_targets(), make_targets()]
    out = {"aux_mask_logits": torch.randn(2, 6, 64, 64), "aux_boxes": torch.rand(2, 6, 4),
           "pred_logits": torch.randn(2, 6, C + 1), "pred_masks": torch.randn(2, 6, 16, 16)}
    m = HungarianMatcher(num_points=300)
    a = m(out, targets, generator=gen(3))
    b = m(out, targets, generator=gen(3))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    ca = m.cost_matrices(out, targets, generator=gen(3))
    cb = m.cost_matrices(out, targets, generator=gen(3))
    cc = m.cost_matrices(out, targets, generator=gen(4))
    assert all(torch.equal(x, y) for x, y in zip(ca, cb))
    assert not torch.equal(ca[0], cc[0])
    assert ca[0].shape == (6, 4) and all(torch.isfinite(c).all() for c in ca)
    assert math.isclose(m.cost_class, 0.2) and m.num_points == 300


# ---------------------------------------------------------------- class-bound matching (CPU recipe)
def test_class_bound_matching_binds_query_c_to_class_c_whatever_the_predictions():
    targets = [make_targets(), make_targets(empty=True), make_targets()]
    # predictions that Hungarian matching would assign elsewhere (targets reproduced by reversed queries)
    outputs = perfect_outputs(targets, n_q=6, perms=[[3, 2, 1, 0], [], [5, 4, 3, 2]])
    indices = ClassBoundMatcher()(outputs, targets)
    for (q, k), t in zip(indices, targets):
        assert q.dtype == torch.int64 and k.dtype == torch.int64
        assert torch.equal(q, torch.sort(q).values)  # sorted by query
        assert torch.equal(q, t["labels"][k])  # query index == class of its target
    assert indices[1][0].numel() == 0
    hungarian = HungarianMatcher(num_points=256)(outputs, targets, generator=gen())
    assert as_dict(hungarian[0]) == {0: 3, 1: 2, 2: 1, 3: 0}  # the cost-based assignment differs


def test_class_bound_matching_needs_a_query_per_class_and_criterion_uses_it():
    from masksam_core.training.criterion import SetCriterion

    targets = [make_targets()]
    with pytest.raises(ValueError, match="query per class"):
        ClassBoundMatcher()({"aux_mask_logits": torch.zeros(1, 3, 64, 64)}, targets)
    outputs = perfect_outputs(targets, n_q=6)  # query c reproduces class c: a perfect class-bound prediction
    crit = SetCriterion(num_classes=C, matcher=make_matcher("class_bound"), num_points=256)
    losses = crit(outputs, targets, generator=gen())
    assert float(losses["loss_ce"]) < 1e-3 and float(losses["loss_dice"]) < 0.1
    swapped = perfect_outputs(targets, n_q=6, perms=[[1, 0, 2, 3]])  # classes 0 and 1 on each other's query
    assert float(crit(swapped, targets, generator=gen())["loss_ce"]) > 5
    with pytest.raises(ValueError, match="matching must be"):
        make_matcher("greedy")
