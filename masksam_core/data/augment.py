"""Augmentation of slabs on the tensors' device (GPU when training there), seeded and reproducible.

``augment(image (B, 1, D, H, W), label (B, D, H, W), cfg, gen)``: one in-plane rotation/scaling per slab
(identical for its D slices; labels resampled nearest), then intensity changes: brightness, contrast, gamma,
Gaussian noise, Gaussian blur and simulated low resolution (nnU-Net's list). Mirroring is opt-in (``flip_axes``):
a left-right flip would turn a right kidney into a left one, so it is off for organs with laterality.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

DEFAULTS = {
    "p_rotate": 0.2, "max_rotation_deg": 15.0, "p_scale": 0.2, "scale_range": (0.7, 1.4),
    "p_brightness": 0.15, "brightness_range": (0.75, 1.25), "p_contrast": 0.15, "contrast_range": (0.75, 1.25),
    "p_gamma": 0.3, "gamma_range": (0.7, 1.5), "p_noise": 0.1, "noise_std": 0.05, "p_blur": 0.2,
    "blur_sigma": (0.5, 1.0), "p_lowres": 0.25, "lowres_range": (0.5, 1.0), "flip_axes": (),
}


def _u(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=gen))


def _p(gen: torch.Generator, p: float) -> bool:
    return float(torch.rand(1, generator=gen)) < p


def spatial(image: torch.Tensor, label: torch.Tensor, angle: float, scale: float, fill: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate by ``angle`` (rad) and zoom by ``scale`` in-plane, the same for all D slices. (1,D,H,W), (D,H,W)."""
    d, h, w = label.shape
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32, device=image.device)
    theta = theta.expand(d, 2, 3)
    grid = F.affine_grid(theta, (d, 1, h, w), align_corners=False)
    img = F.grid_sample(image[0][:, None].float() - fill, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[:, 0] + fill
    lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[:, 0].round().to(label.dtype)
    return img[None].to(image.dtype), lab


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    ax = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    d, h, w = x.shape[-3:]
    y = x.reshape(-1, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(x.shape)


def augment_slab(image: torch.Tensor, label: torch.Tensor, cfg: Optional[Dict] = None,
                 gen: Optional[torch.Generator] = None, fill: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Augment one slab: image (1, D, H, W), label (D, H, W) with 255 = ignore kept as is."""
    c = {**DEFAULTS, **(cfg or {})}
    gen = gen or torch.Generator().manual_seed(0)
    angle = math.radians(_u(gen, -c["max_rotation_deg"], c["max_rotation_deg"])) if _p(gen, c["p_rotate"]) else 0.0
    scale = _u(gen, *c["scale_range"]) if _p(gen, c["p_scale"]) else 1.0
    if angle or scale != 1.0:
        image, label = spatial(image, label, angle, scale, fill)
    for axis in c["flip_axes"]:  # axis 0 = D, 1 = H (rows), 2 = W (columns)
        if _p(gen, 0.5):
            image = image.flip(axis + 1)
            label = label.flip(axis)
    x = image.float()
    if _p(gen, c["p_brightness"]):
        x = x * _u(gen, *c["brightness_range"])
    if _p(gen, c["p_contrast"]):
        mean = x.mean()
        x = (x - mean) * _u(gen, *c["contrast_range"]) + mean
    if _p(gen, c["p_gamma"]):
        lo, hi = x.min(), x.max()
        span = (hi - lo).clamp_min(1e-6)
        x = ((x - lo) / span).clamp(0, 1) ** _u(gen, *c["gamma_range"]) * span + lo
    if _p(gen, c["p_noise"]):
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        x = x + noise * _u(gen, 0.0, c["noise_std"])
    if _p(gen, c["p_blur"]):
        x = _blur(x, _u(gen, *c["blur_sigma"]))
    if _p(gen, c["p_lowres"]):
        f = _u(gen, *c["lowres_range"])
        h, w = x.shape[-2:]
        small = F.interpolate(x.reshape(-1, 1, h, w), scale_factor=f, mode="nearest")
        x = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).reshape(x.shape)
    return x.to(image.dtype), label
