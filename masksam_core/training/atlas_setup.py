"""The atlas a training run writes into its model folder: its training cases (and a fine-tuned model's base atlas).

Each training case (not the validation cases) becomes an atlas case (``atlas.store.make_case``: resampled to 3 mm,
cropped to the body, int16 image and uint8 labels in the model's class values); fine-tuning keeps the base model's
atlas cases first and adds the new ones, so every corrected case also improves localisation. At most
``atlas_cases`` cases are kept (each costs one registration, 2-5 s on 2 cores, at every prediction); the base
atlas's cases go first, then the dataset's in case-id order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import SimpleITK as sitk

from ..atlas.store import Atlas, make_case, read_atlas, write_atlas
from ..data.dataset import ClassMap, DatasetSpec

DEFAULT_ATLAS_CASES = 3


def atlas_for_training(spec: DatasetSpec, class_map: ClassMap, train_ids: List[str], modality: str,
                       base_model: Optional[Path], num_classes: int, max_cases: int = DEFAULT_ATLAS_CASES,
                       source: str = "", licence: str = "") -> Atlas:
    """The atlas of a new model folder: ``base_model``'s atlas cases, then the training cases ``train_ids``."""
    cases = []
    if base_model is not None:
        base = read_atlas(base_model, num_classes)
        if base is not None:
            cases.extend(base.cases)
    taken = {c.case_id for c in cases}
    for case in sorted(spec.cases, key=lambda c: c.case_id):
        if len(cases) >= max_cases:
            break
        if case.case_id not in train_ids:
            continue
        image = sitk.ReadImage(str(case.image), sitk.sitkFloat32)
        label = sitk.ReadImage(str(case.label))
        mapped = sitk.GetImageFromArray(class_map.apply(sitk.GetArrayFromImage(label)))
        mapped.CopyInformation(label)
        case_id = case.case_id if case.case_id not in taken else f"{case.case_id}_{len(cases)}"
        taken.add(case_id)
        cases.append(make_case(case_id, image, mapped, modality, source or f"{spec.root.name}/{case.case_id}",
                               licence))
    return Atlas(cases[:max_cases])


def dataset_provenance(spec: DatasetSpec) -> Tuple[str, str]:
    """(source, licence) of a dataset from its ``dataset.json`` (MSD's ``reference`` / ``name`` and ``licence``;
    empty where it says nothing)."""
    try:
        meta = json.loads((spec.root / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    return (str(meta.get("reference") or meta.get("name") or ""),
            str(meta.get("licence") or meta.get("license") or ""))


def write_training_atlas(folder: Path, atlas: Atlas) -> Dict[str, object]:
    """Write the atlas into a model folder; returns the card's ``atlas`` record ({} for an empty atlas)."""
    if not atlas.cases:
        return {}
    return write_atlas(folder, atlas)
