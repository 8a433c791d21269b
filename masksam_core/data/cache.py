"""Preprocess once into a cache: model-space arrays (resampled, normalised) and label maps, per case.

Layout: ``<cache_dir>/prep-<key>/<case>/{image.npy (Z,Y,X) float32, label.npy (Z,Y,X) uint8, meta.json}`` and
``manifest.json`` written last. ``key`` hashes the files (size, mtime), target spacing, normalisation, class map
and format, so any change rebuilds; a case is written into a temporary folder and renamed when complete, so a kill
leaves no half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

import numpy as np
import SimpleITK as sitk

from ..fileutil import atomic_folder
from .dataset import ClassMap, DatasetSpec
from .geometry import to_model_space
from .intensity import normalize_intensity

FORMAT = 2  # 2: the model grid's edge voxels extrapolate the nearest input voxel (geometry.to_model_space)


@dataclass
class PreparedCase:
    case_id: str
    image: np.ndarray  # (Z, Y, X) float32 normalised, memory-mapped
    label: np.ndarray  # (Z, Y, X) uint8 class indices
    meta: Dict

    def model_z_for_original(self, original_z: Set[int]) -> Set[int]:
        """Model-space slices whose nearest original slice is in ``original_z`` (mapped through physical space)."""
        m = self.meta
        ref = sitk.Image([int(v) for v in m["original_size"]], sitk.sitkUInt8)
        ref.SetSpacing(m["original_spacing"])
        ref.SetOrigin(m["original_origin"])
        ref.SetDirection(m["original_direction"])
        work = sitk.Image([int(v) for v in m["model_size"]], sitk.sitkUInt8)
        work.SetSpacing(m["model_spacing"])
        work.SetOrigin(m["model_origin"])
        work.SetDirection(m["model_direction"])
        out = set()
        cx, cy = (m["model_size"][0] - 1) / 2.0, (m["model_size"][1] - 1) / 2.0
        for z in range(int(m["model_size"][2])):
            p = work.TransformContinuousIndexToPhysicalPoint((cx, cy, float(z)))
            idx = ref.TransformPhysicalPointToContinuousIndex(p)
            if int(round(idx[2])) in original_z:
                out.add(z)
        return out


def _case_key(case) -> List:
    out = []
    for p in (case.image, case.label):
        st = os.stat(p)
        out.append([str(p), st.st_size, int(st.st_mtime)])
    return out


def cache_key(spec: DatasetSpec, class_map: ClassMap, spacing: Sequence[float], norm: Dict) -> str:
    blob = json.dumps({"format": FORMAT, "cases": [_case_key(c) for c in spec.cases], "spacing": list(spacing),
                       "norm": norm, "classes": class_map.names, "lut": class_map.lut.tolist()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_cache(spec: DatasetSpec, class_map: ClassMap, spacing: Sequence[float], norm: Dict, cache_dir: Path,
                progress: Optional[Callable[[str, int, int], None]] = None) -> List[PreparedCase]:
    """Preprocessed cases, built or reused."""
    key = cache_key(spec, class_map, spacing, norm)
    folder = Path(cache_dir) / f"prep-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    ids = [c.case_id for c in spec.cases]
    if not (manifest.exists() and json.loads(manifest.read_text()).get("cases") == ids):
        manifest.unlink(missing_ok=True)
        for k, case in enumerate(spec.cases):
            final = folder / case.case_id
            if not (final / "meta.json").exists():
                _prepare_case(case, class_map, spacing, norm, folder, final)
            if progress:
                progress("preprocess", k + 1, len(spec.cases))
        for stale in folder.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        manifest.write_text(json.dumps({"key": key, "cases": ids}))
    out = []
    for cid in ids:
        entry = folder / cid
        out.append(PreparedCase(cid, np.load(entry / "image.npy", mmap_mode="r"),
                                np.load(entry / "label.npy", mmap_mode="r"),
                                json.loads((entry / "meta.json").read_text())))
    return out


def _prepare_case(case, class_map: ClassMap, spacing, norm, folder: Path, final: Path) -> None:
    image = sitk.ReadImage(str(case.image), sitk.sitkFloat32)
    label = sitk.ReadImage(str(case.label))
    label.CopyInformation(image)  # checked equal (within tolerance) by check_dataset
    work = to_model_space(image, spacing, sitk.sitkLinear)
    mapped = sitk.GetImageFromArray(class_map.apply(sitk.GetArrayFromImage(label)))
    mapped.CopyInformation(label)
    work_lab = to_model_space(mapped, spacing, sitk.sitkNearestNeighbor)
    arr = normalize_intensity(sitk.GetArrayFromImage(work), norm)
    lab = sitk.GetArrayFromImage(work_lab).astype(np.uint8)
    with atomic_folder(final) as tmp:
        np.save(tmp / "image.npy", arr.astype(np.float32))
        np.save(tmp / "label.npy", lab)
        meta = {"case": case.case_id, "original_size": list(image.GetSize()), "original_spacing": list(image.GetSpacing()),
                "original_origin": list(image.GetOrigin()), "original_direction": list(image.GetDirection()),
                "model_size": list(work.GetSize()), "model_spacing": list(work.GetSpacing()),
                "model_origin": list(work.GetOrigin()), "model_direction": list(work.GetDirection()),
                "classes_present": sorted(int(v) for v in np.unique(lab) if v)}
        (tmp / "meta.json").write_text(json.dumps(meta))
