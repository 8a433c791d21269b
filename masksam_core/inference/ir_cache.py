"""Housekeeping of the OpenVINO IR cache (``~/.cache/masksam/openvino`` or ``$MASKSAM_CACHE/openvino``).

Every converted model lies in its own folder, ``<kind>-<weights hash>-<shape key>-ov<version>-code<code hash>``
(see ``openvino_runtime.OpenVINOModel``), 50-150 MB with its compiled kernels. An update of MaskSAM or of
OpenVINO makes all earlier folders unusable (their code or OpenVINO version no longer matches), and a user who
fine-tunes models gets a set per model. Without pruning the cache only grows (1.5 GB on a development machine
after a few updates).

A folder's modification time is its last use (:func:`mark_used` on every load). :func:`prune` removes:

- folders of another code or OpenVINO version unused for ``STALE_UNUSED_DAYS`` (not at once: two installations of
  different versions may share the cache, and each would otherwise delete the other's conversions);
- any folder unused for ``UNUSED_DAYS`` (a model that is no longer used);
- half-written conversions (``.<name>.tmp-*``, left by a killed process) older than a day.

Anything else in the folder is left alone.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional

STALE_UNUSED_DAYS = 7
UNUSED_DAYS = 90
TMP_UNUSED_DAYS = 1
_DAY_S = 86400.0
_IR_FOLDER = re.compile(r"[a-z_]+-[0-9a-f]{16}-.+-ov[0-9A-Za-z._]+-code[0-9a-f]{8}")
_TMP_FOLDER = re.compile(r"\.[a-z_]+-[0-9a-f]{16}-.+\.tmp-.+")


def mark_used(folder: Path) -> None:
    """Record a use of the IR ``folder`` (its modification time); a read-only cache is not an error."""
    try:
        os.utime(folder)
    except OSError:
        pass


def prune(root: Path, current_suffix: str, now: Optional[float] = None) -> List[Path]:
    """Remove the IR folders in ``root`` that the rules above retire; returns what was removed.

    Args:
        root: the IR cache folder.
        current_suffix: ``-ov<version>-code<code hash>`` of this installation's conversions.
        now: the current time (seconds since the epoch; for tests).
    """
    now = time.time() if now is None else now
    removed: List[Path] = []
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.is_dir() or entry.is_symlink():
                continue
            idle_days = (now - entry.stat().st_mtime) / _DAY_S
        except OSError:
            continue
        if _TMP_FOLDER.fullmatch(entry.name):
            retire = idle_days > TMP_UNUSED_DAYS
        elif _IR_FOLDER.fullmatch(entry.name):
            limit = UNUSED_DAYS if entry.name.endswith(current_suffix) else STALE_UNUSED_DAYS
            retire = idle_days > limit
        else:
            continue
        if retire:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed
