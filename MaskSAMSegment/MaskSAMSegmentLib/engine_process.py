"""Running ``python -m masksam_core.predict`` as a separate process: the command line, progress, cancellation.

The widget drives the same ``EngineRun`` from a Qt timer (non-blocking); the console path waits for it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional


def predict_command(python: str, input_path: str, output_path: str, model_dir: Optional[str] = None,
                    device: str = "auto", fast: bool = False, sam_checkpoint: Optional[str] = None,
                    output_format: Optional[str] = None, modality: Optional[str] = None) -> List[str]:
    """The predict command line, always with JSON progress and --overwrite (outputs go to a fresh temp folder);
    ``modality``: the volume's DICOM Modality where Slicer knows it (the exported file does not carry it);
    ``output_format``: predict's ``--format`` (None: the output's extension decides, as the module's labels.nrrd
    needs; predict refuses a format that contradicts the extension)."""
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
    return cmd


def parse_progress(line: str) -> Optional[Dict]:
    """One progress line -> {"stage", "done", "total", "fraction"}; None for any other output."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if "stage" not in data:
        return None
    total = data.get("total") or 0
    data["fraction"] = (data.get("done", 0) / total) if total else 0.0
    return data


class EngineRun:
    """A predict (or train) process with its own temporary folder; ``cancel()`` really stops it and cleans up."""

    def __init__(self, command_builder: Callable[[Path], List[str]], env: Optional[Dict[str, str]] = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="masksam-slicer-"))
        self.command = command_builder(self.workdir)
        self.log: List[str] = []
        self.progress: Optional[Dict] = None
        self.cancelled = False
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=full_env, bufsize=1, start_new_session=True)

    def poll_lines(self) -> Optional[int]:
        """Read whatever the process printed (blocking until it prints or ends); return its exit code when done."""
        line = self.process.stdout.readline()
        if line:
            self.log.append(line.rstrip("\n"))
            parsed = parse_progress(line)
            if parsed:
                self.progress = parsed
            return None
        return self.process.wait()

    def wait(self, on_progress: Optional[Callable[[Dict], None]] = None) -> int:
        while True:
            code = self.poll_lines()
            if code is not None:
                return code
            if on_progress and self.progress:
                on_progress(self.progress)

    def cancel(self, grace_s: float = 5.0) -> None:
        """SIGTERM (the engine unwinds and deletes its temporary files), SIGKILL after ``grace_s``; remove the
        working folder."""
        self.cancelled = True
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.time() + grace_s
            while self.process.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        return "\n".join(self.log)


def slicer_python() -> str:
    """The Python that runs the engine: Slicer's own (PythonSlicer) inside Slicer, else this interpreter."""
    exe = shutil.which("PythonSlicer")
    return exe or sys.executable
