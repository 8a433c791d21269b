"""Reading volumes with validation, and atomic writers for labelmaps, ``.seg.nrrd`` and DICOM SEG.

Every problem a user can cause is an :class:`InputError` or :class:`OutputError` with a one-line message.
Writers never leave a partial file: they write a temporary file in the target folder and rename it.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError
from ..labels import snomed_codes, terminology_tag

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: segment tag naming the model class of a segment (shared with the Slicer modules)
CLASS_TAG = "MaskSAM.ClassName"

_COMPLEX = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # ITK messages start with the source location; the reason is usually the last line
    text = lines[-1] if lines else type(exc).__name__
    return text[:limit]


# ---------------------------------------------------------------------------------------------------- reading

@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings on stderr (GDCM complains about every folder without DICOM files)."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _scan_dicom(folder: Path) -> List[Tuple[str, List[str]]]:
    """(SeriesInstanceUID, sorted files) of every DICOM series under ``folder`` (recursively), largest first."""
    reader = sitk.ImageSeriesReader()
    found: List[Tuple[str, List[str]]] = []
    with _quiet_itk():
        for root, dirs, _files in os.walk(str(folder)):
            dirs.sort()
            try:
                uids = reader.GetGDCMSeriesIDs(root)
            except RuntimeError:
                continue
            for uid in uids:
                try:
                    files = list(reader.GetGDCMSeriesFileNames(root, uid))
                except RuntimeError:
                    continue
                if files:
                    found.append((uid, files))
    found.sort(key=lambda t: -len(t[1]))  # stable: equal sizes keep folder order
    return found


def list_dicom_series(folder: os.PathLike) -> List[Tuple[str, int]]:
    """(SeriesInstanceUID, number of files) of every DICOM series in ``folder`` (recursively), largest first."""
    return [(uid, len(files)) for uid, files in _scan_dicom(Path(folder))]


def _series_files(folder: Path, series_uid: Optional[str]) -> List[str]:
    """Files of the chosen series (the largest when ``series_uid`` is None), sorted along the slice normal."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of DICOM files")
    series = _scan_dicom(folder)
    if series_uid is not None:
        series = [s for s in series if s[0] == series_uid]
        if not series:
            raise InputError(f"no DICOM series with SeriesInstanceUID {series_uid} in {folder}")
    if not series:
        raise InputError(f"no DICOM image series found in {folder}")
    return series[0][1]


def _read_series(files: List[str], folder: Path) -> Tuple[sitk.Image, str]:
    """Read a sorted DICOM series and its Modality tag ("" when absent); InputError when it is unreadable or its
    slices are not evenly spaced."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"the DICOM series in {folder} holds no readable image ({_first_line(exc)})") from None
    if len(files) >= 3 and image.GetDimension() == 3:
        _check_slice_positions(reader, len(files), image, folder)
    modality = reader.GetMetaData(0, "0008|0060").strip() if reader.HasMetaDataKey(0, "0008|0060") else ""
    return image, modality


def _check_slice_positions(reader: sitk.ImageSeriesReader, n: int, image: sitk.Image, folder: Path) -> None:
    """SimpleITK stacks slices with missing positions or uneven gaps at their mean spacing (only a warning),
    which would put every result in the wrong place: refuse such a series."""
    positions = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return  # no per-slice positions (e.g. not a classic CT/MR series): nothing to check
        try:
            positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")[:3]])
        except ValueError:
            return
    normal = np.array(image.GetDirection(), float).reshape(3, 3)[:, 2]
    gaps = np.diff(np.array(positions) @ normal)
    spacing = float(np.median(np.abs(gaps)))
    if spacing <= 1e-6:
        raise InputError(f"the DICOM series in {folder} has several slices at the same position "
                         f"(more than one volume in one series?); choose or split the series")
    if np.abs(np.abs(gaps) - spacing).max() > max(0.1 * spacing, 1e-3):
        raise InputError(f"the DICOM series in {folder} has missing slices or uneven slice spacing "
                         f"({np.abs(gaps).min():.3g} to {np.abs(gaps).max():.3g} mm); it cannot be read as one volume")


def _nifti_data_end(header: bytes) -> Optional[int]:
    """Bytes a single-file NIfTI-1/2 needs (voxel offset + voxel data), or None when the header is not one."""
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr == 348 and header[344:347] == b"n+1":
            ndim, *dims = struct.unpack(endian + "8h", header[40:56])
            (bitpix,) = struct.unpack(endian + "h", header[72:74])
            (offset,) = struct.unpack(endian + "f", header[108:112])
        elif sizeof_hdr == 540 and header[4:7] == b"n+2" and len(header) >= 176:
            (bitpix,) = struct.unpack(endian + "h", header[14:16])
            ndim, *dims = struct.unpack(endian + "8q", header[16:80])
            (offset,) = struct.unpack(endian + "q", header[168:176])
        else:
            continue
        if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 0 for d in dims[:ndim]):
            return None
        return int(offset) + int(np.prod(dims[:ndim], dtype=np.int64)) * bitpix // 8
    return None


def _check_nifti_complete(path: Path) -> None:
    """ITK reads a truncated NIfTI without complaint (the missing voxels become zeros): refuse it here."""
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"  # by content: ITK also reads a misnamed uncompressed file
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            header = f.read(540)
        need = _nifti_data_end(header)
        if need is None:
            return  # not a single-file NIfTI header: let the reader decide
        if not compressed:
            have = path.stat().st_size
        else:
            with open(path, "rb") as raw:
                raw.seek(-4, os.SEEK_END)
                (isize,) = struct.unpack("<I", raw.read(4))
            if isize == need % 2 ** 32:
                return  # the gzip trailer's length matches: complete
            have = 0
            with gzip.open(path, "rb") as f:
                while have < need:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    have += len(chunk)
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        raise InputError(f"cannot read {path.name} as an image (corrupt or truncated file: {exc})") from None
    if have < need:
        raise InputError(f"cannot read {path.name} as an image (truncated file: {have} of {need} bytes)")


def read_volume(path: os.PathLike, series_uid: Optional[str] = None, modality: Optional[str] = None) -> sitk.Image:
    """Read a 3D scalar volume (NIfTI, NRRD, MHA/MHD, or a DICOM series folder) as float32.

    A folder is read as a DICOM series: the one with the most files, or ``series_uid``. Raises
    :class:`InputError` (one line) for a missing path, an unreadable file, a 2D (one slice), 4D, vector or complex
    image, an empty volume, NaN or infinite voxels, a DICOM folder without an image series, or an unknown
    ``series_uid``. A constant volume is accepted. A DICOM series' Modality tag is kept in the image's metadata
    (``0008|0060``); ``modality`` sets it for a file that does not carry it (the user's or Slicer's word).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    modality_read = None
    if p.is_dir():
        image, modality_read = _read_series(_series_files(p, series_uid), p)
    else:
        if p.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(p)
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise InputError(f"cannot read {p.name} as an image ({_first_line(exc)})") from None
    image = validate_volume(image, p.name)
    modality = modality or modality_read
    if modality:  # kept for the modality check (``atlas.modality``)
        image.SetMetaData("0008|0060", modality)
    return image


def validate_volume(image: sitk.Image, name: str = "image") -> sitk.Image:
    """Check that ``image`` is a usable 3D scalar volume; returns it as float32 (see :func:`read_volume`)."""
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:  # a 3D volume stored with a singleton time axis
        image = image[:, :, :, 0]
        dim = 3
    if 0 in image.GetSize():
        raise InputError(f"{name} is empty (size {'x'.join(str(s) for s in image.GetSize())})")
    if dim == 2 or (dim == 3 and image.GetSize()[2] == 1):
        raise InputError(f"{name} is a 2D image (a single slice); a 3D volume is needed")
    if dim != 3:
        raise InputError(f"{name} is a {dim}D image; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} is a vector image with {image.GetNumberOfComponentsPerPixel()} components "
                         f"per voxel; a scalar volume is needed")
    if image.GetPixelID() in _COMPLEX:
        raise InputError(f"{name} has complex voxels; a real-valued scalar volume is needed")
    try:
        image = sitk.Cast(image, sitk.sitkFloat32)
    except RuntimeError as exc:
        raise InputError(f"{name} has voxels of type {image.GetPixelIDTypeAsString()} that cannot be used "
                         f"({_first_line(exc)})") from None
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix; rename it onto ``path`` on success.

    The temporary name is ``.<name>.<random>.tmp<suffix>`` (``.nii.gz`` for ``x.nii.gz``, so writers that choose
    the format by extension work). Raises :class:`OutputError` when ``path`` exists and ``overwrite`` is false,
    when it is a folder, or when its folder cannot be created or written. On any error (Ctrl-C included) the
    temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{target} is a folder, not a file")
    if target.exists() and not overwrite:
        raise OutputError(f"{target} exists; use --overwrite to replace it")
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
        if not overwrite and target.exists():
            raise OutputError(f"{target} appeared while it was being written; use --overwrite to replace it")
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the user's usual mode
        try:
            os.replace(tmp_path, target)
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def _write_image(image: sitk.Image, tmp: Path, target: Path) -> None:
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    except RuntimeError as exc:
        raise OutputError(f"cannot write {target}: {_first_line(exc)}") from None


def _label_array(labelmap: sitk.Image) -> np.ndarray:
    """(z, y, x) integer array of a labelmap; InputError for anything that is not a scalar 3D labelmap."""
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("a labelmap must be a 3D scalar image")
    arr = sitk.GetArrayFromImage(labelmap)
    if arr.size and (arr.min() < 0 or not np.array_equal(arr, np.round(arr))):
        raise InputError("a labelmap must hold non-negative integer label values")
    if arr.size and arr.max() > 65535:
        raise InputError(f"label value {int(arr.max())} is above 65535")
    return arr.astype(np.uint8 if (arr.max() if arr.size else 0) <= 255 else np.uint16)


def write_labelmap(labelmap: sitk.Image, path: os.PathLike, overwrite: bool = False) -> Path:
    """Write a labelmap (uint8, or uint16 above 255) as ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha`` (by
    extension), compressed and atomically. Geometry (spacing, origin, direction) is the labelmap's."""
    target = Path(path)
    if not target.name.lower().endswith(LABELMAP_SUFFIXES) or target.name.lower().endswith(".seg.nrrd"):
        raise OutputError(f"cannot write a labelmap as {target.name}: use one of {', '.join(LABELMAP_SUFFIXES)}"
                          + (" (or write_seg_nrrd for .seg.nrrd)" if target.name.lower().endswith(".seg.nrrd")
                             else ""))
    arr = _label_array(labelmap)
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(labelmap)
    with atomic_output(target, overwrite) as tmp:
        _write_image(image, tmp, target)
    return target


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to LPS millimetres."""
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection(), float).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def write_seg_nrrd(labelmap: sitk.Image, path: os.PathLike, classes: Sequence[Dict],
                   overwrite: bool = False) -> Path:
    """A Slicer ``.seg.nrrd`` with the labelmap's geometry: one segment per class of ``classes`` present in the
    labelmap (label value = class value), with its display name, colour, terminology tag and class-name tag.

    Voxels whose value is not in ``classes`` are written as background. Readable by Slicer and by
    ``slicerio.read_segmentation``.
    """
    import slicerio

    arr = _label_array(labelmap)  # (z, y, x)
    values = {int(e["value"]) for e in classes}
    present = set(np.unique(arr).tolist()) - {0}
    stray = present - values
    if stray:
        arr = np.where(np.isin(arr, sorted(stray)), 0, arr).astype(arr.dtype)
    segments = []
    for entry in sorted(classes, key=lambda e: int(e["value"])):
        value = int(entry["value"])
        if value not in present:
            continue
        colour = entry.get("color") or (128, 128, 128)
        segments.append({
            "id": f"Segment_{value}", "labelValue": value, "layer": 0,
            "name": str(entry.get("display_name") or entry["name"]),
            "color": [round(float(c) / 255.0, 6) for c in colour],
            "nameAutoGenerated": False, "colorAutoGenerated": False,
            "tags": {"TerminologyEntry": terminology_tag(entry), CLASS_TAG: str(entry["name"])},
        })
    seg = {"voxels": np.ascontiguousarray(arr.transpose(2, 1, 0)), "ijkToLPS": ijk_to_lps(labelmap),
           "segments": segments, "encoding": "gzip",
           "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap",
           "referenceImageExtentOffset": [0, 0, 0]}
    target = Path(path)
    with atomic_output(target, overwrite) as tmp:
        try:
            slicerio.write_segmentation(str(tmp), seg)
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot write {target}: {exc}") from None
    return target


def write_dicom_seg(labelmap: sitk.Image, dicom_folder: os.PathLike, path: os.PathLike, classes: Sequence[Dict],
                    overwrite: bool = False, series_uid: Optional[str] = None) -> Path:
    """A binary DICOM SEG (highdicom) referencing the source series, one segment per class present.

    ``labelmap`` must lie on the grid of the series (the largest in ``dicom_folder``, or ``series_uid``), as
    :func:`read_volume` returns it. Segments carry the class's display name, SNOMED CT category, type and
    laterality modifier, and its colour. InputError when the folder holds no such series, the series' images lack
    the UIDs a SEG must reference (``dicom_seg_check``: checked before reading the pixels), the grids differ or
    no class is present; OutputError, with nothing written, when the SEG built does not reference its source.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__
    from .dicom_seg_check import check_built_seg, check_seg_datasets, fill_type2, read_headers
    from .geometry import same_grid

    folder = Path(dicom_folder)
    files = _series_files(folder, series_uid)
    datasets = read_headers(files, folder)
    check_seg_datasets(datasets, folder)
    fill_type2(datasets)  # an anonymiser may have removed what the SEG copies as Type 2: empty is valid
    ref_image, _ = _read_series(files, folder)
    if ref_image.GetDimension() != 3 or not same_grid(ref_image, labelmap, tol=1e-3):
        raise InputError("the labelmap does not lie on the DICOM series' grid (size, spacing, origin, direction); "
                         "DICOM SEG needs the source grid")
    arr = _label_array(labelmap)  # (z, y, x), z in the files' order (SimpleITK sorted them by position)
    present = [e for e in sorted(classes, key=lambda e: int(e["value"])) if (arr == int(e["value"])).any()]
    if not present:
        raise InputError("nothing was segmented: a DICOM SEG needs at least one segment")
    algorithm = hd.AlgorithmIdentificationSequence(name="MaskSAM", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    mask = np.zeros(arr.shape + (len(present),), bool)
    for k, entry in enumerate(present):
        mask[..., k] = arr == int(entry["value"])
        category, type_, modifier = snomed_codes(entry)
        colour = entry.get("color")
        desc = hd.seg.SegmentDescription(
            segment_number=k + 1, segment_label=str(entry.get("display_name") or entry["name"])[:64],
            segmented_property_category=hd.sr.CodedConcept(*category),
            segmented_property_type=hd.sr.CodedConcept(*type_),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*[int(c) for c in colour]) if colour else None,
        )
        if modifier:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(*modifier)]
        descriptions.append(desc)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MaskSAM", manufacturer_model_name="MaskSAM",
            software_versions=__version__, device_serial_number="0", series_description="MaskSAM organs",
            content_label="MASKSAM", content_description="Organ segmentation (research use only)",
        )
    except (ValueError, AttributeError, TypeError) as exc:
        raise InputError(f"cannot build a DICOM SEG for the series in {folder} ({_first_line(exc)})") from None
    target = Path(path)
    check_built_seg(seg, datasets, target)
    with atomic_output(target, overwrite) as tmp:
        seg.save_as(str(tmp))
    return target
