"""An unexpected failure in any command-line door: one line on stderr, the traceback in a log, exit code 1."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from masksam_core.cli_util import door_name, run_cli

DOORS = {"predict": "masksam_core.predict", "train": "masksam_core.train", "evaluate": "masksam_core.evaluate",
         "model": "masksam_core.model.__main__", "sample-data": "masksam_core.sample_data"}


def _boom(argv=None):
    raise RuntimeError("the kernel ran out of something\nsecond line")


def _one_log(folder):
    logs = sorted((folder / "logs").glob("masksam-*.log"))
    assert len(logs) == 1, logs
    return logs[0]


def _check_one_line(err, door, log):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {door} failed unexpectedly (RuntimeError: the kernel ran out of something)")
    assert lines[0].endswith(f"full traceback in {log}")


@pytest.mark.parametrize("door", sorted(DOORS))
def test_each_door_of_the_masksam_command_reports_a_bug_in_one_line_with_a_log(door, tmp_path, capsys,
                                                                             monkeypatch):
    from masksam_core.__main__ import main

    monkeypatch.setenv("MASKSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.import_module(DOORS[door]), "main", _boom)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the masksam command rewrites it
    assert main([door, "--some", "option"]) == 1
    err = capsys.readouterr().err
    log = _one_log(tmp_path / "cache")
    _check_one_line(err, door, log)
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: the kernel ran out of something" in text
    assert f"command: {door} --some option" in text
    assert not list((tmp_path / "cache" / "logs").glob(".*"))  # no temporary file left


def test_run_cli_names_the_door_from_its_module_and_keeps_user_errors_at_code_2(tmp_path, capsys, monkeypatch):
    from masksam_core.errors import InputError
    from masksam_core.evaluate import main as evaluate_main
    from masksam_core.model.__main__ import main as model_main
    from masksam_core.predict import main as predict_main

    assert [door_name(f) for f in (predict_main, evaluate_main, model_main)] == ["predict", "evaluate", "model"]
    monkeypatch.setenv("MASKSAM_CACHE", str(tmp_path / "cache"))

    def user_error(argv=None):
        raise InputError("input not found: x.nii.gz")

    assert run_cli(user_error, []) == 2
    assert capsys.readouterr().err == "error: input not found: x.nii.gz\n"
    assert not (tmp_path / "cache" / "logs").exists()  # a user's error is not a bug: no log
    assert run_cli(_boom, [], name="predict") == 1
    _check_one_line(capsys.readouterr().err, "predict", _one_log(tmp_path / "cache"))
    assert run_cli(_boom, [], name="predict") == 1  # a second failure in the same second: a second log
    assert len(list((tmp_path / "cache" / "logs").glob("masksam-*.log"))) == 2


def test_only_the_newest_logs_are_kept(tmp_path, capsys, monkeypatch):
    import os

    from masksam_core.cli_util import KEEP_LOGS

    logs = tmp_path / "cache" / "logs"
    logs.mkdir(parents=True)
    for k in range(KEEP_LOGS + 3):
        old = logs / f"masksam-20200101-0000{k:02d}.log"
        old.write_text("old")
        os.utime(old, (1_600_000_000 + k, 1_600_000_000 + k))
    monkeypatch.setenv("MASKSAM_CACHE", str(tmp_path / "cache"))
    assert run_cli(_boom, [], name="evaluate") == 1
    kept = sorted(p.name for p in logs.glob("masksam-*.log"))
    assert len(kept) == KEEP_LOGS and "masksam-20200101-000000.log" not in kept
    assert any("RuntimeError" in p.read_text() for p in logs.glob("masksam-*.log"))
    capsys.readouterr()


def test_a_log_that_cannot_be_written_still_gives_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MASKSAM_CACHE", str(blocker))
    assert run_cli(_boom, [], name="train") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no log could be written" in err and "Traceback" not in err


def test_the_predict_command_in_a_process_prints_no_traceback(tmp_path):
    """``python -m masksam_core.predict`` with the model loader broken by a bug: stderr holds one line."""
    probe = f"""
import runpy, sys
import masksam_core
def broken(*args, **kwargs):
    raise RuntimeError("bug in the loader")
masksam_core.load_model = broken
sys.argv = ["predict", "-i", {str(tmp_path / "ct.nii.gz")!r}, "-o", {str(tmp_path / "o.nii.gz")!r},
            "--model", {str(tmp_path / "model")!r}]
runpy.run_module("masksam_core.predict", run_name="__main__")
"""
    import numpy as np
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 16, 16), np.float32)), str(tmp_path / "ct.nii.gz"))
    from masksam_core.model.__main__ import main as model_main

    assert model_main(["init", "--classes", "liver", "--out", str(tmp_path / "model"), "--slab-depth", "2",
                       "--num-queries", "2", "--spacing", "6,6,6"]) == 0
    env = {**__import__("os").environ, "MASKSAM_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "predict failed unexpectedly (RuntimeError: bug in the loader)" in out.stderr
    assert "bug in the loader" in _one_log(tmp_path / "cache").read_text()
