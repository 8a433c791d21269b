"""The 3D convolutions that run as 2D convolutions (``masksam_core/model/conv.py``) and the channels-last instance
norm (``masksam_core/model/norm.py``) compute exactly what nn.Conv3d / nn.ConvTranspose3d / nn.InstanceNorm3d
compute, forward and backward, with the same state-dict keys."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from masksam_core.model.conv import Conv3d, ConvTranspose3d
from masksam_core.model.norm import InstanceNorm3d

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


@pytest.mark.parametrize("norm", [InstanceNorm3d, nn.InstanceNorm3d])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv3d_reads_the_previous_conv3d_output_layout(norm, batch):
    """The fast path returns a channels-last-3D tensor; a following norm (ours keeps the layout, PyTorch's copies
    it) and Conv3d still compute the right thing, values and gradients."""
    torch.manual_seed(0)
    ours = nn.Sequential(Conv3d(3, 6, 3, padding=1), norm(6, affine=True), nn.LeakyReLU(0.01, inplace=True),
                         Conv3d(6, 2, 3, padding=1))
    reference = nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.InstanceNorm3d(6, affine=True),
                              nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(6, 2, 3, padding=1))
    _compare(ours, reference, torch.randn(batch, 3, 4, 12, 11))


def test_conv3d_runs_per_depth_tap_channels_last():
    """A 3x3x3 convolution runs as DepthTapConv3dFunction (per-tap 2D convolutions and their backward) and returns
    channels-last-3D; a kernel deeper than the input leaves the unreached taps' gradients zero."""
    torch.manual_seed(0)
    conv = Conv3d(4, 5, 3, padding=1)
    y = conv(torch.randn(1, 4, 3, 8, 8))
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert type(y.grad_fn).__name__ == "DepthTapConv3dFunctionBackward"
    deep = Conv3d(2, 3, (5, 3, 3), padding=(2, 1, 1))
    deep(torch.randn(1, 2, 2, 6, 6)).sum().backward()  # taps 0 and 4 reach no slice of a 2-slice input
    assert deep.weight.grad[:, :, [0, 4]].abs().max() == 0 and deep.weight.grad[:, :, 1:4].abs().max() > 0


def test_conv3d_under_bf16_autocast_equals_torch():
    """Under autocast the per-tap path casts as autocast casts a convolution: bf16 output, fp32 parameter
    gradients, the values of nn.Conv3d under the same autocast."""
    torch.manual_seed(0)
    ours, reference = Conv3d(5, 7, 3, padding=1), nn.Conv3d(5, 7, 3, padding=1)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 4, 9, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ours(x), reference(x)
    assert ya.dtype == yb.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), yb.float(), rtol=2e-2, atol=2e-2)
    ya.float().sum().backward()
    yb.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=2e-2, atol=2e-1)


def _graph_names(fn, depth: int) -> set:
    """Names of the autograd nodes within ``depth`` steps of ``fn``."""
    names = {type(fn).__name__}
    if depth > 0:
        for nxt, _ in fn.next_functions:
            if nxt is not None:
                names |= _graph_names(nxt, depth - 1)
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.channels_last_3d, torch.contiguous_format])
def test_instance_norm_equals_torch(dtype, layout):
    """InstanceNorm3d gives nn.InstanceNorm3d's values and gradients (input, weight, bias) for channels-last
    inputs (its own path, which keeps the layout) and others (PyTorch's path)."""
    torch.manual_seed(0)
    ours, reference = InstanceNorm3d(6, affine=True).to(dtype), nn.InstanceNorm3d(6, affine=True).to(dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.uniform_(-1.0, 1.0)
    reference.load_state_dict(ours.state_dict())
    x = (torch.randn(2, 6, 3, 7, 9, dtype=dtype) * 4 + 3).contiguous(memory_format=layout)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), reference(xb)
    if layout == torch.channels_last_3d:
        assert ya.is_contiguous(memory_format=torch.channels_last_3d)
        assert "ChannelsLastInstanceNormFunctionBackward" in _graph_names(ya.grad_fn, depth=3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ya, yb, **tol)
    grad = torch.randn(yb.shape, dtype=dtype)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, **tol)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, **tol)


def test_instance_norm_is_as_precise_as_torch_on_large_channels_last_inputs():
    """On a prompt-generator-sized channels-last input, the fp32 output stays as close to fp64 as PyTorch's own
    instance norm (PyTorch's channels-last group_norm was 1.7e-4 off at this size)."""
    torch.manual_seed(0)
    x = (torch.randn(1, 16, 4, 128, 128) * 3 + 5).contiguous(memory_format=torch.channels_last_3d)
    norm = InstanceNorm3d(16, affine=True)
    exact = nn.functional.instance_norm(x.double())
    with torch.no_grad():
        ours = norm(x).double()
        torch_own = nn.functional.instance_norm(x.contiguous()).double()
    assert (ours - exact).abs().max() <= max(2 * (torch_own - exact).abs().max().item(), 1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # nn.InstanceNorm3d's own shape checks
def test_instance_norm_traces_as_torch_instance_norm():
    """Exporters (OpenVINO) see PyTorch's own instance norm."""
    norm = InstanceNorm3d(4, affine=True).eval()
    x = torch.randn(1, 4, 3, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    traced = torch.jit.trace(norm, x)
    assert "instance_norm" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), norm(x))


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
    assert isinstance(block[1], InstanceNorm3d)
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
