"""The paper's full recipe end to end on CPU: encoder depth adapters and slice embedding, the learned conv3d stem,
the refinement head and Hungarian matching, trained for a few steps on a tiny random-weight ViT (SAM's layout),
saved as a model folder and used by ``predict`` on a volume whose geometry differs from the training data's.

The CPU recipe (cached encoder features, class-bound matching) is what ``test_train.py`` runs; this is the GPU
recipe's code path (``--recipe gpu``), which back-propagates through the frozen encoder into its adapters.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import test_train
from synthetic_data import make_case
from tiny_backbones import tiny_vit_backbone


@pytest.mark.slow
def test_full_recipe_trains_saves_and_predicts_on_the_input_grid(dataset, tmp_path, monkeypatch):
    import masksam_core.model.folder as folder
    import masksam_core.training.loop as loop
    import masksam_core.training.runner as runner
    from masksam_core.predict import main as predict
    from masksam_core.train import main as train

    monkeypatch.setattr(runner, "load_backbone", lambda *a, **k: tiny_vit_backbone(64))
    monkeypatch.setattr(folder, "load_backbone", lambda *a, **k: tiny_vit_backbone(64))
    initial = {}
    first_step = loop.Trainer.train_step

    def step(self, *a, **k):  # the trained parts' weights before the first step
        if not initial:
            initial.update(self.model.trainable_state_dict())
        return first_step(self, *a, **k)

    monkeypatch.setattr(loop.Trainer, "train_step", step)
    out = tmp_path / "model"
    assert train(["--data", str(dataset), "--out", str(out), "--backbone", "vit_b", "--recipe", "gpu",
                  "--matching", "hungarian", "--device", "cpu", "--precision", "fp32", "--max-steps", "3",
                  "--steps-per-epoch", "3", "--val-cases", "case02", "--cache-dir", str(tmp_path / "cache"),
                  "--classes", "liver,spleen,aorta", "--slab-depth", "2", "--num-queries", "5", "--spacing", "3,3,6",
                  "--progress", "json"]) == 0
    card = json.loads((out / "model.json").read_text())
    arch, training = card["architecture"], card["training"]
    assert (arch["stem"], arch["encoder_adapters"], arch["encoder_depth_embedding"], arch["refine_head"]) == \
        ("conv3d", True, True, True)
    assert training["recipe"] == "gpu" and training["matching"] == "hungarian"
    assert not training["cached_encoder_features"] and training["steps_done"] == 3
    assert {"stem", "encoder.adapters", "encoder.depth_embedding", "refine"} <= set(training["trained_parts"])
    # every trained part learned: the gradients reach the stem and the adapters through the frozen encoder
    trained = torch.load(out / "weights.pt", weights_only=True)
    assert trained.keys() == initial.keys()
    for part in ("stem.", "encoder.adapters.", "encoder.depth_embedding", "refine.", "decoder.layer_adapters."):
        names = [n for n in trained if n.startswith(part)]
        assert names and any(not torch.equal(trained[n], initial[n]) for n in names), part

    # a volume unlike the training cases: other size, spacing, origin and an oblique direction
    image, _ = make_case(7, size=(36, 30, 9), spacing=(2.5, 2.0, 5.0))
    image.SetOrigin((12.5, -40.0, 7.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    assert predict(["-i", str(path), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(out), "--device", "cpu",
                    "--runtime", "torch", "--progress", "json"]) == 0
    ref, seg = sitk.ReadImage(str(path)), sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert seg.GetSize() == ref.GetSize()
    assert np.allclose(seg.GetSpacing(), ref.GetSpacing()) and np.allclose(seg.GetOrigin(), ref.GetOrigin())
    assert np.allclose(seg.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayViewFromImage(seg))) <= {0, 1, 2, 3}
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["labels"] == {"1": "liver", "2": "spleen", "3": "aorta"}


dataset = test_train.dataset  # three synthetic cases
