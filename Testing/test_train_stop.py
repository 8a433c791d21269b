"""Stopping ``train`` gracefully (SIGTERM / SIGINT / Windows' CTRL_BREAK), resuming after a stop, and
``--checkpoint-every``; on synthetic data with a tiny random-weight backbone (see ``test_train.py``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import test_train
from masksam_core.errors import MaskSAMError

HERE = Path(__file__).resolve().parent
COMMON = ["--classes", "liver,spleen,aorta", "--slab-depth", "2", "--num-queries", "6", "--feature-copies", "1",
          "--spacing", "3,3,6", "--progress", "json", "--atlas-cases", "0"]


tiny = test_train.tiny  # the tiny backbone in training and in predict's loader
dataset = test_train.dataset  # three synthetic cases


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one feature cache for the module's runs: built once


def _card(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())


def _steps_logged(out: Path):
    import csv

    with (out / "train_log.csv").open() as handle:
        return [int(r["step"]) for r in csv.DictReader(handle) if r["loss"]]


# ------------------------------------------------------------------------------------------ the signal handlers

SIGNAL_CHILD = """
import os, signal, time
from masksam_core.training.stop import graceful_stop

before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
try:
    with graceful_stop() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in this (the main) thread at the next bytecode
        assert stop() and stop.reason == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # a second signal: abort at once
        time.sleep(1)
    raise SystemExit("the second signal did not abort")
except KeyboardInterrupt:
    pass
assert {s: signal.getsignal(s) for s in before} == before
print("ok")
"""


def test_first_signal_asks_to_stop_a_second_aborts_and_the_handlers_are_put_back():
    """In a child interpreter: signals sent to the test process itself could reach the native handlers of
    libraries that other tests loaded (VTK, OpenVINO)."""
    _run_child(SIGNAL_CHILD)


def _run_child(code: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_no_handlers_outside_the_main_thread():
    from masksam_core.training.stop import graceful_stop

    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def body():
        with graceful_stop() as stop:
            seen["inside"] = signal.getsignal(signal.SIGTERM)
            stop.request("by code")
            seen["set"] = stop()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"inside": before, "set": True}


WINDOWS_CHILD = """
import os, signal, sys, time
from masksam_core.training import stop as stop_module

assert signal.SIGUSR1 not in stop_module.stop_signals()
sys.platform = "win32"
signal.SIGBREAK = signal.SIGUSR1
assert stop_module.stop_signals() == [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1]
before = signal.getsignal(signal.SIGUSR1)
with stop_module.graceful_stop() as stop:
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    assert stop()
assert signal.getsignal(signal.SIGUSR1) == before
print("ok")
"""


def test_windows_ctrl_break_is_a_stop_signal():
    """On Windows the Trainer sends CTRL_BREAK_EVENT (SIGBREAK); here SIGUSR1 stands in for it so the branch runs.
    In a child interpreter, for the same reason as the test above."""
    _run_child(WINDOWS_CHILD)


def test_checkpoint_every_option():
    from masksam_core.train import parse_config
    from masksam_core.training.stop import checkpoint_due

    assert parse_config(["--checkpoint-every", "5"]).checkpoint_every == 5
    assert parse_config([]).checkpoint_every is None
    with pytest.raises(MaskSAMError, match="--checkpoint-every must be at least 1"):
        parse_config(["--checkpoint-every", "0"])
    assert [k for k in range(1, 11) if checkpoint_due(k, 4)] == [4, 8]
    assert not any(checkpoint_due(k, None) for k in range(1, 11))


def test_resume_may_change_checkpoint_every_and_yaml_sets_it(tmp_path):
    from masksam_core.train import parse_config
    from masksam_core.training.config import TrainConfig

    config_file = tmp_path / "c.yaml"
    config_file.write_text("checkpoint_every: 3\n")
    assert parse_config(["--config", str(config_file)]).checkpoint_every == 3
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps(TrainConfig(out=str(out), max_steps=9,
                                                                  checkpoint_every=3).to_dict()))
    cfg = parse_config(["--out", str(out), "--resume", "--checkpoint-every", "2"])
    assert (cfg.max_steps, cfg.checkpoint_every) == (9, 2)  # how often to checkpoint changes nothing trained


# ------------------------------------------------------------------------------------------ the runs

CHILD = textwrap.dedent("""
    import runpy, sys
    sys.path.insert(0, {testing!r})
    from tiny_backbones import tiny_tinyvit_backbone
    import masksam_core.training.runner as runner
    runner.load_backbone = lambda *a, **k: tiny_tinyvit_backbone()
    sys.argv = ["masksam_core.train"] + sys.argv[1:]
    runpy.run_module("masksam_core.train", run_name="__main__", alter_sys=True)  # python -m masksam_core.train
""")


def test_sigterm_mid_run_saves_a_model_that_predict_loads(tiny, dataset, cache, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(testing=str(HERE)))
    out = tmp_path / "model"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.Popen([sys.executable, str(script), "--data", str(dataset), "--out", str(out),
                                 "--max-steps", "200", "--steps-per-epoch", "100", "--cache-dir", str(cache)] + COMMON,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("{") and json.loads(line).get("stage") == "train" and json.loads(line)["done"] >= 2:
                    proc.send_signal(signal.SIGTERM)
                    break
            rest, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
    lines += rest.splitlines(keepends=True)
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    k = json.loads([ln for ln in lines if ln.startswith('{"stage": "stopped"')][0])["step"]
    assert 2 <= k < 200
    assert lines[-1].strip() == f"Stopped at step {k} of 200; model saved to {out}"
    assert "SIGTERM: stopping after the current step" in (tmp_path / "stderr.txt").read_text()
    # the folder is a model predict loads, marked as stopped (no validation yet: the current weights)
    from masksam_core import load_model

    model, card = load_model(out)
    assert card.training["stopped"] == {"step": k, "max_steps": 200} and card.training["steps_done"] == k
    assert _card(out / "latest")["training"]["stopped"] == {"step": k, "max_steps": 200}
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert all(torch.equal(v, model.trainable_state_dict()[n]) for n, v in weights.items())
    state = torch.load(out / "state" / "training_state.pt", weights_only=True)
    assert state["trainer"]["step"] == k and _steps_logged(out) == list(range(1, k + 1))
    assert json.loads((out / "summary.json").read_text())["stopped"]["step"] == k
    assert f"**Partial model:** training was stopped at step {k} of 200" in (out / "README.md").read_text()
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))


_train = test_train._train

STOP_CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {testing!r})
    from tiny_backbones import tiny_tinyvit_backbone
    import masksam_core.training.loop as loop
    import masksam_core.training.runner as runner
    runner.load_backbone = lambda *a, **k: tiny_tinyvit_backbone()
    original = loop.Trainer.train_step

    def step(self, *a, **k):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **k)

    loop.Trainer.train_step = step
    handler = signal.getsignal(signal.SIGTERM)
    from masksam_core.train import main
    code = main(sys.argv[1:])
    assert signal.getsignal(signal.SIGTERM) == handler, "the command did not put the handler back"
    sys.exit(code)
""")


@pytest.mark.slow  # three runs
def test_stop_then_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny, dataset, cache, tmp_path,
                                                                          monkeypatch, capsys):
    args = ["--data", str(dataset), "--max-steps", "4", "--steps-per-epoch", "2", "--seed", "3",
            "--val-slices", "case02:5-6", "--cache-dir", str(cache), "--precision", "fp32",
            "--prompt-fraction", "0.25"] + COMMON  # the decoder trains from step 2: step 2's validation is scored
    assert _train(args + ["--out", str(tmp_path / "a")]) == 0
    # the stopped run in a child interpreter: SIGTERM arrives during step 3 (after the validation at step 2)
    script = tmp_path / "stop_child.py"
    script.write_text(STOP_CHILD.format(testing=str(HERE)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(script)] + args + ["--out", str(tmp_path / "b")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "Stopped at step 3 of 4; model saved to" in child.stdout
    b = tmp_path / "b"
    # the best model so far (step 2) stays the folder's model, marked as stopped; latest/ has step 3's weights
    assert _card(b)["training"]["stopped"] == {"step": 3, "max_steps": 4} and _card(b)["training"]["best_step"] == 2
    assert _card(b / "latest")["training"]["steps_done"] == 3
    assert _train(["--out", str(b), "--resume"]) == 0
    assert "stopped" not in _card(b)["training"] and "stopped" not in _card(b / "latest")["training"]
    for name in ("latest/weights.pt", "weights.pt"):
        wa = torch.load(tmp_path / "a" / name, weights_only=True)
        wb = torch.load(b / name, weights_only=True)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa), name
    assert _steps_logged(b) == list(range(1, 5))


def test_checkpoint_every_writes_checkpoints_at_its_steps(tiny, dataset, cache, tmp_path, monkeypatch):
    import masksam_core.training.runner as runner

    saved = []
    real_save = runner.save_state

    def recording_save(folder, payload):
        saved.append(payload["trainer"]["step"])
        return real_save(folder, payload)

    monkeypatch.setattr(runner, "save_state", recording_save)
    out = tmp_path / "m"
    assert _train(["--data", str(dataset), "--out", str(out), "--max-steps", "5", "--steps-per-epoch", "3",
                   "--checkpoint-every", "2", "--cache-dir", str(cache)] + COMMON) == 0
    assert saved == [2, 3, 4, 5]  # every 2 steps and at each epoch end (3, and the last step)
    assert [p.name for p in (out / "state").iterdir()] == ["training_state.pt"]


def test_python_api_stops_on_its_own_callable_and_installs_no_handler(tiny, dataset, cache, tmp_path):
    from masksam_core.train import parse_config
    from masksam_core.training.runner import run_training

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    asked = []

    def stop() -> bool:  # asked after every step, with the caller's own signal handlers in place
        asked.append({s: signal.getsignal(s) for s in handlers})
        return len(asked) == 2

    out = tmp_path / "api"
    cfg = parse_config(["--data", str(dataset), "--out", str(out), "--max-steps", "5", "--cache-dir", str(cache)]
                       + COMMON)
    summary = run_training(cfg, stop=stop)
    assert summary["stopped"] == {"step": 2, "max_steps": 5} and summary["steps"] == 2
    assert asked == [handlers, handlers]
    assert _card(out)["training"]["stopped"] == {"step": 2, "max_steps": 5}


def test_the_stop_file_the_slicer_modules_write_asks_to_stop(tmp_path, monkeypatch):
    """Slicer's Stop writes ``$MASKSAM_STOP_FILE``: the flag reads it between steps, on every platform."""
    from masksam_core.training.stop import STOP_FILE_ENV, StopFlag

    path = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(path))
    flag = StopFlag()
    assert not flag()
    path.write_text("stop\n")
    assert flag() and flag.reason == "stop file"
    monkeypatch.delenv(STOP_FILE_ENV)
    assert not StopFlag()()
