"""The Slicer modules' engine process helper without Slicer: output through a reader thread, a stop that reaches the
whole process tree, on POSIX for real and on Windows with its system calls faked."""
from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MaskSAMSegment"))
from MaskSAMSegmentLib import engine_process  # noqa: E402

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the real-process test of the POSIX branch")


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan may stay a zombie where PID 1 does not reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" not in status


def _wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


CHILD = textwrap.dedent("""
    import json, subprocess, sys, time
    from pathlib import Path
    workdir, out = Path(sys.argv[1]), Path(sys.argv[2])
    (workdir / "input.nrrd").write_text("x")
    partial = out.parent / ("." + out.name + ".tmp-abc")
    partial.mkdir()
    (partial / "labels.nrrd").write_text("half")
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (workdir / "pids").write_text(json.dumps([grandchild.pid]))
    print("caf\\u00e9 \\u2713", flush=True)
    print(json.dumps({"stage": "segment", "done": 1, "total": 4}), flush=True)
    time.sleep(120)
""")


@posix_only
def test_cancel_stops_the_whole_tree_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_process, "IS_WINDOWS", False)
    monkeypatch.setattr(select, "select", None)  # the helper must not poll the pipe with select
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "labels.nrrd"
    run = engine_process.EngineRun(lambda wd: [sys.executable, str(script), str(wd), str(out)], outputs=[str(out)])
    assert _wait_for(lambda: run.poll() is None and run.progress is not None)
    assert run.progress["fraction"] == 0.25
    assert "caf\u00e9 \u2713" in run.log  # decoded as UTF-8 whatever the locale
    pids = [run.process.pid] + __import__("json").loads((run.workdir / "pids").read_text())
    assert engine_process.partial_outputs(out)
    t = time.monotonic()
    run.cancel(grace_s=2)
    assert time.monotonic() - t < 8
    assert run.process.poll() is not None
    assert _wait_for(lambda: not any(_alive(p) for p in pids)), [p for p in pids if _alive(p)]
    assert not run.workdir.exists()
    assert engine_process.partial_outputs(out) == [] and not out.exists()


@posix_only
def test_poll_never_blocks_and_kills_after_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_process, "IS_WINDOWS", False)
    # a child that ignores SIGTERM: request_stop asks, poll() kills the group once the grace period is over
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"
    run = engine_process.EngineRun(lambda wd: [sys.executable, "-c", code], stop_grace_s=0.5)
    assert _wait_for(lambda: run.poll() is None and "ready" in run.log)
    t = time.monotonic()
    assert run.poll() is None and time.monotonic() - t < 0.2
    run.request_stop()
    assert run.cancelled and run.stopping
    assert _wait_for(lambda: run.poll() is not None, timeout_s=5)
    assert run.killed and run.process.returncode == -signal.SIGKILL
    run.cleanup()
    assert not run.workdir.exists()


def test_a_graceful_stop_keeps_the_engines_exit_code_and_last_lines(tmp_path, monkeypatch):
    """What the Trainer's Stop relies on: SIGTERM makes train save and exit 0; its last line reaches the log."""
    if sys.platform == "win32":
        pytest.skip("POSIX signal")
    monkeypatch.setattr(engine_process, "IS_WINDOWS", False)
    code = textwrap.dedent("""
        import os, signal, sys, time
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        print("step 1", flush=True)
        while not stop and not os.path.exists(os.environ["MASKSAM_STOP_FILE"]):
            time.sleep(0.02)
        time.sleep(0.2)
        print("Stopped at step 1 of 40; model saved to /x", flush=True)
    """)
    run = engine_process.EngineRun(lambda wd: [sys.executable, "-c", code], stop_grace_s=10)
    assert _wait_for(lambda: run.poll() is None and "step 1" in run.log)
    run.request_stop()
    assert _wait_for(lambda: run.poll() is not None)
    assert run.process.returncode == 0 and not run.killed
    assert run.log[-1].startswith("Stopped at step 1 of 40")
    run.cleanup()


LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    code = (
        "import signal, sys, time\\n"
        "stop = []\\n"
        "signal.signal(signal.SIGTERM, lambda *a: stop.append(1))\\n"
        "print('engine running', flush=True)\\n"
        "while not stop: time.sleep(0.02)\\n"
        "time.sleep(2.5)\\n"
        "print('Stopped at step 3 of 40; model saved to /m', flush=True)\\n"
    )
    subprocess.Popen([sys.executable, "-c", code])
    import time
    time.sleep(120)
""")


@posix_only
def test_a_launcher_that_ends_first_does_not_cut_off_the_engines_last_lines(monkeypatch):
    """PythonSlicer may die on SIGTERM before python-real has saved: poll() waits for the engine's output (within
    the grace period) instead of reporting the end at once."""
    monkeypatch.setattr(engine_process, "IS_WINDOWS", False)
    run = engine_process.EngineRun(lambda wd: [sys.executable, "-c", LAUNCHER], stop_grace_s=10)
    assert _wait_for(lambda: run.poll() is None and "engine running" in run.log)
    run.request_stop()
    assert _wait_for(lambda: run.poll() is not None)
    assert run.log[-1].startswith("Stopped at step 3 of 40") and not run.killed
    run.cleanup()


class FakeWindowsProcess:
    pid = 4242

    def __init__(self, lines):
        self.stdout = io.StringIO("".join(lines))
        self.returncode = None
        self.signals = []

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        return self.returncode

    def send_signal(self, sig):
        self.signals.append(sig)

    def kill(self):
        self.signals.append("kill")
        self.returncode = 1


def test_the_windows_branch_uses_process_groups_ctrl_break_and_taskkill(monkeypatch):
    monkeypatch.setattr(engine_process, "IS_WINDOWS", True)
    # none of these exist on Windows: calling one fails the test
    monkeypatch.delattr(os, "killpg", raising=False)
    monkeypatch.delattr(signal, "SIGKILL", raising=False)
    monkeypatch.setattr(select, "select", None)
    started, ran = [], []
    proc = FakeWindowsProcess(['{"stage": "segment", "done": 2, "total": 4}\n', "log line\n"])

    def fake_popen(cmd, **kwargs):
        started.append(kwargs)
        return proc

    def fake_run(cmd, **kwargs):
        ran.append((cmd, kwargs))
        proc.returncode = 1  # taskkill ended the tree
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(engine_process.subprocess, "run", fake_run)
    run = engine_process.EngineRun(lambda wd: ["PythonSlicer", "-m", "masksam_core.predict"], popen=fake_popen,
                                   stop_grace_s=0.0)
    kwargs = started[0]
    assert kwargs["creationflags"] == engine_process.CREATE_NEW_PROCESS_GROUP | engine_process.CREATE_NO_WINDOW
    assert kwargs["creationflags"] == 0x00000200 | 0x08000000
    assert "start_new_session" not in kwargs
    assert kwargs["encoding"] == "utf-8" and kwargs["errors"] == "replace"
    assert kwargs["env"]["PYTHONIOENCODING"] == "utf-8"
    assert _wait_for(lambda: run.poll() is None and len(run.log) == 2)
    assert run.progress["fraction"] == 0.5
    run.request_stop()
    assert proc.signals == [engine_process.CTRL_BREAK_EVENT] and not ran  # graceful first
    assert run.stop_file.read_text() == "stop\n"
    time.sleep(0.01)
    assert _wait_for(lambda: run.poll() is not None)  # the grace period is over: the tree is killed
    cmd, run_kwargs = ran[0]
    assert cmd == ["taskkill", "/F", "/T", "/PID", "4242"]
    assert run_kwargs["creationflags"] == engine_process.CREATE_NO_WINDOW
    run.cleanup()
    assert not run.workdir.exists()


def test_windows_ctrl_break_not_delivered_kills_the_tree_at_once(monkeypatch):
    """CTRL_BREAK needs a shared console; when it cannot be sent, Cancel must still stop the engine."""
    monkeypatch.delattr(os, "killpg", raising=False)
    ran = []
    proc = FakeWindowsProcess([])

    def refuse(sig):
        raise OSError("no console")

    proc.send_signal = refuse
    monkeypatch.setattr(engine_process.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    run = engine_process.EngineRun(lambda wd: ["x"], popen=lambda cmd, **kw: proc, windows=True)
    run.request_stop()
    assert ran == [["taskkill", "/F", "/T", "/PID", "4242"]] and proc.signals == ["kill"]
    run.cleanup()


def test_popen_options_per_platform():
    posix = engine_process.popen_options(False)
    assert posix["start_new_session"] is True and "creationflags" not in posix
    assert posix["stdin"] is subprocess.DEVNULL and posix["stderr"] is subprocess.STDOUT


def test_predict_command_and_progress_parsing():
    cmd = engine_process.predict_command("py", "in.nrrd", "out.nrrd", "/m", "cpu", True)
    assert cmd[:3] == ["py", "-m", "masksam_core.predict"] and "--fast" in cmd and "json" in cmd
    assert "--modality" not in cmd and "--format" not in cmd and "--organs" not in cmd
    cmd = engine_process.predict_command("py", "in.nrrd", "out.nrrd", "/m", "cpu", False, modality="MR",
                                         organs=["liver", "kidney_left"])
    assert cmd[cmd.index("--modality") + 1] == "MR"
    assert cmd[cmd.index("--organs") + 1] == "liver,kidney_left"
    assert engine_process.parse_progress('{"stage": "segment", "done": 3, "total": 4}\n')["fraction"] == 0.75
    assert engine_process.parse_progress('{"stage": "segment", "done": null, "total": 0}')["fraction"] == 0.0
    assert engine_process.parse_progress("some log line") is None
    assert engine_process.parse_progress("[1, 2]") is None


def test_a_failing_command_builder_leaves_no_folder(tmp_path, monkeypatch):
    made = []

    def builder(wd):
        made.append(wd)
        raise ValueError("cannot export")

    with pytest.raises(ValueError):
        engine_process.EngineRun(builder)
    assert made and not made[0].exists()
