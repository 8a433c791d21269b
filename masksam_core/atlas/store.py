"""The atlas inside a model folder: the labelled cases a model was trained on, kept compact for registration.

Layout (``atlas/`` in a model folder)::

    atlas/atlas.json           {"format_version": 1, "spacing": [3, 3, 3], "cases": [{"id", "image", "labels",
                                "modality", "source", "licence"}, ...]}
    atlas/<id>_image.nii.gz    int16 (CT: HU) on LPS axes at ``spacing``, cropped to the body
    atlas/<id>_labels.nii.gz   uint8, the model card's class values (1..C_fg), same grid

A case is about 2 MB for an abdomen-to-pelvis CT (s1: 1.7 MB). Labels are stored in the card's class values, so an atlas belongs to its model's class
set; :func:`read_atlas` checks that. Several cases make a multi-atlas (each registered, then fused).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import ModelError

ATLAS_DIR = "atlas"
ATLAS_FILE = "atlas.json"
FORMAT_VERSION = 1
ATLAS_SPACING = (3.0, 3.0, 3.0)
MARGIN_MM = 6.0


@dataclass
class AtlasCase:
    """One labelled case of an atlas: its CT (or MR) image and labels on one grid, and where it came from."""

    case_id: str
    image: sitk.Image
    labels: sitk.Image
    modality: str = "CT"
    source: str = ""
    licence: str = ""

    def record(self) -> Dict[str, str]:
        return {"id": self.case_id, "image": f"{self.case_id}_image.nii.gz",
                "labels": f"{self.case_id}_labels.nii.gz", "modality": self.modality, "source": self.source,
                "licence": self.licence}


@dataclass
class Atlas:
    """The cases of a model's atlas (see the module docstring)."""

    cases: List[AtlasCase] = field(default_factory=list)
    spacing: Sequence[float] = ATLAS_SPACING

    def card_record(self) -> Dict[str, object]:
        """What the model card records about the atlas (method, spacing, each case's source and licence)."""
        return {"folder": ATLAS_DIR, "method": "registered atlas (SimpleITK affine, Mattes mutual information; demons, for MR on a pseudo-CT)",
                "spacing": [float(s) for s in self.spacing],
                "cases": [{k: v for k, v in c.record().items() if k not in ("image", "labels")} for c in self.cases]}


def _safe_id(case_id: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", str(case_id)).strip("._") or "case"
    return cleaned[:64]


def make_case(case_id: str, image: sitk.Image, labels: sitk.Image, modality: str = "CT", source: str = "",
              licence: str = "", spacing: Sequence[float] = ATLAS_SPACING) -> AtlasCase:
    """An atlas case from an image and its labels (card class values) on the same grid: both brought to LPS axes
    at ``spacing`` (linear / nearest), cropped to the labelled body plus a margin, the image as int16."""
    from ..data.geometry import body_bbox, to_model_space

    if image.GetSize() != labels.GetSize():
        raise ModelError(f"atlas case {case_id}: image {image.GetSize()} and labels {labels.GetSize()} differ")
    img = to_model_space(image, spacing, sitk.sitkLinear, pixel_type=sitk.sitkFloat32)
    lab = to_model_space(labels, spacing, sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt8)
    arr = sitk.GetArrayFromImage(img)
    box = body_bbox(arr, -500.0) if modality == "CT" else None
    if box is None:
        box = tuple(slice(0, n) for n in arr.shape)
    margin = [int(round(MARGIN_MM / s)) for s in spacing][::-1]  # (z, y, x)
    box = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(box, margin, arr.shape))
    start = [box[2].start, box[1].start, box[0].start]
    size = [box[2].stop - box[2].start, box[1].stop - box[1].start, box[0].stop - box[0].start]
    img = sitk.RegionOfInterest(img, size, start)
    lab = sitk.RegionOfInterest(lab, size, start)
    low = -1024 if modality == "CT" else 0
    img = sitk.Cast(sitk.Clamp(sitk.Round(img), sitk.sitkFloat32, low, 32767), sitk.sitkInt16)
    return AtlasCase(_safe_id(case_id), img, sitk.Cast(lab, sitk.sitkUInt8), modality, source, licence)


def write_atlas(model_dir: os.PathLike, atlas: Atlas) -> Dict[str, object]:
    """Write ``atlas`` into ``model_dir/atlas`` (:func:`write_atlas_files`); returns the card record."""
    return write_atlas_files(Path(model_dir) / ATLAS_DIR, atlas)


def write_atlas_files(folder: os.PathLike, atlas: Atlas) -> Dict[str, object]:
    """Write ``atlas``'s files into ``folder`` (created if needed; a temporary folder that is renamed into place,
    or a model folder being assembled); returns the card record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [c.case_id for c in atlas.cases]
    if len(set(ids)) != len(ids):
        raise ModelError(f"atlas case ids must be unique, got {ids}")
    for case in atlas.cases:
        rec = case.record()
        sitk.WriteImage(case.image, str(folder / rec["image"]), True)
        sitk.WriteImage(case.labels, str(folder / rec["labels"]), True)
    meta = {"format_version": FORMAT_VERSION, "spacing": [float(s) for s in atlas.spacing],
            "cases": [c.record() for c in atlas.cases]}
    (folder / ATLAS_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return atlas.card_record()


def read_atlas(model_dir: os.PathLike, num_classes: Optional[int] = None) -> Optional[Atlas]:
    """The atlas of a model folder, or None when it has none. ``num_classes`` (foreground classes of the card):
    labels beyond it are a :class:`ModelError` (an atlas made for another class set)."""
    folder = Path(model_dir) / ATLAS_DIR
    path = folder / ATLAS_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        version = meta.get("format_version")
        records = meta["cases"]
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ModelError(f"atlas {path} is corrupt: {exc}") from None
    if version != FORMAT_VERSION:
        raise ModelError(f"atlas {path} has format version {version!r}; this MaskSAM reads {FORMAT_VERSION}")
    cases = []
    for rec in records:
        try:
            image = sitk.ReadImage(str(folder / rec["image"]))
            labels = sitk.ReadImage(str(folder / rec["labels"]), sitk.sitkUInt8)
        except (KeyError, RuntimeError) as exc:
            raise ModelError(f"atlas case {rec.get('id')!r} in {folder} cannot be read: "
                             f"{str(exc).strip().splitlines()[-1][:200]}") from None
        if image.GetSize() != labels.GetSize():
            raise ModelError(f"atlas case {rec.get('id')!r}: image and labels have different sizes")
        if num_classes is not None:
            top = int(np.max(sitk.GetArrayViewFromImage(labels)))
            if top > num_classes:
                raise ModelError(f"atlas case {rec.get('id')!r} has label {top}, but the model has {num_classes} "
                                 f"organs: the atlas was made for another class set")
        cases.append(AtlasCase(rec["id"], image, labels, rec.get("modality", "CT"), rec.get("source", ""),
                               rec.get("licence", "")))
    if not cases:
        return None
    return Atlas(cases, meta.get("spacing", ATLAS_SPACING))
