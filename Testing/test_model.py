"""The MaskSAM network: shapes, adapters, freezing, checkpoints and model folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from masksam_core.errors import ModelError
from masksam_core.model import MaskSAM, MaskSAMConfig, semantic_probabilities
from masksam_core.model.backbones import adapt_sam_state_dict, load_litemedsam_backbone, load_sam_backbone
from masksam_core.model.card import ModelCard, make_card
from masksam_core.model.folder import load_model, save_model_folder
from masksam_core.model.recipes import architecture_for_recipe
from tiny_backbones import TINY_VARIANT, tiny_sam_parts, tiny_tinyvit_backbone, tiny_vit_backbone

FAMILIES = {"vit": lambda: tiny_vit_backbone(64), "tinyvit": tiny_tinyvit_backbone}


def _reference_encoder(backbone, x):
    """The pretrained encoder's own forward (TinyViT's hard-codes a 64x64 grid, so the tiny one is unrolled)."""
    enc = backbone.image_encoder
    if backbone.family == "vit" or backbone.input_size == 256:
        return enc(x)
    h = enc.patch_embed(x)
    for layer in enc.layers:
        h = layer(h)
    r = enc.layers[-1].input_resolution
    return enc.neck(h.view(h.shape[0], r[0], r[1], -1).permute(0, 3, 1, 2))


def _assert_same_to_float_rounding(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """The encoder computes its backbone's function, not bit for bit: TinyViT's window attention scales the queries
    instead of the scores (model/window_attention.py), which rounds differently in float32 (up to 3e-6 of the
    range; a trained adapter changes the output by orders of magnitude more)."""
    assert ours.shape == reference.shape
    err = float((ours - reference).abs().max() / reference.abs().max())
    assert err < 1e-5, err


def _config(family: str, recipe: str = "gpu", depth: int = 4, queries: int = 5, classes: int = 4) -> MaskSAMConfig:
    stages = 5 if family == "vit" else 3
    return architecture_for_recipe(recipe, classes, depth, queries, prompt_channels=[8] * stages)


@pytest.mark.parametrize("family", ["vit", "tinyvit"])
@pytest.mark.parametrize("depth,batch", [(1, 1), (4, 2), (8, 1)])
def test_output_shapes(family, depth, batch):
    torch.manual_seed(0)
    backbone = FAMILIES[family]()
    model = MaskSAM(backbone, _config(family, "gpu", depth=depth)).eval()
    s = backbone.input_size
    with torch.no_grad():
        out = model(torch.randn(batch, 1, depth, s, s))
    gd, n = batch * depth, 5
    assert out["aux_mask_logits"].shape == (gd, n, s, s)
    assert out["aux_boxes"].shape == (gd, n, 4)
    assert out["pred_logits"].shape == (gd, n, 5)  # C + 1 with C = 4
    assert out["pred_masks"].shape == (gd, n, s, s)  # refinement head brings masks to the input size
    assert out["decoded"].all()
    boxes = out["aux_boxes"]
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
    assert boxes.min() >= 0 and boxes.max() <= 1
    sem = semantic_probabilities(out)
    assert sem.shape == (gd, 4, s, s)
    assert torch.isfinite(sem).all()


@pytest.mark.parametrize("family", ["vit", "tinyvit"])
@pytest.mark.parametrize("mode", ["unpartitioned", "official"])
def test_zero_initialised_adapters_reproduce_the_backbone(family, mode):
    backbone = FAMILIES[family]()
    config = _config(family, "gpu", depth=4)
    config.adapter_mode = mode
    model = MaskSAM(backbone, config).eval()
    x = torch.randn(8, 3, backbone.input_size, backbone.input_size)
    with torch.no_grad():
        neck = model.encoder(x)[0]
        reference = _reference_encoder(backbone, x)
    _assert_same_to_float_rounding(neck, reference)


def test_adapters_change_the_output_once_trained():
    backbone = tiny_vit_backbone(64)
    model = MaskSAM(backbone, _config("vit", "gpu", depth=4)).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        for p in model.encoder.adapters.parameters():
            p.normal_(0, 0.1)
        assert not torch.allclose(model.encoder(x)[0], backbone.image_encoder(x))


def test_depth_adapter_mixes_neighbouring_slices_only_within_a_slab():
    from masksam_core.model.adapters import DepthConvAdapter

    torch.manual_seed(0)
    ad = DepthConvAdapter(8, depth=4)
    torch.nn.init.normal_(ad.up.weight)
    x = torch.randn(8, 3, 3, 8)  # two slabs of 4 slices
    base = ad(x)
    x2 = x.clone()
    x2[1] += 1.0  # change slice 1 of slab 0
    changed = (ad(x2) - base).abs().flatten(1).amax(1) > 1e-6
    assert changed[:4].tolist() == [True, True, True, False]  # 3x3x3 kernel: slices 0..2 see slice 1
    assert not changed[4:].any()  # the other slab is untouched


@pytest.mark.parametrize("family", ["vit", "tinyvit"])
def test_frozen_parameters_stay_bit_identical_after_a_step(family):
    torch.manual_seed(0)
    backbone = FAMILIES[family]()
    model = MaskSAM(backbone, _config(family, "gpu", depth=2)).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen_buffers = {n: b.detach().clone() for m in model.frozen_modules() for n, b in m.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    assert all(not m.training for m in model.frozen_modules())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    s = backbone.input_size
    out = model(torch.randn(1, 1, 2, s, s))
    loss = out["pred_masks"].mean() + out["aux_mask_logits"].mean() + out["pred_logits"].mean() + out["aux_boxes"].mean()
    loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(torch.equal(b, frozen_buffers[n]) for m in model.frozen_modules() for n, b in m.named_buffers())
    moved = [n for n, v in trainable.items() if not torch.equal(params[n], v)]
    assert any(n.startswith("prompt_generator") for n in moved)
    assert any(n.startswith("decoder.class_head") for n in moved)
    assert any("encoder.adapters" in n for n in moved)


def test_decoding_a_subset_matches_decoding_everything():
    torch.manual_seed(0)
    backbone = tiny_vit_backbone(64)
    model = MaskSAM(backbone, _config("vit", "cpu", depth=4)).eval()
    slab = torch.randn(2, 1, 4, 64, 64)
    decode = torch.zeros(2, 5, dtype=torch.bool)
    decode[0, 1] = decode[1, 3] = decode[1, 4] = True
    with torch.no_grad():
        full = model(slab)
        part = model(slab, decode=decode)
    sel = part["decoded"]
    assert sel.sum() == 3 * 4
    assert torch.allclose(full["pred_masks"][sel], part["pred_masks"][sel], atol=1e-5)
    assert torch.allclose(full["pred_logits"][sel], part["pred_logits"][sel], atol=1e-5)
    assert (part["pred_logits"][~sel].argmax(-1) == 4).all()  # undecoded -> no object


def test_decoding_in_chunks_matches_one_call(monkeypatch):
    """Inference decodes in chunks of whole (slab, query) groups, gathering each chunk's inputs on its own."""
    torch.manual_seed(0)
    model = MaskSAM(tiny_vit_backbone(64), _config("vit", "cpu", depth=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # non-trivial adapters, so that the grouping of slices matters
                p.add_(torch.randn_like(p) * 0.05)
    slab = torch.randn(2, 1, 4, 64, 64)
    calls = []
    def counting_decoder(*args):
        calls.append(args[1].shape[0])  # items: (embeddings, item_embedding, ...)
        return model.decode_items(*args)

    with torch.no_grad():
        whole = model(slab)  # 2 slabs x 5 queries x 4 slices = 40 items, in 2 chunks of 32 and 8
        monkeypatch.setattr(MaskSAM, "decode_chunk", lambda self, depth: depth)
        stem = model.apply_stem(slab)
        chunked = model.forward_features(model.encode(stem), stem, decoder=counting_decoder)
    assert calls == [4] * 10
    for key in ("pred_masks", "pred_logits"):
        assert torch.allclose(whole[key], chunked[key], atol=1e-5), key


def test_slab_depth_must_match_the_card():
    model = MaskSAM(tiny_vit_backbone(64), _config("vit", "cpu", depth=4))
    with pytest.raises(ModelError, match="slab depth 3 differs"):
        model(torch.zeros(1, 1, 3, 64, 64))


def test_cpu_recipe_encoder_is_per_slice():
    model = MaskSAM(tiny_vit_backbone(64), _config("vit", "cpu", depth=4))
    assert model.encoder_is_per_slice and model.stem is None and model.encoder.adapters is None
    assert not MaskSAM(tiny_vit_backbone(64), _config("vit", "gpu")).encoder_is_per_slice


# ---------------------------------------------------------------------------- SAM checkpoints

def _write_tiny_checkpoint(tmp_path, seed=0):
    sam = tiny_sam_parts(64, seed=seed)  # "official" size for the tiny variant is 64 px
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


@pytest.mark.parametrize("mode", ["crop", "resize"])
def test_meta_checkpoint_loads_strictly_at_a_smaller_input(tmp_path, mode):
    sam, path = _write_tiny_checkpoint(tmp_path)
    backbone = load_sam_backbone("vit_b", path, input_size=32, pos_embed_mode=mode, variant=TINY_VARIANT)
    pos = backbone.image_encoder.pos_embed
    assert pos.shape == (1, 2, 2, 48)
    if mode == "crop":
        assert torch.equal(pos, sam.image_encoder.pos_embed[:, :2, :2])
    g_block = TINY_VARIANT.global_attn_indexes[0]
    assert backbone.image_encoder.blocks[g_block].attn.rel_pos_h.shape == (3, 12)
    assert torch.equal(backbone.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)
    assert len(backbone.sha256) == 64
    model = MaskSAM(backbone, _config("vit", "cpu", depth=2, queries=3))
    out = model(torch.randn(1, 1, 2, 32, 32))
    assert out["pred_masks"].shape == (2, 3, 8, 8)


def test_same_size_checkpoint_is_loaded_unchanged(tmp_path):
    sam, path = _write_tiny_checkpoint(tmp_path)
    backbone = load_sam_backbone("vit_b", path, input_size=64, variant=TINY_VARIANT)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.image_encoder(x), sam.image_encoder(x))


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    _, path = _write_tiny_checkpoint(tmp_path)
    with pytest.raises(ModelError, match="not vit_h"):
        load_sam_backbone("vit_h", path, input_size=256)
    with pytest.raises(ModelError, match="needs the official SAM checkpoint"):
        load_sam_backbone("vit_b", None)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_sam_backbone("vit_b", junk, variant=TINY_VARIANT)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="not a Segment Anything checkpoint"):
        load_sam_backbone("vit_b", tmp_path / "other.pth", variant=TINY_VARIANT)


def test_rel_pos_resizing_matches_segment_anything_interpolation():
    from segment_anything.modeling.image_encoder import get_rel_pos

    table = torch.randn(127, 12)
    state = {"image_encoder.pos_embed": torch.zeros(1, 64, 64, 48),
             "image_encoder.blocks.1.attn.rel_pos_h": table}
    variant = TINY_VARIANT.__class__(**{**TINY_VARIANT.__dict__, "checkpoint_img_size": 1024})
    out = adapt_sam_state_dict(state, variant, 512)
    resized = out["image_encoder.blocks.1.attn.rel_pos_h"]
    assert resized.shape == (63, 12)
    # get_rel_pos resizes 127 -> 63 on the fly for a 32x32 grid; both must agree
    expected = get_rel_pos(32, 32, table)
    assert torch.allclose(get_rel_pos(32, 32, resized), expected, atol=1e-6)


# ---------------------------------------------------------------------------- model folders

def _card(backbone, config, classes=("liver", "spleen", "aorta")):
    entries = [{"value": i + 1, "name": n, "color": [10 * i, 20, 30]} for i, n in enumerate(classes)]
    return make_card("tiny", backbone.name, backbone.sha256, backbone.input_size, config, entries, (1.5, 1.5, 3.0))


def test_model_folder_round_trip(tmp_path):
    backbone = tiny_vit_backbone(64)
    model = MaskSAM(backbone, _config("vit", "gpu", depth=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    card = _card(backbone, model.config)
    folder = save_model_folder(model, card, tmp_path / "m")
    saved = torch.load(folder / "weights.pt", weights_only=True)
    assert not any(k.startswith(("encoder.base", "prompt_encoder", "decoder.base")) for k in saved)
    loaded, card2 = load_model(folder, backbone=tiny_vit_backbone(64))
    assert card2.to_dict() == card.to_dict()
    slab = torch.randn(1, 1, 2, 64, 64)
    with torch.no_grad():
        a, b = model.eval()(slab), loaded(slab)
    assert torch.equal(a["pred_masks"], b["pred_masks"])
    with pytest.raises(Exception, match="exists"):
        save_model_folder(model, card, folder)
    save_model_folder(model, card, folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left


def test_model_folder_mismatches_are_clear_errors(tmp_path):
    backbone = tiny_vit_backbone(64)
    model = MaskSAM(backbone, _config("vit", "cpu", depth=2, classes=4))
    folder = save_model_folder(model, _card(backbone, model.config), tmp_path / "m")
    with pytest.raises(ModelError, match="model folder not found"):
        load_model(tmp_path / "nope", backbone=backbone)
    other = tiny_vit_backbone(64)
    other.sha256 = "f" * 64
    with pytest.raises(ModelError, match="other vit_b base weights"):
        load_model(folder, backbone=other)
    tiny = tiny_tinyvit_backbone()
    with pytest.raises(ModelError, match="made for backbone vit_b"):
        load_model(folder, backbone=tiny)
    # wrong class count: a card with 4 organs and weights for 3
    data = json.loads((folder / "model.json").read_text())
    data["classes"].append({"value": 4, "name": "kidney_left", "color": [1, 2, 3]})
    data["architecture"]["num_classes"] = 5
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="shape"):
        load_model(folder, backbone=tiny_vit_backbone(64))
    data["architecture"]["num_classes"] = 4
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="architecture has 4 classes but the card lists 4 organs"):
        load_model(folder, backbone=tiny_vit_backbone(64))
    (folder / "model.json").write_text("{ not json")
    with pytest.raises(ModelError, match="corrupt"):
        load_model(folder, backbone=backbone)
    (folder / "model.json").unlink()
    with pytest.raises(ModelError, match="not a MaskSAM model folder"):
        load_model(folder, backbone=backbone)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    backbone = tiny_vit_backbone(64)
    model = MaskSAM(backbone, _config("vit", "cpu", depth=2))
    folder = save_model_folder(model, _card(backbone, model.config), tmp_path / "m")
    (folder / "weights.pt").unlink()
    with pytest.raises(ModelError, match="no weights file"):
        load_model(folder, backbone=backbone)


def test_weights_with_code_are_refused(tmp_path):
    backbone = tiny_vit_backbone(64)
    model = MaskSAM(backbone, _config("vit", "cpu", depth=2))
    folder = save_model_folder(model, _card(backbone, model.config), tmp_path / "m")
    torch.save({"payload": object()}, folder / "weights.pt")  # needs pickle of an arbitrary object
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_model(folder, backbone=backbone)


def test_card_validation():
    backbone = tiny_vit_backbone(64)
    config = _config("vit", "cpu", classes=3)
    card = _card(backbone, config, classes=("liver", "spleen"))
    data = card.to_dict()
    data["format_version"] = 99
    with pytest.raises(ModelError, match="format version"):
        ModelCard.from_dict(data)
    data = card.to_dict()
    data["classes"][0]["value"] = 7
    with pytest.raises(ModelError, match="class values"):
        ModelCard.from_dict(data)


# ---------------------------------------------------------------------------- real LiteMedSAM

@pytest.fixture(scope="module")
def litemedsam():
    return load_litemedsam_backbone()


def test_litemedsam_weights_load_and_adapters_are_inert_on_a_real_slice(litemedsam, totalseg_dir):
    import SimpleITK as sitk

    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(totalseg_dir / "s1_ct.nii.gz")))
    slc = np.clip((ct[90].astype(np.float32) + 160) / 400, 0, 1)
    img = torch.zeros(1, 1, 1, 256, 256)
    img[0, 0, 0, : slc.shape[0], : slc.shape[1]] = torch.from_numpy(slc)
    config = architecture_for_recipe("gpu", 16, slab_depth=1, num_queries=4)
    config.stem = "repeat"  # compare the encoders on the same input
    model = MaskSAM(litemedsam, config).eval()
    x = model.apply_stem(img)[:, :, 0]
    with torch.no_grad():
        ours = model.encoder(x)[0]
        ref = litemedsam.image_encoder(x)
    assert ours.shape == (1, 256, 64, 64)
    _assert_same_to_float_rounding(ours, ref)
    assert ref.abs().mean() > 0.01  # a real embedding, not zeros


def test_model_cli_init_and_summary(tmp_path, litemedsam, capsys):
    from masksam_core.model.__main__ import main

    assert main(["init", "--backbone", "litemedsam", "--classes", "liver,spleen,aorta", "--out", str(tmp_path / "m"),
                 "--slab-depth", "2", "--num-queries", "4"]) == 0
    card = ModelCard.read(tmp_path / "m")
    assert card.class_names == ["liver", "spleen", "aorta"]
    assert card.backbone["sha256"] == litemedsam.sha256
    model, _ = load_model(tmp_path / "m", backbone=litemedsam)
    assert model.slab_depth == 2
    capsys.readouterr()
    assert main(["summary", "--backbone", "litemedsam", "--num-classes", "3", "--slab-depth", "1",
                 "--num-queries", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable_params"] > 0 and summary["frozen_params"] > 9_000_000
    assert summary["output_shapes"]["pred_logits"] == [1, 2, 5]


def test_background_threshold_fusion():
    """Background = the constant t: a pixel is an organ only where that organ's fused score exceeds t."""
    logits = torch.full((1, 3, 4), -20.0)  # 3 queries, C = 3 classes + no object
    logits[0, 0, 0] = 20.0  # query 0: background, sure
    logits[0, 1, 1] = 20.0  # query 1: class 1, sure
    logits[0, 2, 2] = 0.0
    logits[0, 2, 3] = 0.0   # query 2: class 2 or no object, 50/50
    masks = torch.full((1, 3, 2, 2), -20.0)
    masks[0, 0] = 20.0       # the background mask covers everything (what the short CPU recipe produces)
    masks[0, 1, 0, 0] = 20.0
    masks[0, 2, 1, 1] = 20.0
    out = {"pred_logits": logits, "pred_masks": masks}
    spec = semantic_probabilities(out).argmax(1)[0]
    assert spec.tolist() == [[0, 0], [0, 0]]  # the background class wins everywhere
    thr = semantic_probabilities(out, background_threshold=0.4).argmax(1)[0]
    assert thr.tolist() == [[1, 0], [0, 2]]
    assert semantic_probabilities(out, background_threshold=0.6).argmax(1)[0].tolist() == [[1, 0], [0, 0]]


def test_card_inference_settings_are_validated(tmp_path):
    from masksam_core.errors import ModelError
    from masksam_core.model.card import ModelCard

    card = _card(FAMILIES["tinyvit"](), _config("tinyvit", "cpu"))
    data = card.to_dict()
    assert ModelCard.from_dict(data).background_threshold is None
    data["inference"] = {"background_threshold": 0.5}
    assert ModelCard.from_dict(data).background_threshold == 0.5
    for bad in (1.5, "0.5", True):
        data["inference"] = {"background_threshold": bad}
        with pytest.raises(ModelError, match="background_threshold"):
            ModelCard.from_dict(data)


def test_model_card_text_keeps_the_lineage_of_fine_tuned_models():
    from masksam_core.model.card_text import card_markdown

    card = _card(FAMILIES["tinyvit"](), _config("tinyvit", "cpu"))
    data = card.to_dict()
    first = {"command": "python -m masksam_core.train --config a.yaml", "steps_done": 1750, "training_time_s": 4806.5,
             "hardware": "cpu A"}
    second = {"command": "python -m masksam_core.train --init-from m1", "steps_done": 400, "training_time_s": 2000.0,
              "hardware": "cpu B", "base_training": first}
    data["training"] = {"command": "python -m masksam_core.train --init-from m2", "training_time_s": 100.0,
                        "init_from": "m2", "base_training": second}
    text = card_markdown(ModelCard.from_dict(data))
    for run in (first, second):
        assert run["command"] in text and str(run["steps_done"]) in text and run["hardware"] in text
    assert text.index("--init-from m2") < text.index("--init-from m1") < text.index("--config a.yaml")
    assert "all 3 runs together: 6906 s" in text
    data["training"] = {"command": "python -m masksam_core.train --config a.yaml"}
    assert "runs together" not in card_markdown(ModelCard.from_dict(data))
    assert "Note:" not in card_markdown(ModelCard.from_dict(data))
    data["training"]["note"] = "paused twice for benchmarks"
    assert "\nNote: paused twice for benchmarks\n" in card_markdown(ModelCard.from_dict(data))
