"""Labelled datasets: nnU-Net v2 raw and MSD layouts, class selection and mapping, checks before training.

nnU-Net v2: ``dataset.json`` with ``labels`` {name: value}, ``file_ending``; ``imagesTr/CASE_0000<ending>`` and
``labelsTr/CASE<ending>``. MSD: ``dataset.json`` with ``labels`` {"value": name} and ``training`` [{image, label}],
images ``imagesTr/CASE.nii.gz``. Single-channel images only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError


@dataclass
class Case:
    case_id: str
    image: Path
    label: Path


@dataclass
class DatasetSpec:
    root: Path
    labels: Dict[str, int]  # source label name -> value (background included when declared)
    cases: List[Case]
    layout: str


@dataclass
class ClassMap:
    """Target classes (names, label values 1..n) and a lookup table from source label values to them."""

    names: List[str]
    lut: np.ndarray  # (max source value + 1,) uint8; 0 = background
    sources: Dict[str, List[str]] = field(default_factory=dict)

    def apply(self, label: np.ndarray) -> np.ndarray:
        lab = np.asarray(label).astype(np.int64)
        out = np.zeros(lab.shape, np.uint8)
        inside = (lab >= 0) & (lab < len(self.lut))
        out[inside] = self.lut[lab[inside]]
        return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def discover_dataset(root: Union[str, Path]) -> DatasetSpec:
    """Find the cases and label names of a dataset folder (nnU-Net v2 raw or MSD)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}")
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise InputError(f"{root} has no dataset.json (expected the nnU-Net v2 raw or MSD layout)")
    meta = _read_json(meta_path)
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise InputError(f"{meta_path} has no 'labels' mapping")
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    if len(channels) != 1:
        raise InputError(f"{meta_path} declares {len(channels)} input channels; MaskSAM takes single-channel images")
    if all(re.fullmatch(r"-?\d+", str(k)) for k in raw_labels):  # MSD: {"0": "background", "1": "liver"}
        labels = {str(v): int(k) for k, v in raw_labels.items()}
        layout = "msd"
        cases = []
        for item in meta.get("training", []):
            image = root / item["image"]
            label = root / item["label"]
            case_id = image.name.split(".")[0]
            cases.append(Case(case_id, image, label))
        if not cases:
            for image in sorted((root / "imagesTr").glob("*.nii*")):
                if image.name.startswith("."):
                    continue
                cid = image.name.split(".")[0]
                cases.append(Case(cid, image, root / "labelsTr" / image.name))
    else:
        labels = {}
        for name, value in raw_labels.items():
            if isinstance(value, (list, tuple)):  # nnU-Net region labels are not supported
                raise InputError(f"{meta_path}: region-based label {name!r} is not supported")
            labels[str(name)] = int(value)
        layout = "nnunetv2"
        ending = meta.get("file_ending", ".nii.gz")
        cases = []
        for image in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
            cid = image.name[: -len(f"_0000{ending}")]
            cases.append(Case(cid, image, root / "labelsTr" / f"{cid}{ending}"))
        extra = sorted(p.name for p in (root / "imagesTr").glob(f"*_0001{ending}")) if (root / "imagesTr").exists() else []
        if extra:
            raise InputError(f"{root}/imagesTr holds second channels ({extra[0]}); MaskSAM takes single-channel images")
    if not cases:
        raise InputError(f"no training cases found in {root}/imagesTr")
    return DatasetSpec(root=root, labels=labels, cases=cases, layout=layout)


def select_classes(spec: DatasetSpec, classes: Optional[Sequence[str]] = None,
                   mapping: Optional[Dict[str, Union[str, List[str]]]] = None) -> ClassMap:
    """Keep ``classes`` (default: every non-background label), renumbered 1..n in the given order.

    ``mapping`` merges source labels into a target class: {"kidney": ["kidney_left", "kidney_right"]}.
    Everything else becomes background.
    """
    available = {n: v for n, v in spec.labels.items() if v != 0}
    names = list(classes) if classes else sorted(available, key=lambda n: available[n])
    sources: Dict[str, List[str]] = {}
    for name in names:
        src = (mapping or {}).get(name, name)
        src_list = [src] if isinstance(src, str) else list(src)
        missing = [s for s in src_list if s not in available]
        if missing:
            raise InputError(f"class {missing[0]!r} is not in the dataset's labels; available: "
                             f"{', '.join(sorted(available))}")
        sources[name] = src_list
    if len(set(names)) != len(names):
        raise InputError("a class is listed twice")
    lut = np.zeros(max(spec.labels.values()) + 1, np.uint8)
    for k, name in enumerate(names, start=1):
        for s in sources[name]:
            lut[available[s]] = k
    return ClassMap(names=names, lut=lut, sources=sources)


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def check_dataset(spec: DatasetSpec, class_map: Optional[ClassMap] = None, tol: float = 1e-3) -> None:
    """Every problem found before training, one per line, in one :class:`InputError`."""
    problems: List[str] = []
    declared = set(spec.labels.values()) | {0}
    for case in spec.cases:
        if not case.image.exists():
            problems.append(f"{case.case_id}: image missing ({case.image.name})")
            continue
        if not case.label.exists():
            problems.append(f"{case.case_id}: label missing ({case.label.name})")
            continue
        try:
            img, lab = _header(case.image), _header(case.label)
        except RuntimeError as exc:
            problems.append(f"{case.case_id}: unreadable ({str(exc).strip().splitlines()[0][:100]})")
            continue
        if img.GetDimension() != 3 or img.GetNumberOfComponents() != 1:
            problems.append(f"{case.case_id}: image is not a 3D scalar volume")
            continue
        if img.GetSize() != lab.GetSize():
            problems.append(f"{case.case_id}: label size {lab.GetSize()} differs from image size {img.GetSize()}")
            continue
        if not (np.allclose(img.GetSpacing(), lab.GetSpacing(), atol=tol)
                and np.allclose(img.GetOrigin(), lab.GetOrigin(), atol=tol * 10)
                and np.allclose(img.GetDirection(), lab.GetDirection(), atol=tol)):
            problems.append(f"{case.case_id}: label geometry (spacing, origin or direction) differs from the image")
            continue
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))).astype(int).tolist())
        undeclared = sorted(values - declared)
        if undeclared:
            problems.append(f"{case.case_id}: label values {undeclared[:5]} are not declared in dataset.json")
    if problems:
        raise InputError("dataset problems:\n  " + "\n  ".join(problems))
