"""A picture of a segmentation: organs overlaid on a few slices of the volume (PNG, for the README and reports).

Slices are shown in radiological convention (patient left on the image's right, anterior up; coronal view with
superior up), whatever the file's orientation: the volume and the labelmap are first brought to LPS axis order
with SimpleITK's ``DICOMOrient`` and displayed with their physical aspect ratio.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..data.volume_io import atomic_output


def _lps_arrays(image: sitk.Image, labels: sitk.Image) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """-> image and label arrays (z, y, x) in LPS order (x: right->left, y: anterior->posterior, z: inferior->
    superior) and their spacing (x, y, z)."""
    img = sitk.DICOMOrient(image, "LPS")
    lab = sitk.DICOMOrient(labels, "LPS")
    return sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab), img.GetSpacing()


def _window(slice_hu: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.clip((slice_hu.astype(np.float32) - lo) / (hi - lo), 0, 1)


def overlay_rgb(gray: np.ndarray, label: np.ndarray, colours: Dict[int, Tuple[int, int, int]],
                alpha: float = 0.45) -> np.ndarray:
    """``gray`` (h, w) in [0, 1], ``label`` (h, w) int -> (h, w, 3) float RGB with each label blended in its colour
    and a darker outline."""
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for value, colour in colours.items():
        m = label == value
        if not m.any():
            continue
        c = np.asarray(colour, np.float32) / 255.0
        rgb[m] = (1 - alpha) * rgb[m] + alpha * c
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = 0.6 * c
    return rgb


def save_overlay_figure(image: sitk.Image, labels: sitk.Image, names: Dict[int, str],
                        colours: Dict[int, Tuple[int, int, int]], path: Union[str, Path], title: str = "",
                        axial_fractions: Optional[Sequence[float]] = None,
                        window: Tuple[float, float] = (-160.0, 240.0)) -> Path:
    """Write a PNG with three axial slices through the labelled region and one coronal slice, organs overlaid,
    and a legend of the organs present. ``names``/``colours`` map label values to names and RGB (0-255)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img, lab, (sx, sy, sz) = _lps_arrays(image, labels)
    present = [int(v) for v in np.unique(lab) if v != 0 and int(v) in names]
    zs = np.nonzero(lab.any(axis=(1, 2)))[0]
    z_lo, z_hi = (int(zs.min()), int(zs.max())) if zs.size else (0, img.shape[0] - 1)
    fractions = axial_fractions or (0.25, 0.55, 0.85)
    axial = [int(round(z_lo + f * (z_hi - z_lo))) for f in fractions]
    ys = np.nonzero(lab.any(axis=(0, 2)))[0]
    y_cor = int(np.median(ys)) if ys.size else img.shape[1] // 2

    fig, axes = plt.subplots(1, len(axial) + 1, figsize=(4.0 * (len(axial) + 1), 4.6))
    for ax, z in zip(axes, axial):
        ax.imshow(overlay_rgb(_window(img[z], window), lab[z], colours), aspect=sy / sx, interpolation="nearest")
        ax.set_title(f"axial {z + 1}/{img.shape[0]}", fontsize=9)
    # coronal: rows are z (flip so superior is up), columns x
    cor = overlay_rgb(_window(img[:, y_cor, :], window), lab[:, y_cor, :], colours)[::-1]
    axes[-1].imshow(cor, aspect=sz / sx, interpolation="nearest")
    axes[-1].set_title("coronal", fontsize=9)
    for ax in axes:
        ax.axis("off")
    handles = [Patch(color=np.asarray(colours[v]) / 255.0, label=names[v]) for v in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 0.95 if title else 1))
    path = Path(path)
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def organ_surfaces(labels: sitk.Image, values: Sequence[int], max_faces: int = 40000
                   ) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """Triangle surfaces of the labelled organs in LPS millimetres, relative to the labelmap's LPS-ordered corner.

    Returns {value: (vertices (V, 3) as (x, y, z) mm with x towards the patient's left, y posterior, z superior;
    faces (F, 3) int)} for each value present. Large organs are meshed on a coarser grid (marching cubes step) so
    that each stays under about ``max_faces`` triangles.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.measure import marching_cubes

    lab = sitk.DICOMOrient(labels, "LPS")
    arr = sitk.GetArrayViewFromImage(lab)
    sx, sy, sz = lab.GetSpacing()
    out = {}
    for value in values:
        mask = np.asarray(arr == value)
        if not mask.any():
            continue
        zs, ys, xs = [np.nonzero(mask.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1))]
        crop = np.pad(mask[zs[0]:zs[-1] + 1, ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1], 2).astype(np.float32)
        # smooth over about 1.5 mm so that thick slices do not show as stairs; the 0.5 level stays at the boundary
        crop = gaussian_filter(crop, sigma=[min(1.0, 1.5 / sp) for sp in (sz, sy, sx)])
        # surface ~ voxels^(2/3); marching cubes' step divides the face count by about step^2
        step = max(1, int(np.ceil(np.sqrt(4.0 * mask.sum() ** (2.0 / 3.0) / max_faces))))
        verts, faces, _, _ = marching_cubes(crop, 0.5, spacing=(sz, sy, sx), step_size=step)
        offset = np.array([(zs[0] - 2) * sz, (ys[0] - 2) * sy, (xs[0] - 2) * sx])
        out[int(value)] = ((verts + offset)[:, ::-1].copy(), faces)
    return out


def save_surface_figure(labels: sitk.Image, names: Dict[int, str], colours: Dict[int, Tuple[int, int, int]],
                        path: Union[str, Path], title: str = "", translucent: Sequence[int] = ()) -> Path:
    """Write a PNG of the organs in 3D, seen from the front (anterior view: the patient's left on the picture's
    right, superior up), shaded in each organ's colour, with a legend. Organs whose values are in ``translucent``
    (e.g. the bowel, which hides the rest from the front) are drawn see-through."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    surfaces = organ_surfaces(labels, sorted(names))
    fig = plt.figure(figsize=(6.0, 6.4))
    ax = fig.add_subplot(projection="3d")
    light = np.array([0.3, -1.0, 0.6])
    light /= np.linalg.norm(light)
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for value, (verts, faces) in surfaces.items():
        tri = verts[faces]  # (F, 3 corners, xyz)
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
        shade = 0.35 + 0.65 * np.abs(normal @ light)
        rgb = np.asarray(colours.get(value, (200, 200, 200)), np.float32) / 255.0
        alpha = 0.25 if value in translucent else 1.0
        ax.add_collection3d(Poly3DCollection(tri, facecolors=np.clip(shade[:, None] * rgb, 0, 1), linewidths=0,
                                             alpha=alpha))
        lo, hi = np.minimum(lo, verts.min(0)), np.maximum(hi, verts.max(0))
    if surfaces:
        for set_lim, a, b in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), lo, hi):
            set_lim(a, b)
        ax.set_box_aspect(tuple(np.maximum(hi - lo, 1.0)))
    ax.view_init(elev=5, azim=-90)  # camera in front of the patient (-y), x (patient left) to the right
    ax.set_axis_off()
    handles = [Patch(color=np.asarray(colours[v]) / 255.0, label=names[v]) for v in surfaces if v in colours]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7, frameon=False)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    fig.subplots_adjust(left=0, right=1, top=0.92 if title else 1, bottom=0.12 if handles else 0)
    path = Path(path)
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
