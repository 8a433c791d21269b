"""Small helpers shared by the command-line doors."""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .errors import MaskSAMError


def ask_torch_for_huge_pages() -> bool:
    """Have torch's CPU allocator back tensors of 2 MB and more with transparent huge pages (its
    ``THP_MEM_ALLOC_ENABLE``), unless the environment already says; True when it will.

    torch reads the variable once, at its first allocation, so this works only before torch is imported (the command
    lines import it lazily). With the kernel's default ``madvise`` mode and 4 kB pages, every large tensor a training
    step frees goes back to the kernel and its successor is faulted in page by page: measured on 2 cores with the
    default model's configuration, 25 prompt-generator steps and a validation took 17.8 million page faults and 45 s
    of system time; with huge pages 0.84 million and 22 s, and the steps 6-10 % less time. The default model's whole
    run: 17.5 instead of 477 million page faults, 984 instead of 1356 s of system time. (``predict``'s time did not
    change measurably, so only ``train`` asks.)
    """
    if "torch" in sys.modules:
        return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


_collector = {"paused": False}


def pause_garbage_collector() -> None:
    """At a command line's start (its ``__main__``): no cyclic garbage collection until
    :func:`resume_garbage_collector`, while torch, OpenVINO and the model are imported and loaded.

    Those leave about 400,000 long-lived Python objects (many from torch's dynamo, which torchvision imports for
    LiteMedSAM's TinyViT through timm), and every full collection walks them all: measured on 2 cores, ``predict``
    ran 6 full collections while starting (0.85 s), and the interpreter's exit, which collects again, took 2.1 s.
    """
    gc.disable()
    _collector["paused"] = True


def resume_garbage_collector() -> None:
    """Once the model is loaded: when :func:`pause_garbage_collector` paused the collector, move every object alive
    now out of its reach for good (``gc.freeze``; they live until the process ends anyway) and turn it back on.
    Measured: the exit then takes 0.6 instead of 2.1 s. A no-op otherwise (``main`` called from Python)."""
    if _collector["paused"]:
        _collector["paused"] = False
        gc.freeze()
        gc.enable()


def spacing_argument(text: str) -> List[float]:
    """An argparse type for ``--spacing x,y,z``: three positive numbers in mm (anything else is one line)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"needs three positive numbers x,y,z in mm, got {text!r}")
    return values


def door_name(main: Callable) -> str:
    """How a door is named in messages: ``predict`` for ``masksam_core.predict.main``, ``model`` for
    ``masksam_core.model.__main__.main``, ``masksam`` for the package's own ``__main__``."""
    module = getattr(main, "__module__", None) or ""
    if module == "__main__":  # run as ``python -m masksam_core.<door>``: the module's real name is its spec's
        spec = getattr(main, "__globals__", {}).get("__spec__")
        module = spec.name if spec is not None else ""
    parts = [p for p in module.split(".") if p not in ("masksam_core", "__main__")]
    return parts[-1] if parts else "masksam"


def log_folder() -> Path:
    """Where the logs of unexpected failures go: ``logs`` in the user cache folder (``sample_data.cache_root``:
    ``$MASKSAM_CACHE``, else ``$XDG_CACHE_HOME/masksam`` or ``~/.cache/masksam``)."""
    from .sample_data import cache_root

    return cache_root() / "logs"


def write_failure_log(door: str, text: str) -> Optional[Path]:
    """Write ``text`` (a traceback and what ran) to a new ``masksam-YYYYmmdd-HHMMSS.log`` in :func:`log_folder`,
    atomically (a temporary file renamed into place, never over an older log); the path, or None when no log
    could be written (then the caller says so rather than failing a second time). Only the newest
    :data:`KEEP_LOGS` logs are kept, so the folder cannot grow without end."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        folder = log_folder()
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".masksam-", suffix=".log.tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        for k in range(1, 1000):
            target = folder / (f"masksam-{stamp}.log" if k == 1 else f"masksam-{stamp}-{k}.log")
            if not target.exists():
                os.replace(tmp, target)
                try:
                    _prune_logs(folder)
                except OSError:  # an old log that cannot be removed does not matter here
                    pass
                return target
        os.unlink(tmp)
    except Exception:  # noqa: BLE001 - a log that cannot be written must not hide the failure itself
        pass
    return None


KEEP_LOGS = 20


def _prune_logs(folder: Path) -> None:
    logs = sorted(folder.glob("masksam-*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in logs[KEEP_LOGS:]:
        old.unlink()


def _failure_report(door: str, argv: Optional[Sequence[str]]) -> str:
    from . import __version__

    args = list(sys.argv[1:] if argv is None else argv)
    return (f"masksam {__version__} {door} failed at {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
            f"command: {' '.join([door] + [str(a) for a in args])}\n"
            f"python {sys.version.split()[0]} on {platform.platform()}\n\n{traceback.format_exc()}")


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
            name: Optional[str] = None) -> int:
    """Run ``main(argv)``; turn a :class:`MaskSAMError` into one line on stderr and exit code 2.

    ``KeyboardInterrupt`` gives exit code 130 with a one-line message. Any other exception is a bug, not the user's
    doing: one line on stderr says which door failed, the exception's type and message and the log holding the
    full traceback (:func:`write_failure_log`), exit code 1 (Python's own for an uncaught exception). ``name``
    names the door in that line (default: from ``main``'s module, :func:`door_name`).
    """
    try:
        return int(main(argv) or 0)
    except MaskSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: cancelled", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every unexpected failure ends as one line and a log
        door = name or door_name(main)
        log = write_failure_log(door, _failure_report(door, argv))
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        where = f"full traceback in {log}" if log else f"no log could be written in {_safe_log_folder()}"
        print(f"error: {door} failed unexpectedly ({message}); {where}", file=sys.stderr)
        return 1


def _safe_log_folder() -> str:
    try:
        return str(log_folder())
    except Exception:  # noqa: BLE001
        return "the cache folder"
