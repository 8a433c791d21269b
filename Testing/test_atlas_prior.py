"""The atlas prior: stored atlases, registration onto a new scan, prompts from the registered organs, the fallback
when registration fails, and the modality check.

Registration is tested on the real CT (s1; skipped when absent) against a strongly deformed, re-scanned and cropped
copy of it (``evaluation/proxy.py``), where the true labels are known: organs must land on the right side and in
the right slice range. The engine's use of the prior is tested with a tiny random-weight backbone.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from masksam_core.atlas.modality import guess_modality, modality_warning
from masksam_core.atlas.prior import build_prior, crop_slab, fill_absent_slices, fuse_votes, slab_prompts
from masksam_core.atlas.registration import assess, register, search_z_offset, warp_labels
from masksam_core.atlas.store import Atlas, make_case, read_atlas, write_atlas
from masksam_core.errors import MaskSAMWarning, ModelError
from synthetic_data import make_case as synthetic_case

ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6, "aorta": 52,
          "inferior_vena_cava": 63}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


# ---------------------------------------------------------------------------------------------- prompts
def test_slab_prompts_give_each_class_its_box_on_the_slices_that_hold_it():
    labels = np.zeros((3, 32, 32), np.uint8)
    labels[0, 4:10, 6:20] = 2  # class 2 on slice 0: rows 4-9, columns 6-19
    labels[1, 20:22, 20:22] = 2  # 4 pixels: below the minimum area
    labels[2, 0:32, 0:5] = 1
    out = slab_prompts(labels, num_queries=4, pad_px=2.0, min_area=10)
    present, boxes, masks = out["present"], out["boxes"], out["masks"]
    assert present.shape == (3, 4) and boxes.shape == (3, 4, 4) and masks.shape == (3, 4, 32, 32)
    assert present[:, 0].sum() == 0  # the background's query never
    assert present[0].tolist() == [False, False, True, False]
    assert present[1].tolist() == [False, False, False, False]
    assert present[2].tolist() == [False, True, False, False]
    # xyxy, normalised, padded by 2 px and clamped to the canvas
    assert torch.allclose(boxes[0, 2] * 32, torch.tensor([4.0, 2.0, 22.0, 12.0]))
    assert torch.allclose(boxes[2, 1] * 32, torch.tensor([0.0, 0.0, 7.0, 32.0]))
    assert masks[0, 2].sum() == 6 * 14 and masks[0, 2, 4, 6] == 1 and masks[0, 0].sum() == 0


def test_absent_slices_take_the_nearest_present_slices_box():
    boxes = torch.zeros(1, 4, 2, 4)
    present = torch.zeros(1, 4, 2, dtype=torch.bool)
    boxes[0, 1, 1] = torch.tensor([0.1, 0.1, 0.2, 0.2])
    boxes[0, 3, 1] = torch.tensor([0.5, 0.5, 0.6, 0.6])
    present[0, 1, 1] = present[0, 3, 1] = True
    out = fill_absent_slices(boxes, present)
    assert torch.equal(out[0, 0, 1], boxes[0, 1, 1]) and torch.equal(out[0, 2, 1], boxes[0, 1, 1])
    assert torch.equal(out[0, 3, 1], boxes[0, 3, 1]) and torch.equal(out[0, :, 0], boxes[0, :, 0])


def test_crop_slab_lays_the_prior_out_as_the_engine_lays_out_the_image():
    labels = np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 6, 7)
    out = crop_slab(labels, z0=3, depth=4, y0=0, x0=0, size=8, offset=(1, 0))
    assert out.shape == (4, 8, 8)
    assert np.array_equal(out[:2, 1:7, :7], labels[3:5])  # two slices left, centred rows
    assert out[2:].sum() == 0 and out[:, 0].sum() == 0


def test_majority_vote_of_several_atlases():
    a = np.array([1, 1, 2, 0], np.uint8)
    b = np.array([1, 2, 2, 0], np.uint8)
    c = np.array([0, 2, 3, 3], np.uint8)
    assert fuse_votes([a, b, c], 3).tolist() == [1, 2, 2, 0]
    assert fuse_votes([a], 3) is a


def test_blending_keeps_the_prior_inside_removes_far_outside_and_lets_sam_decide_at_the_edge():
    from masksam_core.inference.engine import blend_prior

    prior = np.zeros((1, 1, 40), np.uint8)
    prior[0, 0, 10:30] = 1
    probs = np.zeros((2, 1, 1, 40), np.float32)
    probs[0] = 0.5  # the background threshold
    probs[1, 0, 0, 10:30] = 0.1  # SAM is unsure inside the registered organ...
    probs[1, 0, 0, 5:9] = 0.95  # ...and finds it a little outside the prior (x 5-8) and far outside (x 38)
    probs[1, 0, 0, 38] = 0.95
    blend_prior(probs, prior, 0.5, np.array([0.0, 0.0, 2.0]))
    organ = probs[1, 0, 0] > probs[0, 0, 0]  # with w = 0.5: organ where SAM's score and the prior's sum over 1
    assert organ[14:26].all()  # inside the registered organ, although SAM was unsure there
    assert organ[8] and not organ[5] and not organ[38]  # next to it SAM decides; far away the prior says no
    assert np.allclose(probs[0], 0.5)


# ---------------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tiny_model():
    from masksam_core.model.masksam import MaskSAM, MaskSAMConfig
    from tiny_backbones import tiny_tinyvit_backbone

    torch.manual_seed(0)
    return MaskSAM(tiny_tinyvit_backbone(), MaskSAMConfig(num_classes=4, slab_depth=2, num_queries=4)).eval()


def test_the_prior_decides_which_queries_are_decoded_with_which_boxes(tiny_model):
    model = tiny_model
    s = model.input_size
    labels = np.zeros((2, s, s), np.uint8)
    labels[0, 10:30, 12:40] = 3  # class 3 on slice 0 only
    prompts = slab_prompts(labels, 4, pad_px=0.0, min_area=1)
    prior = {k: v[None] for k, v in prompts.items()}
    prior["mask_prompt"] = "prior"
    seen = {}

    def spy(embeddings, item_embedding, slice_index, sparse, mask_prompts, aux_tokens):
        seen["items"] = item_embedding.tolist()
        seen["mask_sum"] = float(mask_prompts.sum())
        return model.decode_items(embeddings, item_embedding, slice_index, sparse, mask_prompts, aux_tokens)

    slab = torch.randn(1, 1, 2, s, s)
    with torch.inference_mode():
        stem = model.apply_stem(slab)
        feats = model.encode(stem)
        out = model.forward_features(feats, stem, decode=None, decoder=spy, prior=prior)
        ref = model.forward_features(feats, stem, decode=None)
    # only query 3 was decoded, on both slices of the slab (the depth adapters need them), and only slice 0 is kept
    assert seen["items"] == [0, 1]
    assert out["decoded"].tolist() == [[False, False, False, True], [False, False, False, False]]
    assert torch.allclose(out["prompt_boxes"][0, 3] * s, torch.tensor([12.0, 10.0, 40.0, 30.0]))
    assert torch.allclose(out["prompt_boxes"][1, 3], out["prompt_boxes"][0, 3])  # slice 1: the nearest slice's box
    assert seen["mask_sum"] > 0  # the prior's mask is SAM's mask prompt
    assert not torch.equal(out["pred_masks"], ref["pred_masks"])  # the prior is not ignored
    # under "class": "prior" the decoded query is class 3 whatever the class head says
    prior["class"] = "prior"
    with torch.inference_mode():
        forced = model.forward_features(feats, stem, decode=None, prior=prior)
    assert int(forced["pred_logits"][0, 3].argmax()) == 3
    assert int(forced["pred_logits"][0, 0].argmax()) == 4  # not decoded: no object


# ---------------------------------------------------------------------------------------------- store and card
def _synthetic_atlas_case(seed=0):
    image, label = synthetic_case(seed)
    return make_case(f"case{seed}", image, label, "CT", "synthetic", "CC0")


def test_atlas_round_trip_and_class_set_check(tmp_path):
    case = _synthetic_atlas_case()
    assert case.image.GetPixelID() == sitk.sitkInt16 and case.labels.GetPixelID() == sitk.sitkUInt8
    assert case.image.GetSpacing() == (3.0, 3.0, 3.0) and case.image.GetSize() == case.labels.GetSize()
    record = write_atlas(tmp_path, Atlas([case]))
    assert record["cases"] == [{"id": "case0", "modality": "CT", "source": "synthetic", "licence": "CC0"}]
    back = read_atlas(tmp_path, num_classes=3)
    assert [c.case_id for c in back.cases] == ["case0"]
    assert np.array_equal(sitk.GetArrayFromImage(back.cases[0].labels), sitk.GetArrayFromImage(case.labels))
    with pytest.raises(ModelError, match="another class set"):
        read_atlas(tmp_path, num_classes=2)
    assert read_atlas(tmp_path / "nothing") is None
    (tmp_path / "atlas" / "atlas.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        read_atlas(tmp_path)


def test_card_records_the_atlas_and_the_modalities(tmp_path):
    from masksam_core.model.card import ModelCard

    folder = Path(__file__).resolve().parents[1] / "masksam_core" / "models" / "default"
    data = json.loads((folder / "model.json").read_text())
    data["atlas"] = {"cases": [{"id": "x", "source": "s", "licence": "Apache-2.0"}]}
    data["modalities"] = ["ct"]
    card = ModelCard.from_dict(data)
    assert card.modalities == ["CT"] and card.to_dict()["atlas"] == data["atlas"]
    data.pop("modalities")
    assert ModelCard.from_dict(data).modalities == ["CT"]  # told by the CT normalisation
    from masksam_core.model.card_text import card_markdown

    text = card_markdown(card)
    assert "## Atlas" in text and "`x` (?): s; licence Apache-2.0" in text and "Trained on: CT." in text
    with pytest.raises(ModelError, match="modalities"):
        ModelCard.from_dict({**data, "modalities": "CT"})
    with pytest.raises(ModelError, match="atlas"):
        ModelCard.from_dict({**data, "atlas": {"cases": "x"}})


# ---------------------------------------------------------------------------------------------- modality
def test_modality_is_told_by_the_dicom_tag_or_the_intensities():
    ct, _ = synthetic_case(0)
    assert guess_modality(ct) == ("CT", "intensities")
    mr = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 800, (10, 20, 20)).astype(np.float32))
    assert guess_modality(mr) == ("MR", "intensities")
    # a CT cropped inside the body (no air) still holds fat: CT, not MR
    fat_and_tissue = np.where(np.random.default_rng(1).random((10, 20, 20)) < 0.2, -100.0, 40.0)
    assert guess_modality(sitk.GetImageFromArray(fat_and_tissue.astype(np.float32)))[0] == "CT"
    tagged = sitk.Image(ct)
    tagged.SetMetaData("0008|0060", "MR")
    assert guess_modality(tagged) == ("MR", "DICOM tag")
    modality, warning = modality_warning(mr, ["CT"])
    assert modality == "MR" and "trained on CT" in warning
    assert modality_warning(ct, ["CT"]) == ("CT", None)


def test_an_mr_scan_given_to_a_ct_model_warns_in_the_api_and_the_sidecar(tmp_path, monkeypatch):
    from masksam_core.inference import engine
    from masksam_core.model.card import ModelCard
    from tiny_backbones import tiny_tinyvit_backbone
    from masksam_core.model.masksam import MaskSAM

    folder = Path(__file__).resolve().parents[1] / "masksam_core" / "models" / "default"
    card = ModelCard.from_dict(json.loads((folder / "model.json").read_text()))
    card.preprocessing["target_spacing"] = [6.0, 6.0, 6.0]
    card.architecture.slab_depth = 2
    model = MaskSAM(tiny_tinyvit_backbone(), card.architecture).eval()
    model.input_size = 64
    rng = np.random.default_rng(0)
    mr = sitk.GetImageFromArray(rng.uniform(0, 800, (8, 40, 40)).astype(np.float32))
    mr.SetSpacing((6.0, 6.0, 6.0))
    with pytest.warns(MaskSAMWarning, match="looks like MR"):
        _, sidecar = engine.segment(mr, model, card, engine.InferenceOptions(runtime="torch"))
    assert sidecar["modality"] == "MR" and any("trained on CT" in w for w in sidecar["warnings"])


def test_an_mr_given_to_a_ct_model_is_scaled_by_its_percentiles_not_a_ct_window():
    """A CT window on MR values clips the whole body to one grey; the MR is scaled by its 0.5-99.5 percentiles
    instead (LiteMedSAM's MR convention), a CT keeps the card's window, and a card trained on MR keeps its own."""
    from masksam_core.inference.preprocess import normalization_for, prepare_volume
    from masksam_core.model.card import ModelCard

    folder = Path(__file__).resolve().parents[1] / "masksam_core" / "models" / "default"
    card = ModelCard.from_dict(json.loads((folder / "model.json").read_text()))
    assert normalization_for(card, "CT") == card.normalization
    assert normalization_for(card, "MR")["mode"] == "mr_percentile"
    mr_card = ModelCard.from_dict({**json.loads((folder / "model.json").read_text()), "modalities": ["CT", "MR"]})
    assert normalization_for(mr_card, "MR") == mr_card.normalization
    rng = np.random.default_rng(0)
    mr = sitk.GetImageFromArray(rng.uniform(0, 800, (8, 40, 40)).astype(np.float32))
    mr.SetSpacing((6.0, 6.0, 6.0))
    volume = prepare_volume(mr, card, atlas_prior=False)
    assert volume.modality == "MR"
    region = volume.region
    assert region.min() == 0.0 and region.max() == 1.0 and 0.3 < float(np.median(region)) < 0.7  # not clipped
    assert any("trained on CT" in w for w in volume.warnings)


# ---------------------------------------------------------------------------------------------- registration
def test_z_search_finds_where_a_thin_scan_lies_in_the_atlas():
    rng = np.random.default_rng(0)
    atlas = rng.normal(0, 1, (40, 16, 16)).astype(np.float32)
    body = np.ones_like(atlas, bool)
    scan = atlas[23:30] + rng.normal(0, 0.1, (7, 16, 16)).astype(np.float32)
    k, score, overlap = search_z_offset(scan, body[:7], atlas, body)
    assert k == 23 and score > 0.9 and overlap == 7
    long_scan = np.concatenate([rng.normal(0, 1, (10, 16, 16)), atlas, rng.normal(0, 1, (5, 16, 16))])
    k, _, overlap = search_z_offset(long_scan.astype(np.float32), np.ones(long_scan.shape, bool), atlas, body)
    assert k == -10 and overlap == 40  # the scan extends beyond the atlas on both ends


def test_registration_is_refused_when_implausible():
    assert assess({"scales": [1.0, 1.0, 1.0], "coverage": 1.0, "body_dice": 0.9}) == (True, "")
    ok, why = assess({"scales": [0.3, 1.0, 1.0], "coverage": 1.0, "body_dice": 0.9})
    assert not ok and "scaled" in why
    ok, why = assess({"scales": [1.0, 1.0, 1.0], "coverage": 1.0, "body_dice": 0.3})
    assert not ok and "overlaps" in why
    ok, why = assess({"scales": [1.0, 1.0, 1.0], "coverage": 0.0, "body_dice": 0.9})
    assert not ok and "does not overlap" in why


def test_a_scan_without_a_body_gets_no_prior_and_a_warning(tmp_path):
    """A registration that fails (here: nothing but air) must not place organs: the prior is empty, the
    registration implausible, and prepare_volume says the atlas could not be registered."""
    from masksam_core.inference.preprocess import prepare_volume
    from masksam_core.model.card import ModelCard

    case = _synthetic_atlas_case()
    air = sitk.Image([40, 40, 10], sitk.sitkFloat32) - 1000.0
    air.SetSpacing((3.0, 3.0, 3.0))
    prior = build_prior(air, air, Atlas([case]), 3)
    assert prior.labels.sum() == 0 and not prior.registrations[0].plausible
    # through prepare_volume, with a model folder holding the atlas
    folder = tmp_path / "model"
    folder.mkdir()
    default = Path(__file__).resolve().parents[1] / "masksam_core" / "models" / "default" / "model.json"
    data = json.loads(default.read_text())
    data["classes"] = data["classes"][:3]
    data["architecture"]["num_classes"] = 4
    data["atlas"] = write_atlas(folder, Atlas([case]))
    (folder / "model.json").write_text(json.dumps(data))
    card = ModelCard.read(folder)
    body_air = sitk.Image([40, 40, 10], sitk.sitkFloat32) - 1000.0
    body_air.SetSpacing((3.0, 3.0, 3.0))
    volume = prepare_volume(body_air, card)
    assert volume.prior is not None and not any(r.plausible for r in volume.prior.registrations)
    assert any("could not be registered" in w for w in volume.warnings)


def test_synthetic_atlas_registers_onto_another_synthetic_case():
    atlas_case = _synthetic_atlas_case(0)
    image, label = synthetic_case(3)
    reg = register(image, sitk.Cast(atlas_case.image, sitk.sitkFloat32))
    assert reg.plausible, reg.quality
    warped = sitk.GetArrayFromImage(warp_labels(atlas_case.labels, image, reg.transform))
    truth = sitk.GetArrayFromImage(label)
    assert _dice(warped == 1, truth == 1) > 0.6 and _dice(warped == 2, truth == 2) > 0.5
    summary = reg.summary()
    assert summary["plausible"] and len(summary["matrix"]) == 9 and summary["seconds"] >= 0


@pytest.fixture(scope="module")
def s1(totalseg_dir):
    image = sitk.ReadImage(str(totalseg_dir / "s1_ct.nii.gz"), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(totalseg_dir / "s1_labels.nii.gz"))
    return image, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_registration_puts_the_organs_on_the_right_side_and_slices(s1, seed):
    """s1 registered onto a deformed, re-scanned, cropped copy of itself: the organs must overlap their truth,
    the right kidney must lie right of the left one, and the liver's slice range must match."""
    from masksam_core.evaluation.proxy import make_proxy_case

    image, labels = s1
    scan, truth_img, drawn = make_proxy_case(image, labels, seed)
    reg = register(scan, image)
    assert reg.plausible, reg.quality
    warped = sitk.GetArrayFromImage(warp_labels(labels, scan, reg.transform))
    truth = sitk.GetArrayFromImage(truth_img)
    present = [n for n, v in ORGANS.items() if (truth == v).sum() > 500]
    assert len(present) >= 4, drawn
    dice = {n: _dice(warped == ORGANS[n], truth == ORGANS[n]) for n in present}
    assert np.mean(list(dice.values())) > 0.7 and min(dice.values()) > 0.4, dice
    for name in present:
        got = np.nonzero((warped == ORGANS[name]).any(axis=(1, 2)))[0]
        want = np.nonzero((truth == ORGANS[name]).any(axis=(1, 2)))[0]
        overlap = len(set(got) & set(want)) / len(set(want))
        assert overlap > 0.7, (name, got.min(), got.max(), want.min(), want.max())
    if {"kidney_right", "kidney_left"} <= set(present):
        xs = {}
        for n in ("kidney_right", "kidney_left"):
            z, y, x = np.argwhere(warped == ORGANS[n]).mean(axis=0)
            xs[n] = scan.TransformContinuousIndexToPhysicalPoint([float(x), float(y), float(z)])[0]
        # LPS physical coordinates: the patient's left is +x
        assert xs["kidney_right"] < xs["kidney_left"] - 50, xs


def test_the_atlas_registered_onto_itself_lands_on_itself(s1):
    """The subject registered onto itself: organs in place, no scaling (a registration that drifted or mirrored
    the patient fails here)."""
    image, labels = s1
    reg = register(image, image)
    warped = sitk.GetArrayFromImage(warp_labels(labels, image, reg.transform))
    truth = sitk.GetArrayFromImage(labels)
    for name in ("spleen", "liver", "kidney_left", "kidney_right"):
        assert _dice(warped == ORGANS[name], truth == ORGANS[name]) > 0.85, name
    assert reg.quality["scales"][0] > 0.95 and reg.quality["scales"][-1] < 1.05


def test_the_proxy_case_keeps_image_and_labels_aligned(s1):
    from masksam_core.evaluation.proxy import make_proxy_case

    image, labels = s1
    a, la, drawn = make_proxy_case(image, labels, 5)
    b, lb, _ = make_proxy_case(image, labels, 5)
    assert np.array_equal(sitk.GetArrayFromImage(la), sitk.GetArrayFromImage(lb))  # seeded
    assert a.GetSize() == la.GetSize() and a.GetSpacing() == la.GetSpacing()
    arr, lab = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(la)
    # organs sit on soft tissue, not in air
    assert np.median(arr[lab == 5]) > 0 if (lab == 5).any() else True
    assert drawn["fov_z_mm"] <= 336.0 and a.GetSpacing()[2] == drawn["slice_mm"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_proxy_case(image, labels, 6)


def test_training_atlas_adds_the_new_cases_to_the_base_models(tmp_path):
    """Fine-tuning keeps the base atlas and adds its own training cases (a case of the same id replaces the old
    version); at most max_cases are kept, the newest first kept."""
    from masksam_core.data.dataset import discover_dataset, select_classes
    from masksam_core.training.atlas_setup import atlas_for_training
    from synthetic_data import make_nnunet_dataset

    root = make_nnunet_dataset(tmp_path / "Dataset001", n_cases=3)
    spec = discover_dataset(root)
    class_map = select_classes(spec, ["liver", "spleen", "aorta"])
    base = tmp_path / "base"
    write_atlas(base, Atlas([_synthetic_atlas_case(7)]))  # id "case7"
    atlas = atlas_for_training(spec, class_map, ["case00", "case01"], "CT", base, 3, max_cases=3)
    assert [c.case_id for c in atlas.cases] == ["case7", "case00", "case01"]
    lab = sitk.GetArrayFromImage(atlas.cases[1].labels)
    assert set(np.unique(lab)) <= {0, 1, 2, 3} and (lab == 3).any()  # the card's class values
    assert [c.case_id for c in atlas_for_training(spec, class_map, ["case00", "case01"], "CT", base, 3,
                                                  max_cases=2).cases] == ["case00", "case01"]
    write_atlas(base, Atlas([_synthetic_atlas_case(7), make_case("case01", *synthetic_case(9), "CT")]))
    again = atlas_for_training(spec, class_map, ["case01"], "CT", base, 3, max_cases=3)
    assert [c.case_id for c in again.cases] == ["case7", "case01"]
    assert again.cases[1].source.endswith("case01")  # the new version, not the base's


def _mr_like(image: sitk.Image) -> sitk.Image:
    """An MR-like contrast of a CT (non-monotonic in HU, as a T1 would show it: air and bone dark, fat bright,
    soft tissue grey, no values below 0), so that neither CT intensities nor their correlation can match it."""
    hu = sitk.GetArrayFromImage(image)
    mr = np.interp(hu, [-1000, -500, -150, -50, 0, 60, 200, 400, 1500], [0, 10, 800, 700, 250, 330, 300, 80, 40])
    out = sitk.GetImageFromArray(mr.astype(np.float32))
    out.CopyInformation(image)
    return out


def test_a_thin_mr_like_slab_is_registered_at_the_right_height(s1):
    """A 60-mm MR-like slab through the kidneys and the liver, its field of view cutting the body at the sides
    (as in TotalSegmentator's MR example): the z offset across modalities comes from the multi-start similarity
    stage, not from intensities or outlines, which put the atlas's pelvis there before."""
    image, labels = s1
    arr = sitk.GetArrayViewFromImage(labels)
    kidney = np.nonzero((arr == ORGANS["kidney_right"]).any(axis=(1, 2)))[0]
    z_top = int(kidney.max())
    thick = int(round(60.0 / image.GetSpacing()[2]))
    nx = image.GetSize()[0]
    region = (slice(z_top - thick + 1, z_top + 1), slice(None), slice(nx // 8, nx - nx // 8))
    index = [region[2].start, 0, region[0].start]
    size = [region[2].stop - region[2].start, image.GetSize()[1], thick]
    scan = _mr_like(sitk.RegionOfInterest(image, size, index))
    truth = sitk.GetArrayFromImage(sitk.RegionOfInterest(labels, size, index))
    assert guess_modality(scan)[0] == "MR"
    reg = register(scan, image, "MR")
    assert reg.plausible, reg.quality
    warped = sitk.GetArrayFromImage(warp_labels(labels, scan, reg.transform))
    for name in ("liver", "kidney_right", "spleen"):
        assert _dice(warped == ORGANS[name], truth == ORGANS[name]) > 0.6, (name, reg.quality)
    assert len(reg.quality["z_starts_mm"]) >= 2  # several starts were tried
    assert reg.quality["deformable"] and "pseudo-CT" in reg.summary()["method"]


def test_the_pseudo_ct_maps_an_mr_like_contrast_back_to_ct_values(s1):
    """After a good (here: identity) affine, each MR intensity bin takes the CT value of the tissue it holds: the
    pseudo-CT matches the CT inside the body (demons can then run across modalities), the air outside is the
    clamp's floor."""
    from masksam_core.atlas.registration import CT_CLAMP, body_mask, pseudo_ct, to_registration_grid

    image, _ = s1
    ct = to_registration_grid(image)
    mr = to_registration_grid(_mr_like(image))
    ct_arr = np.clip(sitk.GetArrayFromImage(ct), *CT_CLAMP).astype(np.float32)
    ct_img = sitk.GetImageFromArray(ct_arr)
    ct_img.CopyInformation(ct)
    body = body_mask(sitk.GetArrayFromImage(mr), "MR")
    out = sitk.GetArrayFromImage(pseudo_ct(mr, body, ct_img, sitk.AffineTransform(3)))
    err = np.abs(out[body] - ct_arr[body])
    assert np.median(err) < 40 and np.corrcoef(out[body], ct_arr[body])[0, 1] > 0.8, (np.median(err),)
    assert (out[~body] == CT_CLAMP[0]).all()
