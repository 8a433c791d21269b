"""An input volume made ready for the slab engine: on the model's grid, cropped to the body and normalised.

This is steps 1-3 of ``engine.segment`` on their own, without torch or the model (only the card's spacing and
normalisation), so that ``predict`` can read and prepare a volume in a second thread while the model loads (on 2
cores, reading and preparing a 512x512x336 CT took 1.3 s, loading the model 2.3 s) or while the previous volume of
a batch is segmented. SimpleITK and numpy release the GIL for this work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

if TYPE_CHECKING:
    from ..model.card import ModelCard

CT_MODES = ("ct_window", "ct_zscore")
BODY_HU = -500.0
# --fast's z spacing, in multiples of the model card's (6 mm for the default model's 3 mm; TotalSegmentator's fast
# mode also halves the resolution). Measured on TotalSegmentator's example CT at 512x512x336 with the default model,
# 2 AMX cores: 1.5x took 25.8-27.7 s, mean Dice 0.573, surface Dice 0.517, HD95 30.2 mm; 2x 20.9-25.1 s, 0.580,
# 0.508, 30.4 mm (docs/benchmarks.md).
FAST_Z_FACTOR = 2.0


@dataclass
class ModelSpaceVolume:
    """An input volume on the model's grid (see :func:`prepare_volume`).

    image: the input, on its own grid (the labelmap goes back onto it).
    grid: the model-space image (LPS axes, ``spacing``); its geometry places the labels, its voxels are not used.
    box: (z, y, x) slices of the body's bounding box in model space (the whole volume when not cropped).
    region: (Zb, Yb, Xb) float32, the normalised intensities inside ``box``.
    pad_value: the normalised value of air (CT) or of the darkest voxel (MR), for padding slabs and tiles.
    spacing: the model-space spacing (x, y, z) in mm.
    seconds: how long the preparation took (registration included).
    modality: the scan's modality (``atlas.modality.guess_modality``).
    prior: the registered atlas (``atlas.prior.AtlasPrior``) on ``grid``, or None.
    warnings: one-line warnings for the user (modality, registration).
    """

    image: sitk.Image
    grid: sitk.Image
    box: Tuple[slice, slice, slice]
    region: np.ndarray
    pad_value: float
    spacing: List[float]
    seconds: float
    modality: str = "CT"
    prior: Optional[Any] = None  # atlas.prior.AtlasPrior on ``grid``, when the model has an atlas and it was asked for
    warnings: List[str] = field(default_factory=list)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(Z, Y, X) of the whole model-space volume."""
        x, y, z = self.grid.GetSize()
        return z, y, x


def model_spacing(card: "ModelCard", fast: bool) -> List[float]:
    """The spacing (x, y, z) in mm the engine segments at: the card's, with z ``FAST_Z_FACTOR`` times coarser when
    ``fast``."""
    spacing = [float(s) for s in card.target_spacing]
    if fast:
        spacing[2] *= FAST_Z_FACTOR
    return spacing


def check_image(image: sitk.Image) -> None:
    """An InputError for what the engine cannot segment: not 3D, or not scalar."""
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3D image, got a {image.GetDimension()}D image")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("expected a scalar image, got a vector (multi-component) image")


def prepare_volume(image: sitk.Image, card: "ModelCard", fast: bool = False,
                   crop_to_body: bool = True, atlas_prior: bool = True) -> ModelSpaceVolume:
    """Resample ``image`` to the model's grid (:func:`model_spacing`), crop it to the body (CT only, when
    ``crop_to_body``: the largest region above -500 HU) and normalise it as the card says; check its modality
    against the card's; with ``atlas_prior`` and a model folder with an atlas, register the atlas onto it."""
    from ..atlas.modality import modality_warning

    from ..data.geometry import body_bbox, to_model_space
    from ..data.intensity import normalize_intensity

    start = time.perf_counter()
    check_image(image)
    spacing = model_spacing(card, fast)
    grid = to_model_space(image, spacing, sitk.sitkLinear, pixel_type=sitk.sitkFloat32)
    raw = sitk.GetArrayViewFromImage(grid)  # (z, y, x)
    modality, warning = modality_warning(image, card.modalities)
    norm_spec = normalization_for(card, modality)
    is_ct = norm_spec.get("mode") in CT_MODES
    box = body_bbox(raw, BODY_HU) if crop_to_body and is_ct else None
    if box is None:
        box = tuple(slice(0, n) for n in raw.shape)
    region = normalize_intensity(raw[box], norm_spec).astype(np.float32)
    if is_ct:
        pad_value = float(normalize_intensity(np.array([-1024.0], np.float32), norm_spec)[0])
    else:
        pad_value = float(region.min())
    warnings = [warning] if warning else []
    prior = None
    if atlas_prior and card.atlas:
        prior, why = _register_atlas(image, grid, card, modality)
        if why:
            warnings.append(why)
    return ModelSpaceVolume(image=image, grid=grid, box=box, region=region, pad_value=pad_value, spacing=spacing,
                            seconds=time.perf_counter() - start, modality=modality, prior=prior, warnings=warnings)


MR_NORMALIZATION = {"mode": "mr_percentile", "percentiles": [0.5, 99.5]}


def normalization_for(card: "ModelCard", modality: str) -> Dict[str, Any]:
    """The card's intensity normalisation, except for an MR given to a model that knows only CT: a CT window on MR
    values (arbitrary units, no air or fat below -60 HU) clips nearly the whole body to one grey, so such a scan is scaled
    by its 0.5-99.5 percentiles onto [0, 1], the MR convention LiteMedSAM was pretrained with. The modality warning
    still says the model was not trained on MR."""
    spec = card.normalization
    if modality == "MR" and "MR" not in card.modalities and spec.get("mode") in CT_MODES:
        return dict(MR_NORMALIZATION)
    return spec


_ATLASES: Dict[str, Any] = {}


def _register_atlas(image: sitk.Image, grid: sitk.Image, card: "ModelCard", modality: str):
    """(the atlas prior or None, a warning or ""): the model's atlas registered onto ``image``, on ``grid``."""
    from ..atlas.prior import build_prior
    from ..atlas.store import read_atlas
    from ..errors import ModelError

    if card.folder is None:
        return None, ""
    if card.training.get("matching") != "class_bound":
        return None, ""  # prompts from the prior need query c to answer for class c
    key = str(card.folder.resolve())
    if key not in _ATLASES:
        atlas = read_atlas(card.folder, len(card.classes))
        if atlas is None:
            raise ModelError(f"the model card names an atlas but {card.folder} has no atlas/atlas.json")
        _ATLASES[key] = atlas
    prior = build_prior(image, grid, _ATLASES[key], len(card.classes), "CT" if modality == "CT" else "MR")
    failed = [r for r in prior.registrations if not r.plausible]
    if len(failed) == len(prior.registrations):
        return prior, (f"the atlas could not be registered onto this scan ({failed[0].reason}): organs are "
                       f"located by the model alone, which generalises poorly to patients it was not trained on")
    return prior, ""
