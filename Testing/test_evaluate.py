"""Evaluation metrics and the evaluate command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from masksam_core.cli_util import run_cli
from masksam_core.evaluate import main as evaluate_main
from masksam_core.evaluation.metrics import dice, hd95, surface_dice


def _cube(shape=(20, 30, 30), lo=(5, 8, 8), size=(8, 10, 10), shift=(0, 0, 0)):
    m = np.zeros(shape, bool)
    z, y, x = (a + s for a, s in zip(lo, shift))
    m[z:z + size[0], y:y + size[1], x:x + size[2]] = True
    return m


def test_perfect_and_shifted_masks():
    a = _cube()
    assert dice(a, a) == 1.0 and hd95(a, a, (2.0, 1.0, 1.0)) == 0.0 and surface_dice(a, a, (2.0, 1.0, 1.0)) == 1.0
    b = _cube(shift=(0, 0, 3))  # 3 voxels along x at 0.7 mm
    assert hd95(a, b, (2.0, 1.0, 0.7)) == pytest.approx(2.1, abs=1e-6)
    c = _cube(shift=(2, 0, 0))  # 2 slices at 2.5 mm
    assert hd95(a, c, (2.5, 1.0, 1.0)) == pytest.approx(5.0, abs=1e-6)
    assert surface_dice(a, c, (2.5, 1.0, 1.0), tolerance_mm=2.0) < 1.0
    assert dice(a, np.zeros_like(a)) == 0.0 and hd95(a, np.zeros_like(a), (1, 1, 1)) is None
    assert dice(np.zeros_like(a), np.zeros_like(a)) is None


def _write(path, arr, spacing=(1.0, 1.0, 2.0), labels=None):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    if labels:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps({"labels": labels}))
    return path


def test_cli_matches_organs_by_name_and_writes_reports(tmp_path, capsys):
    pred = np.zeros((20, 30, 30), np.uint8)
    pred[_cube()] = 1
    pred[_cube(lo=(2, 2, 20), size=(4, 5, 5))] = 2
    ref = np.zeros_like(pred)
    ref[_cube()] = 7  # liver has value 7 in the reference
    ref[_cube(lo=(2, 2, 20), size=(4, 5, 5), shift=(0, 1, 0))] = 3
    _write(tmp_path / "p.nii.gz", pred, labels={"1": "liver", "2": "spleen"})
    _write(tmp_path / "r.nii.gz", ref)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"pred": {"1": "liver", "2": "spleen"}, "ref": {"7": "liver", "3": "spleen"}}))
    out = tmp_path / "report.json"
    code = run_cli(evaluate_main, ["--pred", str(tmp_path / "p.nii.gz"), "--ref", str(tmp_path / "r.nii.gz"),
                                   "--labels", str(labels), "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    organs = report["cases"][0]["organs"]
    assert organs["liver"]["dice"] == 1.0 and organs["liver"]["hd95_mm"] == 0.0
    assert 0 < organs["spleen"]["dice"] < 1
    assert (tmp_path / "report.csv").read_text().startswith("case,organ,dice")
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_one_label_map_names_the_reference_and_never_overrides_the_predictions_sidecar(tmp_path, capsys):
    """predict's output numbers organs 1..C; a reference map (e.g. TotalSegmentator's 117 labels) numbers them
    otherwise. Given as one --labels map, it must not be read as the prediction's numbering."""
    pred = np.zeros((20, 30, 30), np.uint8)
    pred[_cube()] = 1  # liver in the prediction's own numbering
    ref = np.zeros_like(pred)
    ref[_cube()] = 5  # liver in the reference's numbering; its value 1 is the spleen
    _write(tmp_path / "p.nii.gz", pred, labels={"1": "liver"})
    _write(tmp_path / "r.nii.gz", ref)
    labels = tmp_path / "total.json"
    labels.write_text(json.dumps({"1": "spleen", "5": "liver"}))
    out = tmp_path / "report.json"
    args = ["--pred", str(tmp_path / "p.nii.gz"), "--ref", str(tmp_path / "r.nii.gz"), "--labels", str(labels),
            "--out", str(out)]
    assert run_cli(evaluate_main, args) == 0
    organs = json.loads(out.read_text())["cases"][0]["organs"]
    assert organs["liver"]["dice"] == 1.0 and "spleen" not in organs
    # without its sidecar the prediction is read with the one map (it then holds "spleen", which is absent in ref)
    (tmp_path / "p.json").unlink()
    assert run_cli(evaluate_main, args) == 0
    organs = json.loads(out.read_text())["cases"][0]["organs"]
    assert organs["liver"]["dice"] == 0.0 and organs["spleen"]["dice"] == 0.0


def test_grid_mismatch_is_refused_unless_resampling(tmp_path, capsys):
    arr = np.zeros((10, 12, 12), np.uint8)
    arr[2:6, 3:8, 3:8] = 1
    _write(tmp_path / "p.nii.gz", arr, labels={"1": "liver"})
    _write(tmp_path / "r.nii.gz", arr, spacing=(1.0, 1.0, 2.5))
    args = ["--pred", str(tmp_path / "p.nii.gz"), "--ref", str(tmp_path / "r.nii.gz"), "--out", str(tmp_path / "o.json")]
    assert run_cli(evaluate_main, args) == 2
    assert "different grids" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
    assert run_cli(evaluate_main, args + ["--resample-ref"]) == 0


def test_folders_of_cases(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    for k in range(2):
        arr = np.zeros((10, 12, 12), np.uint8)
        arr[2:6, 3:8, 3 + k:8] = 1
        _write(tmp_path / "pred" / f"c{k}.nii.gz", arr, labels={"1": "liver"})
        _write(tmp_path / "ref" / f"c{k}.nii.gz", arr)
    assert run_cli(evaluate_main, ["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                                   "--out", str(tmp_path / "rep.json")]) == 0
    report = json.loads((tmp_path / "rep.json").read_text())
    assert len(report["cases"]) == 2 and report["mean_over_cases"]["dice"] == 1.0
    assert run_cli(evaluate_main, ["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "x.json")]) == 2


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"one": "liver"}', '{"pred": 3}'])
def test_a_malformed_labels_file_is_one_line_not_a_traceback(tmp_path, capsys, text):
    arr = np.zeros((6, 8, 8), np.uint8)
    arr[2:4, 2:5, 2:5] = 1
    _write(tmp_path / "p.nii.gz", arr)
    _write(tmp_path / "r.nii.gz", arr)
    (tmp_path / "labels.json").write_text(text)
    args = ["--pred", str(tmp_path / "p.nii.gz"), "--ref", str(tmp_path / "r.nii.gz"), "--labels",
            str(tmp_path / "labels.json"), "--out", str(tmp_path / "o.json")]
    assert run_cli(evaluate_main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --labels labels.json must be a JSON object") and len(err.splitlines()) == 1
