"""Defaults that work: the recipe's measured values for the options a run leaves out, the line that says which
recipe was picked, the default validation, and a default_model.yaml that runs on any dataset."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from masksam_core.errors import MaskSAMError
from synthetic_data import make_nnunet_dataset
from tiny_backbones import tiny_tinyvit_backbone

MODELS = Path(__file__).resolve().parents[1] / "masksam_core" / "models"
NORM = {"mode": "ct_window", "window": [-160, 240]}


@pytest.fixture()
def tiny(monkeypatch):
    import masksam_core.model.folder as folder
    import masksam_core.training.runner as runner

    monkeypatch.setattr(runner, "load_backbone", lambda *a, **k: tiny_tinyvit_backbone())
    monkeypatch.setattr(folder, "load_backbone", lambda *a, **k: tiny_tinyvit_backbone())


def _defaults(cli, recipe="cpu", num_classes=16, file_values=None):
    from masksam_core.training.config import apply_recipe_defaults, merge_config

    return apply_recipe_defaults(merge_config(file_values or {}, cli), recipe, num_classes)


def test_cpu_recipe_takes_the_measured_defaults_and_scales_the_schedule():
    cfg, filled = _defaults({})
    assert (cfg.slab_depth, cfg.num_queries, cfg.feature_copies, cfg.max_decoded) == (4, 16, 4, 6)
    assert (cfg.lr, cfg.max_steps, cfg.steps_per_epoch, cfg.prompt_fraction) == (3e-3, 2150, 100, 0.7907)
    assert (cfg.point_aux_steps, cfg.background_threshold) == (1400, 0.5)
    assert {"slab_depth", "point_aux_steps", "background_threshold", "max_steps", "feature_copies"} <= set(filled)
    short, _ = _defaults({"max_steps": 430})  # the same proportions: 340 prompt-generator steps, 280 point-sampled
    assert (short.max_steps, int(short.prompt_fraction * 430), short.point_aux_steps) == (430, 340, 280)
    tiny_run, _ = _defaults({"max_steps": 2})  # one prompt step: no room for a point-sampled start
    assert tiny_run.point_aux_steps == 0
    many, _ = _defaults({}, num_classes=21)  # a query per class, so that class-bound matching applies
    assert many.num_queries == 21 and many.point_aux_steps == 1400
    assert _defaults({"matching": "hungarian"})[0].point_aux_steps == 0  # a point-sampled start is class-bound's
    assert _defaults({"num_queries": 6})[0].point_aux_steps == 0  # auto matching is Hungarian with N < C


def test_given_options_win_over_the_recipe_defaults():
    cfg, filled = _defaults({"slab_depth": 2, "lr": 1e-3, "point_aux_steps": 0, "background_threshold": "none",
                             "prompt_fraction": 0.25, "epochs": 3}, file_values={"steps_per_epoch": 7})
    assert (cfg.slab_depth, cfg.lr, cfg.point_aux_steps, cfg.background_threshold) == (2, 1e-3, 0, "none")
    assert (cfg.prompt_fraction, cfg.epochs, cfg.max_steps, cfg.steps_per_epoch) == (0.25, 3, None, 7)
    assert not {"slab_depth", "lr", "point_aux_steps", "background_threshold", "steps_per_epoch"} & set(filled)
    assert "feature_copies" not in _defaults({"feature_copies": 2})[1]
    assert _defaults({"prompt_fraction": 0.5, "max_steps": 100})[0].point_aux_steps == 41  # 14/17 of 50
    assert _defaults({"background_threshold": "0.3"})[0].background_threshold == 0.3
    with pytest.raises(MaskSAMError, match="between 0 and 1, or none"):
        _defaults({"background_threshold": "high"})


def test_fine_tuning_and_gpu_keep_their_own_defaults():
    tuned, _ = _defaults({"init_from": "model"})
    assert (tuned.feature_copies, tuned.max_decoded, tuned.lr, tuned.prompt_fraction) == (1, 3, 3e-4, 0.0)
    assert (tuned.point_aux_steps, tuned.background_threshold, tuned.slab_depth) == (0, None, None)  # the base's
    assert (tuned.epochs, tuned.steps_per_epoch, tuned.max_steps) == (20, 50, None)
    gpu, _ = _defaults({}, recipe="gpu")
    assert (gpu.slab_depth, gpu.num_queries, gpu.lr, gpu.point_aux_steps, gpu.background_threshold) == \
        (8, 16, 1e-3, 0, None)
    assert (gpu.epochs, gpu.steps_per_epoch) == (20, 250)


def test_the_recipe_and_why():
    from masksam_core.training.config import resolve_recipe

    assert resolve_recipe("auto", "cpu", "auto", False) == ("cpu", "no CUDA device")
    assert resolve_recipe("auto", "cpu", "cpu", True) == ("cpu", "--device cpu")
    assert resolve_recipe("auto", "cuda", "auto", True) == ("gpu", "CUDA device")
    assert resolve_recipe("cpu", "cuda", "auto", True) == ("cpu", "--recipe cpu")


def test_a_bare_cpu_run_says_its_recipe_and_validates_on_a_held_out_case(tiny, tmp_path, capsys):
    from masksam_core.train import main

    data = make_nnunet_dataset(tmp_path / "d", n_cases=2)
    out = tmp_path / "m"
    assert main(["--data", str(data), "--out", str(out), "--max-steps", "6", "--classes", "liver,spleen,aorta",
                 "--spacing", "3,3,6", "--feature-copies", "1", "--device", "cpu", "--progress", "json"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("recipe: ")]
    assert len(lines) == 1, err
    line = lines[0]
    assert re.match(r"recipe: cpu \((no CUDA device|--device cpu)\), new model: slab depth 4, 16 queries, "
                    r"class-bound matching, background threshold 0\.5, 6 steps \(4 prompt-generator steps, the "
                    r"first 3 point-sampled\), lr 0\.003, 100 steps per epoch, 1 feature copy, 6 decoded queries "
                    r"per slab;", line), line
    assert "given: --classes, --device cpu, --feature-copies 1, --max-steps 6, --spacing;" in line
    assert re.search(r"validation: across cases, case0[01] held out whole \(1 of 2 cases", err), err
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["slab_depth"], saved["point_aux_steps"], saved["background_threshold"]) == (4, 3, 0.5)
    assert saved["recipe_choice"] == line and "max_steps" in saved["options_given"]
    assert saved["val_cases"] in (["case00"], ["case01"])  # the default split, recorded to be repeated
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["validation"]["kind"] == "across cases"
    assert card["training"]["recipe_choice"] == line and card["inference"]["background_threshold"] == 0.5
    from masksam_core.training.config import merge_config, read_config_file

    again = merge_config(read_config_file(str(out / "train_config.json")), {})  # the saved file repeats the run
    assert again.val_cases == saved["val_cases"] and again.slab_depth == 4


def _split(root: Path, tmp_path: Path, **options):
    from masksam_core.training.config import merge_config
    from masksam_core.training.data_setup import prepare_data

    cfg = merge_config({}, {"data": str(root), "out": str(tmp_path / "m"), "cache_dir": str(tmp_path / "c"),
                            **options})
    return prepare_data(cfg, None, (3.0, 3.0, 3.0), NORM)


def test_default_validation_across_cases_within_one_case_or_none(tmp_path, capsys):
    two = make_nnunet_dataset(tmp_path / "two", n_cases=2, size=(32, 32, 12))
    first = _split(two, tmp_path)
    held = first.validation_options["val_cases"]
    assert len(held) == 1 and first.validation_record()["kind"] == "across cases"
    assert first.train_z[held[0]] == set() and _split(two, tmp_path).validation_options == {"val_cases": held}
    assert "validation: across cases" in capsys.readouterr().err
    # one case: held-out slices of it (24 slices at 3 mm: 18-23), never trained on
    one = make_nnunet_dataset(tmp_path / "one", n_cases=1, size=(32, 32, 12))
    data = _split(one, tmp_path)
    assert data.val_z == {"case00": set(range(18, 24))} and data.train_z == {"case00": set(range(18))}
    assert data.validation_record()["kind"] == "within case" and data.validation_options == {"val_slices": "auto"}
    assert "validation: within case, 6 of 24 slices of case00 held out" in capsys.readouterr().err
    # too thin to hold slices out: no validation, said in one line with what to do
    thin = make_nnunet_dataset(tmp_path / "thin", n_cases=1, size=(32, 32, 9))
    data = _split(thin, tmp_path)
    assert data.val_z == {} and data.validation_record()["kind"] == "none"
    assert data.validation_options == {"val_fraction": 0.0}
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("validation:")]
    assert len(notes) == 1 and "training without validation" in notes[0] and "give a second case" in notes[0]
    # an explicit opt-out still gives none
    data = _split(two, tmp_path, val_fraction=0.0)
    assert data.val_z == {} and data.validation_options == {}
    assert "validation: none (--val-fraction 0)" in capsys.readouterr().err


def test_default_model_yaml_has_no_dataset_specific_keys_and_loads_on_other_classes(tmp_path):
    from masksam_core.training.config import merge_config, read_config_file
    from masksam_core.training.data_setup import prepare_data

    for name in ("default_model.yaml", "default_model_prior.yaml"):
        values = read_config_file(str(MODELS / name))
        assert not {"classes", "val_slices", "val_cases", "name"} & set(values), name
        header = (MODELS / name).read_text()
        assert "--val-slices s1:18-23,42-47,66-71,90-95" in header and "--name masksam-litemedsam-abdomen15-s1" \
            in header  # the bundled model stays reproducible
    assert "--classes spleen,kidney_right," in (MODELS / "default_model.yaml").read_text()
    root = make_nnunet_dataset(tmp_path / "other", n_cases=2, size=(32, 32, 12))
    labels = {"background": 0, "kidney": 1, "lung": 2, "heart": 3}
    spec = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**spec, "labels": labels}))
    cfg = merge_config(read_config_file(str(MODELS / "default_model.yaml")),
                       {"data": str(root), "out": str(tmp_path / "m"), "cache_dir": str(tmp_path / "c")})
    data = prepare_data(cfg, cfg.classes, (3.0, 3.0, 6.0), NORM, progress=False)
    assert data.class_names == ["kidney", "lung", "heart"] and data.validation_record()["kind"] == "across cases"


def test_a_resumed_run_says_what_its_first_run_was_given(tmp_path):
    from masksam_core.train import parse_config
    from masksam_core.training.config import TrainConfig

    out = tmp_path / "run"
    out.mkdir()
    saved = {**TrainConfig(data="/d", out=str(out), max_steps=40, slab_depth=4).to_dict(),
             "recipe_choice": "recipe: cpu ...", "options_given": ["data", "max_steps", "out"]}
    (out / "train_config.json").write_text(json.dumps(saved))
    cfg = parse_config(["--out", str(out), "--resume", "--device", "cpu"])
    assert cfg.given == ["data", "device", "max_steps", "out", "resume"] and (cfg.max_steps, cfg.slab_depth) == (40, 4)
    assert not cfg.legacy


def test_a_run_saved_before_the_recipe_defaults_resumes_with_the_defaults_it_started_with(tmp_path):
    """A train_config.json written before the recipe defaults existed (no "recipe_choice") left the schedule and the
    fusion unset, which then meant a quarter of the steps for the prompt generator, the spec's fusion and 20 epochs
    of 50 steps on a CPU: --resume must continue that run, not switch it to today's recipe halfway."""
    from masksam_core.train import parse_config
    from masksam_core.training.config import NO_THRESHOLD, TrainConfig, apply_recipe_defaults

    out = tmp_path / "old_run"
    out.mkdir()
    old = TrainConfig(data="/d", out=str(out), slab_depth=8, num_queries=16, point_aux_steps=0).to_dict()
    assert old["prompt_fraction"] is None and old["background_threshold"] is None and old["max_steps"] is None
    (out / "train_config.json").write_text(json.dumps(old))
    cfg = parse_config(["--out", str(out), "--resume", "--device", "cpu"])
    assert cfg.legacy
    filled, _ = apply_recipe_defaults(cfg, "cpu", 4)
    assert (filled.prompt_fraction, filled.background_threshold, filled.lr) == (0.25, NO_THRESHOLD, 1e-3)
    assert (filled.epochs, filled.steps_per_epoch, filled.point_aux_steps, filled.slab_depth) == (20, 50, 0, 8)
