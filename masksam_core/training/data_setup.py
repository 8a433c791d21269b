"""From a dataset folder to a batch source: checks, preprocessing cache, train/validation split, feature cache.

Validation split (one of):
- ``val_slices`` "CASE:18-23,42-47[;CASE2:...]": a within-case split in the ORIGINAL file's slice indices,
  mapped to model-space slices through physical position (each model slice takes its nearest original slice);
  ``val_slices`` "auto": in every case, the last block of each four blocks of 6 model-space slices (a quarter of
  the slices, 18 mm blocks at 3 mm; the split of the example CT's README), whatever the file's orientation;
- ``val_cases``: whole cases;
- ``val_fraction``: a seeded random fraction of the cases; 0: no validation (the last model is kept);
- none of them (the default): with two or more cases, ``DEFAULT_VAL_FRACTION`` of the cases (at least one, chosen
  by the seed) are held out whole ("across cases"); a single case holds out slices as ``val_slices`` "auto" does
  ("within case"); a case too thin for that trains without validation, and the log says so and what to do.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch

from ..data.augment import augment_slab
from ..data.cache import PreparedCase, build_cache
from ..data.dataset import check_dataset, discover_dataset, select_classes
from ..data.intensity import normalize_intensity
from ..errors import InputError, MaskSAMError
from ..inference.engine import autocast_dtype, precision_name
from ..inference.openvino_runtime import make_encoder_runner, resolve_runtime
from ..inference.preprocess import CT_MODES
from ..model.masksam import MaskSAM
from .config import TrainConfig
from .feature_cache import FeatureCache, canvas, cache_key
from .loop import IGNORE, Batch
from .sources import CachedSource, PriorTraining, _mask_slices, _val_windows


def parse_slice_ranges(text: str) -> Dict[str, Set[int]]:
    """'s1:18-23,42-47;s2:5' -> {'s1': {18..23, 42..47}, 's2': {5}} (inclusive ranges)."""
    out: Dict[str, Set[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if ":" not in part:
            raise MaskSAMError(f"--val-slices needs CASE:RANGES, got {part!r}")
        case, ranges = part.split(":", 1)
        zs: Set[int] = set()
        for r in filter(None, (x.strip() for x in ranges.split(","))):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", r)
            if not m:
                raise MaskSAMError(f"--val-slices: cannot read the range {r!r}")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            zs.update(range(lo, hi + 1))
        out[case.strip()] = zs
    return out


DEFAULT_VAL_FRACTION = 0.2  # no validation option given, two or more cases: this share of them (at least one)
AUTO_VAL_BLOCK = 6  # --val-slices auto: model-space slices per held-out block
AUTO_VAL_PERIOD = 4  # one block in four is held out


def auto_validation_slices(num_slices: int) -> Set[int]:
    """``--val-slices auto`` for a case of ``num_slices`` model-space slices: z with (z // 6) % 4 == 3, i.e.
    18-23, 42-47, 66-71, ... (none for cases of up to 18 slices)."""
    return {z for z in range(num_slices) if (z // AUTO_VAL_BLOCK) % AUTO_VAL_PERIOD == AUTO_VAL_PERIOD - 1}


def pad_value_for(norm: Dict) -> float:
    """The normalised value of air/background (what padding holds)."""
    if norm.get("mode") in CT_MODES:
        return float(normalize_intensity(np.array([-1024.0], np.float32), norm)[0])
    return 0.0


def body_centre(image: np.ndarray, pad: float) -> tuple:
    """(y, x) centre of the voxels brighter than the background, for placing the canvas."""
    fg = np.asarray(image) > pad + 0.05
    if not fg.any():
        return ((image.shape[1] - 1) / 2.0, (image.shape[2] - 1) / 2.0)
    ys, xs = np.nonzero(fg.any(axis=0))
    return ((ys.min() + ys.max()) / 2.0, (xs.min() + xs.max()) / 2.0)


@dataclass
class TrainingData:
    cfg: TrainConfig
    class_names: List[str]
    cases: List[PreparedCase]
    train_z: Dict[str, Optional[Set[int]]]
    val_z: Dict[str, Set[int]]
    norm: Dict
    cache_dir: Path
    prep_key: str
    # the validation options that say what the split was when none was given (train_config.json records them)
    validation_options: Dict[str, object] = field(default_factory=dict)

    def validation_record(self) -> Dict[str, object]:
        """What the validation measures, for the model card: ``kind`` "across cases" (whole cases held out, never
        trained on), "within case" (held-out slices of cases whose other slices are trained on: the same patients,
        so it does not measure generalisation to others) or "none"; the held-out ``cases`` and ``slices``."""
        whole = sorted(c for c, zs in self.val_z.items() if zs and not self.train_z.get(c))
        partial = sorted(c for c, zs in self.val_z.items() if zs and self.train_z.get(c))
        slices = int(sum(len(zs) for zs in self.val_z.values()))
        if not slices:
            return {"kind": "none", "cases": [], "slices": 0}
        kind = "within case" if partial else "across cases"
        return {"kind": kind, "cases": whole + partial, "slices": slices}

    def make_source(self, model: MaskSAM, cached: bool, device: torch.device, batch_size: int, seed: int,
                    progress: bool = True, prior: Optional[PriorTraining] = None):
        """The loop's batch source: cached features (CPU recipe; ``prior``: perturbed atlas priors for a share of
        the decoder steps) or full volumes."""
        pad = pad_value_for(self.norm)
        s = model.input_size
        if not cached:
            return VolumeSource(self, s, model.slab_depth, pad, batch_size, device)
        copies = max(1, int(self.cfg.feature_copies))
        runtime = resolve_runtime(model, "auto", device)  # OpenVINO encodes the cache where it is installed
        # encoding precision: inference's (bf16 on CUDA, and on OpenVINO on a CPU with native bf16: features as
        # inference computes them there, in half the time), or --precision's
        amp = autocast_dtype(device, self.cfg.precision, openvino=runtime == "openvino")
        key = cache_key({"backbone": model.backbone_sha256, "size": s, "prep": self.prep_key, "copies": copies,
                         "aug": self.cfg.augmentation, "seed": seed, "amp": str(amp),
                         "encoder_runtime": runtime})
        gen = torch.Generator().manual_seed(seed)
        volumes = []
        for case in self.cases:
            if not (self.train_z.get(case.case_id, None) is None or self.train_z[case.case_id]
                    or self.val_z.get(case.case_id)):
                continue
            img, lab = canvas(np.asarray(case.image), np.asarray(case.label), s, pad,
                              body_centre(np.asarray(case.image), pad))
            for copy in range(copies):
                if copy == 0:
                    volumes.append((f"{case.case_id}__c0", case.case_id, 0, img, lab))
                    continue
                if not (self.train_z.get(case.case_id) is None or self.train_z[case.case_id]):
                    continue  # validation-only case: no augmented copies
                aug_cfg = {"p_rotate": 0.8, "p_scale": 0.8, **self.cfg.augmentation}
                ai, al = augment_slab(torch.from_numpy(img)[None], torch.from_numpy(lab.astype(np.int64)), aug_cfg,
                                      gen, fill=pad)
                volumes.append((f"{case.case_id}__c{copy}", case.case_id, copy, ai[0].numpy(),
                                al.numpy().astype(np.uint8)))
        cache = FeatureCache(self.cache_dir, key)
        reporter = _stderr_progress if progress else None
        if progress and not cache.is_complete([v[0] for v in volumes]):
            print(f"encoding {sum(v[3].shape[0] for v in volumes)} slices once ({precision_name(amp)}, "
                  f"{runtime}) into the feature cache {cache.folder}", file=sys.stderr, flush=True)
        cached_volumes = cache.build(model, volumes, amp, device, reporter, make_encoder=lambda: make_encoder_runner(
            model, runtime, torch.get_num_threads(), amp is not None, device)[0])
        source = CachedSource(cached_volumes, model.slab_depth, pad, batch_size, self.train_z, self.val_z,
                              prior=prior)
        source.has_validation = bool(source.val_volumes)
        source.feature_precision = precision_name(amp)
        return source


def _stderr_progress(stage: str, done: int, total: int) -> None:
    print(f"\r{stage}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def split_validation(cfg: TrainConfig, cases: List[PreparedCase], progress: bool = True
                     ) -> Tuple[Dict[str, Optional[Set[int]]], Dict[str, Set[int]], Dict[str, object]]:
    """(slices trained on per case, None: all; held-out slices per case; the validation options of a default split)
    as the module docstring says; prints the default's choice (or why there is none) when ``progress``."""
    ids = [c.case_id for c in cases]
    train_z: Dict[str, Optional[Set[int]]] = {cid: None for cid in ids}
    val_z: Dict[str, Set[int]] = {}
    chosen: Dict[str, object] = {}
    note = None
    slice_text = cfg.val_slices.strip().lower() if cfg.val_slices else ""
    if not (slice_text or cfg.val_cases or cfg.val_fraction is not None):  # the default: see the module docstring
        if len(ids) > 1:
            n = max(1, int(round(DEFAULT_VAL_FRACTION * len(ids))))
            chosen = {"val_cases": sorted(np.random.default_rng(cfg.seed).permutation(ids)[:n].tolist())}
            note = (f"validation: across cases, {', '.join(chosen['val_cases'])} held out whole ({n} of {len(ids)} "
                    f"cases, chosen by --seed; --val-cases, --val-slices or --val-fraction 0 to choose otherwise)")
        else:
            slice_text, chosen = "auto", {"val_slices": "auto"}
    if slice_text == "auto":
        for case in cases:
            mz = auto_validation_slices(case.image.shape[0])
            if mz:
                val_z[case.case_id] = mz
                train_z[case.case_id] = set(range(case.image.shape[0])) - mz
        held = sum(len(v) for v in val_z.values())
        total = sum(c.image.shape[0] for c in cases)
        least = (AUTO_VAL_PERIOD - 1) * AUTO_VAL_BLOCK + 1
        if chosen and held:
            note = (f"validation: within case, {held} of {total} slices of {ids[0]} held out (--val-slices auto, "
                    f"the default for one case: it measures the same subject, not others; give a second case to "
                    f"validate across cases, or --val-fraction 0 for none)")
        elif chosen:
            chosen = {"val_fraction": 0.0}
            note = (f"validation: none, training without validation: {ids[0]} has {total} slices at the model's "
                    f"spacing and holding slices out needs {least} or more; give a second case, or --val-slices "
                    f"CASE:RANGES")
        else:
            note = (f"--val-slices auto: {held} of {total} slices held out for validation" if held else
                    f"--val-slices auto: no case has more than {least - 1} slices at the model's spacing; "
                    f"training without validation")
    elif cfg.val_slices:
        ranges = parse_slice_ranges(cfg.val_slices)
        for cid, zs in ranges.items():
            case = next((c for c in cases if c.case_id == cid), None)
            if case is None:
                raise InputError(f"--val-slices names case {cid!r}, which is not in the dataset ({', '.join(ids)})")
            mz = case.model_z_for_original(zs)
            val_z[cid] = mz
            train_z[cid] = set(range(case.image.shape[0])) - mz
    held_cases = chosen.get("val_cases") or (cfg.val_cases if not cfg.val_slices else None)
    if held_cases:
        unknown = [c for c in held_cases if c not in ids]
        if unknown:
            raise InputError(f"--val-cases names unknown case(s) {', '.join(unknown)}")
        for cid in held_cases:
            val_z[cid] = set(range(next(c for c in cases if c.case_id == cid).image.shape[0]))
            train_z[cid] = set()
    elif cfg.val_fraction and not cfg.val_slices:
        rng = np.random.default_rng(cfg.seed)
        n = max(1, int(round(cfg.val_fraction * len(ids)))) if len(ids) > 1 else 0
        for cid in rng.permutation(ids)[:n].tolist():
            val_z[cid] = set(range(next(c for c in cases if c.case_id == cid).image.shape[0]))
            train_z[cid] = set()
    elif cfg.val_fraction == 0 and not chosen:
        note = "validation: none (--val-fraction 0): the last model is kept"
    if progress and note:
        print(note, file=sys.stderr, flush=True)
    return train_z, val_z, chosen


def prepare_data(cfg: TrainConfig, classes: Optional[List[str]], spacing, norm: Dict, progress: bool = True) -> TrainingData:
    spec = discover_dataset(cfg.data)
    class_map = select_classes(spec, classes, cfg.class_map)
    check_dataset(spec, class_map)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.data) / ".masksam_cache"
    cases = build_cache(spec, class_map, spacing, norm, cache_dir, _stderr_progress if progress else None)
    train_z, val_z, chosen = split_validation(cfg, cases, progress)
    if not any(v is None or v for v in train_z.values()):
        raise InputError("no training slices left after the validation split")
    from ..data.cache import cache_key as prep_key

    return TrainingData(cfg, class_map.names, cases, train_z, val_z, norm, cache_dir,
                        prep_key(spec, class_map, spacing, norm), chosen)


class VolumeSource:
    """Slabs sampled from preprocessed volumes and augmented on the device (GPU recipe: the whole network runs)."""

    def __init__(self, data: TrainingData, size: int, depth: int, pad: float, batch_size: int,
                 device: torch.device) -> None:
        self.data, self.size, self.depth, self.pad = data, size, depth, pad
        self.batch_size, self.device = batch_size, device
        self.train_cases = [c for c in data.cases if data.train_z.get(c.case_id) is None or data.train_z[c.case_id]]
        self.val_cases = [c for c in data.cases if data.val_z.get(c.case_id)]
        self.has_validation = bool(self.val_cases)

    def _slab(self, case: PreparedCase, z0: int, centre) -> tuple:
        z1 = min(z0 + self.depth, case.image.shape[0])
        img, lab = canvas(np.asarray(case.image[z0:z1]), np.asarray(case.label[z0:z1]), self.size, self.pad, centre)
        lab = lab.astype(np.int64)
        if img.shape[0] < self.depth:
            extra = self.depth - img.shape[0]
            img = np.concatenate([img, np.full((extra,) + img.shape[1:], self.pad, np.float32)])
            lab = np.concatenate([lab, np.full((extra,) + lab.shape[1:], IGNORE, np.int64)])
        return img, lab

    def train_batch(self, rng: np.random.Generator, gen: torch.Generator) -> Batch:
        imgs, labs = [], []
        for _ in range(self.batch_size):
            case = self.train_cases[int(rng.integers(len(self.train_cases)))]
            nz, ny, nx = case.image.shape
            allowed = self.data.train_z.get(case.case_id)
            if rng.random() < 1 / 3 and case.meta.get("classes_present"):
                k = int(rng.choice(case.meta["classes_present"]))
                zs, ys, xs = np.nonzero(np.asarray(case.label) == k)
                i = int(rng.integers(len(zs)))
                z, centre = int(zs[i]), (float(ys[i]), float(xs[i]))
            else:
                pool = sorted(allowed) if allowed is not None else range(nz)
                z = int(pool[int(rng.integers(len(pool)))])
                centre = (float(rng.uniform(0, ny - 1)), float(rng.uniform(0, nx - 1)))
            z0 = int(min(max(z - rng.integers(self.depth), 0), max(nz - self.depth, 0)))
            img, lab = self._slab(case, z0, centre)
            lab = _mask_slices(lab, range(z0, z0 + self.depth), allowed)
            ti, tl = augment_slab(torch.from_numpy(img)[None].to(self.device),
                                  torch.from_numpy(lab).to(self.device), self.data.cfg.augmentation, gen, self.pad)
            imgs.append(ti)
            labs.append(tl)
        return Batch(slab=torch.stack(imgs), label=torch.stack(labs))

    def val_batches(self):
        for case in self.val_cases:
            zs = self.data.val_z[case.case_id]
            centre = body_centre(np.asarray(case.image), self.pad)
            for z0 in _val_windows(zs, self.depth, case.image.shape[0]):
                img, lab = self._slab(case, z0, centre)
                lab = _mask_slices(lab, range(z0, z0 + self.depth), zs)
                yield Batch(slab=torch.from_numpy(img)[None, None], label=torch.from_numpy(lab)[None])
