"""Small synthetic labelled datasets (bright spheres and cubes as organs) in the nnU-Net v2 and MSD layouts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "liver": 1, "spleen": 2, "aorta": 3}


def make_case(seed: int, size=(48, 40, 12), spacing=(3.0, 3.0, 6.0)):
    """(image, label) SimpleITK images: a body ellipse (0 HU), a liver sphere (+150), a spleen cube (+300),
    an aorta cylinder (+500), on -1000 HU air; positions jitter with the seed."""
    rng = np.random.default_rng(seed)
    x, y, z = size
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    img = np.full((z, y, x), -1000.0, np.float32)
    lab = np.zeros((z, y, x), np.uint8)
    body = ((xx - x / 2) / (x * 0.45)) ** 2 + ((yy - y / 2) / (y * 0.42)) ** 2 <= 1
    img[body] = 0.0
    cx, cy = x * 0.35 + rng.integers(-2, 3), y * 0.5 + rng.integers(-2, 3)
    liver = ((xx - cx) ** 2 + (yy - cy) ** 2) * 1.0 + ((zz - z / 2) * 2.0) ** 2 <= (x * 0.16) ** 2
    img[liver], lab[liver] = 150.0, 1
    sx, sy = int(x * 0.68) + rng.integers(-2, 3), int(y * 0.45) + rng.integers(-2, 3)
    spleen = (abs(xx - sx) <= 4) & (abs(yy - sy) <= 4) & (abs(zz - z / 2) <= z / 3)
    img[spleen], lab[spleen] = 300.0, 2
    aorta = ((xx - x * 0.5) ** 2 + (yy - y * 0.72) ** 2 <= 4) & body
    img[aorta], lab[aorta] = 500.0, 3
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    image = sitk.GetImageFromArray(img)
    image.SetSpacing(spacing)
    image.SetOrigin((-70.0 + seed, -60.0, 100.0))
    label = sitk.GetImageFromArray(lab)
    label.CopyInformation(image)
    return image, label


def make_nnunet_dataset(root: Path, n_cases: int = 3, size=(48, 40, 12), spacing=(3.0, 3.0, 6.0),
                        seeds: Sequence[int] = None) -> Path:
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for k, seed in enumerate(seeds or range(n_cases)):
        image, label = make_case(seed, size, spacing)
        sitk.WriteImage(image, str(root / "imagesTr" / f"case{k:02d}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"case{k:02d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return root


def make_msd_dataset(root: Path, n_cases: int = 2) -> Path:
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for k in range(n_cases):
        image, label = make_case(k)
        sitk.WriteImage(image, str(root / "imagesTr" / f"case{k}.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"case{k}.nii.gz"))
        training.append({"image": f"./imagesTr/case{k}.nii.gz", "label": f"./labelsTr/case{k}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {str(v): n for n, v in LABELS.items()}, "training": training}))
    return root
