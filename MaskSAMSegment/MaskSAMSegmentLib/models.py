"""Which model folders MaskSAMSegment offers (the bundled default and the ones the user added), and their organs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


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


def model_organs(folder: str) -> List[Tuple[str, str]]:
    """(class name, display name) of each organ on a model's card, in label order; [] for an unreadable card. The
    class name is what predict's ``--organs`` takes; the display name is what the checklist shows."""
    try:
        card = json.loads((Path(folder) / "model.json").read_text(encoding="utf-8"))
        classes = sorted(card["classes"], key=lambda c: c.get("value", 0))
        return [(str(c["name"]), str(c.get("display_name") or c["name"])) for c in classes]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def organs_argument(all_organs: Sequence[str], checked: Sequence[str]) -> Optional[List[str]]:
    """The ``organs`` of :func:`engine_process.predict_command` for a checklist: None when every organ is checked
    (predict decodes all), else the checked class names in the model's order. Nothing checked is refused."""
    chosen = set(checked)
    unknown = chosen - set(all_organs)
    if unknown:
        raise ValueError("not organs of this model: " + ", ".join(sorted(unknown)))
    if not chosen:
        raise ValueError("choose at least one organ to segment")
    if chosen == set(all_organs):
        return None
    return [name for name in all_organs if name in chosen]


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
