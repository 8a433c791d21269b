"""3D convolutions computed as 2D convolutions, because PyTorch's CPU backend runs this model's Conv3d slowly.

At batch 1, PyTorch sends many of the model's Conv3d shapes to its reference kernel ``slow_conv3d`` (for example
(1, 16, 4, 256, 256) with 16 -> 16 channels: about 10 GFLOP/s on 2 cores), and the 3D backward is slow even
where the forward uses oneDNN. A k_d x k_h x k_w convolution with stride 1 and "same" depth padding is a sum over
its k_d depth taps of 2D k_h x k_w convolutions of the slices, each tap's output landing on the slices it reaches.
:class:`DepthTapConv3dFunction` computes it that way on channels-last slices (oneDNN's fast 2D layout; the output
is channels-last-3D, which the next convolution and :class:`~masksam_core.model.norm.InstanceNorm3d` read in
place), and its backward as one 2D ``convolution_backward`` per tap accumulated in place.

History, measured on 2 cores: the first rewrite stacked the k_d depth-shifted copies of the input along channels
for one 2D convolution (forward + backward of the example 1019 -> 225 ms; a prompt-generator training step on
cached features 3.05 -> 1.80 s, 2-core AVX2 EPYC), but the stacked copy, its gradient (``unfold_backward``) and the
copies between layouts around each ``nn.InstanceNorm3d`` cost a third of the prompt generator's time. Per tap and
channels-last, with the norm in place: prompt-generator forward + backward on one slab of 4 slices 1.58-1.72 ->
1.02-1.12 s (2-core AVX-512 EPYC, old and new alternated), the same outputs to fp32 rounding.

:class:`Conv3d` and :class:`ConvTranspose3d` have exactly the parameters and state-dict keys of ``nn.Conv3d``
and ``nn.ConvTranspose3d``, so model files do not change. Configurations outside the fast path (strides,
dilations, non-zero padding modes; groups for the transposed convolution) run PyTorch's own 3D operator. While
being traced for export (OpenVINO), they also emit the plain 3D operator, which graph compilers already run well.

Depthwise 3D convolutions (the adapters') are the exception: oneDNN's own depthwise 3D kernel on a channels-last
input beats the 2D forms. :class:`Conv3d` runs them that way (adapter forward + backward on 20 decoder items
0.81 -> 0.53 s; the convolution alone at (5, 64, 4, 64, 64): 458 -> 199 ms). Its backward, however, is slow
where its forward is fast: at (8, 64, 4, 64, 64) on 2 cores, forward 14 ms, backward 280 ms (input gradient 90 ms,
weight gradient 170 ms, bias gradient 190 ms, each measured alone). :class:`DepthwiseConv3dFunction` computes the
same gradients from fast kernels: the input gradient as the forward depthwise convolution of the output gradient
with the flipped kernel (12 ms), the weight gradient as one 2D depthwise weight gradient per depth tap (about 6 ms
each), the bias gradient as a sum. It is used on the CPU in fp32 training (no autocast), where the decoder's two
depthwise adapters took about 0.6 s of an 8-s training step.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class DepthwiseConv3dFunction(torch.autograd.Function):
    """A depthwise, stride-1 3D convolution (oneDNN's kernel, channels-last) whose backward uses fast kernels.

    Inputs: x (N, C, D, H, W) laid out channels-last (``torch.channels_last_3d``), weight (C, 1, kd, kh, kw),
    bias (C,) or None, padding (pd, ph, pw) with p <= k - 1. Output (N, C, D', H', W') channels-last, as
    ``F.conv3d(x, weight, bias, padding=padding, groups=C)``. Gradients equal PyTorch's to float rounding.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                padding: Tuple[int, int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = tuple(padding)
        return F.conv3d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        c = x.shape[1]
        kd, kh, kw = weight.shape[2:]
        pd, ph, pw = ctx.padding
        grad_out = grad_out.contiguous(memory_format=torch.channels_last_3d)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # a stride-1 convolution's transpose is the convolution with the flipped kernel
            grad_x = F.conv3d(grad_out, weight.flip(2, 3, 4), None, padding=(kd - 1 - pd, kh - 1 - ph, kw - 1 - pw),
                              groups=c)
        if ctx.needs_input_grad[1]:
            grad_w = _depthwise_weight_grad(x, grad_out, weight, ctx.padding)
        if ctx.needs_input_grad[2]:  # False when there is no bias
            grad_b = grad_out.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


def _depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
                           padding: Tuple[int, int, int]) -> torch.Tensor:
    """The weight gradient (C, 1, kd, kh, kw) of a stride-1 depthwise 3D convolution: for each depth tap a, the 2D
    depthwise weight gradient of the output slices d paired with the input slices d + a - pd (channels-last).

    :meth:`DepthTapConv3dFunction.backward` computes the same per-tap weight gradients on each tap's unpadded slice
    range, which is a view only at N = 1 (the prompt generator); here the input is padded once, because the
    adapters run at N > 1, where per-tap slice ranges would be copied twice per tap."""
    n, c, d_out = grad_out.shape[:3]
    kd = weight.shape[2]
    pd, ph, pw = padding
    x_slices = F.pad(x.permute(0, 2, 3, 4, 1), (0, 0, 0, 0, 0, 0, pd, pd))  # (N, D + 2 pd, H, W, C)
    g_slices = grad_out.permute(0, 2, 3, 4, 1)  # (N, D', H', W', C)
    ga = g_slices.reshape(n * d_out, *g_slices.shape[2:]).permute(0, 3, 1, 2)  # the same for every tap
    taps = []
    for a in range(kd):
        xa = x_slices[:, a:a + d_out].reshape(n * d_out, *x_slices.shape[2:]).permute(0, 3, 1, 2)
        taps.append(torch.ops.aten.convolution_backward(
            ga, xa, weight[:, :, a], None, [1, 1], [ph, pw], [1, 1], False, [0, 0], c, [False, True, False])[1])
    return torch.stack(taps, dim=2)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` whose stride-1, same-depth-padded case runs as 2D convolutions per depth tap
    (:class:`DepthTapConv3dFunction`, grouped or not), or, when depthwise, as oneDNN's 3D depthwise kernel; both on
    a channels-last input.

    Input (N, C_in, D, H, W) -> output (N, C_out, D, H', W'), as ``nn.Conv3d``; the fast paths' output is
    channels-last-3D (memory (N, D, H', W', C_out)), which the next :class:`Conv3d` reads without a copy. Under
    autocast the per-tap path casts its input and parameters to the autocast dtype, as autocast casts a
    convolution.
    """

    def _per_tap(self) -> bool:
        kd = self.kernel_size[0]
        return (self.stride == (1, 1, 1) and self.dilation == (1, 1, 1) and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple) and kd % 2 == 1 and self.padding[0] == kd // 2)

    def _depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tracing() or not self._per_tap():
            return super().forward(x)
        if self._depthwise():  # the output keeps the channels-last layout
            x = x.contiguous(memory_format=torch.channels_last_3d)
            if (x.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                    and all(p <= k - 1 for p, k in zip(self.padding, self.kernel_size))):
                return DepthwiseConv3dFunction.apply(x, self.weight, self.bias, self.padding)
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # cast as autocast casts a convolution, then run unautocast
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(x.device.type, enabled=False):
            return DepthTapConv3dFunction.apply(x, weight, bias, self.padding[1:], self.groups)


def _tap_ranges(depth: int, kd: int) -> List[Tuple[int, int, int, int]]:
    """For each depth tap a of a "same"-padded kernel of odd depth kd: (a, first output slice, end, input shift),
    output slice k reading input slice k + shift; the centre tap first, taps that reach no slice left out."""
    centre = kd // 2
    ranges = [(centre, 0, depth, 0)]
    for tap in range(kd):
        shift = tap - centre
        if tap != centre and abs(shift) < depth:
            ranges.append((tap, max(0, -shift), depth - max(0, shift), shift))
    return ranges


def _slice_batch(slices: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """(N, D, C, H, W) channels-last slices -> slices first..end-1 as a (N·(end-first), C, H, W) batch (a view
    when N = 1)."""
    return slices[:, first:end].reshape(-1, *slices.shape[2:])


class DepthTapConv3dFunction(torch.autograd.Function):
    """A stride-1 3D convolution with "same" depth padding (odd kd) as one 2D convolution per depth tap over
    channels-last slices, each tap's output added onto the slices it reaches; its backward is one 2D
    ``convolution_backward`` per tap, accumulated in place (autograd's slicing of the same computation zero-filled
    and copied full-size gradients for each tap).

    Inputs: x (N, C_in, D, H, W) channels-last-3D, weight (C_out, C_in/groups, kd, kh, kw), bias (C_out,) or
    None, padding_hw (ph, pw), groups. Output (N, C_out, D, H', W') channels-last-3D, as ``F.conv3d(x, weight,
    bias, padding=(kd // 2, ph, pw), groups=groups)``. No depth-stacked copy of the input is made.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                padding_hw: Tuple[int, int], groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (tuple(padding_hw), groups)
        n, d = x.shape[0], x.shape[2]
        slices = x.transpose(1, 2)  # (N, D, C_in, H, W), channels-last slices
        out = None
        for tap, first, end, shift in _tap_ranges(d, weight.shape[2]):
            part = F.conv2d(_slice_batch(slices, first + shift, end + shift), weight[:, :, tap],
                            bias if out is None else None, padding=padding_hw, groups=groups)
            part = part.reshape(n, end - first, *part.shape[1:])  # (N, D_tap, C_out, H', W')
            if out is None:
                out = part
            else:
                out[:, first:end] += part
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        padding_hw, groups = ctx.conf
        n, d = x.shape[0], x.shape[2]
        kd = weight.shape[2]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_slices = grad_out.contiguous(memory_format=torch.channels_last_3d).transpose(1, 2)
        slices = x.transpose(1, 2)
        grad_x = None
        grad_taps = [torch.zeros_like(weight[:, :, 0])] * kd if need_w else None
        for tap, first, end, shift in _tap_ranges(d, kd):
            gx, gw, _ = torch.ops.aten.convolution_backward(
                _slice_batch(grad_slices, first, end), _slice_batch(slices, first + shift, end + shift),
                weight[:, :, tap], None, [1, 1], list(padding_hw), [1, 1], False, [0, 0], groups,
                [need_x, need_w, False])
            if need_x:
                gx = gx.reshape(n, end - first, *gx.shape[1:])
                if grad_x is None:
                    grad_x = gx
                else:
                    grad_x[:, first + shift:end + shift] += gx
            if need_w:
                grad_taps[tap] = gw
        grad_w = torch.stack(grad_taps, dim=2) if need_w else None
        grad_b = grad_out.sum(dim=(0, 2, 3, 4)) if need_b else None
        return grad_x.transpose(1, 2) if need_x else None, grad_w, grad_b, None, None


class ConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` whose in-plane case (depth kernel and stride 1, no depth padding, no groups) runs
    as one 2D transposed convolution over the N·D slices. (N, C_in, D, H, W) -> (N, C_out, D, H', W')."""

    def _per_slice(self) -> bool:
        return (self.groups == 1 and self.kernel_size[0] == 1 and self.stride[0] == 1 and self.padding[0] == 0
                and self.output_padding[0] == 0 and self.dilation == (1, 1, 1) and self.padding_mode == "zeros")

    def forward(self, x: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        if _tracing() or output_size is not None or not self._per_slice():
            return super().forward(x, output_size)
        n, c, d, h, w = x.shape
        slices = x.transpose(1, 2).reshape(n * d, c, h, w)
        out = F.conv_transpose2d(slices, self.weight[:, :, 0], self.bias, stride=self.stride[1:],
                                 padding=self.padding[1:], output_padding=self.output_padding[1:])
        return out.reshape(n, d, *out.shape[1:]).transpose(1, 2)
