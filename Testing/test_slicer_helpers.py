"""The Slicer modules' plain-Python helpers, tested without slicer-core (on every supported Python): model
registry and organ checklist, dependency check and install plan, the train process's command and outcome, and the
self-test's stub engine."""
from __future__ import annotations

import json
import subprocess
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MaskSAMSegment"))
sys.path.insert(0, str(ROOT / "MaskSAMTrainer"))
from MaskSAMSegmentLib import dependencies, engine_process, models  # noqa: E402
from MaskSAMTrainerLib import train_process  # noqa: E402

HELPERS = ["MaskSAMSegmentLib.engine_process", "MaskSAMSegmentLib.models", "MaskSAMSegmentLib.dependencies",
           "MaskSAMSegmentLib.stub_engine", "MaskSAMTrainerLib.train_process", "MaskSAMTrainerLib.progress_rows"]


def test_helpers_import_without_slicer_or_qt():
    code = ("import sys\nsys.modules['slicer'] = None\nsys.modules['qt'] = None\nsys.modules['vtk'] = None\n"
            f"sys.path[:0] = [{str(ROOT / 'MaskSAMSegment')!r}, {str(ROOT / 'MaskSAMTrainer')!r}]\n"
            "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in HELPERS))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _model(folder: Path, name="mine", classes=("liver", "spleen", "kidney_left")) -> Path:
    from masksam_core.labels import class_entries

    folder.mkdir(parents=True)
    entries = class_entries(list(classes))
    (folder / "model.json").write_text(json.dumps({"name": name, "backbone": {"name": "litemedsam"},
                                                   "classes": entries[::-1]}))  # order on the card: any
    return folder


def test_model_registry_persists(tmp_path):
    folder = _model(tmp_path / "m")
    reg = models.ModelRegistry(tmp_path / "settings" / "models.json")
    reg.add(str(folder))
    again = models.ModelRegistry(tmp_path / "settings" / "models.json")
    assert [m["path"] for m in again.models() if "mine" in m["label"]] == [str(folder)]
    with pytest.raises(ValueError, match="not a MaskSAM model folder"):
        reg.add(str(tmp_path))
    again.remove(str(folder))
    assert str(folder) not in again.user_folders()


def test_organ_checklist_and_the_organs_argument(tmp_path):
    folder = _model(tmp_path / "m")
    organs = models.model_organs(str(folder))
    assert organs == [("liver", "Liver"), ("spleen", "Spleen"), ("kidney_left", "Left kidney")]  # label order
    assert models.model_organs(str(tmp_path / "nothing")) == []
    names = [n for n, _ in organs]
    assert models.organs_argument(names, names) is None  # all checked: predict decodes everything
    assert models.organs_argument(names, ["kidney_left", "liver"]) == ["liver", "kidney_left"]
    with pytest.raises(ValueError, match="at least one organ"):
        models.organs_argument(names, [])
    with pytest.raises(ValueError, match="not organs of this model: aorta"):
        models.organs_argument(names, ["aorta"])
    cmd = engine_process.predict_command("py", "in.nrrd", "out.nrrd", str(folder), "cpu",
                                         organs=models.organs_argument(names, ["spleen"]))
    assert cmd[cmd.index("--organs") + 1] == "spleen"
    assert "--organs" not in engine_process.predict_command("py", "i", "o", organs=None)


def test_predict_parses_the_modules_command():
    from masksam_core.predict import build_parser, output_format

    cmd = engine_process.predict_command("py", "in.nrrd", "out.nrrd", "/m", "cpu", True, modality="MR")
    args = build_parser().parse_args(cmd[3:])
    assert output_format(Path(args.output), args.format) == "nrrd"  # labels.nrrd: the extension decides
    assert args.modality == "MR"


def test_dependency_list_is_the_engines():
    text = (ROOT / "pyproject.toml").read_text()  # no tomllib before Python 3.11
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    declared = re.findall(r'"([^"]+)"', block)
    assert len(declared) >= 14
    assert sorted(p.requirement.lower() for p in dependencies.RUNTIME_PACKAGES) == sorted(r.lower() for r in declared)


def test_missing_packages_checks_import_and_version_floor():
    present = {"numpy": "1.26.4", "torch": "1.13.1+cpu", "scipy": None}
    pkgs = [dependencies.Package("torch", "torch", "2.0"), dependencies.Package("numpy", "numpy", "1.22"),
            dependencies.Package("scipy", "scipy", "1.9"), dependencies.Package("yaml", "pyyaml", "6.0")]
    missing = dependencies.missing_packages(
        pkgs, find_spec=lambda m: object() if m in present else None,
        installed_version=lambda pip: present.get(pip))
    assert missing == ["torch>=2.0", "pyyaml>=6.0"]  # torch too old; scipy without metadata is accepted
    assert dependencies.version_tuple("2.3.1+cu121") == (2, 3, 1)
    assert dependencies.version_tuple("2024.0rc1") == (2024, 0)
    assert dependencies.version_tuple("2.10") > dependencies.version_tuple("2.9")
    assert dependencies.missing_packages() == []  # this environment has the whole engine


def test_install_plan_and_a_refused_torch_install():
    missing = ["torch>=2.0", "torchvision>=0.15", "scipy>=1.9", "matplotlib>=3.5"]
    plan = dependencies.install_plan(missing, pytorch_extension_available=True)
    assert plan == [("torch", ["torch>=2.0", "torchvision>=0.15"]), ("pip", ["scipy>=1.9", "matplotlib>=3.5"])]
    assert dependencies.describe_plan(plan)[0] == "PyTorch extension: torch>=2.0 torchvision>=0.15"
    assert dependencies.install_plan(missing[:1], False) == [("pip", ["torch>=2.0"])]
    assert dependencies.install_plan([], True) == []
    pipped, floors = [], []
    dependencies.run_plan(plan, pipped.append, lambda floor: floors.append(floor) or "torch module")
    assert floors == [">=2.0"] and pipped == [["scipy>=1.9", "matplotlib>=3.5"]]
    # installTorch returns None when the user declines or it fails: a clear message, nothing else installed
    pipped.clear()
    with pytest.raises(dependencies.DependencyError, match="PyTorch was not installed.*torch>=2.0"):
        dependencies.run_plan(plan, pipped.append, lambda floor: None)
    assert pipped == []


def test_train_command_checkpoints_often_enough_for_stop():
    cmd = train_process.train_command("py", "/ds", "/m", "/base", 40, "cpu", ["liver", "spleen"], val_slices="auto")
    assert cmd[1:3] == ["-m", "masksam_core.train"]
    assert cmd[cmd.index("--checkpoint-every") + 1] == "10"
    assert cmd[cmd.index("--classes") + 1] == "liver,spleen" and cmd[cmd.index("--init-from") + 1] == "/base"
    assert train_process.checkpoint_every(3) == 1 and train_process.checkpoint_every(400) == 100


def test_a_second_training_with_the_same_name_goes_to_a_new_folder(tmp_path):
    wanted = tmp_path / "model"
    assert train_process.unique_output_dir(str(wanted)) == str(wanted)
    wanted.mkdir()
    assert train_process.unique_output_dir(str(wanted)) == str(tmp_path / "model-2")
    (tmp_path / "model-2").mkdir()
    assert train_process.unique_output_dir(str(wanted)) == str(tmp_path / "model-3")


def test_the_outcome_of_a_training_run(tmp_path):
    line = "Stopped at step 12 of 40; model saved to /data/my model"
    assert train_process.parse_stopped_line(line) == {"step": 12, "max_steps": 40, "folder": "/data/my model"}
    assert train_process.parse_stopped_line('{"stage": "train"}') is None
    out = tmp_path / "model"
    assert train_process.outcome(1, str(out), stop_requested=False).kind == "failed"
    nothing = train_process.outcome(0, str(out), stop_requested=True)
    assert nothing.kind == "nothing" and nothing.model is None and "--" not in nothing.message
    out.mkdir()
    (out / "model.json").write_text(json.dumps({"name": "m", "training": {"stopped": {"step": 12,
                                                                                      "max_steps": 40}}}))
    stopped = train_process.outcome(0, str(out), stop_requested=True)
    assert stopped.kind == "stopped" and stopped.model == str(out) and "step 12 of 40" in stopped.message
    (out / "model.json").write_text(json.dumps({"name": "m", "training": {"steps": 40}}))
    assert train_process.outcome(0, str(out), stop_requested=False) == (
        "complete", f"Model saved to {out}.", str(out))
    assert "exit code 1" in train_process.outcome(1, str(out), stop_requested=False).message


def test_the_stub_engine_speaks_predicts_protocol(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((6, 10, 12), np.int16))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "in.nrrd"))
    out = tmp_path / "labels.nrrd"
    run = engine_process.EngineRun(lambda wd: engine_process.stub_command(sys.executable, str(tmp_path / "in.nrrd"),
                                                                          str(out)))
    assert run.wait() == 0, run.log_text()
    assert run.progress["fraction"] == 1.0
    labels = sitk.ReadImage(str(out))
    assert labels.GetSize() == image.GetSize() and np.allclose(labels.GetOrigin(), image.GetOrigin())
    assert sitk.GetArrayFromImage(labels).max() == 1
    sidecar = json.loads((tmp_path / "labels.json").read_text())
    assert sidecar["labels"] == {"1": "liver"} and sidecar["model"]["classes"][0]["display_name"] == "Liver"
    run.cleanup()
    # hanging, then cancelled: no output and no temporary file
    out2 = tmp_path / "second" / "labels.nrrd"
    out2.parent.mkdir()
    run = engine_process.EngineRun(lambda wd: engine_process.stub_command(
        sys.executable, str(tmp_path / "in.nrrd"), str(out2), hang_s=60))
    while run.poll() is None and run.progress is None:
        pass
    run.cancel(grace_s=5)
    assert run.process.poll() is not None and list(out2.parent.iterdir()) == []


def test_train_command_without_hold_out_asks_for_no_validation():
    """Train validates by default; the Trainer's unticked hold-out must say 0, not leave the option out."""
    cmd = train_process.train_command("py", "/ds", "/m", "/base", 40, "cpu", ["liver"], val_fraction=0.0)
    assert cmd[cmd.index("--val-fraction") + 1] == "0.0" and "--val-slices" not in cmd
    assert "--val-fraction" not in train_process.train_command("py", "/ds", "/m", "/base", 40, "cpu", ["liver"])
