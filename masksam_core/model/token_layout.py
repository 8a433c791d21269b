"""SAM's decoder-side operations written for channels-last tokens, with no large transposes.

SAM's modules compute attention head by head ((B, heads, N, C/heads) after a transpose of the whole token
sequence) and upscale with ``ConvTranspose2d`` on channels-first maps. On the 4096 image tokens of a 64 x 64
embedding those transposes, and a softmax over the 8 prompt tokens as the innermost axis, took over half of
OpenVINO's bf16 decoder time on 2 CPU cores (measured per operation with OpenVINO's performance counters). The
functions here compute the same values (to float rounding; tested against SAM's modules) from the same
weights, keeping every large tensor as (B, N, C):

- :func:`attend`: multi-head attention where one side is short (the decoder's prompt tokens): that side is
  spread into a block-diagonal matrix (one row block per head), so that each head's products become one plain
  matrix product over all channels (the off-head blocks are zero) and the long side is never split into heads;
- :func:`upscale_masks`: ``output_upscaling`` (two 2 x 2, stride-2 transposed convolutions, LayerNorm, GELU) as
  linear layers on tokens, with the 4 x 4 sub-pixel layout kept in separate axes until the final one-channel
  mask, followed by the hypernetwork's dot product;
- :func:`embed_masks`: the prompt encoder's ``mask_downscaling`` (two 2 x 2, stride-2 convolutions and a 1 x 1
  one) as linear layers on 2 x 2 patches, giving the dense prompt embedding as tokens.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """Channels-first maps (P, E, h, w) -> tokens (P, h·w, E), row-major over (h, w)."""
    return x.flatten(2).transpose(1, 2)


def _block_diagonal(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, heads·T, C): row (h, t) holds x[:, t] on head h's C/heads channels and zeros elsewhere."""
    b, t, c = x.shape
    eye = torch.eye(heads, dtype=x.dtype, device=x.device).view(1, heads, 1, heads, 1)
    return (x.view(b, 1, t, heads, c // heads) * eye).reshape(b, heads * t, c)


def attend(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention(q, k, v)`` (same weights, same values) for (B, Nq, E), (B, Nk, E), (B, Nk, E) -> (B, Nq, E).

    The shorter of the two sides (queries or keys) is made block-diagonal over heads, so the longer side keeps its
    (B, N, C) layout throughout. The extra multiplications by zero cost heads x the short side's share of the
    attention products, which is small next to the projections when the short side has a few tokens.
    """
    heads = attention.num_heads
    q, k, v = attention.q_proj(q), attention.k_proj(k), attention.v_proj(v)
    b, nq, c = q.shape
    nk = k.shape[1]
    scale = 1.0 / math.sqrt(c // heads)
    if nq <= nk:  # few queries attend to many keys: queries block-diagonal, softmax over the long key axis
        qbd = _block_diagonal(q * scale, heads)  # (B, heads·Nq, C); scaled here so that K is never rewritten
        attn = torch.softmax(qbd @ k.transpose(1, 2), dim=-1)  # (B, heads·Nq, Nk)
        per_head = (attn @ v).view(b, heads, nq, heads, c // heads)  # row head x channel head
        eye = torch.eye(heads, dtype=per_head.dtype, device=per_head.device).view(1, heads, 1, heads, 1)
        out = (per_head * eye).sum(dim=1).reshape(b, nq, c)
    else:  # many queries attend to few keys: keys and values block-diagonal, softmax over the short key axis
        kbd = _block_diagonal(k * scale, heads)  # (B, heads·Nk, C)
        logits = (kbd @ q.transpose(1, 2)).view(b, heads, nk, nq)  # queries innermost: a vectorised softmax
        attn = torch.softmax(logits, dim=2).view(b, heads * nk, nq)
        out = attn.transpose(1, 2) @ _block_diagonal(v, heads)  # (B, Nq, C)
    return attention.out_proj(out)


def _patch_linear_weight(conv: nn.Module) -> torch.Tensor:
    """A 2 x 2 stride-2 ``Conv2d`` (out, in, 2, 2) as a linear weight (out, (a, b, in)) on 2 x 2 patches."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)


def _check_kernel(conv: nn.Module, kernel: Tuple[int, int], what: str) -> None:
    if tuple(conv.kernel_size) != kernel or tuple(conv.stride) != kernel:
        raise ValueError(f"{what}: expected kernel and stride {kernel}, got {conv.kernel_size}, {conv.stride}")


def embed_masks(mask_downscaling: nn.Sequential, masks: torch.Tensor) -> torch.Tensor:
    """The prompt encoder's dense embedding of mask prompts, as tokens.

    mask_downscaling: SAM's ``[Conv2d 2x2/2, LayerNorm2d, GELU, Conv2d 2x2/2, LayerNorm2d, GELU, Conv2d 1x1]``.
    masks: (P, 4h, 4w). Returns (P, h·w, E), row-major over (h, w): ``mask_downscaling(masks[:, None])`` flattened
    channels-last.
    """
    conv1, norm1, act1, conv2, norm2, act2, conv3 = mask_downscaling
    _check_kernel(conv1, (2, 2), "mask_downscaling[0]")
    _check_kernel(conv2, (2, 2), "mask_downscaling[3]")
    p, mh, mw = masks.shape
    h, w = mh // 4, mw // 4
    # pixel (4i + 2a1 + a2, 4j + 2b1 + b2) -> (i, a1, a2, j, b1, b2) -> patches of the two stride-2 convolutions
    x = masks.reshape(p, h, 2, 2, w, 2, 2).permute(0, 1, 4, 2, 5, 3, 6).reshape(p, h, w, 2, 2, 4)
    x = act1(F.layer_norm(F.linear(x, _patch_linear_weight(conv1), conv1.bias), (conv1.out_channels,),
                          norm1.weight, norm1.bias, norm1.eps))  # (P, h, w, a1, b1, C1)
    x = act2(F.layer_norm(F.linear(x.reshape(p, h, w, -1), _patch_linear_weight(conv2), conv2.bias),
                          (conv2.out_channels,), norm2.weight, norm2.bias, norm2.eps))  # (P, h, w, C2)
    x = F.linear(x, conv3.weight.flatten(1), conv3.bias)
    return x.reshape(p, h * w, -1)


def _transposed_linear_weight(conv: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 2 x 2 stride-2 ``ConvTranspose2d`` (in, out, 2, 2) as a linear layer in -> ((a, b), out) and its bias."""
    _check_kernel(conv, (2, 2), "output_upscaling")
    weight = conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.in_channels)  # ((a, b, out), in)
    return weight, conv.bias.repeat(4)


def upscale_masks(output_upscaling: nn.Sequential, keys: torch.Tensor, hyper: torch.Tensor,
                  grid: Tuple[int, int]) -> torch.Tensor:
    """SAM's mask head: ``hyper · output_upscaling(keys)`` at 4x the embedding grid.

    output_upscaling: ``[ConvTranspose2d 2x2/2, LayerNorm2d, GELU, ConvTranspose2d 2x2/2, GELU]``.
    keys: (P, h·w, E) image tokens; hyper: (P, C2) the hypernetwork's output for the mask token; grid: (h, w).
    Returns mask logits (P, 1, 4h, 4w).
    """
    up1, norm, act1, up2, act2 = output_upscaling
    p = keys.shape[0]
    h, w = grid
    w1, b1 = _transposed_linear_weight(up1)
    w2, b2 = _transposed_linear_weight(up2)
    x = F.linear(keys, w1, b1).view(p, h, w, 2, 2, up1.out_channels)  # (P, i, j, a1, b1, C1)
    x = act1(F.layer_norm(x, (up1.out_channels,), norm.weight, norm.bias, norm.eps))
    x = act2(F.linear(x, w2, b2))  # (P, i, j, a1, b1, (a2, b2, C2))
    x = x.reshape(p, -1, up2.out_channels)
    masks = (x @ hyper.unsqueeze(-1)).view(p, h, w, 2, 2, 2, 2)  # (P, i, j, a1, b1, a2, b2)
    return masks.permute(0, 1, 3, 5, 2, 4, 6).reshape(p, 1, 4 * h, 4 * w)
