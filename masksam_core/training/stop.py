"""Stopping a training run gracefully, and the checkpoints that make a stop (or a kill) lose little.

``python -m masksam_core.train`` turns SIGTERM and SIGINT (on Windows also CTRL_BREAK_EVENT, which arrives as
SIGBREAK; it is what the Slicer Trainer sends to a process group there) into a request to stop: the loop finishes
the step it is in, writes a resumable checkpoint and a model folder marked as stopped (``training.stopped`` in
``model.json``: ``{"step": k, "max_steps": n}``), and the command exits 0. A second signal aborts at once
(``KeyboardInterrupt``: exit code 130), for a user who does not want to wait for the step.

Only the command line installs the handlers (:func:`graceful_stop`, in the main thread; they are put back when it
ends): a program that calls :func:`~masksam_core.training.runner.run_training` keeps its own signal handling and can
pass any ``stop`` callable of its own (a ``threading.Event().is_set``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist


STOP_FILE_ENV = "MASKSAM_STOP_FILE"


class StopFlag:
    """A stop request, set by a signal handler (or by :meth:`request`) and read by the loop between steps; also set
    once the file named by ``$MASKSAM_STOP_FILE`` exists (the Slicer modules write it on Stop: a request that works
    the same on every platform, where a console event may not reach a process that has no console)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: Optional[str] = None
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None

    def request(self, reason: str = "requested") -> None:
        self.reason = reason
        self._event.set()

    def __call__(self) -> bool:
        if not self._event.is_set() and self.stop_file and os.path.exists(self.stop_file):
            self.request("stop file")
            print(f"{self.stop_file} exists: stopping after the current step", file=sys.stderr, flush=True)
        return self._event.is_set()


def stop_signals() -> List[int]:
    """The signals that ask for a graceful stop on this platform: SIGINT and SIGTERM, and on Windows SIGBREAK
    (CTRL_BREAK_EVENT, the only console event a process group other than the console's own can be sent there)."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if sys.platform == "win32":
        signals.append(signal.SIGBREAK)
    return signals


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """Within the block, :func:`stop_signals` set the yielded flag (the first time) or raise ``KeyboardInterrupt``
    (a second time); the previous handlers are restored when the block ends. Outside the main thread (where Python
    allows no signal handlers) nothing is installed and the flag is only set by :meth:`StopFlag.request`."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame) -> None:
        if flag():
            raise KeyboardInterrupt
        flag.request(_signal_name(signum))
        print(f"{flag.reason}: stopping after the current step (send it again to abort at once)",
              file=sys.stderr, flush=True)

    previous: Dict[int, object] = {}
    try:
        for signum in stop_signals():
            previous[signum] = signal.signal(signum, handler)
        yield flag
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def stop_requested(stop: Optional[Callable[[], bool]], world: int, device: torch.device) -> bool:
    """Whether to stop after this step. Under torchrun every process takes part (the most any process asks for), so
    that all stop at the same step and none waits in a collective the others have left."""
    local = bool(stop is not None and stop())
    if world <= 1:
        return local
    flag = torch.tensor([int(local)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def checkpoint_due(step: int, every: Optional[int]) -> bool:
    """Whether ``--checkpoint-every`` asks for a checkpoint after ``step`` (None or 0: only at epoch ends)."""
    return bool(every) and step % int(every) == 0


def _replace_file(src: Path, dst: Path) -> None:
    """Copy ``src`` onto ``dst`` atomically (a temporary sibling, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _edit_card(card_path: Path, edit: Callable[[Dict], bool]) -> None:
    """Apply ``edit`` to the training record of the model card at ``card_path``; rewrite it atomically when
    ``edit`` says it changed something."""
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if edit(card.setdefault("training", {})):
        fd, tmp = tempfile.mkstemp(prefix=f".{card_path.name}.", suffix=".tmp", dir=card_path.parent)
        os.close(fd)
        try:
            Path(tmp).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, card_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def publish_stopped(out: Path, latest: Path, card_name: str, weights_name: str, stopped: Dict[str, int],
                    keep_best: bool) -> None:
    """Make ``out`` a model folder marked as stopped, once ``latest`` (a model folder of the current weights,
    marked stopped) is written. ``keep_best``: ``out`` already holds the best weights by validation so far, which
    stay and are only marked; otherwise (no validation yet, or none in this run) the current weights become the
    model, as they do at an epoch end without validation."""
    if keep_best and (out / card_name).is_file():
        _edit_card(out / card_name, lambda tr: tr.update(stopped=dict(stopped)) is None)
        return
    _replace_file(latest / weights_name, out / weights_name)  # the weights first: the card names them
    _replace_file(latest / card_name, out / card_name)


def clear_stopped(card_path: Path) -> None:
    """At a finished run's end: drop the stop mark that a stopped and resumed run left on a best model that no
    later validation replaced."""
    if card_path.is_file():
        _edit_card(card_path, lambda tr: tr.pop("stopped", None) is not None)
