"""Small helpers shared by the command-line doors."""
from __future__ import annotations

import argparse
import gc
import os
import sys
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


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; turn a :class:`MaskSAMError` into one line on stderr and exit code 2.

    ``KeyboardInterrupt`` gives exit code 130 with a one-line message.
    """
    try:
        return int(main(argv) or 0)
    except MaskSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: cancelled", file=sys.stderr)
        return 130
