"""Refining one organ with a box (``masksam_core.refine``): the box in LPS mm reaches the decoder as the right
canvas region, only that organ changes and only on the box's slices, the geometry is the input's, and bad input
is one clear error. A tiny random-weight class-bound model keeps it fast; one slow test runs the bundled model on
TotalSegmentator's example CT."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from masksam_core.errors import InputError, MaskSAMError, ModelError
from masksam_core.inference.engine import InferenceOptions
from masksam_core.labels import class_entries
from masksam_core.model.card import make_card
from masksam_core.model.masksam import MaskSAM
from masksam_core.model.recipes import architecture_for_recipe
from masksam_core.refine import box_index_range, build_parser, join_box_value, organ_value, parse_box, refine
from tiny_backbones import tiny_tinyvit_backbone

ORGANS = ["liver", "spleen", "kidney_left"]
LIVER, SPLEEN = 1, 2
OPTS = InferenceOptions(device="cpu", runtime="torch", precision="fp32")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = architecture_for_recipe("cpu", len(ORGANS) + 1, slab_depth=2, num_queries=4, prompt_channels=[8, 8, 8])
    model = MaskSAM(tiny_tinyvit_backbone(), config).eval()
    card = make_card("tiny", "litemedsam", "random", 64, config, class_entries(ORGANS), (2.0, 2.0, 4.0),
                     {"mode": "ct_window", "window": [-160.0, 240.0]}, training={"matching": "class_bound"},
                     inference={"background_threshold": 0.5})
    return model, card


# a scan stored as Slicer writes NIfTI (x and y flipped against LPS) with an arbitrary origin
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
ORIGIN = (123.4, 87.6, -50.2)


def _scan():
    """(image, segmentation, liver cube index ranges): a 48 x 40 x 12 CT at 2 x 2 x 4 mm; an off-centre, non-square
    bright block (the "liver", 200 HU) on slices 2-9 and a spleen block beside it, a strip of fat at the front."""
    arr = np.zeros((12, 40, 48), np.float32)  # (z, y, x); 0 HU: all body
    arr[:, 0:2, :] = -100.0  # a strip of fat: a CT's intensities (an image with neither air nor fat reads as MR)
    seg = np.zeros(arr.shape, np.uint8)
    arr[2:10, 6:16, 28:44] = 200.0
    seg[2:10, 6:16, 28:44] = LIVER
    seg[2:10, 24:34, 4:14] = SPLEEN
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((2.0, 2.0, 4.0))
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    labels = sitk.GetImageFromArray(seg)
    labels.CopyInformation(image)
    return image, labels


def _box_mm(image, x, y, z):
    """The LPS box covering voxel index ranges x, y, z (inclusive) of ``image`` to their outer faces."""
    lo = image.TransformContinuousIndexToPhysicalPoint([x[0] - 0.5, y[0] - 0.5, z[0] - 0.5])
    hi = image.TransformContinuousIndexToPhysicalPoint([x[1] + 0.5, y[1] + 0.5, z[1] + 0.5])
    return tuple(lo) + tuple(hi)


def _bright(img):
    """The block's pixels on the canvas: the brightest (200 HU, clipped by the window), not the body (0 HU) nor the
    canvas padding (air)."""
    return img > img.max() - 0.1 * (img.max() - img.min())


def _spy(model, monkeypatch, oracle=False):
    """Record each forward_features call's prior and slab image; with ``oracle`` the decoded masks become the
    slab's bright pixels (logit +-20), so that the result is known."""
    calls = []
    real = model.forward_features

    def spy(feats, stem_out, **kwargs):
        out = real(feats, stem_out, **kwargs)
        prior = kwargs.get("prior")
        calls.append({"prior": prior, "image": stem_out[0, 0].float().clone()})
        if oracle and prior is not None:
            bright = _bright(stem_out[0, 0])  # (D, S, S)
            d, n = stem_out.shape[2], model.config.num_queries
            masks = torch.where(bright, 20.0, -20.0)[:, None].expand(d, n, -1, -1)
            out["pred_masks"] = torch.where(out["decoded"][..., None, None], masks, out["pred_masks"])
        return out

    monkeypatch.setattr(model, "forward_features", spy)
    return calls


def test_the_box_in_lps_mm_prompts_the_canvas_region_that_shows_the_organ(tiny, monkeypatch):
    """The prompted box on the canvas holds exactly the bright block the box was drawn around: with x and y swapped,
    or RAS taken for LPS, it would hold another region (or miss the image)."""
    model, card = tiny
    image, seg = _scan()
    calls = _spy(model, monkeypatch)
    refine(image, seg, "liver", _box_mm(image, (28, 43), (6, 15), (4, 6)), model=model, card=card, options=OPTS)
    prompted = 0
    for call in calls:
        present = call["prior"]["present"][0]  # (D, N)
        assert not present[:, [0, SPLEEN, 3]].any()  # only the liver's query is prompted
        for d in torch.nonzero(present[:, LIVER]).flatten().tolist():
            x0, y0, x1, y1 = (call["prior"]["boxes"][0, d, LIVER] * 64).round().int().tolist()
            img = call["image"][d]
            bright = _bright(img)
            inside = torch.zeros_like(bright)
            inside[y0:y1, x0:x1] = True
            assert bright.sum() == 16 * 10 and (bright == inside).all()  # the box is the block, pixel for pixel
            prompted += 1
    assert prompted >= 3  # slices 4-6, each decoded by every slab that holds it


def test_on_a_volume_wider_than_a_tile_each_tile_is_prompted_with_its_part_of_the_box(tiny, monkeypatch):
    """100 voxels wide at the tiny model's 64-px tiles: model-space tiles start at column 0, 32 and 36; the box's
    part in each tile is where that tile's canvas shows the block."""
    model, card = tiny
    arr = np.zeros((6, 40, 100), np.float32)
    arr[:, 0:2, :] = -100.0  # fat, as in _scan
    arr[1:5, 8:20, 50:90] = 200.0
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((2.0, 2.0, 4.0))
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    seg = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    seg.CopyInformation(image)
    calls = _spy(model, monkeypatch)
    refine(image, seg, "liver", _box_mm(image, (50, 89), (8, 19), (2, 3)), model=model, card=card, options=OPTS)
    prompted = set()
    for call in calls:
        present = call["prior"]["present"][0]
        for d in torch.nonzero(present[:, LIVER]).flatten().tolist():
            x0, y0, x1, y1 = (call["prior"]["boxes"][0, d, LIVER] * 64).round().int().tolist()
            bright = _bright(call["image"][d])
            inside = torch.zeros_like(bright)
            inside[y0:y1, x0:x1] = True
            assert (bright == inside).all()
            prompted.add((x0, x1))
    # model space is LPS: the stored x flip puts the block (input i 50-89) on model columns 10-49, which tile 0
    # shows at canvas 10-49, tile 32 at 0-17 and tile 36 at 0-13
    assert prompted == {(10, 50), (0, 18), (0, 14)}


def test_only_the_organ_changes_and_only_on_the_boxs_slices(tiny, monkeypatch):
    model, card = tiny
    image, seg = _scan()
    _spy(model, monkeypatch, oracle=True)
    # the liver block is x 28-43, y 6-15; the box covers its left part (x 34-43) on slices 4-6
    out = refine(image, seg, LIVER, _box_mm(image, (34, 43), (4, 17), (4, 6)), model=model, card=card, options=OPTS)
    assert out.GetSize() == image.GetSize() and out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == seg.GetPixelID()
    before, after = sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(out)
    changed = before != after
    assert changed.any()
    assert not changed[:4].any() and not changed[7:].any()  # only the box's slices
    assert np.array_equal(after[before == SPLEEN], before[before == SPLEEN])  # the other organ is untouched
    assert np.isin(before[changed], [0, LIVER]).all() and np.isin(after[changed], [0, LIVER]).all()
    expected = np.zeros((40, 48), bool)
    expected[6:16, 34:44] = True  # SAM's (the oracle's) mask: the bright block, confined to the box
    for z in (4, 5, 6):
        assert np.array_equal(after[z] == LIVER, expected), z
    assert np.array_equal(after[2:4], before[2:4]) and np.array_equal(after[7:10], before[7:10])


def test_other_organs_are_kept_unless_the_refined_one_may_take_them(tiny, monkeypatch):
    model, card = tiny
    image, seg = _scan()
    arr = sitk.GetArrayFromImage(seg)
    arr[:, 6:16, 28:32] = SPLEEN  # the spleen overlaps the bright block's right edge
    seg2 = sitk.GetImageFromArray(arr)
    seg2.CopyInformation(seg)
    _spy(model, monkeypatch, oracle=True)
    box = _box_mm(image, (26, 45), (4, 17), (5, 5))  # one slice
    kept = sitk.GetArrayFromImage(refine(image, seg2, "Liver", box, model=model, card=card, options=OPTS))
    assert (kept[5, 6:16, 28:32] == SPLEEN).all()
    taken = sitk.GetArrayFromImage(refine(image, seg2, "liver", box, model=model, card=card, options=OPTS,
                                          take_from_others=True))
    assert (taken[5, 6:16, 28:32] == LIVER).all()
    assert np.array_equal(taken[arr != SPLEEN], kept[arr != SPLEEN])


def test_the_real_tiny_decoder_changes_nothing_outside_the_box_slices(tiny):
    model, card = tiny
    image, seg = _scan()
    out = sitk.GetArrayFromImage(refine(image, seg, "liver", _box_mm(image, (26, 45), (4, 17), (3, 7)), model=model,
                                        card=card, options=OPTS))
    before = sitk.GetArrayFromImage(seg)
    assert np.array_equal(out[:3], before[:3]) and np.array_equal(out[8:], before[8:])
    assert np.array_equal(out == SPLEEN, before == SPLEEN)
    new = out[3:8] == LIVER
    inside = np.zeros_like(new)
    inside[:, 4:18, 26:46] = True
    assert not (new & ~inside).any()  # the new mask lies in the box


def test_box_mapping_clips_flat_boxes_and_refuses_boxes_outside(tiny):
    image, _ = _scan()
    lo, hi = box_index_range(image, _box_mm(image, (3, 9), (2, 5), (4, 6)))
    assert lo.tolist() == [3, 2, 4] and hi.tolist() == [9, 5, 6]
    p = image.TransformIndexToPhysicalPoint((5, 5, 7))
    lo, hi = box_index_range(image, (p[0] - 5, p[1] - 5, p[2], p[0] + 5, p[1] + 5, p[2]))  # a flat box on slice 7
    assert lo[2] == hi[2] == 7
    lo, hi = box_index_range(image, _box_mm(image, (-20, 60), (2, 5), (4, 6)))  # clipped to the image
    assert lo[0] == 0 and hi[0] == 47
    ras = np.array(_box_mm(image, (28, 43), (6, 15), (4, 6)))
    ras[[0, 1, 3, 4]] *= -1  # RAS given for LPS: outside this image
    with pytest.raises(InputError, match="outside the image.*RAS"):
        box_index_range(image, ras)
    assert parse_box("1,2,3,4,5,6") == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    with pytest.raises(argparse.ArgumentTypeError, match="six numbers"):
        parse_box("1,2,3")
    # a box that starts with a negative coordinate is the option's value, not another option
    assert join_box_value(["--box", "-1,2,3,4,5,6", "-o", "x"]) == ["--box=-1,2,3,4,5,6", "-o", "x"]
    assert build_parser().parse_args(join_box_value(["-i", "a", "-s", "b", "--organ", "liver", "--box",
                                                     "-1.5,2,3,4,5,6", "-o", "c"])).box[0] == -1.5


def test_bad_inputs_are_one_clear_error(tiny):
    import dataclasses

    model, card = tiny
    image, seg = _scan()
    box = _box_mm(image, (28, 43), (6, 15), (4, 6))
    with pytest.raises(InputError, match="unknown organ 'heart'.*liver \\(1\\)"):
        refine(image, seg, "heart", box, model=model, card=card, options=OPTS)
    assert organ_value(card, "2") == 2 and organ_value(card, 3) == 3
    with pytest.raises(InputError, match="unknown organ"):
        organ_value(card, 9)
    with pytest.raises(InputError, match="outside the image"):
        refine(image, seg, "liver", (1e4, 1e4, 1e4, 1e4 + 5, 1e4 + 5, 1e4 + 5), model=model, card=card, options=OPTS)
    moved = sitk.Image(seg)
    moved.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="grid .* differs from the image's"):
        refine(image, moved, "liver", box, model=model, card=card, options=OPTS)
    with pytest.raises(ModelError, match="not class-bound"):
        refine(image, seg, "liver", box, model=model, card=dataclasses.replace(card, training={}), options=OPTS)
    with pytest.raises(InputError, match="too small"):
        refine(image, seg, "liver", _box_mm(image, (30, 31), (8, 8), (4, 6)), model=model, card=card, options=OPTS)
    with pytest.raises(MaskSAMError, match="needs its card"):
        refine(image, seg, "liver", box, model=model, options=OPTS)


@pytest.fixture()
def tiny_folder(tiny, tmp_path, monkeypatch):
    import masksam_core.model.folder as folder
    from masksam_core.model.folder import save_model_folder

    model, card = tiny
    monkeypatch.setattr(folder, "load_backbone", lambda *a, **k: tiny_tinyvit_backbone())
    return save_model_folder(model, card, tmp_path / "model")


def test_command_line_writes_once_and_errors_in_one_line(tiny_folder, tmp_path, capsys):
    from masksam_core.__main__ import main as masksam
    from masksam_core.cli_util import run_cli
    from masksam_core.refine import main

    image, seg = _scan()
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(seg, str(tmp_path / "seg.nii.gz"))
    box = ",".join(f"{v:.3f}" for v in _box_mm(image, (28, 43), (6, 15), (4, 6)))
    out = tmp_path / "refined.nii.gz"
    args = ["-i", str(tmp_path / "ct.nii.gz"), "-s", str(tmp_path / "seg.nii.gz"), "--organ", "liver", "--box", box,
            "-o", str(out), "--model", str(tiny_folder), "--device", "cpu", "--runtime", "torch"]
    assert main(args) == 0
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == image.GetSize() and np.allclose(written.GetDirection(), DIRECTION)
    assert "liver refined" in capsys.readouterr().out
    assert run_cli(main, args) == 2  # never overwritten without asking
    assert "exists; use --overwrite" in capsys.readouterr().err
    assert masksam(["refine"] + args + ["--overwrite", "--progress", "json"]) == 0
    assert '"stage": "segment"' in capsys.readouterr().out
    bad = args[:4] + ["--organ", "heart", "--box", box, "-o", str(tmp_path / "x.nii.gz")] + args[10:]
    assert run_cli(main, bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown organ") and err.count("\n") == 1
    assert not (tmp_path / "x.nii.gz").exists()
    assert run_cli(main, args[:8] + ["-o", str(tmp_path / "x.png")] + args[10:]) == 2  # before any work
    assert "cannot write a labelmap as x.png" in capsys.readouterr().err


def _bundled_model_and_s1(totalseg_dir):
    """(model, card, s1's CT, its labels in the card's values, their array); skips without the bundled model."""
    from masksam_core.predict import default_model_dir

    if not (default_model_dir() / "model.json").exists():
        pytest.skip("the bundled default model is not installed")
    from masksam_core.model.folder import load_model

    model, card = load_model(default_model_dir())
    ct = sitk.ReadImage(str(totalseg_dir / "s1_ct.nii.gz"), sitk.sitkFloat32)
    labels = _s1_labels(totalseg_dir, card)
    return model, card, ct, labels, sitk.GetArrayFromImage(labels)


@pytest.mark.slow
def test_refining_the_real_liver_with_a_box_brings_it_back(totalseg_dir, tmp_path):
    """s1 with the liver deleted on a few slices: a box around the true liver there gives its Dice back."""
    model, card, ct, labels, arr = _bundled_model_and_s1(totalseg_dir)
    liver = organ_value(card, "liver")
    zs = np.nonzero((arr == liver).any(axis=(1, 2)))[0]
    # the input's k axis: a few slices in the liver's middle (s1 is stored with k along z)
    k_mid = int(zs[len(zs) // 2])
    ks = (k_mid - 2, k_mid + 2)
    damaged = arr.copy()
    damaged[ks[0]:ks[1] + 1][damaged[ks[0]:ks[1] + 1] == liver] = 0
    seg = sitk.GetImageFromArray(damaged)
    seg.CopyInformation(labels)
    yy, xx = np.nonzero((arr[ks[0]:ks[1] + 1] == liver).any(axis=0))
    box = _box_mm(ct, (int(xx.min()), int(xx.max())), (int(yy.min()), int(yy.max())), ks)
    out = sitk.GetArrayFromImage(refine(ct, seg, "liver", box, model=model, card=card,
                                        options=InferenceOptions(device="cpu")))
    truth = arr[ks[0]:ks[1] + 1] == liver
    got = out[ks[0]:ks[1] + 1] == liver
    dice = 2 * (truth & got).sum() / (truth.sum() + got.sum())
    print(f"liver Dice on the {ks[1] - ks[0] + 1} refined slices: {dice:.3f}")
    assert dice > 0.5, dice  # from 0 (deleted)
    assert np.array_equal(out[: ks[0] - 1], damaged[: ks[0] - 1])


def _s1_labels(folder: Path, card) -> sitk.Image:
    """s1's TotalSegmentator labels mapped onto the card's class values (0 for organs the card lacks)."""
    import json

    labels = sitk.ReadImage(str(folder / "s1_labels.nii.gz"))
    names_file = folder / "labels_total.json"
    if not names_file.is_file():
        pytest.skip(f"no label names ({names_file.name}) beside s1_labels.nii.gz in {folder}")
    names = json.loads(names_file.read_text())
    arr = sitk.GetArrayFromImage(labels)
    out = np.zeros(arr.shape, np.uint8)
    wanted = {c["name"]: int(c["value"]) for c in card.classes}
    for value, name in (names.items() if isinstance(names, dict) else enumerate(names)):
        if str(name) in wanted:
            out[arr == int(value)] = wanted[str(name)]
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(labels)
    return image


def test_the_slicer_modules_box_and_command_line_need_no_slicer():
    """MaskSAMSegment's refine helpers that touch no MRML (ROI bounds -> LPS box, the command line) import and work
    without Slicer, Qt or VTK (RAS -> LPS: x and y negated)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "MaskSAMSegment"
    code = (f"import sys\nsys.modules['slicer'] = sys.modules['qt'] = sys.modules['vtk'] = None\n"
            f"sys.path.insert(0, {str(root)!r})\n"
            "from MaskSAMSegmentLib import refine_logic as r\n"
            "class Roi:\n"
            "    def GetRASBounds(self, b):\n"
            "        b[:] = [8.0, 12.0, -23.0, -17.0, 26.0, 34.0]\n"
            "box = r.roi_box_lps(Roi())\n"
            "assert box == (-12.0, 17.0, 26.0, -8.0, 23.0, 34.0), box\n"
            "cmd = r.refine_command('py', 'i.nrrd', 's.nrrd', 'liver', box, 'o.nrrd', None, 'cpu')\n"
            "assert '--box=-12.000,17.000,26.000,-8.000,23.000,34.000' in cmd and '--model' not in cmd, cmd\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- points ------------------------------------------------------------------------------------------------------
def _point_mm(image, i, j, k, positive=True):
    """The LPS point at the centre of voxel (i, j, k) of ``image``."""
    return tuple(image.TransformIndexToPhysicalPoint((i, j, k))) + (positive,)


def _pixel_table(model):
    """SAM's point embeddings of every canvas pixel centre, labels 1 and 0: (2, S·S, E), and the pixels (S·S, 2)."""
    s = model.input_size
    ys, xs = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    pix = torch.stack([xs.flatten(), ys.flatten()], dim=1).float()
    with torch.no_grad():
        table = [model.prompt_encoder(points=(pix[None], torch.full((1, s * s), lab)), boxes=None, masks=None)[0][0, :-1]
                 for lab in (1, 0)]
    return torch.stack(table), pix


def _decoded_points(tokens, table, pix):
    """The (x, y, label) canvas points a decoder item's extra tokens embed (SAM's "not a point" slots skipped)."""
    out = []
    for t in tokens:
        dist = (table - t.float()[None, None]).norm(dim=-1)  # (2, S·S)
        lab, k = divmod(int(dist.argmin()), dist.shape[1])
        if dist[lab, k] < 1e-3:
            out.append((int(pix[k, 0]), int(pix[k, 1]), 1 - lab))
    return out


def _point_oracle(model, monkeypatch):
    """The decoder answers like an ideal SAM on the synthetic scans: the slice's bright regions holding a positive
    point (all of them when there is none) less those holding a negative one. Returns the list of each decoded
    item's points and its slice's bright pixels."""
    from scipy import ndimage

    table, pix = _pixel_table(model)
    seen = []
    current = {}
    real_ff, real_decode = model.forward_features, model.decode_items

    def ff(feats, stem_out, **kwargs):
        current["image"] = stem_out[0, 0].float()
        return real_ff(feats, stem_out, **kwargs)

    def decode(embeddings, item_embedding, slice_index, sparse, mask_prompts, aux_tokens):
        masks, logits = real_decode(embeddings, item_embedding, slice_index, sparse[:, :2], mask_prompts, aux_tokens)
        masks = masks.clone()
        for p, d in enumerate(slice_index.tolist()):
            pts = _decoded_points(sparse[p, 2:], table, pix)
            bright = _bright(current["image"][d]).numpy()
            seen.append((pts, bright))
            comp, _ = ndimage.label(bright)
            pos = {comp[y, x] for x, y, lab in pts if lab == 1} - {0}
            neg = {comp[y, x] for x, y, lab in pts if lab == 0} - {0}
            want = np.isin(comp, list(pos)) if pos else bright
            want &= ~np.isin(comp, list(neg))
            masks[p, 0] = torch.where(torch.from_numpy(want), 20.0, -20.0)
        return masks, logits

    monkeypatch.setattr(model, "forward_features", ff)
    monkeypatch.setattr(model, "decode_items", decode)
    return seen


def _two_blocks():
    """The synthetic scan with a second bright block B (x 4-13, y 24-33, slices 2-9) where the segmentation holds
    the spleen."""
    image, seg = _scan()
    arr = sitk.GetArrayFromImage(image)
    arr[2:10, 24:34, 4:14] = 200.0
    image2 = sitk.GetImageFromArray(arr)
    image2.CopyInformation(image)
    return image2, sitk.GetArrayFromImage(seg)


def _labels(arr, like):
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(like)
    return out


def test_points_reach_the_decoder_on_the_canvas_pixels_they_were_placed_on(tiny, monkeypatch):
    """A positive point on the liver block's corner voxel and a negative one on the other block become SAM point
    tokens (after the box's two) at exactly those canvas pixels: with x and y swapped, or RAS for LPS, the pixel
    would not be the block's corner."""
    from scipy import ndimage

    model, card = tiny
    image, before = _two_blocks()
    seen = _point_oracle(model, monkeypatch)
    points = [_point_mm(image, 43, 15, 5), _point_mm(image, 8, 28, 5, False)]
    refine(image, _labels(before, image), "liver", _box_mm(image, (2, 45), (4, 35), (4, 6)), model=model,
           card=card, options=OPTS, points=points)
    with_points = [(p, bright) for p, bright in seen if p]
    assert len(with_points) >= 2  # slice 5, decoded by both slabs that hold it
    for pts, bright in with_points:
        assert sorted(lab for _, _, lab in pts) == [0, 1]
        (xp, yp, _), = [p for p in pts if p[2] == 1]
        (xn, yn, _), = [p for p in pts if p[2] == 0]
        assert bright[yp, xp] and bright[yn, xn]
        neighbours = [(yp - 1, xp), (yp + 1, xp), (yp, xp - 1), (yp, xp + 1)]
        assert sum(bool(bright[q]) for q in neighbours) == 2  # the block's corner pixel
        comp, _ = ndimage.label(bright)
        assert comp[yp, xp] != comp[yn, xn] and (comp == comp[yp, xp]).sum() == 16 * 10  # on the liver's block


def test_a_negative_point_takes_the_region_it_lies_on_out_of_the_box(tiny, monkeypatch):
    model, card = tiny
    image, before = _two_blocks()
    seg = before.copy()
    seg[seg == SPLEEN] = 0  # block B is not labelled: the box (over both blocks) gives it to the liver
    _point_oracle(model, monkeypatch)
    box = _box_mm(image, (2, 45), (4, 35), (4, 6))
    out = sitk.GetArrayFromImage(refine(image, _labels(seg, image), "liver", box, model=model, card=card,
                                        options=OPTS, points=[_point_mm(image, 8, 28, 5, False)]))
    block_a = np.zeros((40, 48), bool)
    block_a[6:16, 28:44] = True
    block_b = np.zeros((40, 48), bool)
    block_b[24:34, 4:14] = True
    assert np.array_equal(out[5] == LIVER, block_a)  # the negative point's slice: block B left out
    for z in (4, 6):  # the box alone: both bright blocks
        assert np.array_equal(out[z] == LIVER, block_a | block_b), z
    assert np.array_equal(out[:4], seg[:4]) and np.array_equal(out[7:], seg[7:])


def test_points_alone_grow_the_organ_toward_a_positive_point_and_shrink_it_near_a_negative_one(tiny, monkeypatch):
    """The liver labelled on only the left part of its block (and on block B, a leak) on slices 4-6: a positive
    point on the block's right part and a negative one on B, on slices 4 and 6, refine slices 4-6 (slice 5 takes
    both slices' points) to exactly the block; nothing else changes."""
    model, card = tiny
    image, before = _two_blocks()
    seg = before.copy()
    seg[4:7, 6:16, 36:44] = 0  # the block's right part missing
    seg[4:7, 24:34, 4:14] = LIVER  # the leak into B (the spleen there)
    seen = _point_oracle(model, monkeypatch)
    points = [_point_mm(image, 40, 10, 4), _point_mm(image, 8, 28, 6, False), _point_mm(image, 41, 11, 6)]
    out = sitk.GetArrayFromImage(refine(image, _labels(seg, image), "liver", None, model=model, card=card,
                                        options=OPTS, points=points))
    block_a = np.zeros((40, 48), bool)
    block_a[6:16, 28:44] = True
    for z in (4, 5, 6):
        assert np.array_equal(out[z] == LIVER, block_a), z
    assert np.array_equal(out[:4], seg[:4]) and np.array_equal(out[7:], seg[7:])
    assert any(len(p) == 3 for p, _ in seen)  # slice 5: the points of slices 4 and 6 (both as near)


def test_bad_points_are_one_clear_error(tiny, tiny_folder, tmp_path, capsys):
    from masksam_core.cli_util import run_cli
    from masksam_core.refine import main, parse_point

    model, card = tiny
    image, seg = _scan()
    assert parse_point("1,-2,3") == (1.0, -2.0, 3.0, True)
    assert parse_point("1, 2, 3, -") == (1.0, 2.0, 3.0, False)
    for bad in ("a,b", "1,2", "1,2,3,x", "1,2,3,4", "1,2,nan"):
        with pytest.raises(InputError, match="--point needs x,y,z in LPS mm"):
            parse_point(bad)
    box = _box_mm(image, (28, 43), (6, 15), (4, 6))
    with pytest.raises(InputError, match="needs a box, points or both"):
        refine(image, seg, "liver", None, model=model, card=card, options=OPTS)
    with pytest.raises(InputError, match="point .* outside the image.*RAS"):
        refine(image, seg, "liver", box, model=model, card=card, options=OPTS, points=[(1e4, 0.0, 0.0)])
    with pytest.raises(InputError, match="beyond the box's slices"):
        refine(image, seg, "liver", box, model=model, card=card, options=OPTS, points=[_point_mm(image, 30, 8, 9)])
    with pytest.raises(InputError, match="positive point .* outside the box"):
        refine(image, seg, "liver", box, model=model, card=card, options=OPTS, points=[_point_mm(image, 5, 8, 5)])
    with pytest.raises(InputError, match="say nothing about where the organ is"):
        refine(image, seg, "liver", None, model=model, card=card, options=OPTS,
               points=[_point_mm(image, 30, 8, 11, False)])
    with pytest.raises(InputError, match="a point must be"):
        refine(image, seg, "liver", None, model=model, card=card, options=OPTS, points=[(1.0, 2.0)])
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(seg, str(tmp_path / "seg.nii.gz"))
    args = ["-i", str(tmp_path / "ct.nii.gz"), "-s", str(tmp_path / "seg.nii.gz"), "--organ", "liver", "-o",
            str(tmp_path / "out.nii.gz"), "--model", str(tiny_folder), "--device", "cpu", "--runtime", "torch"]
    for extra, message in ((["--point", "a,b"], "error: --point needs x,y,z in LPS mm"),
                           ([], "error: give the organ's --box, one or more --point, or both")):
        assert run_cli(main, args + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out.nii.gz").exists()
    # a point starting with a negative coordinate is the option's value
    assert join_box_value(["--point", "-1,2,3,-", "--box", "-1,2,3,4,5,6"]) == ["--point=-1,2,3,-",
                                                                               "--box=-1,2,3,4,5,6"]
    p = _point_mm(image, 40, 10, 5)
    assert run_cli(main, args + ["--point", f"{p[0]:.3f},{p[1]:.3f},{p[2]:.3f},+"]) == 0
    assert "liver refined on model slices 5..5" in capsys.readouterr().out


@pytest.mark.slow
def test_points_alone_mend_a_partly_missing_real_organ(totalseg_dir):
    """s1 with the spleen's half beyond its median column removed on 5 slices: two positive points there (on the
    first and last of those slices) bring its Dice on them up (0.73 -> 0.90 measured)."""
    model, card, ct, labels, arr = _bundled_model_and_s1(totalseg_dir)
    spleen = organ_value(card, "spleen")
    zs = np.nonzero((arr == spleen).any(axis=(1, 2)))[0]
    ks = (int(zs[len(zs) // 2]) - 2, int(zs[len(zs) // 2]) + 2)
    damaged = arr.copy()
    part = damaged[ks[0]:ks[1] + 1]
    xmid = int(np.median(np.nonzero((part == spleen).any(axis=(0, 1)))[0]))
    beyond = np.arange(arr.shape[2])[None, :] >= xmid
    part[(part == spleen) & beyond[None]] = 0
    points = []
    for k in ks:
        yy, xx = np.nonzero((arr[k] == spleen) & beyond)
        j = int(np.argmin((yy - yy.mean()) ** 2 + (xx - xx.mean()) ** 2))
        points.append(tuple(ct.TransformIndexToPhysicalPoint((int(xx[j]), int(yy[j]), k))) + (True,))
    seg = sitk.GetImageFromArray(damaged)
    seg.CopyInformation(labels)
    out = sitk.GetArrayFromImage(refine(ct, seg, "spleen", None, model=model, card=card, points=points,
                                        options=InferenceOptions(device="cpu", runtime="torch")))
    truth = arr[ks[0]:ks[1] + 1] == spleen

    def dice(a):
        got = a[ks[0]:ks[1] + 1] == spleen
        return 2 * (truth & got).sum() / (truth.sum() + got.sum())

    print(f"spleen Dice on the {ks[1] - ks[0] + 1} slices: {dice(damaged):.3f} damaged, {dice(out):.3f} refined")
    assert dice(out) > dice(damaged) + 0.1
    assert np.array_equal(out[: ks[0]], damaged[: ks[0]]) and np.array_equal(out[ks[1] + 1:], damaged[ks[1] + 1:])
