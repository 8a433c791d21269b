"""A small synthetic CT DICOM series written with SimpleITK (for DICOM input and DICOM SEG tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

UID_ROOT = "1.2.826.0.1.3680043.2.1125.77"


def write_series(folder: Path, arr: np.ndarray, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 30.0),
                 series_suffix: str = "1") -> sitk.Image:
    """Write (z, y, x) int16 ``arr`` as an axial CT series in ``folder``; returns the image it encodes."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    series = f"{UID_ROOT}.{series_suffix}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        s = img[:, :, k]
        tags = {
            "0010|0010": "Test^Patient", "0010|0020": "P1", "0020|000d": f"{UID_ROOT}.9", "0020|000e": series,
            "0020|0052": f"{UID_ROOT}.8", "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series}.2.{k}", "0020|0013": str(k + 1), "0020|0011": series_suffix,
            "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
            "0008|0020": "20240101", "0008|0030": "120000", "0008|0070": "MaskSAM tests",
        }
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_suffix}_{k:03d}.dcm"))
        writer.Execute(s)
    return img
