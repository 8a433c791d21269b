"""Training state for exact resumption: weights, optimizer, scaler, step, RNG states, best score.

Written atomically (temporary file, then ``os.replace``) so a kill at any moment leaves either the previous or
the new state, never half of one. Read with ``torch.load(..., weights_only=True)``: RNG states are stored as
tensors and plain Python values.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import MaskSAMError

STATE_FILE = "training_state.pt"


def rng_state(np_rng: np.random.Generator, torch_gen: torch.Generator) -> Dict[str, Any]:
    """The random states that drive sampling, augmentation and point sampling."""
    bitgen = np_rng.bit_generator.state
    return {
        "numpy_bitgen": {"state": int(bitgen["state"]["state"]), "inc": int(bitgen["state"]["inc"]),
                         "has_uint32": int(bitgen["has_uint32"]), "uinteger": int(bitgen["uinteger"])},
        "torch_gen": torch_gen.get_state(),
        "torch_global": torch.get_rng_state(),
        "python": repr(random.getstate()),
    }


def restore_rng(state: Dict[str, Any], np_rng: np.random.Generator, torch_gen: torch.Generator) -> None:
    b = state["numpy_bitgen"]
    np_rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": b["state"], "inc": b["inc"]},
                                  "has_uint32": b["has_uint32"], "uinteger": b["uinteger"]}
    torch_gen.set_state(state["torch_gen"])
    torch.set_rng_state(state["torch_global"])
    import ast

    random.setstate(_to_tuple(ast.literal_eval(state["python"])))


def _to_tuple(value):
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_to_tuple(v) for v in value)
    return value


def checkpoint_payload(model, trainer, np_rng: np.random.Generator, torch_gen: torch.Generator, best: Dict,
                       before: Dict, start: float) -> Dict[str, Any]:
    """Everything ``--resume`` needs to continue exactly after this step: the trained weights, the trainer's
    optimizer and step, the random states, the best validation so far, the fine-tuning baseline and the time
    spent (``start``: the run's ``time.time()`` at its start)."""
    return {"model": model.trainable_state_dict(), "trainer": trainer.state(), "rng": rng_state(np_rng, torch_gen),
            "best": json.dumps(best), "before": json.dumps(before), "elapsed_s": float(time.time() - start)}


def save_state(folder: Path, payload: Dict[str, Any]) -> Path:
    """Atomically write ``payload`` to ``folder / training_state.pt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, folder / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / STATE_FILE


def load_state(folder: Path) -> Optional[Dict[str, Any]]:
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MaskSAMError(f"training state {path} is unreadable: {str(exc).splitlines()[0]}") from None
