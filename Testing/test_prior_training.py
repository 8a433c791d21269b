"""Training the decoder on perturbed atlas priors (``training.prior_perturb``, ``--prior-fraction``).

Would fail if the perturbation did nothing or leaked held-out labels, if a prior step decoded queries the prior does
not hold (or ignored the prior), if the prompt generator learned in a prior step, or if the option did not reach
the batches and the model card.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from masksam_core.atlas.prior import slab_prompts
from masksam_core.errors import MaskSAMError
from masksam_core.training.criterion import prior_mask_losses
from masksam_core.training.prior_perturb import PriorPerturbation, cap_prior, prior_region, training_prior
from synthetic_data import make_nnunet_dataset
from tiny_backbones import tiny_tinyvit_backbone

SPACING = (1.6, 1.6, 3.0)


def _labels(z=10, s=64):
    lab = np.zeros((z, s, s), np.uint8)
    lab[:, 10:30, 8:28] = 1
    lab[2:8, 36:52, 34:56] = 2
    return lab


def test_perturbation_is_seeded_changes_the_organs_and_keeps_their_classes():
    lab = _labels()
    p = PriorPerturbation()
    a = p(lab, SPACING, np.random.default_rng(3))
    b = p(lab, SPACING, np.random.default_rng(3))
    assert a.shape == lab.shape and a.dtype == lab.dtype and np.array_equal(a, b)
    assert set(np.unique(a)) <= {0, 1, 2}
    changed = [not np.array_equal(p(lab, SPACING, np.random.default_rng(k)), lab) for k in range(8)]
    assert all(changed)
    # each kind of error on its own moves the organs; with none of them the prior is the labels
    none = PriorPerturbation(translate_mm=0, rotate_deg=0, scale=0, elastic_mm=0, organ_shift_p=0, morph_p=0,
                             drop_p=0, spurious_p=0)
    assert np.array_equal(none(lab, SPACING, np.random.default_rng(0)), lab)
    dropped = PriorPerturbation(translate_mm=0, rotate_deg=0, scale=0, elastic_mm=0, organ_shift_p=0, morph_p=0,
                                drop_p=1.0, spurious_p=0)
    assert not dropped(lab, SPACING, np.random.default_rng(0)).any()
    shifted = PriorPerturbation(translate_mm=0, rotate_deg=0, scale=0, elastic_mm=0, organ_shift_p=0, morph_p=0,
                                drop_p=0, spurious_p=1.0)(lab, SPACING, np.random.default_rng(1))
    for c in (1, 2):
        moved = shifted == c
        assert moved.sum() and (moved & (lab == c)).sum() < 0.8 * moved.sum()


def test_prior_region_pads_the_ends_and_hides_held_out_slices():
    lab = _labels()
    region = prior_region(lab, z0=-1, depth=4, margin=2, allowed={0, 1, 2, 5})
    assert region.shape == (8, 64, 64)
    assert not region[:3].any()  # z = -3 .. -1: outside the volume
    assert np.array_equal(region[3:6], lab[0:3])  # z = 0, 1, 2: training slices
    assert not region[6:].any()  # z = 3, 4: held out (not allowed)
    prompts = training_prior(region, 2, PriorPerturbation(), SPACING, 4, 5.0, np.random.default_rng(0))
    assert prompts["present"].shape == (4, 4) and prompts["masks"].shape == (4, 4, 64, 64)
    assert not prompts["present"][:, 0].any()  # the background query is never prompted


def test_cap_prior_keeps_at_most_k_queries_per_slab():
    present = torch.zeros(2, 3, 8, dtype=torch.bool)
    present[0, :, 1:7] = True
    present[1, 0, 2] = True
    capped = cap_prior({"present": present, "class": "prior"}, 2, torch.Generator().manual_seed(0))
    assert int(capped["present"][0].any(0).sum()) == 2 and capped["present"][1].equal(present[1])
    assert capped["class"] == "prior" and (capped["present"] <= present).all()


def test_prior_losses_score_the_decoded_pairs_against_the_labels():
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, 2:8, 2:8] = 1
    labels[1] = 255  # an ignored slice: no term
    decoded = torch.zeros(2, 3, dtype=torch.bool)
    decoded[0, 1] = decoded[0, 2] = decoded[1, 1] = True  # class 2 is spurious on slice 0
    good = torch.full((2, 3, 16, 16), -20.0)
    good[0, 1][labels[0] == 1] = 20.0
    low = prior_mask_losses(good, decoded, labels)
    assert low["loss_mask"] < 1e-3 and low["loss_dice"] < 0.05
    wrong = good.clone()
    wrong[0, 2] = 20.0  # the spurious organ painted everywhere: penalised
    high = prior_mask_losses(wrong, decoded, labels)
    assert high["loss_mask"] > 5 and high["loss_dice"] > 0.4
    none = prior_mask_losses(good.requires_grad_(), torch.zeros(2, 3, dtype=torch.bool), labels)
    assert float(none["loss_mask"]) == 0 and not none["loss_mask"].requires_grad


def _tiny_trainer(max_decoded=2):
    from masksam_core.model.masksam import MaskSAM
    from masksam_core.model.recipes import architecture_for_recipe
    from masksam_core.training.loop import LoopConfig, Trainer

    torch.manual_seed(0)
    model = MaskSAM(tiny_tinyvit_backbone(), architecture_for_recipe("cpu", 3, 2, 4, None))
    cfg = LoopConfig(max_steps=30, steps_per_epoch=30, lr=3e-3, matching="class_bound", max_decoded=max_decoded)
    return model, Trainer(model, cfg, torch.device("cpu"), None)


def _prior_batch(model, label):
    from masksam_core.training.loop import Batch

    slab = torch.randn(1, 1, 2, 64, 64)
    slab[0, 0][label[0] == 1] += 2.0
    slab[0, 0][label[0] == 2] -= 2.0
    with torch.no_grad():
        features = model.encode(model.apply_stem(slab))
    noisy = np.roll(label[0].numpy().astype(np.uint8), 3, axis=2)  # the prior: the organs 4.8 mm to the left
    prior = {k: v[None] for k, v in slab_prompts(noisy, 4, 2.0).items()}
    prior.update({"mask_prompt": "prior", "class": "prior"})
    return Batch(slab=slab, label=label, features=features, prior=prior)


def test_a_prior_step_decodes_the_prior_organs_only_and_trains_the_decoder_not_the_prompt_generator():
    model, trainer = _tiny_trainer()
    label = torch.zeros(1, 2, 64, 64, dtype=torch.long)
    label[0, :, 8:24, 8:40] = 1
    label[0, 1, 40:56, 16:48] = 2
    batch = _prior_batch(model, label)
    seen = []
    decode_items = model.decode_items

    def counting(embeddings, item_embedding, *rest):
        seen.append(int(item_embedding.shape[0]))
        return decode_items(embeddings, item_embedding, *rest)

    model.decode_items = counting
    pg_before = {k: v.clone() for k, v in model.prompt_generator.state_dict().items()}
    adapters_before = [p.clone() for n, p in model.named_parameters() if p.requires_grad and "adapter" in n]
    assert adapters_before
    gen = torch.Generator().manual_seed(0)
    rows = [trainer.train_step(batch, gen) for _ in range(12)]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert "loss_aux_mask" not in rows[0] and "loss_ce" not in rows[0]  # mask terms of the prior's queries only
    assert rows[-1]["loss"] < rows[0]["loss"]
    # the prior holds classes 1 and 2 (query 1 on both slices, query 2 on one): 2 queries x 2 slices per step
    assert set(seen) == {4}
    for k, v in model.prompt_generator.state_dict().items():
        assert torch.equal(v, pg_before[k]), k
    after = [p for n, p in model.named_parameters() if p.requires_grad and "adapter" in n]
    assert any(not torch.equal(a, b) for a, b in zip(adapters_before, after))
    # validation with the prior scores the prior-prompted decoding
    scores = trainer.validate(iter([batch]), decode=True)
    assert set(scores["dice"]) == {1, 2}


def test_without_a_prior_the_step_is_the_usual_matched_step():
    model, trainer = _tiny_trainer()
    label = torch.zeros(1, 2, 64, 64, dtype=torch.long)
    label[0, :, 8:24, 8:40] = 1
    batch = _prior_batch(model, label)
    batch.prior = None
    row = trainer.train_step(batch, torch.Generator().manual_seed(0))
    assert "loss_aux_mask" in row and "loss_ce" in row


def test_cached_source_attaches_priors_to_the_chosen_share_and_to_validation():
    from masksam_core.training.feature_cache import CachedVolume
    from masksam_core.training.sources import CachedSource, PriorTraining

    lab = _labels(z=12)
    vol = CachedVolume("c__c0", "c", 0, np.zeros((12, 64, 64), np.float16), lab,
                       [np.zeros((12, 2, 4, 4), np.float16)])
    prior = PriorTraining(fraction=0.5, num_queries=4, pad_px=2.0, spacing=SPACING)
    source = CachedSource([vol], 4, 0.0, train_z={"c": set(range(8))}, val_z={"c": {9, 10}}, prior=prior)
    rng, gen = np.random.default_rng(0), torch.Generator()
    batches = [source.train_batch(rng, gen) for _ in range(40)]
    share = np.mean([b.prior is not None for b in batches])
    assert 0.3 < share < 0.7
    with_prior = next(b for b in batches if b.prior is not None)
    assert with_prior.prior["present"].shape == (1, 4, 4) and with_prior.prior["class"] == "prior"
    val_a = [b.prior["masks"] for b in source.val_batches()]
    val_b = [b.prior["masks"] for b in source.val_batches()]
    assert val_a and all(torch.equal(a, b) for a, b in zip(val_a, val_b))
    plain = CachedSource([vol], 4, 0.0, train_z={"c": set(range(8))}, val_z={"c": {9, 10}})
    assert all(b.prior is None for b in plain.val_batches())


@pytest.fixture()
def tiny(monkeypatch):
    import masksam_core.model.folder as folder
    import masksam_core.training.runner as runner

    monkeypatch.setattr(runner, "load_backbone", lambda *a, **k: tiny_tinyvit_backbone())
    monkeypatch.setattr(folder, "load_backbone", lambda *a, **k: tiny_tinyvit_backbone())


def test_prior_fraction_trains_end_to_end_and_is_recorded(tiny, tmp_path):
    from masksam_core.train import main

    data = make_nnunet_dataset(tmp_path / "Dataset001", n_cases=2)
    out = tmp_path / "model"
    common = ["--data", str(data), "--classes", "liver,spleen,aorta", "--slab-depth", "2", "--num-queries", "6",
              "--feature-copies", "1", "--spacing", "3,3,6", "--progress", "json", "--val-cases", "case01",
              "--precision", "fp32", "--atlas-cases", "0"]
    assert main(["--out", str(out), "--max-steps", "8", "--steps-per-epoch", "8", "--prompt-fraction", "0.25",
                 "--prior-fraction", "1"] + common) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["prior_fraction"] == 1.0
    import csv

    rows = list(csv.DictReader((out / "train_log.csv").open()))
    steps = [r for r in rows if r["loss"]]
    decoder_steps = [r for r in steps if int(r["step"]) > 2]
    assert decoder_steps and all(not r.get("loss_aux_mask") for r in decoder_steps)  # every decoder step: prior
    assert all(r.get("loss_aux_mask") for r in steps if int(r["step"]) <= 2)  # prompt-generator steps: as before
    with pytest.raises(MaskSAMError, match="prior-fraction"):
        main(["--out", str(tmp_path / "m2"), "--max-steps", "4", "--prior-fraction", "0.5", "--matching",
              "hungarian"] + common)
    with pytest.raises(MaskSAMError, match="prior-fraction"):
        main(["--out", str(tmp_path / "m3"), "--max-steps", "4", "--prior-fraction", "1.5"] + common)


def test_a_prior_with_nothing_to_decode_never_breaks_a_step():
    """A slab whose prior holds no organ takes the usual step; one whose prior organs lie only on unlabelled
    slices has nothing to learn from and makes no update."""
    model, trainer = _tiny_trainer()
    label = torch.zeros(1, 2, 64, 64, dtype=torch.long)
    label[0, :, 8:24, 8:40] = 1
    batch = _prior_batch(model, label)
    empty = dict(batch.prior, present=torch.zeros_like(batch.prior["present"]))
    batch.prior = empty
    row = trainer.train_step(batch, torch.Generator().manual_seed(0))
    assert "loss_aux_mask" in row
    batch = _prior_batch(model, label)
    batch.label = torch.full_like(label, 255)
    before = [p.clone() for p in model.parameters() if p.requires_grad]
    row = trainer.train_step(batch, torch.Generator().manual_seed(0))
    assert row["loss"] == 0 and trainer.step == 2
    assert all(torch.equal(a, b) for a, b in zip(before, [p for p in model.parameters() if p.requires_grad]))


def test_a_step_with_nothing_to_learn_still_joins_the_gradient_averaging():
    """With several processes, one whose step has no gradient must still take part in the all-reduce (else the
    others wait for ever) and apply the averaged update like the rest, so that the weights stay identical."""
    model, trainer = _tiny_trainer()
    label = torch.zeros(1, 2, 64, 64, dtype=torch.long)
    label[0, :, 8:24, 8:40] = 1
    batch = _prior_batch(model, label)
    batch.label = torch.full_like(label, 255)  # the prior's organs on unlabelled slices: no gradient here
    calls = []
    params = [p for p in model.parameters() if p.requires_grad]

    def averaged_from_the_others():  # stands in for average_gradients: the other process's gradients arrive
        calls.append(1)
        for p in params:
            p.grad = torch.full_like(p, 1e-3)

    before = [p.clone() for p in params]
    row = trainer.train_step(batch, torch.Generator().manual_seed(0), averaged_from_the_others)
    assert row["loss"] == 0 and calls == [1]
    assert any(not torch.equal(a, b) for a, b in zip(before, params))  # the averaged update was applied
