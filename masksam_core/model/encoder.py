"""Image encoders with depth adapters and multi-scale outputs for the prompt generator.

Both wrappers keep the pretrained encoder as ``self.base`` (frozen) and own the trainable additions:
a learnable, zero-initialised depth (slice) embedding and one :class:`DepthConvAdapter` (after attention,
residual) plus one parallel MLP adapter (scale 0.5) per attention block (spec §1.2).

``forward(x)`` takes the stem's output (G·D, 3, S, S) for G slabs of D slices in (g, d) order and returns
a list of feature maps, deepest first:

- ``features[0]``: the neck output (G·D, E, h, w), the image embedding for SAM's mask decoder;
- ``features[k]``, k >= 1: skip features (G·D, C_k, h_k, w_k) for the prompt generator's stage k + 1.

``feature_channels`` and ``feature_strides`` describe them.

``adapter_mode``:
- ``"unpartitioned"`` (default, the paper's intent): the depth-conv adapter sees the whole (G·D, h, w, C)
  token grid, so its depth axis groups the D slices of a slab.
- ``"official"``: as in the official code, the adapter runs on the window-partitioned batch
  ((G·D)·nWin, ws, ws, C), so its "depth" groups D consecutive *windows* of one slice (exact only when the
  number of windows equals D, as for AMOS).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters import DepthConvAdapter
from .window_attention import window_attention

ADAPTER_MODES = ("unpartitioned", "official")


class _AdapterPair(nn.Module):
    """The two adapters of one block: ``space`` (after attention, residual) and ``mlp`` (parallel, no skip)."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.space = DepthConvAdapter(dim, depth, skip=True)
        self.mlp = DepthConvAdapter(dim, depth, skip=False)


class ViTFeatureEncoder(nn.Module):
    """SAM's ``ImageEncoderViT`` with depth adapters; returns the neck and the global blocks' outputs.

    Features: [neck (G·D, 256, g, g), global block outputs (G·D, C, g, g) from the last to the first], all at
    stride 16 (g = S / 16).
    """

    def __init__(self, base: nn.Module, slab_depth: int, global_attn_indexes, adapters: bool = True,
                 depth_embedding: bool = True, adapter_mode: str = "unpartitioned") -> None:
        super().__init__()
        if adapter_mode not in ADAPTER_MODES:
            raise ValueError(f"adapter_mode must be one of {ADAPTER_MODES}")
        self.base = base
        self.slab_depth = slab_depth
        self.adapter_mode = adapter_mode
        self.global_attn_indexes = tuple(global_attn_indexes)
        dim = base.patch_embed.proj.out_channels
        self.adapters = nn.ModuleList([_AdapterPair(dim, slab_depth) for _ in base.blocks]) if adapters else None
        self.depth_embedding = nn.Parameter(torch.zeros(1, slab_depth, dim)) if depth_embedding else None
        out_chans = base.neck[0].out_channels
        self.feature_channels = [out_chans] + [dim] * len(self.global_attn_indexes)
        self.feature_strides = [16] * (1 + len(self.global_attn_indexes))

    def _block(self, blk: nn.Module, pair: Optional[_AdapterPair], x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import window_partition, window_unpartition

        shortcut = x
        x = blk.norm1(x)
        h, w = x.shape[1], x.shape[2]
        if blk.window_size > 0:
            x, pad_hw = window_partition(x, blk.window_size)
        x = blk.attn(x)
        if pair is not None and self.adapter_mode == "official":
            x = pair.space(x)
        if blk.window_size > 0:
            x = window_unpartition(x, blk.window_size, pad_hw, (h, w))
        if pair is not None and self.adapter_mode == "unpartitioned":
            x = pair.space(x)
        x = shortcut + x
        xn = blk.norm2(x)
        x = x + blk.mlp(xn)
        if pair is not None:
            x = x + 0.5 * pair.mlp(xn)
        return x

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x: (G·D, 3, S, S) -> [neck (G·D, 256, g, g), globals (G·D, C, g, g) deepest first]."""
        base = self.base
        x = base.patch_embed(x)
        if base.pos_embed is not None:
            x = x + base.pos_embed
        if self.depth_embedding is not None:
            gd = x.shape[0]
            emb = self.depth_embedding.repeat(gd // self.slab_depth, 1, 1).reshape(gd, 1, 1, -1)
            x = x + emb
        globals_out = []
        for i, blk in enumerate(base.blocks):
            x = self._block(blk, None if self.adapters is None else self.adapters[i], x)
            if i in self.global_attn_indexes:
                globals_out.append(x.permute(0, 3, 1, 2))
        neck = base.neck(x.permute(0, 3, 1, 2))
        return [neck] + globals_out[::-1]


class TinyViTFeatureEncoder(nn.Module):
    """LiteMedSAM's TinyViT with depth adapters; returns the neck and two skip features.

    Where the adapters go: TinyViT's first stage is convolutional (MBConv, no attention), so adapters sit in
    the **attention blocks** of stages 1-3 (``TinyViTBlock``): the depth-conv adapter right after the windowed
    attention is reversed to the (G·D, h, w, C) grid and before the residual add, and the parallel adapter
    beside the block's MLP (fed with the MLP's own LayerNorm output, scaled 0.5). The depth embedding is added
    to the patch embedding (G·D, 64, S, S).

    Features at S = 256: [neck (G·D, 256, 64, 64) stride 4, stage-3 output (G·D, 320, 64, 64) stride 4,
    stage-1 blocks' output before its patch merging (G·D, 128, 128, 128) stride 2].
    """

    def __init__(self, base: nn.Module, slab_depth: int, adapters: bool = True, depth_embedding: bool = True,
                 adapter_mode: str = "unpartitioned") -> None:
        super().__init__()
        if adapter_mode not in ADAPTER_MODES:
            raise ValueError(f"adapter_mode must be one of {ADAPTER_MODES}")
        self.base = base
        self.slab_depth = slab_depth
        self.adapter_mode = adapter_mode
        attn_layers = list(base.layers)[1:]
        if adapters:
            self.adapters = nn.ModuleList([
                nn.ModuleList([_AdapterPair(blk.dim, slab_depth) for blk in layer.blocks]) for layer in attn_layers
            ])
        else:
            self.adapters = None
        embed0 = base.patch_embed.embed_dim
        self.depth_embedding = nn.Parameter(torch.zeros(1, slab_depth, embed0)) if depth_embedding else None
        img = base.img_size
        layer1 = base.layers[1]
        res1 = layer1.input_resolution[0]
        last = base.layers[-1]
        res_last = last.input_resolution[0]
        self.feature_channels = [base.neck[0].out_channels, last.dim, layer1.dim]
        self.feature_strides = [img // res_last, img // res_last, img // res1]

    def _attention(self, blk: nn.Module, pair: Optional[_AdapterPair], x: torch.Tensor) -> torch.Tensor:
        """Windowed attention of a TinyViTBlock on (B, L, C) tokens; returns (B, L, C) before the residual."""
        h, w = blk.input_resolution
        b, length, c = x.shape
        ws = blk.window_size
        if pair is None or self.adapter_mode != "official":
            x = window_attention(blk.attn, x.view(b, h, w, c), ws)  # (B, h, w, C)
            if pair is not None:
                x = pair.space(x)
            return x.reshape(b, length, c)
        # the official code's adapter placement: on the window-partitioned batch
        if h == ws and w == ws:
            return pair.space(blk.attn(x).view(b, h, w, c)).view(b, length, c)
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = pair.space(blk.attn(x).view(-1, ws, ws, c)).view(-1, ws * ws, c)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        return x[:, :h, :w].contiguous().view(b, length, c)

    def _block(self, blk: nn.Module, pair: Optional[_AdapterPair], x: torch.Tensor) -> torch.Tensor:
        h, w = blk.input_resolution
        b, length, c = x.shape
        x = x + blk.drop_path(self._attention(blk, pair, x))
        x = blk.local_conv(x.view(b, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, length, c)
        out = x + blk.drop_path(blk.mlp(x))
        if pair is not None:
            out = out + 0.5 * pair.mlp(blk.mlp.norm(x).view(b, h, w, c)).view(b, length, c)
        return out

    @staticmethod
    def _merge(merging: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """TinyViT's PatchMerging (1x1 conv, depthwise 3x3 conv, 1x1 conv) on (B, L, C) tokens or (B, C, h, w) maps
        -> (B, L', C') tokens, read back through a channels-last view (see :meth:`_block`)."""
        if x.ndim == 3:
            h, w = merging.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = merging.conv3(merging.act(merging.conv2(merging.act(merging.conv1(x)))))
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x: (G·D, 3, S, S) -> [neck (G·D, 256, S/4, S/4), stage-3 (G·D, 320, S/4, S/4), stage-1 (G·D, 128, S/2, S/2)]."""
        base = self.base
        x = base.patch_embed(x)
        if self.depth_embedding is not None:
            gd = x.shape[0]
            x = x + self.depth_embedding.repeat(gd // self.slab_depth, 1, 1).reshape(gd, -1, 1, 1)
        stem = base.layers[0]  # convolutional (MBConv) blocks on (G·D, C0, h0, w0) maps
        for blk in stem.blocks:
            x = blk(x)
        x = self._merge(stem.downsample, x)
        skip_fine = None
        for li, layer in enumerate(list(base.layers)[1:]):
            for bi, blk in enumerate(layer.blocks):
                pair = None if self.adapters is None else self.adapters[li][bi]
                x = self._block(blk, pair, x)
            if li == 0:
                h, w = layer.input_resolution
                skip_fine = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
            if layer.downsample is not None:
                x = self._merge(layer.downsample, x)
        h, w = base.layers[-1].input_resolution
        last = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        neck = base.neck(last)
        return [neck, last, skip_fine]
