"""Prompt generator: a UNETR-like 3D decoder over the encoder's multi-scale features (spec §1.3).

From the features of D slices it predicts, for each slice, N auxiliary masks (logits, at input resolution),
N boxes (normalised xyxy) and N auxiliary classifier tokens (E-dimensional).

Stages run from the neck's stride down to stride 1, doubling the resolution each time. Stage 1 is two conv
blocks on the neck; stage k > 1 upsamples the stage below with ConvTranspose3d (1, 2, 2), concatenates the
skip feature ``features[k - 1]`` brought to its resolution by (1, 2, 2) transposed convolutions (as many as
its stride requires; a 1x1x1 conv block if none), and applies one conv block. The last stage also receives
the stem output (the image itself) through one conv block: a UNETR-style full-resolution skip that the official
ViT code lacks (documented deviation; it sharpens boundaries for the 256-px LiteMedSAM).

All conv blocks are Conv3d (3x3x3) + InstanceNorm3d + LeakyReLU (``conv.py`` and ``norm.py``: the same
functions, computed on channels-last slices).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import Conv3d, ConvTranspose3d
from .norm import InstanceNorm3d


def conv_block(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    """Conv3d (kernel^3, same padding) + InstanceNorm3d(affine) + LeakyReLU(0.01)."""
    return nn.Sequential(
        Conv3d(cin, cout, kernel, padding=kernel // 2),
        InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


def up_block(cin: int, cout: int) -> nn.Sequential:
    """In-plane x2 upsampling: ConvTranspose3d with kernel and stride (1, 2, 2)."""
    return nn.Sequential(ConvTranspose3d(cin, cout, kernel_size=(1, 2, 2), stride=(1, 2, 2)))


class SkipBranch(nn.Module):
    """Brings a skip feature from its stride to the stage's: ``n_up`` x [ConvT (1,2,2) + conv block]."""

    def __init__(self, cin: int, cout: int, n_up: int) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        if n_up == 0:
            layers.append(conv_block(cin, cout, kernel=1))
        for i in range(n_up):
            layers += [up_block(cin if i == 0 else cout, cout), conv_block(cout, cout)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """``adaptive_avg_pool3d(x, (D, size, size))`` for x (G, C, D, h, w) -> (G, C, D, size, size): as a plain
    average pool of (h/size, w/size) blocks when they divide evenly (the same windows; OpenVINO ran the adaptive
    form on its reference kernel, 6 % of the prompt generator's time), the adaptive pool otherwise."""
    d, h, w = x.shape[-3:]
    if h % size or w % size:
        return F.adaptive_avg_pool3d(x, (d, size, size))
    return F.avg_pool3d(x, (1, h // size, w // size))


class PromptGenerator(nn.Module):
    """Predicts auxiliary masks, boxes and classifier tokens for N queries on each of D slices.

    Args:
        feature_channels, feature_strides: of the encoder's features (neck first, see ``encoder.py``).
        input_size: S, the square input size in pixels.
        num_queries: N.
        token_dim: E, the decoder's token width (256 for SAM).
        channels: one width per stage, coarse to fine (len = 1 + log2(neck stride)); ``None`` picks a default.
        image_channels: channels of the stem output fed to the last stage (3).
    """

    def __init__(self, feature_channels: Sequence[int], feature_strides: Sequence[int], input_size: int,
                 num_queries: int, token_dim: int = 256, channels: Sequence[int] = None,
                 image_channels: int = 3) -> None:
        super().__init__()
        neck_stride = feature_strides[0]
        n_stages = int(round(math.log2(neck_stride))) + 1
        if 2 ** (n_stages - 1) != neck_stride:
            raise ValueError(f"neck stride {neck_stride} is not a power of two")
        if channels is None:
            channels = [max(16, 256 >> i) for i in range(n_stages)]
        channels = list(channels)
        if len(channels) != n_stages:
            raise ValueError(f"prompt generator needs {n_stages} stage widths, got {len(channels)}")
        skips = list(zip(feature_channels[1:], feature_strides[1:]))
        if len(skips) > n_stages - 1:
            raise ValueError(f"{len(skips)} skip features for {n_stages - 1} upsampling stages")
        self.num_queries = num_queries
        self.input_size = input_size
        self.token_dim = token_dim
        self.stage1 = nn.Sequential(conv_block(feature_channels[0], channels[0]), conv_block(channels[0], channels[0]))
        self.ups = nn.ModuleList()
        self.skip_branches = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for k in range(1, n_stages):
            stride = neck_stride >> k
            self.ups.append(up_block(channels[k - 1], channels[k]))
            cat = channels[k]
            if k - 1 < len(skips):
                cin, s = skips[k - 1]
                n_up = int(round(math.log2(s / stride)))
                self.skip_branches.append(SkipBranch(cin, channels[k], n_up))
                cat += channels[k]
            else:
                self.skip_branches.append(None)
            if k == n_stages - 1:
                self.image_branch = conv_block(image_channels, channels[k])
                cat += channels[k]
            self.fuse.append(conv_block(cat, channels[k]))
        if n_stages == 1:
            self.image_branch = conv_block(image_channels, channels[0])
            self.fuse_single = conv_block(2 * channels[0], channels[0])
        total = sum(channels)
        self.mask_head = Conv3d(channels[-1], num_queries, kernel_size=1)
        self.box_head = nn.Sequential(Conv3d(total, num_queries, kernel_size=1),
                                      InstanceNorm3d(num_queries, affine=True))
        self.token_pool = int(math.ceil(math.sqrt(token_dim)))
        self.token_head = nn.Sequential(Conv3d(total, num_queries, kernel_size=3, padding=1),
                                        InstanceNorm3d(num_queries, affine=True), nn.GELU())
        pooled = self.token_pool ** 2
        self.token_proj = nn.Identity() if pooled == token_dim else nn.Linear(pooled, token_dim)

    @staticmethod
    def _to_3d(x: torch.Tensor, depth: int) -> torch.Tensor:
        """(G·D, C, h, w) -> (G, C, D, h, w)."""
        gd, c, h, w = x.shape
        return x.reshape(gd // depth, depth, c, h, w).transpose(1, 2)

    def forward(self, features: List[torch.Tensor], image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """features: encoder outputs (G·D, C_k, h_k, w_k); image: stem output (G, 3, D, S, S).

        Returns ``aux_mask_logits`` (G·D, N, S, S), ``box_head`` (G·D, N, 4) normalised xyxy from the box head
        alone, and ``tokens`` (G·D, N, E).
        """
        depth = image.shape[2]
        x = self.stage1(self._to_3d(features[0], depth))
        stages = [x]
        for k in range(len(self.ups)):
            parts = [self.ups[k](x)]
            branch = self.skip_branches[k]
            if branch is not None:
                parts.append(branch(self._to_3d(features[k + 1], depth)))
            if k == len(self.ups) - 1:
                parts.append(self.image_branch(image))
            x = self.fuse[k](torch.cat(parts, dim=1))
            stages.append(x)
        if not self.ups:
            x = self.fuse_single(torch.cat([x, self.image_branch(image)], dim=1))
            stages = [x]
        g, _, d, s, _ = x.shape
        n = self.num_queries
        aux = self.mask_head(x)  # (G, N, D, S, S)
        aux = aux.transpose(1, 2).reshape(g * d, n, s, s)

        pooled_box = torch.cat([pool_to(t, 2) for t in stages], dim=1)
        raw = torch.sigmoid(self.box_head(pooled_box))  # (G, N, D, 2, 2): [[x1, y1], [p, q]]
        raw = raw.permute(0, 2, 1, 3, 4).reshape(g * d, n, 4)
        x1y1 = raw[..., 0:2]
        x2y2 = x1y1 + (1.0 - x1y1) * raw[..., 2:4]
        boxes = torch.cat([x1y1, x2y2], dim=-1)

        p = self.token_pool
        pooled_tok = torch.cat([pool_to(t, p) for t in stages], dim=1)
        tokens = self.token_head(pooled_tok)  # (G, N, D, p, p)
        tokens = tokens.permute(0, 2, 1, 3, 4).reshape(g * d, n, p * p)
        tokens = self.token_proj(tokens)
        return {"aux_mask_logits": aux, "box_head": boxes, "tokens": tokens}
