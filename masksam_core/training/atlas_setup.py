"""The atlas a training run writes into its model folder: its training cases (and a fine-tuned model's base atlas).

Each training case (not the validation cases) becomes an atlas case (``atlas.store.make_case``: resampled to 3 mm,
cropped to the body, int16 image and uint8 labels in the model's class values); fine-tuning keeps the base model's
atlas cases first and adds the new ones, so every corrected case also improves localisation. At most
``atlas_cases`` cases are kept (each costs one registration, 2-5 s on 2 cores, at every prediction): the run's own
cases (in case-id order) before the base atlas's, a case of the same id replacing the base's version.
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
    """The atlas of a new model folder: ``base_model``'s atlas cases, then the training cases ``train_ids`` (at
    most ``max_cases`` of them in all; see the module docstring)."""
    base_cases = []
    if base_model is not None:
        base = read_atlas(base_model, num_classes)
        if base is not None:
            base_cases = list(base.cases)
    new_cases = []
    for case in sorted(spec.cases, key=lambda c: c.case_id):
        if len(new_cases) >= max_cases:
            break
        if case.case_id not in train_ids:
            continue
        image = sitk.ReadImage(str(case.image), sitk.sitkFloat32)
        label = sitk.ReadImage(str(case.label))
        mapped = sitk.GetImageFromArray(class_map.apply(sitk.GetArrayFromImage(label)))
        mapped.CopyInformation(label)
        new_cases.append(make_case(case.case_id, image, mapped, modality,
                                   source or f"{spec.root.name}/{case.case_id}", licence))
    # a case fine-tuned on again (same id) replaces its older version; the base atlas's other cases come first
    new_ids = {c.case_id for c in new_cases}
    cases = [c for c in base_cases if c.case_id not in new_ids] + new_cases
    if len(cases) > max_cases:  # keep the newest: the cases this run was given, then the base's latest
        cases = cases[len(cases) - max_cases:]
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
