"""3D convolutions computed as 2D convolutions, because PyTorch's CPU backend runs this model's Conv3d slowly.

At batch 1, PyTorch sends many of the model's Conv3d shapes to its reference kernel ``slow_conv3d`` (for example
(1, 16, 4, 256, 256) with 16 -> 16 channels: about 10 GFLOP/s on 2 cores), and the 3D backward is slow even
where the forward uses oneDNN. A k_d x k_h x k_w convolution with stride 1 and "same" depth padding equals one
2D k_h x k_w convolution over the k_d depth-shifted copies of the input stacked along channels, which oneDNN
runs 4-5x faster: forward + backward of that example 1019 -> 225 ms, and a prompt-generator training step on cached
features 3.05 -> 1.80 s (2-core AVX2 EPYC). The stacked input costs k_d times the input's memory for the duration
of the call.

:class:`Conv3d` and :class:`ConvTranspose3d` have exactly the parameters and state-dict keys of ``nn.Conv3d``
and ``nn.ConvTranspose3d``, so model files do not change. Configurations outside the fast path (strides,
dilations, non-zero padding modes; groups for the transposed convolution) run PyTorch's own 3D operator. While
being traced for export (OpenVINO), they also emit the plain 3D operator, which graph compilers already run well.

Depthwise 3D convolutions (the adapters') are the exception: oneDNN's own depthwise 3D kernel on a channels-last
input beats the stacked 2D form. :class:`Conv3d` runs them that way (adapter forward + backward on 20 decoder items
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
    depthwise weight gradient of the output slices d paired with the input slices d + a - pd (channels-last)."""
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
    """``nn.Conv3d`` whose stride-1, same-depth-padded case runs as one 2D convolution (grouped or not), or, when
    depthwise, as oneDNN's 3D depthwise kernel on a channels-last input (output channels-last too).

    Input (N, C_in, D, H, W) -> output (N, C_out, D, H', W'), as ``nn.Conv3d``. The output of the fast path is
    a (N, C_out, D, H', W') view of a (N, D, C_out, H', W') tensor; the next :class:`Conv3d` reads it without a
    copy.
    """

    def _stackable(self) -> bool:
        kd = self.kernel_size[0]
        return (self.stride == (1, 1, 1) and self.dilation == (1, 1, 1) and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple) and kd % 2 == 1 and self.padding[0] == kd // 2)

    def _depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tracing() or not self._stackable():
            return super().forward(x)
        if self._depthwise():  # the output keeps the channels-last layout
            x = x.contiguous(memory_format=torch.channels_last_3d)
            if (x.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                    and all(p <= k - 1 for p, k in zip(self.padding, self.kernel_size))):
                return DepthwiseConv3dFunction.apply(x, self.weight, self.bias, self.padding)
            return super().forward(x)
        n, c, d, h, w = x.shape
        kd, pd = self.kernel_size[0], self.padding[0]
        slices = x.transpose(1, 2)  # (N, D, C_in, H, W); contiguous when x came from a Conv3d here
        if kd == 1:
            stacked = slices
        else:  # channel-major stack (C_in, kd), so that each group's input channels stay together
            padded = F.pad(slices, (0, 0, 0, 0, 0, 0, pd, pd))  # (N, D + 2 pd, C_in, H, W)
            stacked = padded.unfold(1, kd, 1).permute(0, 1, 2, 5, 3, 4)  # (N, D, C_in, kd, H, W) view
        # (C_out, C_in/g, kd, kh, kw) -> (C_out, C_in/g · kd, kh, kw), matching the channel-major stack
        weight_2d = self.weight.reshape(self.weight.shape[0], -1, *self.kernel_size[1:])
        out = F.conv2d(stacked.reshape(n * d, c * kd, h, w), weight_2d, self.bias, padding=self.padding[1:],
                       groups=self.groups)
        return out.reshape(n, d, *out.shape[1:]).transpose(1, 2)


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
