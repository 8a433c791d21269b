"""Depth adapters that let a frozen 2D SAM see neighbouring slices.

Both adapters are bottlenecks whose output projection is initialised to zero, so that a freshly built MaskSAM
reproduces its pretrained backbone exactly (``skip=True`` adapters are then the identity and ``skip=False``
adapters add zero).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import Conv3d


class LayerNormChannels3d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor (eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class DepthConvAdapter(nn.Module):
    """3D depth-convolution adapter (spec §1.2, ``AdapterTFusion3DMiddleDWConvNorm``).

    Input and output: channels-last tokens (G·D, h, w, C), where consecutive groups of ``depth`` items along
    the first axis are the D slices of one slab (batch order (g, d)). The adapter computes::

        xs = GELU(Linear(C -> C·ratio)(x))
        xt = GELU(LayerNorm3d(depthwise Conv3d 3x3x3 over (D, h, w)(xs)))
        y  = Linear(C·ratio -> C)(xs + xt)          # zero-initialised
        out = x + y if skip else y

    Applied to the un-partitioned token grid, the depth axis groups neighbouring slices (the paper's intent);
    the window-grouping of the official code is reproduced by the caller (see ``adapter_mode``).
    """

    def __init__(self, dim: int, depth: int, ratio: float = 0.25, skip: bool = True) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.depth = depth
        self.skip = skip
        self.down = nn.Linear(dim, hidden)
        self.conv = Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.norm = LayerNormChannels3d(hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (G·D, h, w, C) -> (G·D, h, w, C)."""
        gd, h, w, _ = x.shape
        if gd % self.depth:
            raise ValueError(f"batch of {gd} is not a multiple of the slab depth {self.depth}")
        xs = F.gelu(self.down(x))
        hidden = xs.shape[-1]
        xt = self.conv(xs.reshape(gd // self.depth, self.depth, h, w, hidden).permute(0, 4, 1, 2, 3))
        # LayerNorm3d over channels, computed channels-last: one transpose back, not three (the depthwise
        # convolution itself runs channels-last in oneDNN and OpenVINO)
        xt = xt.permute(0, 2, 3, 4, 1).reshape(gd, h, w, hidden)
        xt = F.gelu(F.layer_norm(xt, (hidden,), self.norm.weight, self.norm.bias, self.norm.eps))
        y = self.up(xs + xt)
        return x + y if self.skip else y


class DepthMLPAdapter(nn.Module):
    """3D depth-MLP adapter for the decoder's tokens (spec §1.5, ``AdapterTFusionMiddleMLPTQReshape``).

    Input and output: (G·D, n, C) token sequences whose batch is ordered (g, d): each group g (one slab and one
    query) holds the same query on the D slices of its slab. The adapter mixes each token along the slice axis::

        xs = GELU(Linear(C -> hidden)(x))
        xs = xs + Linear(4D -> D)(GELU(Linear(D -> 4D)(xs along d)))
        y  = Linear(hidden -> C)(xs)                 # zero-initialised
        out = x + y if skip else y
    """

    def __init__(self, dim: int, depth: int, hidden: int = 64, skip: bool = True) -> None:
        super().__init__()
        self.depth = depth
        self.skip = skip
        self.down = nn.Linear(dim, hidden)
        self.depth_in = nn.Linear(depth, 4 * depth)
        self.depth_out = nn.Linear(4 * depth, depth)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (G·D, n, C) -> (G·D, n, C)."""
        gd, n, _ = x.shape
        if gd % self.depth:
            raise ValueError(f"batch of {gd} is not a multiple of the slab depth {self.depth}")
        xs = F.gelu(self.down(x))
        hidden = xs.shape[-1]
        xt = xs.reshape(gd // self.depth, self.depth, n, hidden).permute(0, 2, 3, 1)  # (G, n, hidden, D)
        xt = self.depth_out(F.gelu(self.depth_in(xt)))
        xs = xs + xt.permute(0, 3, 1, 2).reshape(gd, n, hidden)
        y = self.up(xs)
        return x + y if self.skip else y


class DepthConvTokenAdapter(nn.Module):
    """:class:`DepthConvAdapter` for flattened image tokens (G·D, h·w, C) of a known square grid."""

    def __init__(self, dim: int, depth: int, grid: tuple, ratio: float = 0.25, skip: bool = True) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.inner = DepthConvAdapter(dim, depth, ratio=ratio, skip=skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (G·D, h·w, C) -> (G·D, h·w, C)."""
        gd, hw, c = x.shape
        h, w = self.grid
        return self.inner(x.reshape(gd, h, w, c)).reshape(gd, hw, c)
