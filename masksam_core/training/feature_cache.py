"""Frozen-encoder feature cache for the CPU recipe.

With a repeat stem and no trainable part inside the encoder, the encoder's outputs depend on each slice alone and
never change during training. So every training slice (and a few augmented copies of each case) is encoded once (as
inference encodes it: on OpenVINO where installed, in bf16 on a CPU with native bf16 and fp32 otherwise, unless
``--precision`` says; see ``inference.engine.autocast_dtype``) and stored in fp16 as memory-mapped ``.npy`` arrays;
training then pays only for the prompt generator and the decoder.

Layout: ``<cache_dir>/features-<key>/<entry>/`` with ``image.npy`` (Z, S, S) fp16 normalised slices on the model
canvas, ``label.npy`` (Z, S, S) uint8, ``feat<k>.npy`` (Z, C_k, h_k, w_k) fp16, and ``meta.json``; an entry is
built in a temporary folder and renamed into place when complete, and ``manifest.json`` is written last, so a kill
during building leaves no half-written entry. ``key`` hashes the backbone's sha256, the canvas size, the
preprocessing cache key, the number of copies, the augmentation settings, the seed and the encoding precision:
any change rebuilds.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..fileutil import atomic_folder
from ..model.masksam import MaskSAM

FORMAT = 1
ENCODE_BATCH = 4


@dataclass
class CachedVolume:
    """One (case, copy) of the cache: memory-mapped arrays."""

    name: str
    case: str
    copy: int
    image: np.ndarray  # (Z, S, S) fp16
    label: np.ndarray  # (Z, S, S) uint8
    features: List[np.ndarray]  # [(Z, C_k, h_k, w_k) fp16]

    @property
    def depth(self) -> int:
        return int(self.image.shape[0])


def canvas(image: np.ndarray, label: np.ndarray, size: int, pad_value: float,
           centre_yx: Optional[Tuple[float, float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Crop or pad (Z, Y, X) arrays in-plane to (Z, size, size), centred on ``centre_yx`` (default: the middle)."""
    z, y, x = image.shape
    out_img = np.full((z, size, size), pad_value, np.float32)
    out_lab = np.zeros((z, size, size), np.uint8)
    cy, cx = centre_yx if centre_yx is not None else ((y - 1) / 2.0, (x - 1) / 2.0)
    src = []
    dst = []
    for n, c in ((y, cy), (x, cx)):
        if n <= size:
            src.append(slice(0, n))
            off = (size - n) // 2
            dst.append(slice(off, off + n))
        else:
            start = int(round(c - size / 2.0))
            start = min(max(start, 0), n - size)
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
    out_img[:, dst[0], dst[1]] = image[:, src[0], src[1]]
    out_lab[:, dst[0], dst[1]] = label[:, src[0], src[1]]
    return out_img, out_lab


def cache_key(parts: Dict) -> str:
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@torch.no_grad()
def encode_volume(model: MaskSAM, image: np.ndarray, amp: Optional[torch.dtype],
                  device: torch.device, encoder: Optional[Callable] = None) -> List[np.ndarray]:
    """Encoder features of every slice of ``image`` (Z, S, S) -> [(Z, C_k, h_k, w_k) fp16].

    ``encoder``: what runs the encoder on (B, 3, S, S) (default ``model.encoder``; an OpenVINO runner, see
    ``inference/openvino_runtime.py``)."""
    outs: List[List[np.ndarray]] = []
    for z0 in range(0, image.shape[0], ENCODE_BATCH):
        chunk = torch.from_numpy(np.ascontiguousarray(image[z0:z0 + ENCODE_BATCH], dtype=np.float32)).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            stem_out = model.apply_stem(chunk[None, None], check_depth=False)  # per-slice repeat stem
            feats = model.encode(stem_out, encoder)
        outs.append([f.float().cpu().numpy().astype(np.float16) for f in feats])
    return [np.concatenate([o[k] for o in outs], axis=0) for k in range(len(outs[0]))]


class FeatureCache:
    """Builds or reuses the cached features of a list of volumes."""

    def __init__(self, root: Path, key: str) -> None:
        self.folder = Path(root) / f"features-{key}"
        self.key = key

    def manifest(self) -> Optional[Dict]:
        path = self.folder / "manifest.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_complete(self, names: Sequence[str]) -> bool:
        man = self.manifest()
        return bool(man) and man.get("key") == self.key and sorted(man.get("entries", [])) == sorted(names)

    def build(self, model: MaskSAM, volumes: Sequence[Tuple[str, str, int, np.ndarray, np.ndarray]],
              amp: Optional[torch.dtype], device: torch.device,
              progress: Optional[Callable[[str, int, int], None]] = None,
              make_encoder: Optional[Callable[[], Callable]] = None) -> List[CachedVolume]:
        """Encode missing entries. ``volumes``: (entry name, case, copy, image (Z,S,S), label (Z,S,S)).
        ``make_encoder``: called once, only if something must be encoded, for the encoder runner (default
        ``model.encoder``)."""
        if not model.encoder_is_per_slice:
            raise ValueError("the feature cache needs an encoder that treats slices independently (CPU recipe)")
        names = [v[0] for v in volumes]
        if self.is_complete(names):
            return self.load(volumes)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "manifest.json").unlink(missing_ok=True)
        total = sum(v[3].shape[0] for v in volumes)
        done = 0
        encoder = None
        for name, case, copy, image, label in volumes:
            final = self.folder / name
            if (final / "meta.json").exists():
                done += image.shape[0]
                continue
            with atomic_folder(final) as tmp:
                np.save(tmp / "image.npy", image.astype(np.float16))
                np.save(tmp / "label.npy", label.astype(np.uint8))
                if encoder is None:
                    encoder = make_encoder() if make_encoder else model.encoder
                feats = encode_volume(model, image, amp, device, encoder)
                for k, f in enumerate(feats):
                    np.save(tmp / f"feat{k}.npy", f)
                (tmp / "meta.json").write_text(json.dumps({"case": case, "copy": copy, "slices": int(image.shape[0]),
                                                           "levels": len(feats)}))
            done += image.shape[0]
            if progress:
                progress("encode", done, total)
        for stale in self.folder.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        (self.folder / "manifest.json").write_text(json.dumps({"key": self.key, "entries": names}))
        return self.load(volumes)

    def load(self, volumes) -> List[CachedVolume]:
        out = []
        for name, case, copy, *_ in volumes:
            entry = self.folder / name
            meta = json.loads((entry / "meta.json").read_text())
            feats = [np.load(entry / f"feat{k}.npy", mmap_mode="r") for k in range(meta["levels"])]
            out.append(CachedVolume(name=name, case=case, copy=copy, image=np.load(entry / "image.npy", mmap_mode="r"),
                                    label=np.load(entry / "label.npy", mmap_mode="r"), features=feats))
        return out


def gather_slab(vol: CachedVolume, z0: int, depth: int, pad_value: float) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray]]:
    """D consecutive slices from ``z0`` (padded past the end): image (D,S,S), label (D,S,S), features [(D,...)].

    Padding slices have the pad value, label 0 and features of a padding slice: the features of the last real
    slice are NOT reused; instead zero features are used and the padded slices' labels are set to 255 (ignored).
    """
    z1 = min(z0 + depth, vol.depth)
    n = z1 - z0
    img = np.asarray(vol.image[z0:z1], dtype=np.float32)
    lab = np.asarray(vol.label[z0:z1])
    feats = [np.asarray(f[z0:z1], dtype=np.float32) for f in vol.features]
    if n < depth:
        pad = depth - n
        img = np.concatenate([img, np.full((pad,) + img.shape[1:], pad_value, np.float32)])
        lab = np.concatenate([lab, np.full((pad,) + lab.shape[1:], 255, np.uint8)])
        feats = [np.concatenate([f, np.zeros((pad,) + f.shape[1:], np.float32)]) for f in feats]
    return img, lab, feats
