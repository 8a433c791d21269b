"""The model card: a JSON description of a trained MaskSAM (``model.json`` in a model folder).

It names the backbone and the sha256 of its base weights, the architecture (:class:`MaskSAMConfig`), the
classes (value, name, display name, colour, SNOMED CT codes), the preprocessing (target spacing, intensity
normalisation), how the model was trained, and its intended use. See ``docs/design.md`` for an example.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import ModelError
from .masksam import MaskSAMConfig

FORMAT_VERSION = 1
CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
RESEARCH_ONLY = "Research use only. Not for clinical use."
DEFAULT_CT_NORMALIZATION = {"mode": "ct_window", "window": [-160.0, 240.0]}


@dataclass
class ModelCard:
    """Everything needed to rebuild, check and use a trained MaskSAM."""

    name: str
    backbone: Dict[str, Any]
    architecture: MaskSAMConfig
    classes: List[Dict[str, Any]]
    preprocessing: Dict[str, Any]
    training: Dict[str, Any] = field(default_factory=dict)
    inference: Dict[str, Any] = field(default_factory=dict)  # {"background_threshold": t} (see semantic fusion)
    intended_use: str = RESEARCH_ONLY
    description: str = ""
    weights: str = WEIGHTS_FILE
    format_version: int = FORMAT_VERSION
    atlas: Dict[str, Any] = field(default_factory=dict)  # the atlas folder's record (``masksam_core.atlas.store``)
    trained_modalities: List[str] = field(default_factory=list)  # empty: told by the normalisation
    folder: Optional[Path] = field(default=None, compare=False)  # where the card was read from (not serialised)

    # ------------------------------------------------------------------ facts used everywhere
    @property
    def background_threshold(self) -> Optional[float]:
        """The semantic-fusion background threshold this model was validated with (None: the spec's fusion)."""
        value = self.inference.get("background_threshold")
        return None if value is None else float(value)

    @property
    def modalities(self) -> List[str]:
        """The modalities the model was trained on: the card's list, else "CT" or "MR" from its normalisation."""
        if self.trained_modalities:
            return list(self.trained_modalities)
        mode = self.normalization.get("mode", "")
        return ["CT"] if mode.startswith("ct_") else ["MR"]

    @property
    def slab_depth(self) -> int:
        return self.architecture.slab_depth

    @property
    def num_queries(self) -> int:
        return self.architecture.num_queries

    @property
    def input_size(self) -> int:
        return int(self.backbone["input_size"])

    @property
    def target_spacing(self) -> List[float]:
        """(x, y, z) in mm."""
        return [float(v) for v in self.preprocessing["target_spacing"]]

    @property
    def normalization(self) -> Dict[str, Any]:
        return dict(self.preprocessing["normalization"])

    @property
    def class_names(self) -> List[str]:
        return [c["name"] for c in self.classes]

    def labels(self) -> Dict[int, str]:
        """{label value: name} for the foreground classes."""
        return {int(c["value"]): c["name"] for c in self.classes}

    def identity(self) -> Dict[str, Any]:
        """What a prediction's sidecar records about the model that made it."""
        return {"name": self.name, "backbone": self.backbone.get("name"), "backbone_sha256": self.backbone.get("sha256"),
                "format_version": self.format_version, "recipe": self.training.get("recipe"),
                "classes": self.classes}

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "description": self.description,
            "intended_use": self.intended_use,
            "backbone": self.backbone,
            "architecture": self.architecture.to_dict(),
            "classes": self.classes,
            "preprocessing": self.preprocessing,
            "training": self.training,
            "inference": self.inference,
            "weights": self.weights,
            **({"atlas": self.atlas} if self.atlas else {}),
            **({"modalities": self.trained_modalities} if self.trained_modalities else {}),
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "model card") -> "ModelCard":
        if not isinstance(data, dict):
            raise ModelError(f"{source} is not a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise ModelError(f"{source} has format version {version!r}; this MaskSAM reads versions 1..{FORMAT_VERSION}")
        missing = [k for k in ("name", "backbone", "architecture", "classes", "preprocessing") if k not in data]
        if missing:
            raise ModelError(f"{source} lacks {', '.join(missing)}")
        classes = data["classes"]
        values = [c.get("value") for c in classes]
        if values != list(range(1, len(classes) + 1)):
            raise ModelError(f"{source}: class values must be 1..{len(classes)} in order, got {values}")
        arch = MaskSAMConfig.from_dict(data["architecture"])
        if arch.num_classes != len(classes) + 1:
            raise ModelError(f"{source}: architecture has {arch.num_classes} classes but the card lists "
                             f"{len(classes)} organs (+ background)")
        pre = data["preprocessing"]
        if "target_spacing" not in pre or len(pre["target_spacing"]) != 3 or "normalization" not in pre:
            raise ModelError(f"{source}: preprocessing needs target_spacing (x, y, z) and normalization")
        for key in ("name", "input_size"):
            if key not in data["backbone"]:
                raise ModelError(f"{source}: backbone lacks {key}")
        return cls(name=data["name"], backbone=dict(data["backbone"]), architecture=arch, classes=list(classes),
                   preprocessing=dict(pre), training=dict(data.get("training", {})),
                   inference=_inference_settings(data.get("inference", {}), source),
                   intended_use=data.get("intended_use", RESEARCH_ONLY), description=data.get("description", ""),
                   weights=data.get("weights", WEIGHTS_FILE), format_version=version,
                   atlas=_atlas_record(data.get("atlas", {}), source),
                   trained_modalities=_modalities(data.get("modalities", []), source))

    @classmethod
    def read(cls, folder: Path) -> "ModelCard":
        """The card of a model folder; ``folder`` is remembered (the atlas lies beside the card)."""
        path = Path(folder) / CARD_FILE
        if not Path(folder).is_dir():
            raise ModelError(f"model folder not found: {folder}")
        if not path.is_file():
            raise ModelError(f"{folder} is not a MaskSAM model folder (no {CARD_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"model card {path} is corrupt: {exc}") from None
        card = cls.from_dict(data, source=str(path))
        card.folder = Path(folder)
        return card


def _atlas_record(data: Any, source: str) -> Dict[str, Any]:
    if not isinstance(data, dict) or (data and not isinstance(data.get("cases"), list)):
        raise ModelError(f"{source}: atlas must be an object with a list of cases")
    return dict(data)


def _modalities(data: Any, source: str) -> List[str]:
    if not isinstance(data, list) or not all(isinstance(m, str) and m for m in data):
        raise ModelError(f"{source}: modalities must be a list of names such as [\"CT\"], not {data!r}")
    return [m.upper() for m in data]


def _inference_settings(data: Any, source: str) -> Dict[str, Any]:
    if not isinstance(data, dict):
        raise ModelError(f"{source}: inference must be an object")
    t = data.get("background_threshold")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < float(t) < 1):
        raise ModelError(f"{source}: inference.background_threshold must be a number in (0, 1), not {t!r}")
    return dict(data)


def make_card(name: str, backbone_name: str, backbone_sha256: str, input_size: int, config: MaskSAMConfig,
              classes: List[Dict[str, Any]], target_spacing, normalization: Optional[Dict[str, Any]] = None,
              training: Optional[Dict[str, Any]] = None, description: str = "",
              inference: Optional[Dict[str, Any]] = None) -> ModelCard:
    """A card for a new model; ``config.num_classes`` must be ``len(classes) + 1``."""
    card = ModelCard(
        name=name,
        backbone={"name": backbone_name, "sha256": backbone_sha256, "input_size": int(input_size)},
        architecture=config, classes=classes,
        preprocessing={"target_spacing": [float(v) for v in target_spacing],
                       "normalization": dict(normalization or DEFAULT_CT_NORMALIZATION)},
        training=dict(training or {}), description=description, inference=dict(inference or {}),
    )
    return ModelCard.from_dict(card.to_dict())  # validates
