"""Model folders: the unit that training writes, inference reads and Slicer lists.

A model folder holds ``model.json`` (the :class:`ModelCard`) and ``weights.pt``, the state of the trained parts
only (the frozen backbone comes from its own file, checked by sha256). Folders are written atomically: into a
temporary sibling, then renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..errors import ModelError, OutputError
from ..fileutil import atomic_folder
from .backbones import Backbone, load_backbone, load_state_dict_file
from .card import CARD_FILE, ModelCard
from .masksam import MaskSAM


def build_model(card: ModelCard, backbone: Optional[Backbone] = None, sam_checkpoint: Optional[os.PathLike] = None) -> MaskSAM:
    """An (untrained-head) MaskSAM for ``card``, on ``backbone`` or on the backbone the card names.

    Raises :class:`ModelError` when the backbone's base weights are not the ones the card was made with.
    """
    if backbone is None:
        backbone = load_backbone(card.backbone["name"], sam_checkpoint=sam_checkpoint,
                                 input_size=card.input_size,
                                 pos_embed_mode=card.architecture.pos_embed_mode)
    if backbone.name != card.backbone["name"]:
        raise ModelError(f"model {card.name!r} was made for backbone {card.backbone['name']}, not {backbone.name}")
    expected = card.backbone.get("sha256")
    if expected and backbone.sha256 != expected:
        raise ModelError(f"model {card.name!r} was trained on other {backbone.name} base weights "
                         f"(sha256 {expected[:12]}..., this file has {backbone.sha256[:12]}...)")
    if backbone.input_size != card.input_size:
        raise ModelError(f"model {card.name!r} expects input size {card.input_size}, backbone gives {backbone.input_size}")
    return MaskSAM(backbone, card.architecture)


def load_model(folder: os.PathLike, device: str = "cpu", backbone: Optional[Backbone] = None,
               sam_checkpoint: Optional[os.PathLike] = None) -> Tuple[MaskSAM, ModelCard]:
    """Load a model folder; returns the network in eval mode on ``device`` and its card."""
    folder = Path(folder)
    card = ModelCard.read(folder)
    weights = folder / card.weights
    if not weights.is_file():
        raise ModelError(f"model folder {folder} has no weights file ({card.weights})")
    model = build_model(card, backbone=backbone, sam_checkpoint=sam_checkpoint)
    state = load_state_dict_file(weights)
    load_trainable_state(model, state, source=str(weights))
    return model.to(device).eval(), card


def load_trainable_state(model: MaskSAM, state: dict, source: str = "weights") -> None:
    """Load the trained parts strictly: every trained tensor present, none extra, shapes equal."""
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        detail = (f"missing {missing[:3]}" if missing else "") + (" " if missing and extra else "") + \
                 (f"unexpected {extra[:3]}" if extra else "")
        raise ModelError(f"{source} does not fit this architecture ({detail})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelError(f"{source}: {key} has shape {tuple(state[key].shape)}, the card's architecture needs "
                             f"{tuple(tensor.shape)} (another class count, slab depth or query count?)")
    model.load_state_dict(state, strict=False)


def save_model_folder(model: MaskSAM, card: ModelCard, folder: os.PathLike, overwrite: bool = False,
                      extra_files: Optional[dict] = None, extra_dirs: Optional[list] = None) -> Path:
    """Write ``card`` and the trained weights of ``model`` into ``folder`` atomically.

    An existing folder is refused unless ``overwrite``; then it is replaced in one rename (the old copy is
    removed only after the new one is in place). ``extra_files`` maps file names to text or bytes;
    ``extra_dirs`` are folders copied in under their own names (the atlas).
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputError(f"{folder} exists; choose another folder or allow overwriting")
    with atomic_folder(folder) as tmp:
        (tmp / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
        torch.save(model.trainable_state_dict(), tmp / card.weights)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as handle:
                handle.write(content)
        for src in extra_dirs or []:
            shutil.copytree(src, tmp / Path(src).name)
    return folder
