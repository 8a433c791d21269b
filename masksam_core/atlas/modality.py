"""Which modality a scan is, and whether a model was trained on it.

A model card lists the modalities it was trained on (``ModelCard.modalities``). A scan's modality comes from its
DICOM Modality tag (0008,0060) when it was read from a DICOM series, else from its intensities: a CT in Hounsfield
units holds air and gas far below -300 HU (outside the body, in the lungs and the bowel) or, cropped inside the
body, fat around -100 HU; an MR's values are non-negative up to noise.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

MODALITY_TAG = "0008|0060"
CT_AIR_HU = -300.0
CT_MIN_AIR_SHARE = 0.002  # at least this share of voxels below CT_AIR_HU for a CT
CT_FAT_HU = -60.0  # or a first percentile below this (fat, -150 to -50 HU): a CT cropped inside the body


def guess_modality(image: sitk.Image) -> Tuple[str, str]:
    """("CT" | "MR" | other DICOM modality, how it was told: "DICOM tag" or "intensities")."""
    if image.HasMetaDataKey(MODALITY_TAG):
        tag = image.GetMetaData(MODALITY_TAG).strip().upper()
        if tag:
            return ("MR" if tag == "MR" else tag), "DICOM tag"
    arr = sitk.GetArrayViewFromImage(image)
    step = max(1, int(round((arr.size / 2_000_000) ** (1 / 3))))  # a sample of about 2 million voxels is plenty
    sample = np.asarray(arr[::step, ::step, ::step])
    share = float((sample < CT_AIR_HU).mean())
    is_ct = share >= CT_MIN_AIR_SHARE or float(np.percentile(sample, 1)) < CT_FAT_HU
    return ("CT" if is_ct else "MR"), "intensities"


def modality_warning(image: sitk.Image, trained_on: List[str]) -> Tuple[str, Optional[str]]:
    """The scan's modality and a one-line warning when the model was not trained on it (None when it was)."""
    modality, how = guess_modality(image)
    if modality in trained_on:
        return modality, None
    basis = "its DICOM Modality tag" if how == "DICOM tag" else "its intensities (no air or fat below -60 HU)" \
        if modality == "MR" else "its intensities"
    return modality, (f"this scan looks like {modality} ({basis}) but the model was trained on "
                      f"{', '.join(trained_on) or 'unknown modalities'} only: expect wrong or missing organs")
