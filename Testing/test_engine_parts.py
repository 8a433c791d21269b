"""Pieces of the inference engine and training bookkeeping that need no model."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from masksam_core.inference.slabs import depth_weights, plane_weights, window_starts
from masksam_core.training.state import load_state, restore_rng, rng_state, save_state


@pytest.mark.parametrize("length,window,stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (30, 8, 8), (100, 8, 4), (7, 8, 8)])
def test_windows_cover_everything(length, window, stride):
    starts = window_starts(length, window, stride)
    covered = set()
    for s in starts:
        covered.update(range(s, min(s + window, length)))
    assert covered == set(range(length))
    assert starts == sorted(set(starts)) and starts[0] == 0
    assert all(s + window <= max(length, window) for s in starts)


def test_blending_weights():
    w = depth_weights(8)
    assert w.shape == (8,) and (w > 0).all() and w[3] == w.max() and np.allclose(w, w[::-1])
    assert depth_weights(1).tolist() == [1.0]
    p = plane_weights(64)
    assert p.shape == (64, 64) and p.max() == 1.0 and p.min() >= 1e-3


def test_training_state_restores_every_random_stream(tmp_path):
    rng = np.random.default_rng(3)
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(7)
    random.seed(11)
    rng.random(3), torch.rand(2, generator=gen)
    save_state(tmp_path, {"rng": rng_state(rng, gen), "step": 4})
    expected = (rng.random(4), torch.rand(3, generator=gen), torch.rand(2), random.random())
    rng2 = np.random.default_rng(0)
    gen2 = torch.Generator()
    state = load_state(tmp_path)
    restore_rng(state["rng"], rng2, gen2)
    got = (rng2.random(4), torch.rand(3, generator=gen2), torch.rand(2), random.random())
    assert np.array_equal(expected[0], got[0])
    assert torch.equal(expected[1], got[1]) and torch.equal(expected[2], got[2])
    assert expected[3] == got[3]
    assert [p.name for p in tmp_path.iterdir()] == ["training_state.pt"]


def _on_glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_allocator_tuning_is_applied_once_and_harmless():
    from masksam_core.inference import allocator

    first = allocator.tune_allocator()
    assert allocator.tune_allocator() is first  # once per process
    if _on_glibc():
        assert first is True


def test_training_asks_torch_for_huge_pages_before_importing_it():
    """``python -m masksam_core.train`` sets torch's THP_MEM_ALLOC_ENABLE before torch is imported (torch reads it
    once); a value the user set wins, and after torch's import the setting is only reported, not changed."""
    import subprocess

    probe = ("import os, sys; import masksam_core.train; assert 'torch' not in sys.modules, 'train imports torch'; "
             "from masksam_core.cli_util import ask_torch_for_huge_pages as ask; r = ask(); import torch; "
             "print(r, os.environ.get('THP_MEM_ALLOC_ENABLE'), ask())")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    for preset, expected in ((None, "True 1 True"), ("0", "False 0 False")):
        run_env = env if preset is None else {**env, "THP_MEM_ALLOC_ENABLE": preset}
        out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split()
    late = "import os, torch; from masksam_core.cli_util import ask_torch_for_huge_pages as a; print(a(), " \
           "os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "None"]
    source = Path(__file__).resolve().parents[1] / "masksam_core" / "train.py"
    assert "ask_torch_for_huge_pages()" in source.read_text().split('if __name__ == "__main__":')[1]


def test_sidecar_counts_every_organ_voxel_of_the_output_grid():
    """Organ volumes come from the labelmap on the input grid (counted exactly); confidences are the mean of the
    model-space confidences inside each organ."""
    from types import SimpleNamespace

    import SimpleITK as sitk

    from masksam_core.inference.engine import InferenceOptions, _sidecar

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 3, (37, 20, 30)).astype(np.uint8)
    arr[arr == 2] = 0
    arr[5:9, 2:4, 3:7] = 2
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing((0.5, 2.0, 1.5))
    classes = [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"}, {"value": 3, "name": "aorta"}]
    card = SimpleNamespace(classes=classes, labels=lambda: {0: "background", 1: "liver", 2: "spleen", 3: "aorta"},
                           identity=lambda: {"name": "m"})
    labels_model = np.array([[[1, 2, 1, 0, 1]]], np.uint8)
    conf_model = np.array([[[0.75, 0.5, 0.25, 0.9, 0.5]]], np.float32)
    info = _sidecar(out, labels_model, conf_model, card, InferenceOptions(), 1.0)
    assert set(info["organs"]) == {"liver", "spleen"}  # no aorta voxel: not listed
    assert info["organs"]["liver"]["voxels"] == int((arr == 1).sum())
    assert info["organs"]["spleen"]["voxels"] == 4 * 2 * 4
    assert info["organs"]["spleen"]["volume_ml"] == pytest.approx(32 * 1.5 / 1000)
    assert info["organs"]["liver"]["confidence"] == pytest.approx(0.5)
    assert info["organs"]["spleen"]["confidence"] == pytest.approx(0.5)


def test_fused_labels_are_the_argmax_and_the_winning_share():
    from masksam_core.inference.engine import fuse_labels

    rng = np.random.default_rng(3)
    probs = rng.random((5, 11, 6, 7)).astype(np.float32)
    probs[:, 4] = 0.0  # no score at all: label 0, confidence 0
    probs[1:3, 5, 2, 3] = 2.0  # a tie goes to the first class, as numpy's argmax
    labels, conf = fuse_labels(probs)
    assert labels.dtype == np.uint8 and np.array_equal(labels, probs.argmax(axis=0))
    expected = probs.max(axis=0) / np.maximum(probs.sum(axis=0), 1e-8)
    assert conf.dtype == np.float32 and np.allclose(conf, expected) and not conf[4].any()


def test_a_volume_prepared_for_other_options_is_refused():
    import SimpleITK as sitk

    from masksam_core.inference.engine import InferenceOptions, prepare_input, segment_prepared
    from masksam_core.model.card import ModelCard

    from masksam_core.predict import default_model_dir

    card = ModelCard.read(default_model_dir())
    image = sitk.GetImageFromArray(np.full((8, 16, 16), 40, np.float32))
    volume = prepare_input(image, card, InferenceOptions(fast=True))
    x, y, z = card.target_spacing
    assert volume.spacing == [x, y, 2 * z]
    with pytest.raises(ValueError, match="prepared at"):
        segment_prepared(volume, model=None, card=card, options=InferenceOptions(fast=False))


def test_free_memory_is_released_after_an_openvino_conversion(monkeypatch, tmp_path):
    """Each IR conversion is followed by a release of the freed heap (the first run's peak RSS; see allocator);
    a model loaded from the cache does not pay for it."""
    from masksam_core.inference import allocator, openvino_runtime

    pytest.importorskip("openvino")
    if _on_glibc():
        assert allocator.release_free_memory() is True
    calls = []
    monkeypatch.setattr(openvino_runtime, "release_free_memory", lambda: calls.append(1))
    module = torch.nn.Linear(4, 3).eval()
    openvino_runtime.OpenVINOModel(module, (torch.zeros(2, 4),), "t", threads=1, cache_root=tmp_path)
    assert calls == [1]
    openvino_runtime.OpenVINOModel(module, (torch.zeros(2, 4),), "t", threads=1, cache_root=tmp_path)
    assert calls == [1]  # converted once; the second load reads the cache


def test_unused_openvino_conversions_are_retired(tmp_path):
    """Conversions of another code or OpenVINO version go after a week unused, any after 90 days unused, killed
    half-written ones after a day; the current ones in use, and anything that is not a conversion, stay."""
    from masksam_core.inference.ir_cache import prune

    now = 1_800_000_000.0
    day = 86400.0
    current = "-ov2026.4.1_x-code0123abcd"
    folders = {  # name -> days since last use
        f"encoder-{'a' * 16}-256{current}": 30,  # in use: stays
        f"decoder-{'b' * 16}-d4-64x64-tokens{current}": 100,  # an old model's: goes
        f"encoder-{'a' * 16}-256-ov2026.4.1_x-code99999999": 8,  # older code, a week unused: goes
        f"prompt_generator-{'c' * 16}-d4-s256-ov2026.3.0_y-code0123abcd": 2,  # another OpenVINO, recent: stays
        f".encoder-{'d' * 16}-256{current}.tmp-k1ll3d": 2,  # half-written by a killed process: goes
        f".encoder-{'e' * 16}-256{current}.tmp-busy": 0.1,  # being written right now: stays
        "my_notes": 400,  # not a conversion: stays
    }
    for name, idle in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.bin").write_bytes(b"0")
        os.utime(tmp_path / name, (now - idle * day, now - idle * day))
    removed = {p.name for p in prune(tmp_path, current, now=now)}
    gone = {n for n in folders if n.startswith(("decoder-", ".encoder-dddd")) or "code99999999" in n}
    assert removed == gone
    assert {p.name for p in tmp_path.iterdir()} == set(folders) - gone


def test_loading_a_conversion_marks_it_used(tmp_path):
    from masksam_core.inference import openvino_runtime

    pytest.importorskip("openvino")
    module = torch.nn.Linear(4, 3).eval()
    model = openvino_runtime.OpenVINOModel(module, (torch.zeros(2, 4),), "t", threads=1, cache_root=tmp_path)
    os.utime(model.folder, (1_000_000_000, 1_000_000_000))
    again = openvino_runtime.OpenVINOModel(module, (torch.zeros(2, 4),), "t", threads=1, cache_root=tmp_path)
    assert again.folder == model.folder and model.folder.stat().st_mtime > 1_700_000_000
