"""Set criterion on hand-made cases (helpers shared with test_matcher)."""
from __future__ import annotations

import pytest
import torch

from masksam_core.training.criterion import DEFAULT_WEIGHTS, SetCriterion
from masksam_core.training.matcher import HungarianMatcher

from test_matcher import C, gen, make_targets, perfect_outputs

ALL_TERMS = set(DEFAULT_WEIGHTS)
AUX_TERMS = {"loss_aux_mask", "loss_aux_dice", "loss_bbox", "loss_giou"}


def criterion(num_points: int = 500, **kw) -> SetCriterion:
    return SetCriterion(C, matcher=HungarianMatcher(num_points=num_points), num_points=num_points, **kw)


def random_outputs(s_n=2, n_q=6, size=64, pred_size=16, seed=0):
    g = gen(seed)
    return {"aux_mask_logits": torch.randn(s_n, n_q, size, size, generator=g).requires_grad_(),
            "aux_boxes": torch.rand(s_n, n_q, 4, generator=g).sort(-1).values.requires_grad_(),
            "pred_logits": torch.randn(s_n, n_q, C + 1, generator=g).requires_grad_(),
            "pred_masks": torch.randn(s_n, n_q, pred_size, pred_size, generator=g).requires_grad_()}


def test_defaults_follow_the_spec():
    crit = SetCriterion(C)
    assert crit.weight_dict == {"loss_ce": 0.2, "loss_mask": 1.2, "loss_dice": 1.2, "loss_aux_mask": 0.5,
                                "loss_aux_dice": 0.5, "loss_bbox": 0.5, "loss_giou": 0.2}
    assert crit.empty_weight.tolist() == pytest.approx([1, 1, 1, 1, 0.1])
    assert "empty_weight" in dict(crit.named_buffers())
    m = crit.matcher
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.cost_bbox, m.cost_giou, m.cost_aux_mask, m.cost_aux_dice,
            m.num_points) == (0.2, 1.2, 1.2, 0.5, 0.2, 0.5, 0.5, 12544)
    assert (crit.num_points, crit.oversample_ratio, crit.importance_sample_ratio) == (12544, 2.0, 0.75)


def test_perfect_prediction_gives_near_minimum_loss():
    """±20 logits equal to the targets. Class and box terms vanish; the point-sampled mask terms cannot reach 0
    (at a boundary the bilinearly sampled target is fractional and the interpolated logit is steep), but stay
    small at 128 px and grow under any shift of the masks."""
    targets = [make_targets(128)]
    out = perfect_outputs(targets)
    crit = criterion(1000)
    losses = crit(out, targets, generator=gen())
    assert set(losses) == ALL_TERMS
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[name].item() < 1e-4, name
    for name in ("loss_mask", "loss_aux_mask"):
        assert losses[name].item() < 0.15, name
    for name in ("loss_dice", "loss_aux_dice"):
        assert losses[name].item() < 0.05, name
    idx = crit.matcher(out, targets, generator=gen())
    for shift in (2, 4):
        moved = perfect_outputs(targets)
        for key in ("aux_mask_logits", "pred_masks"):
            moved[key] = torch.roll(moved[key], shifts=shift, dims=-1)
        worse = crit(moved, targets, indices=idx, generator=gen())
        for name in ("loss_mask", "loss_aux_mask", "loss_dice", "loss_aux_dice"):
            assert worse[name] > losses[name], (name, shift)


def test_wrong_prediction_costs_more_than_a_perfect_one():
    targets = [make_targets()]
    crit = criterion()
    good = crit.weighted_total(crit(perfect_outputs(targets), targets, generator=gen()))
    bad_out = perfect_outputs(targets)
    bad_out["pred_masks"] = -bad_out["pred_masks"]
    bad_out["pred_logits"][0, :4] = bad_out["pred_logits"][0, :4].flip(-1)
    bad = crit.weighted_total(crit(bad_out, targets, generator=gen()))
    assert bad > good + 1.0


def test_permuted_queries_give_the_same_loss_as_the_identity():
    targets = [make_targets(), make_targets()]
    perms = [[3, 0, 5, 1], [2, 4, 1, 0]]
    crit = criterion()
    a = crit(perfect_outputs(targets), targets, generator=gen())
    b = crit(perfect_outputs(targets, perms=perms), targets, generator=gen())
    for name in ALL_TERMS:
        assert b[name].item() == pytest.approx(a[name].item(), abs=0.03), name


def test_unmatched_queries_are_pushed_to_no_object():
    targets = [make_targets()]
    out = perfect_outputs(targets)
    out["pred_logits"][0, 5] = 0.0  # unmatched query 5: undecided
    out["pred_logits"].requires_grad_()
    losses = criterion()(out, targets, generator=gen())
    assert losses["loss_ce"].item() > 0.01
    losses["loss_ce"].backward()
    grad = out["pred_logits"].grad[0, 5]
    assert grad[C] < 0 and (grad[:C] > 0).all()  # descent raises no object, lowers every class
    # weighted mean (F.cross_entropy with the class weights): one no-object query counts 0.1
    logits = out["pred_logits"].detach()
    ce5 = torch.nn.functional.cross_entropy(logits[0, 5:6], torch.tensor([C])).item()
    assert losses["loss_ce"].item() == pytest.approx(0.1 * ce5 / (4 + 0.1 * 2), rel=1e-3)


def test_empty_slices():
    targets = [make_targets(empty=True), make_targets()]
    out = perfect_outputs(targets, perms=[[], [0, 1, 2, 3]])
    losses = criterion()(out, targets, generator=gen())
    assert set(losses) == ALL_TERMS and all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_ce"].item() < 1e-4  # the empty slice's queries all say no object
    # a batch without any target: zero terms that still reach the graph, class CE all no-object
    targets = [make_targets(empty=True)] * 2
    out = random_outputs()
    losses = criterion()(out, targets, generator=gen())
    assert set(losses) == ALL_TERMS
    for name in ALL_TERMS - {"loss_ce"}:
        assert losses[name].item() == 0.0
    assert losses["loss_ce"].item() > 0
    criterion().weighted_total(losses).backward()
    assert out["pred_logits"].grad.abs().sum() > 0
    assert out["aux_boxes"].grad is not None and out["pred_masks"].grad is not None


def test_gradients_flow_and_decoded_restricts_terms():
    targets = [make_targets(), make_targets()]
    out = random_outputs()
    decoded = torch.tensor([[True, True, True, True, False, False], [True, False, True, False, True, True]])
    out["decoded"] = decoded
    crit = criterion()
    # the matcher prefers decoded queries (slice 0 uses 0..3); in slice 1 query 3 is matched but not decoded
    indices = crit.matcher(out, targets, generator=gen())
    assert indices[0][0].tolist() == [0, 1, 2, 3] and set(indices[1][0].tolist()) == {0, 2, 4, 5}
    indices[1] = (torch.tensor([0, 2, 3, 4]), torch.tensor([1, 0, 3, 2]))
    total = crit.weighted_total(crit(out, targets, indices=indices, generator=gen()))
    total.backward()
    for key in ("aux_mask_logits", "aux_boxes", "pred_logits", "pred_masks"):
        assert out[key].grad is not None and out[key].grad.abs().sum() > 0, key
    per_query_cls = out["pred_logits"].grad.abs().sum(-1)
    per_query_mask = out["pred_masks"].grad.abs().flatten(2).sum(-1)
    assert (per_query_cls[~decoded] == 0).all() and (per_query_cls[decoded] > 0).all()
    assert (per_query_mask[~decoded] == 0).all()
    # the auxiliary terms cover every matched query, decoded or not
    matched = torch.zeros_like(decoded)
    for s, (q, _) in enumerate(indices):
        matched[s, q] = True
    per_query_aux = out["aux_boxes"].grad.abs().sum(-1)
    assert (per_query_aux[matched] > 0).all() and (per_query_aux[~matched] == 0).all()
    assert (~decoded & matched).any()  # the case is exercised


def test_no_decoded_query_gives_zero_class_and_mask_terms():
    targets = [make_targets()]
    out = random_outputs(s_n=1)
    out["decoded"] = torch.zeros(1, 6, dtype=torch.bool)
    losses = criterion()(out, targets, generator=gen())
    assert losses["loss_ce"].item() == 0 and losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_aux_dice"].item() > 0


def test_prompt_only_outputs_give_aux_terms():
    targets = [make_targets(), make_targets(empty=True)]
    out = random_outputs()
    aux_only = {"aux_mask_logits": out["aux_mask_logits"], "aux_boxes": out["aux_boxes"]}
    crit = criterion()
    losses = crit(aux_only, targets, generator=gen())
    assert set(losses) == AUX_TERMS and all(torch.isfinite(v) and v > 0 for v in losses.values())
    crit.weighted_total(losses).backward()
    assert out["aux_mask_logits"].grad.abs().sum() > 0 and out["aux_boxes"].grad.abs().sum() > 0


def test_terms_are_normalised_by_the_number_of_target_masks():
    one = [make_targets()]
    out1 = perfect_outputs(one)
    out1["aux_boxes"] = out1["aux_boxes"] + 0.05
    crit = criterion()
    idx1 = crit.matcher(out1, one, generator=gen())
    l1 = crit(out1, one, indices=idx1, generator=gen())
    two = one * 2
    out2 = {k: torch.cat([v, v]) for k, v in out1.items()}
    l2 = crit(out2, two, indices=idx1 * 2, generator=gen())
    for name in ("loss_bbox", "loss_giou", "loss_ce"):
        assert l2[name].item() == pytest.approx(l1[name].item(), rel=1e-5), name
    assert l1["loss_bbox"].item() == pytest.approx(0.05 * 4, rel=1e-4)  # 4 coordinates off by 0.05, per mask


def test_reproducible_with_a_generator_and_weighted_total():
    targets = [make_targets(), make_targets()]
    out = random_outputs()
    crit = criterion(aux_importance_sampling=True)
    a = crit(out, targets, generator=gen(7))
    b = crit(out, targets, generator=gen(7))
    c = crit(out, targets, generator=gen(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in ("loss_mask", "loss_aux_mask"))
    total = crit.weighted_total(a)
    assert total.item() == pytest.approx(sum(DEFAULT_WEIGHTS[k] * v.item() for k, v in a.items()), rel=1e-5)
    uniform = criterion(aux_importance_sampling=False)(out, targets, generator=gen(7))
    assert set(uniform) == ALL_TERMS and all(torch.isfinite(v) for v in uniform.values())


def test_dense_aux_terms_cover_every_pixel_and_every_class_channel():
    """Class-bound matching: aux BCE on every pixel of every channel (absent classes against an empty mask), Dice
    on every pixel of the present classes' channels."""
    from masksam_core.training.matcher import ClassBoundMatcher

    targets = [make_targets(64)]
    n_q = C + 2  # two queries beyond the classes, never matched
    present = targets[0]["labels"].tolist()
    out = random_outputs(s_n=1, n_q=n_q)
    aux_only = {k: out[k] for k in ("aux_mask_logits", "aux_boxes")}
    dense = SetCriterion(C, matcher=ClassBoundMatcher(), num_points=500, dense_aux=True)
    losses = dense(aux_only, targets, generator=gen())
    # by hand: BCE averaged per mask over all pixels, summed over all N channels; Dice over the present channels
    logits = out["aux_mask_logits"].detach()[0]
    target = torch.zeros_like(logits)
    for j, c in enumerate(present):
        target[c] = targets[0]["masks"][j]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2)).sum()
    p = logits[present].sigmoid().flatten(1)
    t = target[present].flatten(1)
    dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum()
    k = len(present)
    assert losses["loss_aux_mask"].item() == pytest.approx(bce.item() / k, rel=1e-5)
    assert losses["loss_aux_dice"].item() == pytest.approx(dice.item() / k, rel=1e-5)
    losses["loss_aux_mask"].backward()
    grad = out["aux_mask_logits"].grad[0]
    assert all(grad[q].abs().sum() > 0 for q in range(n_q))  # absent channels are trained too
    # a perfect semantic prediction (every channel, absent ones empty) costs almost nothing
    perfect = {"aux_mask_logits": (target * 60 - 30)[None], "aux_boxes": aux_only["aux_boxes"].detach()}
    best = dense(perfect, targets, generator=gen())
    assert best["loss_aux_mask"].item() < 1e-6 and best["loss_aux_dice"].item() < 1e-3
    # the box terms do not depend on the mode
    plain = SetCriterion(C, matcher=ClassBoundMatcher(), num_points=500)
    lp = plain(aux_only, targets, generator=gen())
    for name in ("loss_bbox", "loss_giou"):
        assert losses[name].item() == pytest.approx(lp[name].item()), name


def test_balanced_dense_aux_bce_weighs_organ_and_background_halves():
    """aux_bce="balanced": a matched channel's BCE is the mean of its organ-pixel and background-pixel averages,
    an absent class's channel keeps the plain mean; Dice and the box terms are those of the plain mode. A small
    organ that the channel misses costs far more than under the plain mean."""
    from masksam_core.training.matcher import ClassBoundMatcher

    targets = [make_targets(64)]
    n_q = C + 2
    present = targets[0]["labels"].tolist()
    out = random_outputs(s_n=1, n_q=n_q)
    aux_only = {k: out[k] for k in ("aux_mask_logits", "aux_boxes")}
    balanced = SetCriterion(C, matcher=ClassBoundMatcher(), num_points=500, dense_aux=True, aux_bce="balanced")
    plain = SetCriterion(C, matcher=ClassBoundMatcher(), num_points=500, dense_aux=True)
    losses, reference = balanced(aux_only, targets, generator=gen()), plain(aux_only, targets, generator=gen())
    logits = out["aux_mask_logits"].detach()[0]
    target = torch.zeros_like(logits)
    for j, c in enumerate(present):
        target[c] = targets[0]["masks"][j]
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = 0.0
    for q in range(n_q):
        pos, neg = target[q] > 0, target[q] == 0
        if q in present:
            assert 0 < pos.sum() < pos.numel()
            expected += 0.5 * (per_pixel[q][pos].mean() + per_pixel[q][neg].mean()).item()
        else:
            expected += per_pixel[q].mean().item()
    k = len(present)
    assert losses["loss_aux_mask"].item() == pytest.approx(expected / k, rel=1e-5)
    for name in ("loss_aux_dice", "loss_bbox", "loss_giou"):
        assert losses[name].item() == pytest.approx(reference[name].item(), rel=1e-6), name
    # a 2x2 organ in a 64x64 slice, predicted empty: the balanced BCE sees the miss, the plain mean hardly does
    small = {"labels": torch.tensor([0]), "masks": torch.zeros(1, 64, 64)}
    small["masks"][0, 30:32, 30:32] = 1
    small["boxes"] = torch.tensor([[30 / 64, 30 / 64, 32 / 64, 32 / 64]])
    empty = {"aux_mask_logits": torch.full((1, n_q, 64, 64), -10.0), "aux_boxes": aux_only["aux_boxes"].detach()}
    miss_balanced = balanced(empty, [small], generator=gen())["loss_aux_mask"].item()
    miss_plain = plain(empty, [small], generator=gen())["loss_aux_mask"].item()
    assert miss_balanced == pytest.approx(0.5 * 10, rel=1e-2) and miss_plain < 0.05
    with pytest.raises(ValueError, match="aux_bce"):
        SetCriterion(C, aux_bce="weighted")
