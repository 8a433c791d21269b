"""TinyViT's windowed self-attention on a channels-last token grid, with two layout changes instead of six.

TinyViT (LiteMedSAM's encoder) pads the (B, H, W, C) grid to whole windows, partitions it into windows
((B·nWin, ws·ws, C), a transpose), and its ``Attention`` splits the projected tokens into heads (three more
transposes, plus a split of the innermost axis), attends, merges the heads (a transpose) before the output
projection, and the windows are put back (a transpose). OpenVINO's performance counters put 16 % of the bf16
encoder's time in those transposes and 3 % in the split (on its reference kernel), on 2 CPU cores.

:func:`window_attention` computes the same function from the same modules with one transpose in and one out: the
LayerNorm and the qkv projection act on each token, so they run on the padded grid before any partition; one
permutation takes the projected grid straight to (q|k|v, windows, heads, tokens, channels), whose outer axis
splits for free; and one takes the attended values back to the grid, where the output projection, again per
token, runs on the unpadded tokens only. Padded tokens take part as keys and values exactly as in TinyViT (their
LayerNorm output is the norm's bias, as there). The attention scale multiplies the queries rather than the scores
(OpenVINO otherwise moved it onto the keys and then transposed them in a pass of their own); in float32 that
rounds differently, by about 1e-6 of the encoder's output range.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_bias(attn: nn.Module) -> torch.Tensor:
    """TinyViT ``Attention``'s relative-position bias (heads, N, N), in training and in eval mode alike."""
    return attn.attention_biases[:, attn.attention_bias_idxs]


def window_attention(attn: nn.Module, x: torch.Tensor, window_size: int) -> torch.Tensor:
    """TinyViT's windowed attention (pad, partition, ``attn``, reverse, crop) on channels-last tokens.

    Args:
        attn: a TinyViT ``Attention`` (``norm``, ``qkv``, ``proj``, ``num_heads``, ``key_dim``, ``d``, ``scale``
            and the relative-position bias) for windows of ``window_size`` ** 2 tokens.
        x: (B, H, W, C) tokens.

    Returns:
        (B, H, W, C): the attention output before TinyViT's residual add.
    """
    b, h, w, _ = x.shape
    ws = window_size
    pad_b, pad_r = (-h) % ws, (-w) % ws
    if pad_b or pad_r:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
    heads, kd, d = attn.num_heads, attn.key_dim, attn.d
    qkv = attn.qkv(attn.norm(x))  # (B, ph, pw, heads·(2·kd + d)), per head [q | k | v]
    if d == kd:  # LiteMedSAM's case: q, k and v on an outer axis (OpenVINO splits the innermost on a slow kernel)
        qkv = qkv.view(b, nh, ws, nw, ws, heads, 3, kd).permute(6, 0, 1, 3, 5, 2, 4, 7)
        q, k, v = qkv.reshape(3, b * nh * nw, heads, ws * ws, kd).unbind(0)
    else:
        qkv = qkv.view(b, nh, ws, nw, ws, heads, 2 * kd + d).permute(0, 1, 3, 5, 2, 4, 6)
        q, k, v = qkv.reshape(b * nh * nw, heads, ws * ws, 2 * kd + d).split([kd, kd, d], dim=-1)
    scores = (q * attn.scale) @ k.transpose(-2, -1) + attention_bias(attn)  # (B·nWin, heads, N, N)
    out = scores.softmax(dim=-1) @ v  # (B·nWin, heads, N, d)
    out = out.view(b, nh, nw, heads, ws, ws, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, nh * ws, nw * ws, heads * d)
    if pad_b or pad_r:
        out = out[:, :h, :w]
    return attn.proj(out)
