"""``python -m masksam_core.predict``: outputs, formats, and a clear one-line error for every bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from masksam_core.cli_util import run_cli
from masksam_core.predict import main as predict_main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from masksam_core.model.__main__ import main

    out = tmp_path_factory.mktemp("models") / "untrained"
    assert main(["init", "--backbone", "litemedsam", "--classes", "liver,spleen", "--out", str(out),
                 "--slab-depth", "2", "--num-queries", "3", "--spacing", "6,6,6"]) == 0
    return out


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    arr = np.full((6, 40, 48), -1000, np.float32)
    arr[:, 8:32, 8:40] = 40
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((4.0, 4.0, 5.0))
    img.SetOrigin((10.0, -20.0, 33.0))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = tmp_path_factory.mktemp("vol") / "ct.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def _run(argv, capsys):
    code = run_cli(predict_main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "seg.nrrd"])
def test_outputs_on_the_input_grid_with_sidecar(model_dir, volume, tmp_path, capsys, fmt):
    out = tmp_path / f"organs.{fmt}"
    code, stdout, err = _run(["-i", str(volume), "-o", str(out), "--model", str(model_dir), "--progress", "json"],
                             capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert {"stage", "done", "total"} <= set(lines[0]) and any(line["stage"] == "segment" for line in lines)
    sidecar = json.loads((tmp_path / "organs.json").read_text())
    assert sidecar["labels"] == {"1": "liver", "2": "spleen"}
    assert sidecar["model"]["name"] == "untrained" and sidecar["runtime_s"] > 0
    assert all(0.0 <= o["confidence"] <= 1.0 for o in sidecar["organs"].values())
    if fmt == "seg.nrrd":
        import slicerio

        seg = slicerio.read_segmentation(str(out))
        assert seg["voxels"].shape == sitk.ReadImage(str(volume)).GetSize()
        return
    pred, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(volume))
    assert pred.GetSize() == ref.GetSize()
    assert np.allclose(pred.GetOrigin(), ref.GetOrigin()) and np.allclose(pred.GetDirection(), ref.GetDirection())
    assert np.allclose(pred.GetSpacing(), ref.GetSpacing())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "organs.json"])  # no temporary files


def test_batch_folder(model_dir, volume, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.nii.gz", "b.nrrd"):
        sitk.WriteImage(sitk.ReadImage(str(volume)), str(folder / name))
    code, _, err = _run(["-i", str(folder), "-o", str(tmp_path / "out"), "--model", str(model_dir),
                         "--progress", "json"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json", "a.nii.gz", "b.json", "b.nii.gz"]
    # b was read and prepared while a was segmented: the same volume gives the same labels
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / n))) for n in ("a.nii.gz", "b.nii.gz"))
    assert np.array_equal(a, b)


def test_batch_stops_at_a_bad_volume_with_one_line_and_keeps_what_was_done(model_dir, volume, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(volume)), str(folder / "a.nii.gz"))
    _write(folder / "b.nii.gz", np.zeros((30, 30), np.float32))  # 2D: read while a is segmented
    code, _, err = _run(["-i", str(folder), "-o", str(tmp_path / "out"), "--model", str(model_dir),
                         "--progress", "json"], capsys)
    assert code == 2 and err.startswith("error: ") and "2D image" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json", "a.nii.gz"]


def _write(path, arr, spacing=None):
    img = sitk.GetImageFromArray(arr, isVector=arr.ndim == 4 and arr.shape[-1] == 3)
    sitk.WriteImage(img, str(path))
    return path


def _bad_inputs(tmp_path):
    cases = {
        "missing": (tmp_path / "nope.nii.gz", "input not found"),
        "not an image": (tmp_path / "notes.nii.gz", "cannot read"),
        "2D": (_write(tmp_path / "flat.nii.gz", np.zeros((30, 30), np.float32)), "2D image"),
        "single slice": (_write(tmp_path / "one.nii.gz", np.zeros((1, 30, 30), np.float32)), "2D image"),
        "vector": (_write(tmp_path / "rgb.nii.gz", np.zeros((4, 30, 30, 3), np.float32)), "vector image"),
        "nan": (_write(tmp_path / "nan.mha", np.full((4, 30, 30), np.nan, np.float32)), "NaN"),
        "empty dicom folder": (tmp_path / "dicom", "no DICOM image series"),
    }
    (tmp_path / "notes.nii.gz").write_text("hello")
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "readme.txt").write_text("x")
    four = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 20, 20), np.float32))] * 2)
    sitk.WriteImage(four, str(tmp_path / "four.nii.gz"))
    cases["4D"] = (tmp_path / "four.nii.gz", "4D image")
    return cases


def test_bad_inputs_give_one_line_errors_and_no_output(model_dir, tmp_path, capsys):
    for name, (path, message) in _bad_inputs(tmp_path).items():
        out = tmp_path / "out" / f"{name.replace(' ', '_')}.nii.gz"
        code, _, err = _run(["-i", str(path), "-o", str(out), "--model", str(model_dir), "--progress", "json"], capsys)
        assert code == 2, name
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, (name, err)
        assert "Traceback" not in err
        assert not out.exists() and not out.with_name(out.name.replace(".nii.gz", ".json")).exists(), name
    leftovers = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert leftovers == []


def test_overlap_option_sets_the_slab_stride_and_refuses_bad_values(model_dir, volume, tmp_path, capsys):
    strides, spacings = {}, {}
    for option in ([], ["--overlap", "0.25"], ["--fast"], ["--fast", "--overlap", "0.5"]):
        out = tmp_path / f"o{len(strides)}.nii.gz"
        code, _, err = _run(["-i", str(volume), "-o", str(out), "--model", str(model_dir)] + option, capsys)
        assert code == 0, err
        stats = json.loads(out.with_name(out.name[:-7] + ".json").read_text())["engine_stats"]
        strides[" ".join(option)] = stats["slab_stride"]
        spacings[" ".join(option)] = stats["model_spacing_mm"]
    card = json.loads((model_dir / "model.json").read_text())
    d = card["architecture"]["slab_depth"]
    assert strides == {"": round(d * 0.5), "--overlap 0.25": round(d * 0.75), "--fast": d,
                       "--fast --overlap 0.5": round(d * 0.5)}
    sx, sy, sz = card["preprocessing"]["target_spacing"]  # --fast: twice the model's z spacing, in-plane unchanged
    assert spacings == {"": [sx, sy, sz], "--overlap 0.25": [sx, sy, sz], "--fast": [sx, sy, 2 * sz],
                        "--fast --overlap 0.5": [sx, sy, 2 * sz]}
    for bad in ("0.9", "-0.1"):
        out = tmp_path / "bad.nii.gz"
        code, _, err = _run(["-i", str(volume), "-o", str(out), "--model", str(model_dir), "--overlap", bad], capsys)
        assert code == 2 and "overlap must be between 0 and 0.75" in err and not out.exists()


def test_model_and_output_problems(model_dir, volume, tmp_path, capsys):
    code, _, err = _run(["-i", str(volume), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tmp_path / "nomodel")],
                        capsys)
    assert code == 2 and "model folder not found" in err
    # the input is read while the model loads; a model problem is still the one reported when both are bad
    flat = _write(tmp_path / "flat.nii.gz", np.zeros((30, 30), np.float32))
    code, _, err = _run(["-i", str(flat), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tmp_path / "nomodel")],
                        capsys)
    assert code == 2 and "model folder not found" in err and len(err.strip().splitlines()) == 1
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.json").write_text("{oops")
    code, _, err = _run(["-i", str(volume), "-o", str(tmp_path / "o.nii.gz"), "--model", str(corrupt)], capsys)
    assert code == 2 and "corrupt" in err
    existing = tmp_path / "exists.nii.gz"
    existing.write_text("keep me")
    code, _, err = _run(["-i", str(volume), "-o", str(existing), "--model", str(model_dir)], capsys)
    assert code == 2 and "--overwrite" in err and existing.read_text() == "keep me"
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = _run(["-i", str(volume), "-o", str(locked / "o.nii.gz"), "--model", str(model_dir)], capsys)
        assert code == 2 and "cannot write" in err
    code, _, err = _run(["-i", str(volume), "-o", str(tmp_path / "o.txt"), "--model", str(model_dir)], capsys)
    assert code == 2 and "output format" in err


def test_no_model_and_no_default_says_what_to_do(volume, tmp_path, capsys, monkeypatch):
    import masksam_core.predict as predict

    monkeypatch.setattr(predict, "default_model_dir", lambda: tmp_path / "none")
    code, _, err = _run(["-i", str(volume), "-o", str(tmp_path / "o.nii.gz")], capsys)
    assert code == 2 and "--model" in err


def test_command_line_exit_code_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "masksam_core.predict", "-i", str(tmp_path / "missing.nii.gz"),
                             "-o", str(tmp_path / "o.nii.gz"), "--model", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.startswith("error:")


def test_dicom_series_in_dicom_seg_out(model_dir, tmp_path, capsys):
    from dicom_fixture import write_series

    arr = np.full((4, 40, 48), -1000, np.int16)
    arr[:, 8:32, 8:40] = 40
    arr[:, 12:20, 12:20] = 300  # something for the untrained model to find, or not
    write_series(tmp_path / "dicom", arr)
    out = tmp_path / "seg.dcm"
    code, _, err = _run(["-i", str(tmp_path / "dicom"), "-o", str(out), "--model", str(model_dir),
                         "--progress", "json"], capsys)
    sidecar = json.loads((tmp_path / "seg.json").read_text()) if (tmp_path / "seg.json").exists() else {}
    if code == 2 and "nothing was segmented" in err:  # an untrained model may find no organ at all
        assert not out.exists()
        return
    assert code == 0, err
    import pydicom

    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and len(ds.SegmentSequence) == len(sidecar["organs"])


def test_demo_segments_the_sample_and_compares_with_its_labels(model_dir, volume, tmp_path, capsys, monkeypatch):
    """``predict --demo`` (the quickstart's main command), with the download replaced by a small local sample."""
    import masksam_core.sample_data as sample_data

    ref = sitk.ReadImage(str(volume))
    lab = np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.uint8)
    lab[1:5, 10:30, 10:30] = 5  # "liver" under the sample's own label numbering
    lab_img = sitk.GetImageFromArray(lab)
    lab_img.CopyInformation(ref)
    labels_path = tmp_path / "sample_labels.nii.gz"
    sitk.WriteImage(lab_img, str(labels_path))
    monkeypatch.setattr(sample_data, "get_sample", lambda *a, **k: {
        "ct": volume, "labels": labels_path, "label_names": {5: "liver", 6: "pancreas"}})
    out = tmp_path / "demo" / "sample_organs.nii.gz"
    code, stdout, err = _run(["--demo", "--model", str(model_dir), "-o", str(out)], capsys)
    assert code == 0, err
    assert "training subject" in stdout.lower() and "mean Dice (training subject)" in stdout
    sidecar = json.loads((out.parent / "sample_organs.json").read_text())
    dice = sidecar["dice_vs_reference_training_subject"]
    assert set(dice) == {"liver"} and 0.0 <= dice["liver"] <= 1.0  # spleen is not in the reference; liver is
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["sample_organs.nii.gz", "sample_organs.json", "sample_organs.png", "sample_organs_3d.png"])
    for png in ("sample_organs.png", "sample_organs_3d.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pred = sitk.ReadImage(str(out))
    assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetDirection(), ref.GetDirection())


def test_command_pauses_the_garbage_collector_until_the_model_is_loaded(model_dir, volume, tmp_path):
    """``python -m masksam_core.predict`` runs no cyclic collection while importing and loading (gc off), then
    freezes what is alive and turns it back on before segmenting; ``main`` called from Python leaves gc alone."""
    probe = f"""
import gc, runpy, sys
import masksam_core
import masksam_core.inference.engine as engine
from masksam_core.errors import InputError
from masksam_core.predict import main
seen = {{}}
def fake_load(*args, **kwargs):
    seen.setdefault("load", []).append(gc.isenabled())
    return object(), object()
def fake_segment(*args, **kwargs):
    seen.setdefault("segment", []).append((gc.isenabled(), gc.get_freeze_count() > 0))
    raise InputError("stop here")
masksam_core.load_model, engine.segment_prepared = fake_load, fake_segment
argv = ["-i", {str(volume)!r}, "-o", {str(tmp_path / "out.nii.gz")!r}, "--model", {str(model_dir)!r}]
try:
    main(argv)
except InputError:
    pass
sys.argv = ["predict"] + argv
try:
    runpy.run_module("masksam_core.predict", run_name="__main__")
except SystemExit as exc:
    seen["code"] = exc.code
print(seen)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str({"load": [True, False], "segment": [(True, False), (True, True)], "code": 2})


def test_the_installed_masksam_command_runs_each_door(tmp_path):
    """The console script pyproject installs (``masksam``) starts, lists its commands and reaches the doors."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("masksam") or str(Path(sys.executable).with_name("masksam"))
    if not Path(exe).exists():
        pytest.skip("the package is not installed with its console script (pip install -e .)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "predict" in out.stdout and "train" in out.stdout, out.stderr
    out = subprocess.run([exe, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--no-atlas" in out.stdout
    out = subprocess.run([exe, "predict", "-i", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o.nii.gz")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "input not found" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([exe, "nonsense"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_a_format_that_contradicts_the_output_name_is_refused():
    from pathlib import Path

    from masksam_core.errors import MaskSAMError
    from masksam_core.predict import output_format

    assert output_format(Path("x.nrrd"), None) == "nrrd" and output_format(Path("x.nrrd"), "nrrd") == "nrrd"
    assert output_format(Path("organs"), "seg.nrrd") == "seg.nrrd"  # no extension: --format decides
    assert output_format(Path("x.nii"), "nii.gz") == "nii.gz"
    with pytest.raises(MaskSAMError, match="named as nrrd"):
        output_format(Path("x.nrrd"), "nii.gz")
    with pytest.raises(MaskSAMError, match="named as seg.nrrd"):
        output_format(Path("x.seg.nrrd"), "nrrd")


def test_a_bad_training_spacing_says_what_it_needs(capsys):
    from masksam_core.train import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--data", "d", "--out", "o", "--spacing", "a,b"])
    err = capsys.readouterr().err
    assert "needs three positive numbers x,y,z in mm, got 'a,b'" in err and "lambda" not in err
    assert parse_config(["--data", "d", "--out", "o", "--spacing", "1,1,2.5"]).spacing == [1.0, 1.0, 2.5]
