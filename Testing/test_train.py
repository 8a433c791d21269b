"""Headless training end to end on synthetic data, with a tiny random-weight backbone (fast on CPU).

The real LiteMedSAM path differs only in the backbone; ``test_model.py`` covers loading it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from masksam_core.errors import InputError, MaskSAMError
from synthetic_data import make_msd_dataset, make_nnunet_dataset
from tiny_backbones import tiny_tinyvit_backbone

HERE = Path(__file__).resolve().parent
COMMON = ["--classes", "liver,spleen,aorta", "--slab-depth", "2", "--num-queries", "6", "--feature-copies", "2",
          "--spacing", "3,3,6", "--progress", "json"]


@pytest.fixture()
def tiny(monkeypatch):
    import masksam_core.model.folder as folder
    import masksam_core.training.runner as runner

    monkeypatch.setattr(runner, "load_backbone", lambda *a, **k: tiny_tinyvit_backbone())
    monkeypatch.setattr(folder, "load_backbone", lambda *a, **k: tiny_tinyvit_backbone())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_nnunet_dataset(tmp_path_factory.mktemp("data") / "Dataset001", n_cases=3)


def _train(args):
    from masksam_core.train import main

    return main(args)


def _log(out: Path):
    import csv

    with (out / "train_log.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_training_runs_loss_falls_and_predict_loads_the_model(tiny, dataset, tmp_path, capsys):
    out = tmp_path / "model"
    assert _train(["--data", str(dataset), "--out", str(out), "--max-steps", "40", "--steps-per-epoch", "20",
                   "--val-cases", "case02", "--lr", "3e-3", "--precision", "fp32", "--prompt-fraction", "0.25"]
                  + COMMON) == 0
    rows = [r for r in _log(out) if r["loss"]]
    first = np.mean([float(r["loss_aux_dice"]) for r in rows[:5]])
    last = np.mean([float(r["loss_aux_dice"]) for r in rows[-5:]])
    assert last < first, (first, last)
    val = [r for r in _log(out) if r["val_dice_mean"]]
    assert len(val) == 2 and "val_dice_liver" in val[0]
    for name in ("model.json", "weights.pt", "curves.png", "summary.json", "train_config.json", "latest/model.json",
                 "README.md"):
        assert (out / name).exists(), name
    readme = (out / "README.md").read_text()
    assert "| 1 | liver |" in readme and "validation Dice" in readme and "not for clinical use" in readme.lower()
    assert "Validation held out whole cases (case02), never trained on." in readme
    (out / "README.md").unlink()
    from masksam_core.model.__main__ import main as model_main

    assert model_main(["card", str(out)]) == 0 and (out / "README.md").read_text() == readme
    card = json.loads((out / "model.json").read_text())
    # the training cases (not the validation case) are the model's atlas, in the folder and its latest/ copy
    assert [c["id"] for c in card["atlas"]["cases"]] == ["case00", "case01"] and card["modalities"] == ["CT"]
    assert (out / "atlas" / "atlas.json").is_file() and (out / "latest" / "atlas" / "case01_labels.nii.gz").is_file()
    assert card["training"]["recipe"] == "cpu" and card["training"]["cached_encoder_features"]
    assert "prompt_generator" in card["training"]["trained_parts"]
    assert [c["name"] for c in card["classes"]] == ["liver", "spleen", "aorta"]
    # the model folder loads in predict and produces a labelmap on the input grid
    from masksam_core.predict import main as predict

    image = dataset / "imagesTr" / "case00_0000.nii.gz"
    assert predict(["-i", str(image), "-o", str(tmp_path / "pred.nii.gz"), "--model", str(out),
                    "--progress", "json"]) == 0
    pred = sitk.ReadImage(str(tmp_path / "pred.nii.gz"))
    ref = sitk.ReadImage(str(image))
    assert pred.GetSize() == ref.GetSize() and pred.GetOrigin() == ref.GetOrigin()
    sidecar = json.loads((tmp_path / "pred.json").read_text())
    assert sidecar["labels"] == {"1": "liver", "2": "spleen", "3": "aorta"}
    assert sidecar["prompts"] == "atlas prior" and sidecar["atlas_prior"]["cases"][0]["plausible"]


def test_existing_output_is_never_overwritten_without_asking(tiny, dataset, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(MaskSAMError, match="exists and is not empty"):
        _train(["--data", str(dataset), "--out", str(out), "--max-steps", "2"] + COMMON)
    assert (out / "precious.txt").read_text() == "mine"
    with pytest.raises(MaskSAMError, match="nothing to resume"):
        _train(["--data", str(dataset), "--out", str(tmp_path / "new"), "--max-steps", "2", "--resume"] + COMMON)


def test_resume_takes_the_saved_configuration_and_refuses_a_different_one(tmp_path):
    from masksam_core.train import parse_config
    from masksam_core.training.config import TrainConfig

    out = tmp_path / "run"
    out.mkdir()
    saved = TrainConfig(data="/old/place", out=str(out), max_steps=2150, prompt_fraction=0.7907, point_aux_steps=1400,
                        slab_depth=4, spacing=[1.6, 1.6, 3.0], classes=["liver", "aorta"], feature_copies=4,
                        max_decoded=6)
    (out / "train_config.json").write_text(json.dumps(saved.to_dict()))
    cfg = parse_config(["--out", str(out), "--resume", "--data", "/new/place", "--device", "cpu"])
    assert (cfg.max_steps, cfg.prompt_fraction, cfg.point_aux_steps, cfg.slab_depth) == (2150, 0.7907, 1400, 4)
    assert (cfg.data, cfg.device, cfg.resume) == ("/new/place", "cpu", True)  # where and how may change
    same = parse_config(["--out", str(out), "--resume", "--max-steps", "2150", "--spacing", "1.6,1.6,3",
                         "--classes", "liver,aorta"])  # the original command again: accepted
    assert same.to_dict() == {**cfg.to_dict(), "data": "/old/place", "device": "auto"}
    config_file = tmp_path / "c.yaml"  # a config file's values count as given, like the command line's
    config_file.write_text("max_steps: 1750\nslab_depth: 4\n")
    with pytest.raises(MaskSAMError, match=r"max_steps \(given 1750, saved 2150\)"):
        parse_config(["--out", str(out), "--resume", "--config", str(config_file)])
    with pytest.raises(MaskSAMError, match=r"point_aux_steps \(given 0, saved 1400\); prompt_fraction \(given 0.5"):
        parse_config(["--out", str(out), "--resume", "--prompt-fraction", "0.5", "--point-aux-steps", "0"])


def test_config_file_and_effective_config(tiny, dataset, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("max_steps: 3\nsteps_per_epoch: 3\nslab_depth: 2\nnum_queries: 6\nfeature_copies: 1\n"
                   "classes: [liver, aorta]\nspacing: [3, 3, 6]\nseed: 7\n")
    out = tmp_path / "m"
    assert _train(["--data", str(dataset), "--out", str(out), "--config", str(cfg), "--seed", "9",
                   "--progress", "json"]) == 0
    eff = json.loads((out / "train_config.json").read_text())
    assert eff["max_steps"] == 3 and eff["classes"] == ["liver", "aorta"] and eff["seed"] == 9
    bad = tmp_path / "bad.json"
    bad.write_text('{"max_stepz": 3}')
    with pytest.raises(MaskSAMError, match="unknown option"):
        _train(["--data", str(dataset), "--out", str(tmp_path / "x"), "--config", str(bad)])


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {testing!r})
    from tiny_backbones import tiny_tinyvit_backbone
    import masksam_core.training.runner as runner
    import masksam_core.training.loop as loop
    runner.load_backbone = lambda *a, **k: tiny_tinyvit_backbone()
    kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
    original = loop.Trainer.train_step
    def step(self, *a, **k):
        out = original(self, *a, **k)
        if kill_at and self.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    loop.Trainer.train_step = step
    from masksam_core.train import main
    sys.exit(main(sys.argv[1:]))
""")


def _child(args, env_extra=None, torchrun=False):
    script = Path(os.environ.get("PYTEST_TMP_CHILD", "/tmp")) / "masksam_train_child.py"
    script.write_text(CHILD.format(testing=str(HERE)))
    env = {**os.environ, **(env_extra or {}), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script)] + args
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(script)] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_resume_after_sigkill_gives_the_same_weights(dataset, tmp_path):
    args = ["--data", str(dataset), "--max-steps", "12", "--steps-per-epoch", "4", "--val-cases", "case02",
            "--seed", "3", "--cache-dir", str(tmp_path / "cache")] + COMMON
    straight = _child(args + ["--out", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _child(args + ["--out", str(tmp_path / "b")], {"KILL_AT_STEP": "6"})
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "b" / "state" / "training_state.pt", weights_only=True)
    assert state["trainer"]["step"] == 4  # the last checkpoint before the kill
    resumed = _child(["--out", str(tmp_path / "b"), "--resume"])  # the rest comes from the saved configuration
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "a" / "latest" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "latest" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(r["step"]) for r in _log(tmp_path / "b") if r["loss"]]
    assert steps == list(range(1, 13))  # the log matches the weights: no duplicated or lost steps


def test_two_process_gloo_training(dataset, tmp_path):
    result = _child(["--data", str(dataset), "--out", str(tmp_path / "ddp"), "--max-steps", "4",
                     "--steps-per-epoch", "2", "--val-cases", "case02", "--device", "cpu",
                     "--cache-dir", str(tmp_path / "cache")] + COMMON, torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / "model.json").read_text())
    assert card["training"]["processes"] == 2
    assert len([r for r in _log(tmp_path / "ddp") if r["loss"]]) == 4


# ------------------------------------------------------------------------------------------ datasets

def test_msd_layout_is_read(tmp_path):
    from masksam_core.data.dataset import discover_dataset, select_classes

    spec = discover_dataset(make_msd_dataset(tmp_path / "msd"))
    assert spec.layout == "msd" and len(spec.cases) == 2
    cmap = select_classes(spec, ["spleen"])
    assert cmap.names == ["spleen"] and cmap.lut[2] == 1 and cmap.lut[1] == 0


def test_bad_datasets_name_the_problem(tmp_path):
    from masksam_core.data.dataset import check_dataset, discover_dataset, select_classes

    root = make_nnunet_dataset(tmp_path / "d", n_cases=3)
    (root / "labelsTr" / "case00.nii.gz").unlink()
    img = sitk.ReadImage(str(root / "labelsTr" / "case01.nii.gz"))
    img.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(img, str(root / "labelsTr" / "case01.nii.gz"))
    lab = sitk.ReadImage(str(root / "labelsTr" / "case02.nii.gz"))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 9
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(root / "labelsTr" / "case02.nii.gz"))
    spec = discover_dataset(root)
    with pytest.raises(InputError) as err:
        check_dataset(spec, select_classes(spec, None))
    msg = str(err.value)
    assert "case00: label missing" in msg
    assert "case01: label geometry" in msg
    assert "case02: label values [9] are not declared" in msg
    with pytest.raises(InputError, match="not in the dataset's labels"):
        select_classes(spec, ["pancreas"])
    with pytest.raises(InputError, match="no dataset.json"):
        discover_dataset(tmp_path)
    with pytest.raises(InputError, match="not found"):
        discover_dataset(tmp_path / "nope")


def test_val_slices_map_through_physical_space(tmp_path):
    from masksam_core.data.cache import build_cache
    from masksam_core.data.dataset import discover_dataset, select_classes
    from masksam_core.training.data_setup import parse_slice_ranges

    assert parse_slice_ranges("s1:1-3,7;s2:0") == {"s1": {1, 2, 3, 7}, "s2": {0}}
    root = make_nnunet_dataset(tmp_path / "d", n_cases=1, size=(32, 32, 12), spacing=(3.0, 3.0, 6.0))
    spec = discover_dataset(root)
    cases = build_cache(spec, select_classes(spec, None), (3.0, 3.0, 3.0), {"mode": "ct_window", "window": [-160, 240]},
                        tmp_path / "cache")
    # 12 slices of 6 mm -> 24 slices of 3 mm: original slice k covers model slices 2k and 2k+1
    assert cases[0].image.shape[0] == 24
    assert cases[0].model_z_for_original({3, 4}) == {6, 7, 8, 9}


def test_val_slices_auto_holds_out_one_block_of_six_slices_in_four(tmp_path, capsys):
    from masksam_core.training.config import merge_config
    from masksam_core.training.data_setup import auto_validation_slices, prepare_data

    assert auto_validation_slices(18) == set()
    assert auto_validation_slices(50) == set(range(18, 24)) | set(range(42, 48))
    norm = {"mode": "ct_window", "window": [-160, 240]}
    # 12 slices of 6 mm -> 24 model slices of 3 mm: slices 18-23 are held out, the rest trained on
    root = make_nnunet_dataset(tmp_path / "d", n_cases=2, size=(32, 32, 12), spacing=(3.0, 3.0, 6.0))
    cfg = merge_config({}, {"data": str(root), "out": str(tmp_path / "m"), "val_slices": "auto",
                            "cache_dir": str(tmp_path / "c")})
    data = prepare_data(cfg, None, (3.0, 3.0, 3.0), norm)
    assert data.val_z == {"case00": set(range(18, 24)), "case01": set(range(18, 24))}
    assert data.train_z["case00"] == set(range(18)) and data.train_z["case01"] == set(range(18))
    assert "12 of 48 slices held out" in capsys.readouterr().err
    # the model card says what such a validation measures: the same patients, not others
    assert data.validation_record() == {"kind": "within case", "cases": ["case00", "case01"], "slices": 12}
    cfg = merge_config({}, {"data": str(root), "out": str(tmp_path / "m"), "val_cases": "case01",
                            "cache_dir": str(tmp_path / "c")})
    assert prepare_data(cfg, None, (3.0, 3.0, 3.0), norm).validation_record() == {
        "kind": "across cases", "cases": ["case01"], "slices": 24}
    # too thin for a block: trained on whole, no validation, and the log says so
    thin = make_nnunet_dataset(tmp_path / "t", n_cases=1, size=(32, 32, 9), spacing=(3.0, 3.0, 6.0))
    cfg = merge_config({}, {"data": str(thin), "out": str(tmp_path / "m"), "val_slices": "AUTO",
                            "cache_dir": str(tmp_path / "c2")})
    data = prepare_data(cfg, None, (3.0, 3.0, 3.0), norm)
    assert data.val_z == {} and data.train_z == {"case00": None}
    assert data.validation_record() == {"kind": "none", "cases": [], "slices": 0}
    assert "training without validation" in capsys.readouterr().err


def test_preprocessing_cache_is_reused_and_invalidated(tmp_path):
    from masksam_core.data.cache import build_cache
    from masksam_core.data.dataset import discover_dataset, select_classes

    spec = discover_dataset(make_nnunet_dataset(tmp_path / "d", n_cases=1))
    cmap = select_classes(spec, None)
    norm = {"mode": "ct_window", "window": [-160, 240]}
    a = build_cache(spec, cmap, (3, 3, 6), norm, tmp_path / "c")
    folder = Path(a[0].image.filename).parent
    stamp = (folder / "image.npy").stat().st_mtime_ns
    b = build_cache(spec, cmap, (3, 3, 6), norm, tmp_path / "c")
    assert Path(b[0].image.filename).parent == folder and (folder / "image.npy").stat().st_mtime_ns == stamp
    c = build_cache(spec, cmap, (2, 2, 6), norm, tmp_path / "c")
    assert Path(c[0].image.filename).parent != folder


def test_killed_preprocessing_leaves_no_half_entry(tmp_path, monkeypatch):
    import masksam_core.data.cache as cache

    from masksam_core.data.dataset import discover_dataset, select_classes

    dspec = discover_dataset(make_nnunet_dataset(tmp_path / "d", n_cases=2))
    cmap = select_classes(dspec, None)
    norm = {"mode": "ct_window", "window": [-160, 240]}
    calls = {"n": 0}
    real_save = np.save

    def dying_save(path, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # during the second case
            raise KeyboardInterrupt
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(cache.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(dspec, cmap, (3, 3, 6), norm, tmp_path / "c")
    monkeypatch.setattr(cache.np, "save", real_save)
    prep = next((tmp_path / "c").iterdir())
    assert not (prep / "manifest.json").exists()
    assert not list(prep.glob(".*tmp*"))
    assert sorted(p.name for p in prep.iterdir()) == ["case00"]
    cases = cache.build_cache(dspec, cmap, (3, 3, 6), norm, tmp_path / "c")
    assert [c.case_id for c in cases] == ["case00", "case01"]


def test_init_from_fine_tunes_an_existing_model(tiny, dataset, tmp_path, capsys):
    base = tmp_path / "base"
    assert _train(["--data", str(dataset), "--out", str(base), "--max-steps", "4", "--steps-per-epoch", "4",
                   "--val-cases", "case02"] + COMMON) == 0
    tuned = tmp_path / "tuned"
    capsys.readouterr()
    assert _train(["--data", str(dataset), "--out", str(tuned), "--init-from", str(base), "--max-steps", "4",
                   "--steps-per-epoch", "4", "--val-cases", "case02"] + COMMON) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the MaskSAM Trainer's verdict reads it
    assert done["stage"] == "done" and done["dice_mean_before"] is not None and "best_dice_mean" in done
    card = json.loads((tuned / "model.json").read_text())
    assert card["training"]["init_from"] == str(base)
    # the fine-tuning curve starts with the base model on the held-out data (step 0), in the log, card and summary
    first = [r for r in _log(tuned) if r["val_dice_mean"]][0]
    assert first["step"] == "0" and first["val_aux_dice_mean"]
    before = card["training"]["val_dice_before"]
    assert before["dice_mean"] == pytest.approx(float(first["val_dice_mean"]), abs=1e-4)
    summary = json.loads((tuned / "summary.json").read_text())
    assert summary["dice_mean_before"] == before["dice_mean"] and summary["dice_before"] == before["dice"]
    assert done["dice_mean_before"] == pytest.approx(before["dice_mean"])
    assert "before fine-tuning" in (tuned / "README.md").read_text()
    base_card = json.loads((base / "model.json").read_text())
    assert card["training"]["base_training"] == base_card["training"]  # lineage kept
    # fine-tuning on the same cases replaces them in the atlas instead of adding copies
    assert [c["id"] for c in card["atlas"]["cases"]] == [c["id"] for c in base_card["atlas"]["cases"]]
    assert base_card["training"]["command"] in (tuned / "README.md").read_text()
    a = torch.load(base / "weights.pt", weights_only=True)
    b = torch.load(tuned / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MaskSAMError, match="fine-tuning keeps them"):
        _train(["--data", str(dataset), "--out", str(tmp_path / "x"), "--init-from", str(base), "--max-steps", "1",
                "--classes", "liver"] + COMMON[2:])
    # without --classes the base model's classes are trained, and the saved configuration says which
    assert _train(["--data", str(dataset), "--out", str(tmp_path / "y"), "--init-from", str(base), "--max-steps",
                   "1", "--val-cases", "case02"] + COMMON[2:]) == 0
    saved = json.loads((tmp_path / "y" / "train_config.json").read_text())
    assert saved["classes"] == ["liver", "spleen", "aorta"] and saved["init_from"] == str(base)


def test_augmentation_keeps_image_and_label_aligned():
    from masksam_core.data.augment import augment_slab

    img = torch.zeros(1, 3, 64, 64)
    img[0, :, 10:30, 20:50] = 1.0
    lab = (img[0] > 0.5).long()
    cfg = {"p_rotate": 1.0, "p_scale": 1.0, "p_brightness": 0, "p_contrast": 0, "p_gamma": 0, "p_noise": 0,
           "p_blur": 0, "p_lowres": 0}
    for seed in range(5):
        ai, al = augment_slab(img, lab, cfg, torch.Generator().manual_seed(seed))
        bright = ai[0] > 0.5
        agree = (bright == (al == 1)).float().mean()
        assert agree > 0.98
        assert torch.equal(al[0], al[1])  # the same transform for every slice of the slab
    a1 = augment_slab(img, lab, None, torch.Generator().manual_seed(1))
    a2 = augment_slab(img, lab, None, torch.Generator().manual_seed(1))
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])


def test_each_stage_has_its_own_poly_schedule():
    from masksam_core.training.loop import LoopConfig, staged_lr

    cfg = LoopConfig(max_steps=100, steps_per_epoch=10, lr=1e-3, prompt_steps=60)
    assert staged_lr(cfg, 0) == pytest.approx(1e-3)
    assert staged_lr(cfg, 59) < 1e-4  # the prompt stage decays to ~0 ...
    assert staged_lr(cfg, 60) == pytest.approx(1e-3)  # ... and the decoder stage starts again from lr
    assert staged_lr(cfg, 99) < staged_lr(cfg, 80) < staged_lr(cfg, 61)
    plain = LoopConfig(max_steps=100, steps_per_epoch=10, lr=1e-3)
    assert staged_lr(plain, 50) == pytest.approx(1e-3 * 0.5 ** 0.9)


def test_tensorboard_scalars_are_written_and_purged_on_resume(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from masksam_core.training.progress_log import TrainingLog

    log = TrainingLog(tmp_path, ["loss_ce"], ["liver"])
    for step in range(1, 6):
        log.write({"step": step, "epoch": 0, "loss": 1.0 / step, "loss_ce": 0.5})
    log.write({"step": 5, "epoch": 0, "val_dice_mean": 0.4, "val_dice_liver": 0.4})
    log.close()
    resumed = TrainingLog(tmp_path, ["loss_ce"], ["liver"], resume_step=3)  # killed after step 5, resumed at 3
    resumed.write({"step": 4, "epoch": 0, "loss": 9.0, "loss_ce": 0.5})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 9.0)]
    assert [r["step"] for r in resumed.rows()] == ["1", "2", "3", "4"]


def test_fine_tuning_defaults_to_one_cached_copy_and_three_decoded_queries():
    """The fine-tuning defaults that fit 10 minutes on 2 cores (benchmarks/bench_finetune.py); explicit values
    win, in a config file or on the command line."""
    from masksam_core.training.config import merge_config

    fresh, tuned = merge_config({}, {}), merge_config({}, {"init_from": "model"})
    assert (fresh.feature_copies, fresh.max_decoded) == (4, 6)
    assert (tuned.feature_copies, tuned.max_decoded) == (1, 3)
    assert merge_config({"feature_copies": 3}, {"init_from": "model"}).feature_copies == 3
    assert merge_config({"max_decoded": 5}, {"init_from": "model"}).max_decoded == 5
    assert merge_config({"max_decoded": 5}, {"init_from": "model", "max_decoded": 0}).max_decoded == 0
    with pytest.raises(MaskSAMError, match="feature-copies"):
        merge_config({}, {"feature_copies": 0})
    with pytest.raises(MaskSAMError, match="max-decoded"):
        merge_config({}, {"max_decoded": -1})
    with pytest.raises(MaskSAMError, match="matching"):
        merge_config({"matching": "greedy"}, {})


def test_matching_is_class_bound_for_the_cpu_recipe_and_follows_the_base_model():
    from types import SimpleNamespace

    from masksam_core.training.runner import resolve_matching

    enough = SimpleNamespace(num_queries=16, num_classes=16)
    few = SimpleNamespace(num_queries=6, num_classes=16)
    assert resolve_matching("auto", True, enough, None) == "class_bound"
    assert resolve_matching("auto", False, enough, None) == "hungarian"  # GPU recipe: the paper's matching
    assert resolve_matching("auto", True, few, None) == "hungarian"
    base = SimpleNamespace(training={"matching": "hungarian"})
    assert resolve_matching("auto", True, enough, base) == "hungarian"
    with pytest.raises(MaskSAMError, match="one query per class"):
        resolve_matching("class_bound", True, few, None)


def test_prompt_stage_length_new_model_fine_tuning_and_explicit():
    from masksam_core.training.config import merge_config
    from masksam_core.training.runner import prompt_steps_for

    assert prompt_steps_for(merge_config({}, {"prompt_fraction": 0.25}), 400, cached=True) == 100
    assert prompt_steps_for(merge_config({}, {"init_from": "m"}), 400, cached=True) == 0
    assert prompt_steps_for(merge_config({}, {"init_from": "m", "prompt_fraction": 0.75}), 400, cached=True) == 300
    assert prompt_steps_for(merge_config({"prompt_fraction": 0.5}, {}), 400, cached=False) == 0  # GPU recipe
    for bad in (1.0, -0.1):
        with pytest.raises(MaskSAMError, match="prompt-fraction"):
            merge_config({}, {"prompt_fraction": bad})


def test_class_bound_training_uses_dense_auxiliary_terms():
    from masksam_core.model.masksam import MaskSAM
    from masksam_core.model.recipes import architecture_for_recipe
    from masksam_core.training.loop import LoopConfig, Trainer

    model = MaskSAM(tiny_tinyvit_backbone(), architecture_for_recipe("cpu", 3, 2, 4, None))
    for matching, dense in (("class_bound", True), ("hungarian", False)):
        trainer = Trainer(model, LoopConfig(max_steps=1, steps_per_epoch=1, matching=matching), torch.device("cpu"), None)
        assert trainer.criterion.dense_aux is dense


def test_prompt_stage_precision_applies_to_the_prompt_generator_steps_only(monkeypatch):
    """--prompt-stage-precision: the prompt-generator-only steps run under their own autocast (bf16 there is faster
    on a CPU with native bf16), the decoder steps and validation under --precision's; "auto" is bf16 only where the
    CPU has native bf16; an unknown value is refused."""
    from masksam_core.model.masksam import MaskSAM
    from masksam_core.model.recipes import architecture_for_recipe
    from masksam_core.training import runner
    from masksam_core.training.config import merge_config
    from masksam_core.training.loop import Batch, LoopConfig, Trainer

    cpu = torch.device("cpu")
    monkeypatch.setattr(runner, "cpu_supports_bf16", lambda: True)
    assert runner.prompt_stage_autocast(cpu, "auto", None) is torch.bfloat16
    assert runner.prompt_stage_autocast(cpu, "same", None) is None
    assert runner.prompt_stage_autocast(cpu, "same", torch.bfloat16) is torch.bfloat16
    assert runner.prompt_stage_autocast(cpu, "fp32", torch.bfloat16) is None
    assert runner.prompt_stage_autocast(cpu, "bf16", None) is torch.bfloat16
    monkeypatch.setattr(runner, "cpu_supports_bf16", lambda: False)
    assert runner.prompt_stage_autocast(cpu, "auto", None) is None
    with pytest.raises(MaskSAMError, match="prompt-stage-precision"):
        merge_config({}, {"prompt_stage_precision": "fp16"})

    torch.manual_seed(0)
    model = MaskSAM(tiny_tinyvit_backbone(), architecture_for_recipe("cpu", 3, 2, 4, None))
    seen = []
    model.prompt_generator.register_forward_hook(
        lambda *_: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    label = torch.zeros(1, 2, 64, 64, dtype=torch.long)
    label[0, :, 8:24, 8:40] = 1
    label[0, :, 40:56, 16:48] = 2
    batch = Batch(slab=torch.randn(1, 1, 2, 64, 64), label=label)
    trainer = Trainer(model, LoopConfig(max_steps=3, steps_per_epoch=3, prompt_steps=2, matching="class_bound"),
                      cpu, None, prompt_amp=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        row = trainer.train_step(batch, gen)
        assert np.isfinite(row["loss"])
    trainer.validate(iter([batch]), decode=True)
    assert seen == [torch.bfloat16, torch.bfloat16, None, None]


def test_point_sampled_start_then_dense_auxiliary_losses(tiny, dataset, tmp_path, monkeypatch):
    """--point-aux-steps K: class-bound steps before K train the auxiliary masks at sampled points, later ones on
    every pixel (here with --aux-bce balanced); the learning rate restarts at K and at the decoder stage; the card
    records both stages and the BCE mode."""
    from masksam_core.training import criterion

    modes, bce_modes = [], set()
    original = criterion.SetCriterion.forward

    def spy(self, outputs, targets, indices=None, generator=None, dense_aux=None):
        modes.append(self.dense_aux if dense_aux is None else dense_aux)
        bce_modes.add(self.aux_bce)
        return original(self, outputs, targets, indices, generator, dense_aux)

    monkeypatch.setattr(criterion.SetCriterion, "forward", spy)
    out = tmp_path / "model"
    assert _train(["--data", str(dataset), "--out", str(out), "--max-steps", "8", "--steps-per-epoch", "4",
                   "--prompt-fraction", "0.5", "--point-aux-steps", "2", "--lr", "1e-3", "--val-cases", "case02",
                   "--precision", "fp32", "--aux-bce", "balanced"] + COMMON) == 0
    assert modes == [False, False, True, True, True, True, True, True] and bce_modes == {"balanced"}
    lr = [float(r["lr"]) for r in _log(out) if r["loss"]]
    assert lr[0] == lr[2] == lr[4] == pytest.approx(1e-3) and lr[1] < lr[0] and lr[3] < lr[2]
    # the prompt-only stage validates the auxiliary masks alone; the decoder stage both
    val = {int(r["step"]): r for r in _log(out) if r["val_aux_dice_mean"] or r["val_dice_mean"]}
    assert sorted(val) == [4, 8] and not val[4]["val_dice_mean"] and val[8]["val_dice_mean"]
    assert val[4]["val_aux_dice_mean"] and val[8]["val_aux_dice_mean"] and "val_aux_dice_liver" in val[4]
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["prompt_steps"] == 4 and card["training"]["point_aux_steps"] == 2
    assert "of which with point-sampled auxiliary mask losses: 2" in (out / "README.md").read_text()
    assert card["training"]["aux_bce"] == "balanced"
    assert "auxiliary mask BCE on every pixel: balanced" in (out / "README.md").read_text()
    # a switch outside the prompt stage, or with Hungarian matching, is refused before any work
    for extra, message in ((["--point-aux-steps", "4"], "must be below the prompt-generator steps"),
                           (["--point-aux-steps", "2", "--matching", "hungarian"], "class-bound matching only"),
                           (["--point-aux-steps", "-1"], "0 or more"),
                           (["--aux-bce", "balanced", "--matching", "hungarian"], "class-bound matching only")):
        with pytest.raises(MaskSAMError, match=message):
            _train(["--data", str(dataset), "--out", str(tmp_path / "bad"), "--max-steps", "8",
                    "--prompt-fraction", "0.5"] + extra + COMMON)
        assert not (tmp_path / "bad").exists()


def test_aux_bce_option_reaches_the_criterion_and_rejects_unknown_modes():
    from masksam_core.training.config import merge_config

    assert merge_config({}, {}).aux_bce == "mean"
    assert merge_config({"aux_bce": "balanced"}, {}).aux_bce == "balanced"
    with pytest.raises(MaskSAMError, match="--aux-bce must be one of mean, balanced"):
        merge_config({"aux_bce": "weighted"}, {})


def test_stage_bounds_with_a_point_sampled_start():
    from masksam_core.training.loop import LoopConfig, stage_bounds, staged_lr

    cfg = LoopConfig(max_steps=100, steps_per_epoch=10, lr=1e-3, prompt_steps=60, point_aux_steps=20,
                     matching="class_bound")
    assert stage_bounds(cfg) == [20, 60, 100]
    assert staged_lr(cfg, 19) < 1e-4 and staged_lr(cfg, 20) == pytest.approx(1e-3)
    assert staged_lr(cfg, 59) < 1e-4 and staged_lr(cfg, 60) == pytest.approx(1e-3)
    assert staged_lr(cfg, 40) == pytest.approx(1e-3 * 0.5 ** 0.9)
    hungarian = LoopConfig(max_steps=100, steps_per_epoch=10, prompt_steps=60, point_aux_steps=20)
    assert stage_bounds(hungarian) == [60, 100]


def test_validation_scores_each_class_auxiliary_channel():
    """Class-bound matching: channel k of the auxiliary masks is class k's segmentation; its Dice counts labelled
    voxels only. Without decoding there is no decoded Dice; Hungarian matching has no class channels."""
    from masksam_core.model.masksam import MaskSAM
    from masksam_core.model.recipes import architecture_for_recipe
    from masksam_core.training.loop import Batch, LoopConfig, Trainer

    model = MaskSAM(tiny_tinyvit_backbone(), architecture_for_recipe("cpu", 3, 2, 4, None))
    label = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    label[0, :, 1:3, 1:5] = 1  # 8 voxels per slice
    label[0, :, 5:7, 2:6] = 2
    label[0, 1, :, 4:] = 255  # ignored: class 1 keeps 6 voxels there, class 2 keeps 4
    aux = torch.full((2, 4, 8, 8), -5.0)
    aux[:, 1, 1:3, 1:5] = 5.0  # exactly class 1 (and class 1's ignored voxels, which do not count)
    aux[:, 2, 5:7, 2:4] = 5.0  # half of class 2
    batch = Batch(slab=torch.zeros(1, 1, 2, 8, 8), label=label)
    for matching, expected in (("class_bound", {1: 1.0, 2: 2 * 8 / (8 + 12)}), ("hungarian", {})):
        trainer = Trainer(model, LoopConfig(max_steps=1, steps_per_epoch=1, matching=matching),
                          torch.device("cpu"), None)
        trainer._forward = lambda batch, decode: {"aux_mask_logits": aux}
        scores = trainer.validate(iter([batch]), decode=False)
        assert scores["dice"] == {}
        assert scores["aux_dice"] == pytest.approx(expected)


def test_feature_cache_encodes_as_inference_does(tmp_path, monkeypatch):
    """The cache's features are encoded as inference encodes them: on OpenVINO in bf16 where the CPU has native bf16
    (auto), fp32 when asked for; each precision keys its own cache, and the source says which it holds."""
    from masksam_core.inference import engine
    from masksam_core.model.masksam import MaskSAM
    from masksam_core.model.recipes import architecture_for_recipe
    from masksam_core.training import data_setup
    from masksam_core.training.config import merge_config
    from tiny_backbones import tiny_tinyvit_backbone

    model = MaskSAM(tiny_tinyvit_backbone(), architecture_for_recipe("cpu", 2, slab_depth=2, num_queries=2,
                                                                     prompt_channels=[8, 8, 8])).eval()
    root = make_nnunet_dataset(tmp_path / "d", n_cases=1, size=(32, 32, 6), spacing=(3.0, 3.0, 3.0))
    asked = []
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(data_setup, "resolve_runtime", lambda *a: "openvino")
    monkeypatch.setattr(data_setup, "make_encoder_runner",
                        lambda m, runtime, threads, bf16, device: asked.append(bf16) or (m.encoder, runtime))
    folders = []
    for precision, expected in (("auto", True), ("fp32", False)):
        cfg = merge_config({}, {"data": str(root), "out": str(tmp_path / "m"), "cache_dir": str(tmp_path / "c"),
                                "precision": precision, "feature_copies": 1})
        data = data_setup.prepare_data(cfg, None, (3.0, 3.0, 3.0), {"mode": "ct_window", "window": [-160, 240]},
                                       progress=False)
        source = data.make_source(model, cached=True, device=torch.device("cpu"), batch_size=1, seed=0,
                                  progress=False)
        assert asked[-1] is expected and source.feature_precision == ("bf16" if expected else "fp32")
        folders.append({p.name for p in (tmp_path / "c").glob("features-*")})
    assert len(folders[0]) == 1 and len(folders[1]) == 2
