"""Running the engine (``python -m masksam_core.predict`` or ``train``) as a separate process on Windows, macOS and
Linux: the command line, progress, a graceful stop and a cancel that removes the whole process tree.

Plain Python (no Slicer, no Qt), so that it is tested everywhere. Why it is built this way:

- Output is read by a daemon thread that ``readline()``s into a ``queue.Queue``; the widget's Qt timer drains the
  queue with :meth:`EngineRun.poll`, which never blocks. ``select()`` on a pipe does not work on Windows, and a pipe
  nobody drains makes the engine block once it is full.
- Output is decoded as UTF-8 (``PYTHONIOENCODING=utf-8`` for the child), never with the Windows code page.
- The child starts in a process group of its own (POSIX: a new session; Windows: ``CREATE_NEW_PROCESS_GROUP``, with
  ``CREATE_NO_WINDOW`` so that no console window flashes up). ``PythonSlicer`` is a launcher that starts
  ``python-real``, so stopping only the launcher would leave the engine running: the whole tree is signalled.
- Stopping is two-phase: first a graceful request (SIGTERM to the group / CTRL_BREAK, plus a stop file named in
  ``MASKSAM_STOP_FILE`` for an engine that checks it), then, after a grace period, the tree is killed (``killpg``
  SIGKILL / ``taskkill /F /T``). ``predict`` unwinds on SIGTERM and removes its temporary files; ``train`` finishes
  the current step and saves a valid model folder.

``IS_WINDOWS`` (or the ``windows`` argument of :class:`EngineRun`) selects the platform branch, so that tests can run
the Windows branch on Linux with the system calls faked.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

IS_WINDOWS = sys.platform == "win32"

# Windows-only constants, with their documented values so that the Windows branch can be exercised elsewhere
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
CTRL_BREAK_EVENT = getattr(signal, "CTRL_BREAK_EVENT", 1)

STOP_FILE_ENV = "MASKSAM_STOP_FILE"
LOG_LINES_KEPT = 20000  # the log box and the failure dialog show the end; a runaway engine must not eat memory
EOF_WAIT_S = 2.0  # after the process ended, how long to wait for its pipe to close (a stray child may hold it)


def predict_command(python: str, input_path: str, output_path: str, model_dir: Optional[str] = None,
                    device: str = "auto", fast: bool = False, sam_checkpoint: Optional[str] = None,
                    output_format: Optional[str] = None, modality: Optional[str] = None,
                    organs: Optional[Sequence[str]] = None) -> List[str]:
    """The predict command line, always with JSON progress and --overwrite (outputs go to a fresh temp folder);
    ``modality``: the volume's DICOM Modality where Slicer knows it (the exported file does not carry it);
    ``output_format``: predict's ``--format`` (None: the output's extension decides, as the module's labels.nrrd
    needs; predict refuses a format that contradicts the extension); ``organs``: class names to decode and write
    (``--organs``; None or empty: all of the model's organs)."""
    cmd = [python, "-m", "masksam_core.predict", "-i", input_path, "-o", output_path, "--device", device,
           "--progress", "json", "--overwrite"]
    if output_format:
        cmd += ["--format", output_format]
    if model_dir:
        cmd += ["--model", model_dir]
    if sam_checkpoint:
        cmd += ["--sam-checkpoint", sam_checkpoint]
    if fast:
        cmd.append("--fast")
    if modality:
        cmd += ["--modality", modality]
    if organs:
        cmd += ["--organs", ",".join(organs)]
    return cmd


def parse_progress(line: str) -> Optional[Dict[str, Any]]:
    """One progress line -> {"stage", "done", "total", "fraction"}; None for any other output."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "stage" not in data:
        return None
    total = data.get("total") or 0
    done = data.get("done") or 0
    data["fraction"] = (done / total) if total else 0.0
    return data


def popen_options(windows: bool) -> Dict[str, Any]:
    """Keyword arguments of ``subprocess.Popen`` for the engine: one output pipe decoded as UTF-8, no stdin, and a
    process group of its own (so that the whole tree can be stopped), without a console window on Windows."""
    options: Dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL,
                               "encoding": "utf-8", "errors": "replace", "bufsize": 1}
    if windows:
        options["creationflags"] = CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
    else:
        options["start_new_session"] = True
    return options


def ask_to_stop(process: Any, windows: bool) -> bool:
    """Send the graceful stop request to the process group (SIGTERM on POSIX, CTRL_BREAK on Windows); False when it
    could not be delivered (then only killing the tree stops it)."""
    try:
        if windows:
            process.send_signal(CTRL_BREAK_EVENT)
        else:
            os.killpg(process.pid, signal.SIGTERM)
    except (OSError, ValueError) as exc:  # ProcessLookupError: already gone; OSError: no shared console
        logging.info("MaskSAM: graceful stop not delivered (%s)", exc)
        return False
    return True


def kill_tree(process: Any, windows: bool) -> None:
    """Kill the process and every process it started (its group): ``taskkill /F /T`` on Windows, SIGKILL to the
    process group on POSIX (which also reaches children left over after the process itself ended)."""
    if windows:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, creationflags=CREATE_NO_WINDOW,
                       check=False)
        if process.poll() is None:
            process.kill()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def remove_tree(path: Path, attempts: int = 5, delay_s: float = 0.2) -> bool:
    """Remove a folder, retrying briefly (Windows keeps files of a just-killed process locked for a moment);
    whether it is gone."""
    for k in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not Path(path).exists():
            return True
        if k + 1 < attempts:
            time.sleep(delay_s)
    return False


def partial_outputs(output: Path) -> List[Path]:
    """The engine's unfinished atomic writes of ``output`` (``masksam_core.fileutil.atomic_folder`` siblings named
    ``.<name>.tmp-*``), left behind only when the process was killed."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    return sorted(output.parent.glob(f".{output.name}.tmp-*"))


class EngineRun:
    """One engine process with its own temporary folder (``workdir``, removed by :meth:`cleanup`).

    ``command_builder(workdir)`` returns the command line; ``outputs``: paths the engine writes atomically, whose
    partial copies :meth:`cleanup` removes after a stop; ``windows``: the platform branch (default ``IS_WINDOWS``);
    ``popen``: the process factory (tests pass a fake). The widget calls :meth:`poll` from a Qt timer and
    :meth:`request_stop` for Cancel / Stop; console code calls :meth:`wait` or :meth:`cancel`.
    """

    def __init__(self, command_builder: Callable[[Path], List[str]], env: Optional[Dict[str, str]] = None,
                 outputs: Sequence[str] = (), windows: Optional[bool] = None,
                 popen: Optional[Callable[..., Any]] = None, stop_grace_s: float = 5.0) -> None:
        self.windows = IS_WINDOWS if windows is None else bool(windows)
        self.workdir = Path(tempfile.mkdtemp(prefix="masksam-slicer-"))
        self.stop_file = self.workdir / "stop"
        try:
            self.command = command_builder(self.workdir)
        except BaseException:
            remove_tree(self.workdir)
            raise
        self.outputs = [Path(p) for p in outputs]
        self.log: List[str] = []
        self.progress: Optional[Dict[str, Any]] = None
        self.last_lines: List[str] = []
        self.cancelled = False
        self.killed = False
        self.stop_grace_s = stop_grace_s
        self._stop_asked_at: Optional[float] = None
        self._ended_at: Optional[float] = None
        self._eof = False
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8",
                    STOP_FILE_ENV: str(self.stop_file)}
        logging.info("MaskSAM: running %s", subprocess.list2cmdline(self.command))
        try:
            self.process = (popen or subprocess.Popen)(self.command, env=full_env, **popen_options(self.windows))
        except BaseException:
            remove_tree(self.workdir)
            raise
        self._reader = threading.Thread(target=self._read, name="MaskSAM engine output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self.process.stdout:
                self._lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError):  # the pipe was closed under us: the process is gone
            pass
        finally:
            self._lines.put(None)

    def drain(self) -> List[str]:
        """The lines printed since the last call, without blocking; they are also kept in ``log`` and the last
        progress line in ``progress``."""
        new = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                continue
            new.append(line)
            parsed = parse_progress(line)
            if parsed:
                self.progress = parsed
        self.log.extend(new)
        del self.log[:-LOG_LINES_KEPT]
        return new

    def poll(self) -> Optional[int]:
        """Non-blocking, for a Qt timer: take the new output, kill the tree once a stop request's grace period is
        over, and return the exit code once the process has ended and its output has been read; None meanwhile.
        ``last_lines`` holds the lines this call read."""
        self.last_lines = self.drain()
        code = self.process.poll()
        now = time.monotonic()
        grace_over = self._stop_asked_at is not None and now - self._stop_asked_at > self.stop_grace_s
        if code is None:
            if grace_over:
                self.kill()
            return None
        if self._eof:
            return code
        if self._stop_asked_at is not None and not grace_over:
            # the launcher (PythonSlicer) may end before the engine it started, which still holds the pipe while
            # it saves: wait for it within the grace period
            return None
        if grace_over and not self.killed:
            self.kill()  # what is left of the group after the grace period
        if self._ended_at is None:
            self._ended_at = now
        if now - self._ended_at < EOF_WAIT_S:
            return None
        return code

    def wait(self, on_progress: Optional[Callable[[Dict[str, Any]], None]] = None, interval_s: float = 0.1) -> int:
        """Block until the process ends (console use); ``on_progress`` sees each new progress state."""
        last = None
        while True:
            code = self.poll()
            if on_progress and self.progress is not None and self.progress is not last:
                last = self.progress
                on_progress(self.progress)
            if code is not None:
                return code
            time.sleep(interval_s)

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested and the process has not ended yet."""
        return self._stop_asked_at is not None and self.process.poll() is None

    def request_stop(self, grace_s: Optional[float] = None) -> None:
        """Ask the engine to stop (stop file, then SIGTERM / CTRL_BREAK to its group) and return at once;
        :meth:`poll` kills the tree when it is still running ``grace_s`` seconds later."""
        self.cancelled = True
        if grace_s is not None:
            self.stop_grace_s = grace_s
        if self._stop_asked_at is not None:
            return
        self._stop_asked_at = time.monotonic()
        try:
            self.stop_file.write_text("stop\n")
        except OSError:
            pass
        if self.process.poll() is None and not ask_to_stop(self.process, self.windows):
            self.kill()

    def kill(self) -> None:
        """Kill the whole process tree now."""
        self.killed = True
        kill_tree(self.process, self.windows)

    def cancel(self, grace_s: float = 5.0) -> None:
        """Blocking stop (console use, module cleanup): ask, wait up to ``grace_s``, kill what is left of the tree,
        read the last output and remove the temporary folder and partial outputs."""
        self.request_stop(grace_s)
        deadline = time.monotonic() + grace_s
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.process.poll() is None:
            self.kill()
        else:
            kill_tree(self.process, self.windows)  # grandchildren that outlived the process itself
        self.process.wait()
        self._reader.join(timeout=EOF_WAIT_S)
        self.drain()
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the temporary folder and, after a stop, the partial copies of the outputs."""
        remove_tree(self.workdir)
        if self.cancelled:
            for output in self.outputs:
                for partial in partial_outputs(output):
                    remove_tree(partial)

    def log_text(self) -> str:
        return "\n".join(self.log)


def slicer_python() -> str:
    """The Python that runs the engine: Slicer's own (PythonSlicer) inside Slicer, else this interpreter."""
    exe = shutil.which("PythonSlicer")
    return exe or sys.executable


def stub_command(python: str, input_path: str, output_path: str, hang_s: float = 0.0) -> List[str]:
    """The command of :mod:`stub_engine` (same protocol and outputs as predict, in seconds): the in-Slicer
    self-test's engine."""
    script = Path(__file__).resolve().with_name("stub_engine.py")
    return [python, str(script), "-i", input_path, "-o", output_path, "--hang", str(hang_s)]
