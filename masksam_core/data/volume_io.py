"""Reading volumes with validation, and atomic writers for labelmaps, ``.seg.nrrd`` and DICOM SEG.

Every problem a user can cause is an :class:`InputError` or :class:`OutputError` with a one-line message.
Writers never leave a partial file: they write a temporary file in the target folder and rename it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError
from ..labels import terminology_tag

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


# ---------------------------------------------------------------------------------------------------- reading

def list_dicom_series(folder: os.PathLike) -> List[Tuple[str, int]]:
    """(SeriesInstanceUID, number of files) of every DICOM series in ``folder`` (recursively), largest first."""
    reader = sitk.ImageSeriesReader()
    found = []
    for root, _dirs, _files in os.walk(str(folder)):
        try:
            uids = reader.GetGDCMSeriesIDs(root)
        except RuntimeError:
            uids = ()
        for uid in uids:
            found.append((uid, len(reader.GetGDCMSeriesFileNames(root, uid)), root))
    found.sort(key=lambda t: -t[1])
    return [(uid, n) for uid, n, _ in found]


def _series_files(folder: Path, series_uid: Optional[str]) -> List[str]:
    reader = sitk.ImageSeriesReader()
    best: List[str] = []
    for root, _dirs, _files in os.walk(str(folder)):
        try:
            uids = reader.GetGDCMSeriesIDs(root)
        except RuntimeError:
            continue
        for uid in uids:
            if series_uid is not None and uid != series_uid:
                continue
            files = list(reader.GetGDCMSeriesFileNames(root, uid))
            if len(files) > len(best):
                best = files
    if not best:
        if series_uid is not None:
            raise InputError(f"no DICOM series with SeriesInstanceUID {series_uid} in {folder}")
        raise InputError(f"no DICOM image series found in {folder}")
    return best


def read_volume(path: os.PathLike, series_uid: Optional[str] = None) -> sitk.Image:
    """Read a 3D scalar volume (NIfTI, NRRD, MHA/MHD, or a DICOM series folder) as float32.

    Raises :class:`InputError` for a missing path, an unreadable file, a 2D, 4D or vector image, an empty
    volume, NaN or infinite voxels, or a DICOM folder without an image series.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    try:
        if p.is_dir():
            files = _series_files(p, series_uid)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(p))
    except InputError:
        raise
    except RuntimeError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "unknown reason")
        raise InputError(f"cannot read {p.name} as an image ({first.strip()[:160]})") from None
    return validate_volume(image, p.name)


def validate_volume(image: sitk.Image, name: str = "image") -> sitk.Image:
    """Check that ``image`` is a usable 3D scalar volume; returns it as float32."""
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim == 2 or (dim == 3 and image.GetSize()[2] == 1):
        raise InputError(f"{name} is a 2D image; a 3D volume is needed")
    if dim != 3:
        raise InputError(f"{name} is a {dim}D image; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} is a vector image with {image.GetNumberOfComponentsPerPixel()} components "
                         f"per voxel; a scalar volume is needed")
    if min(image.GetSize()) == 0:
        raise InputError(f"{name} is empty (size {image.GetSize()})")
    image = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite voxels")
    return image


# ---------------------------------------------------------------------------------------------------- writing

def _compound_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".seg.nrrd", ".nii.gz") + VOLUME_SUFFIXES + (".dcm", ".json", ".csv", ".png"):
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix


@contextlib.contextmanager
def atomic_output(path: os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it onto ``path`` on success.

    Raises :class:`OutputError` when ``path`` exists and ``overwrite`` is false, or its folder cannot be
    created or written. The temporary file is removed on any error (or Ctrl-C).
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputError(f"{target} exists; use --overwrite to replace it")
    if target.is_dir():
        raise OutputError(f"{target} is a folder, not a file")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + _compound_suffix(target),
                                   dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_labelmap(labelmap: sitk.Image, path: os.PathLike, overwrite: bool = False) -> Path:
    """Write a labelmap (uint8, or uint16 above 255) as NIfTI, NRRD or MHA (by extension), atomically."""
    arr_max = int(sitk.GetArrayViewFromImage(labelmap).max()) if labelmap.GetNumberOfPixels() else 0
    image = sitk.Cast(labelmap, sitk.sitkUInt8 if arr_max <= 255 else sitk.sitkUInt16)
    with atomic_output(path, overwrite) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return Path(path)


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to LPS millimetres."""
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def write_seg_nrrd(labelmap: sitk.Image, path: os.PathLike, classes: Sequence[Dict], overwrite: bool = False) -> Path:
    """A Slicer ``.seg.nrrd``: one segment per class present, with name, colour and terminology tag."""
    import slicerio

    arr = sitk.GetArrayFromImage(labelmap).astype(np.uint8)  # (z, y, x)
    present = set(np.unique(arr).tolist())
    segments = []
    for entry in classes:
        value = int(entry["value"])
        if value not in present:
            continue
        segments.append({
            "id": f"Segment_{value}", "labelValue": value, "layer": 0,
            "name": entry.get("display_name") or entry["name"],
            "color": [c / 255.0 for c in entry.get("color", (128, 128, 128))],
            "tags": {"TerminologyEntry": terminology_tag(entry), "masksam.name": entry["name"]},
        })
    seg = {"voxels": np.ascontiguousarray(arr.transpose(2, 1, 0)), "ijkToLPS": ijk_to_lps(labelmap),
           "segments": segments, "encoding": "gzip",
           "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap"}
    with atomic_output(path, overwrite) as tmp:
        slicerio.write_segmentation(str(tmp), seg)
    return Path(path)


def write_dicom_seg(labelmap: sitk.Image, dicom_folder: os.PathLike, path: os.PathLike, classes: Sequence[Dict],
                    overwrite: bool = False, series_uid: Optional[str] = None) -> Path:
    """A DICOM SEG (highdicom) referencing the source series; the labelmap must lie on the series' grid."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files = _series_files(Path(dicom_folder), series_uid)
    reference = sitk.ImageSeriesReader()
    reference.SetFileNames(files)
    ref_image = reference.Execute()
    from .geometry import same_grid

    if not same_grid(ref_image, labelmap, tol=1e-3):
        raise InputError("the labelmap does not lie on the DICOM series' grid; DICOM SEG needs the source grid")
    datasets = [pydicom.dcmread(f) for f in files]
    # order source datasets as SimpleITK ordered the slices (files are already sorted by position)
    arr = sitk.GetArrayFromImage(labelmap).astype(np.uint8)  # (z, y, x), z as the files' order
    present = [e for e in classes if (arr == int(e["value"])).any()]
    if not present:
        raise InputError("nothing was segmented: a DICOM SEG needs at least one segment")
    descriptions = []
    mask = np.zeros(arr.shape + (len(present),), bool)
    for k, entry in enumerate(present):
        mask[..., k] = arr == int(entry["value"])
        snomed = entry.get("snomed") or {}
        type_code = snomed.get("type")
        prop_type = hd.sr.CodedConcept(*type_code) if type_code else codes.SCT.Organ
        desc = hd.seg.SegmentDescription(
            segment_number=k + 1, segment_label=(entry.get("display_name") or entry["name"])[:64],
            segmented_property_category=hd.sr.CodedConcept(*(snomed.get("category") or
                                                             ("123037004", "SCT", "Anatomical Structure"))),
            segmented_property_type=prop_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(name="MaskSAM", version="0.1",
                                                                        family=codes.cid7162.ArtificialIntelligence),
        )
        descriptions.append(desc)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MaskSAM", manufacturer_model_name="MaskSAM",
        software_versions="0.1", device_serial_number="0", series_description="MaskSAM organs",
    )
    with atomic_output(path, overwrite) as tmp:
        seg.save_as(str(tmp))
    return Path(path)
