"""The 3D convolutions that run as 2D convolutions (``masksam_core/model/conv.py``) compute exactly what
nn.Conv3d / nn.ConvTranspose3d compute, forward and backward, with the same state-dict keys."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from masksam_core.model.conv import Conv3d, ConvTranspose3d

CONV_CASES = [
    dict(in_channels=5, out_channels=7, kernel_size=3, padding=1),
    dict(in_channels=3, out_channels=4, kernel_size=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5, 3), padding=(1, 2, 1), bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=(5, 3, 3), padding=(2, 1, 1)),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=(1, 0, 0)),  # no in-plane padding
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),  # depthwise, as in the adapters
    dict(in_channels=5, out_channels=5, kernel_size=(3, 5, 3), padding=(1, 2, 0), groups=5, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=(5, 3, 3), padding=(2, 1, 1), groups=4),
    # outside the fast path: run PyTorch's own operator
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, stride=(1, 2, 2)),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=0),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="replicate"),
]


def _compare(ours: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    reference.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(reference.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), reference(xb)
    assert ya.shape == yb.shape
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(yb)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("kwargs", CONV_CASES)
@pytest.mark.parametrize("batch,depth", [(1, 4), (2, 3), (1, 1)])
def test_conv3d_equals_torch_forward_and_backward(kwargs, batch, depth):
    torch.manual_seed(0)
    ours, reference = Conv3d(**kwargs), nn.Conv3d(**kwargs)
    x = torch.randn(batch, kwargs["in_channels"], depth, 9, 10)
    try:
        reference(x)
    except RuntimeError:  # an input too thin for an unpadded kernel: ours refuses it as well
        with pytest.raises(RuntimeError):
            ours(x)
        return
    _compare(ours, reference, x)


def test_conv3d_reads_the_previous_conv3d_output_layout():
    """The fast path returns a transposed view; a following Conv3d and a norm still compute the right thing."""
    torch.manual_seed(0)
    ours = nn.Sequential(Conv3d(3, 6, 3, padding=1), nn.InstanceNorm3d(6, affine=True), nn.LeakyReLU(0.01, inplace=True),
                         Conv3d(6, 2, 3, padding=1))
    reference = nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.InstanceNorm3d(6, affine=True),
                              nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(6, 2, 3, padding=1))
    _compare(ours, reference, torch.randn(2, 3, 4, 12, 11))


def test_depthwise_conv3d_runs_channels_last_and_equals_torch():
    """Depthwise (the adapters') runs oneDNN's 3D depthwise kernel on a channels-last copy of any input layout."""
    torch.manual_seed(0)
    kwargs = dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8)
    x = torch.randn(2, 8, 4, 9, 10)
    ours, reference = Conv3d(**kwargs), nn.Conv3d(**kwargs)
    assert ours(x).is_contiguous(memory_format=torch.channels_last_3d)
    # in fp32 training on the CPU its gradients come from DepthwiseConv3dFunction's fast kernels
    assert type(ours(x).grad_fn).__name__ == "DepthwiseConv3dFunctionBackward"
    _compare(ours, reference, x)
    _compare(ours, reference, x.contiguous(memory_format=torch.channels_last_3d))


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=6, out_channels=4, kernel_size=(1, 2, 2), stride=(1, 2, 2)),
    dict(in_channels=3, out_channels=5, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
         output_padding=(0, 1, 1), bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=(2, 2, 2), stride=(2, 2, 2)),  # outside the fast path
])
def test_conv_transpose3d_equals_torch_forward_and_backward(kwargs):
    torch.manual_seed(0)
    ours = ConvTranspose3d(**kwargs)
    _compare(ours, nn.ConvTranspose3d(**kwargs), torch.randn(2, kwargs["in_channels"], 3, 7, 8))


def test_tracing_emits_the_plain_3d_operator():
    """Exporters (OpenVINO) see nn.Conv3d's own operator, not the 2D rewrite."""
    conv = Conv3d(3, 4, 3, padding=1).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    traced = torch.jit.trace(conv, x)
    graph = str(traced.inlined_graph)
    assert "aten::_convolution" in graph or "aten::conv3d" in graph
    assert "aten::conv2d" not in graph and "aten::unfold" not in graph
    torch.testing.assert_close(traced(x), conv(x))


def test_model_files_keep_their_keys():
    """The prompt generator's convolutions are the drop-in classes, so old model files load unchanged."""
    from masksam_core.model.prompt_generator import conv_block, up_block

    block, up = conv_block(4, 8), up_block(8, 4)
    assert isinstance(block[0], Conv3d) and isinstance(up[0], ConvTranspose3d)
    assert set(block.state_dict()) == set(nn.Sequential(nn.Conv3d(4, 8, 3, padding=1),
                                                        nn.InstanceNorm3d(8, affine=True)).state_dict())


@pytest.mark.parametrize("shape, size", [((2, 3, 4, 64, 64), 16), ((1, 2, 3, 128, 96), 2), ((1, 2, 2, 30, 30), 16)])
def test_prompt_generator_pool_equals_adaptive_average_pool(shape, size):
    """The prompt generator's block-mean pooling (divisible sizes) and its adaptive fallback give
    ``adaptive_avg_pool3d``'s values and gradients."""
    from masksam_core.model.prompt_generator import pool_to

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = pool_to(xa, size), nn.functional.adaptive_avg_pool3d(xb, (shape[2], size, size))
    assert ya.shape == yb.shape and torch.allclose(ya, yb, atol=1e-6)
    (ya * yb.detach()).sum().backward()
    (yb * yb.detach()).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)
