"""The transposed layers against PyTorch's grouped transposed convolution with tied banks."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from conftest import KERNELS, SIZES, assert_drawn_like, cuda
from torch import nn
from torch.nn import init

from sharedconv.transposed import (
    SharedConvTranspose1d,
    SharedConvTranspose2d,
    SharedConvTranspose3d,
)

SHARED_T = {1: SharedConvTranspose1d, 2: SharedConvTranspose2d, 3: SharedConvTranspose3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
# Small inputs: a transposed convolution makes its output larger than its input.
T_SIZES = {1: (7,), 2: (5, 4), 3: (4, 3, 3)}
PADDINGS = {1: [0, (2,)], 2: [0, (1, 2)], 3: [0, (2, 1, 0)]}
OUTPUT_PADDINGS = {1: [0, 1], 2: [0, 1, (1, 0)], 3: [0, 1, (0, 1, 0)]}
TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread, so a busy machine's thread pool cannot dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tied_conv_transpose(layer) -> nn.Module:
    """The plain grouped ``nn.ConvTransposeNd`` whose G banks are copies of ``layer``'s bank.

    Built independently of ``layer.to_conv`` (which is itself under test): its weight
    ``(G * D, F, *k)`` is G copies of the ``(D, F, *k)`` bank stacked along dim 0.
    """
    n, g = layer._dim, layer.groups
    conv = CONV_T[n](
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        output_padding=layer.output_padding,
        groups=g,
        bias=layer.bias is not None,
        dilation=layer.dilation,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.cat([layer.weight] * g, dim=0))
        if layer.bias is not None:
            conv.bias.copy_(torch.cat([layer.bias] * g, dim=0))
    return conv


def assert_matches_tied(layer, x, output_size=None, **tol) -> None:
    """Output and all gradients of ``layer`` equal those of the tied grouped transposed conv.

    The shared weight's gradient must be the sum of the G weight blocks' gradients (dim 0
    of nn's weight), the shared bias's the sum of the G bias chunks' gradients.
    """
    tol = tol or TOL
    layer.zero_grad(set_to_none=True)
    conv = tied_conv_transpose(layer)
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y1, y2 = layer(x1, output_size), conv(x2, output_size)
    assert y1.shape == y2.shape
    torch.testing.assert_close(y1, y2, **tol)
    g = torch.randn_like(y2)  # every output element weighs differently
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    G = layer.groups
    torch.testing.assert_close(layer.weight.grad, conv.weight.grad.unflatten(0, (G, -1)).sum(0),
                               **tol)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, conv.bias.grad.view(G, -1).sum(0), **tol)


def _valid_output_padding(op, stride, dilation, n):
    ops = (op,) * n if isinstance(op, int) else op
    return all(o < stride or o < dilation for o in ops)


def _grid():
    for dim in (1, 2, 3):
        for stride, padding, op, dilation, G, bias in itertools.product(
            (1, 2), PADDINGS[dim], OUTPUT_PADDINGS[dim], (1, 2), (1, 3), (True, False)
        ):
            if not _valid_output_padding(op, stride, dilation, dim):
                continue  # refused by nn and by the layer: tested below
            yield dim, stride, padding, op, dilation, G, bias


GRID = list(_grid())


def _case_id(case):
    dim, stride, padding, op, dilation, G, bias = case
    return f"{dim}d-s{stride}-p{padding}-op{op}-d{dilation}-G{G}-b{int(bias)}"


def _layer(case, D=2, F_out=3, **factory):
    dim, stride, padding, op, dilation, G, bias = case
    return SHARED_T[dim](
        G * D, G * F_out, KERNELS[dim], stride=stride, padding=padding, output_padding=op,
        groups=G, bias=bias, dilation=dilation, dtype=torch.float64, **factory,
    )


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_equals_tied_grouped_conv_transpose(case):
    torch.manual_seed(len(GRID))
    layer = _layer(case)
    x = torch.randn(2, layer.in_channels, *T_SIZES[case[0]], dtype=torch.float64)
    assert_matches_tied(layer, x)


def test_grid_covers_the_requested_axes():
    axes = list(zip(*GRID, strict=True))
    assert set(axes[0]) == {1, 2, 3}
    assert set(axes[1]) == {1, 2}  # stride
    assert {type(p) for p in axes[2]} == {int, tuple}  # padding
    assert {0, 1} <= set(axes[3]) and any(isinstance(op, tuple) for op in axes[3])
    assert set(axes[4]) == {1, 2}  # dilation
    assert set(axes[5]) == {1, 3} and set(axes[6]) == {True, False}  # groups, bias


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_unbatched_input(dim):
    torch.manual_seed(0)
    layer = SHARED_T[dim](6, 4, KERNELS[dim], stride=2, padding=1, output_padding=1, groups=2,
                          dtype=torch.float64)
    x = torch.randn(6, *T_SIZES[dim], dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, layer(x[None])[0], **TOL)
    assert_matches_tied(layer, x)  # nn.ConvTransposeNd accepts it the same way


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("batched", [True, False])
def test_output_size_as_nn(dim, batched):
    torch.manual_seed(1)
    layer = SHARED_T[dim](6, 9, KERNELS[dim], stride=3, padding=1, groups=3,
                          dtype=torch.float64)
    x = torch.randn(2, 6, *T_SIZES[dim], dtype=torch.float64)
    x = x if batched else x[0]
    smallest = layer(x).shape[-dim:]
    for extra in (0, 1, 2):  # every size the stride allows
        spatial = [s + extra for s in smallest]
        assert_matches_tied(layer, x, spatial)
        assert layer(x, spatial).shape[-dim:] == tuple(spatial)
        # with leading batch/channel sizes, which are ignored (e.g. a skip tensor's shape)
        full = torch.Size([5, 17][: 2 if batched else 1] + spatial)
        assert_matches_tied(layer, x, full)


@pytest.mark.parametrize(
    "output_size,exc,fragments",
    [
        ([30], ValueError, ["output size of (30,)", "from (19,) to (21,)", "(7,)"]),
        ([18], ValueError, ["(18,)", "from (19,) to (21,)"]),
        ([1, 2, 3, 4], ValueError, ["output_size must have 1 or 3 elements", "got 4"]),
        (20, TypeError, ["output_size", "list or tuple", "int"]),
        ("20", TypeError, ["output_size", "str"]),
        ([20.0], TypeError, ["output_size must contain ints", "float"]),
    ],
)
def test_output_size_errors(output_size, exc, fragments):
    layer = SharedConvTranspose1d(6, 9, 3, stride=3, padding=1, groups=3)
    x = torch.randn(2, 6, 7)
    assert layer(x).shape[-1] == 19
    with pytest.raises(exc) as info:
        layer(x, output_size)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_gradcheck_and_gradgradcheck(dim):
    torch.manual_seed(2)
    layer = SHARED_T[dim](4, 4, KERNELS[dim], stride=2, padding=1, output_padding=1,
                          dilation=1, groups=2, dtype=torch.float64)
    size = {1: (4,), 2: (3, 2), 3: (2, 2, 2)}[dim]
    x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def fn(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_to_conv_is_the_tied_grouped_conv_transpose(dim):
    torch.manual_seed(3)
    layer = SHARED_T[dim](6, 9, KERNELS[dim], stride=2, padding=1, output_padding=1,
                          dilation=2, groups=3, dtype=torch.float64)
    conv = layer.to_conv()
    reference = tied_conv_transpose(layer)
    assert type(conv) is CONV_T[dim]
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                 "output_padding", "dilation", "groups", "padding_mode"):
        assert getattr(conv, attr) == getattr(reference, attr), attr
    assert conv.weight.shape == (6, 3, *KERNELS[dim])
    assert torch.equal(conv.weight, reference.weight)
    assert torch.equal(conv.bias, reference.bias)
    assert conv.weight.dtype == torch.float64
    x = torch.randn(2, 6, *T_SIZES[dim], dtype=torch.float64)
    torch.testing.assert_close(conv(x), layer(x), **TOL)
    # a snapshot: its parameters are its own
    with torch.no_grad():
        conv.weight.zero_()
    assert layer.weight.abs().sum() > 0
    assert layer.to_conv().bias is not None
    no_bias = SHARED_T[dim](6, 9, KERNELS[dim], groups=3, bias=False)
    assert no_bias.to_conv().bias is None


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_initialisation_matches_nn_conv_transpose(dim):
    """Same distribution as nn.ConvTransposeNd: U(-b, b) with b = 1/sqrt(F * prod(k))."""
    torch.manual_seed(0)
    G, D, F_out = 4, 6, 64  # D != F: a forward convolution's fan-in (D * prod(k)) would fail
    k = {1: (9,), 2: (3, 3), 3: (3, 3, 1)}[dim]
    layer = SHARED_T[dim](G * D, G * F_out, k, groups=G)
    conv = CONV_T[dim](G * D, G * F_out, k, groups=G)
    assert layer.weight.shape == (D, F_out, *k) and conv.weight.shape == (G * D, F_out, *k)
    # the bound computed both ways: by hand, and from nn's weight as nn computes it
    bound = 1 / math.sqrt(F_out * math.prod(k))
    nn_fan_in, _ = init._calculate_fan_in_and_fan_out(conv.weight)
    ours_fan_in, _ = init._calculate_fan_in_and_fan_out(layer.weight)
    assert nn_fan_in == ours_fan_in == F_out * math.prod(k)
    assert 1 / math.sqrt(nn_fan_in) == bound
    assert_drawn_like(layer, conv, bound)  # n = 6*64*9 = 3456 draws
    assert layer.bias.abs().max() > 0.9 * bound  # the bias too uses the whole interval


def test_reset_parameters_redraws():
    layer = SharedConvTranspose1d(4, 8, 3, groups=2)
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_state_dict_round_trip(dim):
    torch.manual_seed(4)
    layer = SHARED_T[dim](6, 9, KERNELS[dim], stride=2, groups=3, dtype=torch.float64)
    state = layer.state_dict()
    assert list(state) == ["weight", "bias"]
    assert state["weight"].shape == (2, 3, *KERNELS[dim]) and state["bias"].shape == (3,)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = SHARED_T[dim](6, 9, KERNELS[dim], stride=2, groups=3, dtype=torch.float64)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 6, *T_SIZES[dim], dtype=torch.float64)
    assert torch.equal(other(x), layer(x))
    with pytest.raises(RuntimeError, match="size mismatch"):  # nn's weight is G times larger
        other.load_state_dict(layer.to_conv().state_dict())


def test_extra_repr():
    layer = SharedConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2,
                                  bias=False, dilation=2)
    assert repr(layer) == (
        "SharedConvTranspose2d(6, 4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), "
        "dilation=(2, 2), output_padding=(1, 1), groups=2, bias=False, "
        "shared_weight=(3, 2, 3, 3))"
    )
    assert repr(SharedConvTranspose1d(3, 5, 2)) == (
        "SharedConvTranspose1d(3, 5, kernel_size=(2,), stride=(1,), shared_weight=(3, 5, 2))"
    )
    assert layer.in_per_group == 3 and layer.out_per_group == 2


def test_channels_last_and_non_contiguous_inputs():
    torch.manual_seed(5)
    layer = SharedConvTranspose2d(6, 9, 3, stride=2, groups=3, dtype=torch.float64)
    conv = tied_conv_transpose(layer)
    base = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    channels_last = base.to(memory_format=torch.channels_last)
    odd_strides = base.transpose(2, 3).contiguous().transpose(2, 3)
    for x in (channels_last, odd_strides):
        y, expected = layer(x), conv(x)
        torch.testing.assert_close(y, layer(base), **TOL)
        torch.testing.assert_close(y, expected, **TOL)
        cl = torch.channels_last
        assert y.is_contiguous(memory_format=cl) == expected.is_contiguous(memory_format=cl)


def test_zero_size_batch():
    layer = SharedConvTranspose2d(6, 4, 3, stride=2, groups=2)
    x = torch.randn(0, 6, 5, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4, 11, 11)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_symbolic_trace():
    layer = SharedConvTranspose1d(4, 6, 3, stride=2, groups=2)
    traced = torch.fx.symbolic_trace(layer)
    x = torch.randn(2, 4, 5)
    assert torch.equal(traced(x), layer(x))


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [
        (dict(in_channels=10, out_channels=12, groups=3), ValueError,
         ["in_channels must be divisible by groups", "10", "groups=3"]),
        (dict(in_channels=9, out_channels=10, groups=3), ValueError,
         ["out_channels must be divisible by groups", "10", "groups=3"]),
        (dict(padding_mode="reflect"), ValueError, ["padding_mode", "'zeros'", "'reflect'"]),
        (dict(padding_mode="circular"), ValueError, ["'zeros'", "'circular'"]),
        (dict(output_padding=1), ValueError,
         ["output_padding must be smaller than the stride or the dilation",
          "output_padding=(1,)", "stride=(1,)", "dilation=(1,)"]),
        (dict(output_padding=2, stride=2, dilation=2), ValueError,
         ["output_padding=(2,)", "stride=(2,)", "dilation=(2,)"]),
        (dict(output_padding=-1, stride=2), ValueError, ["output_padding", ">= 0", "-1"]),
        (dict(padding="same"), TypeError, ["padding", "int or a tuple", "'same'"]),
        (dict(padding=-1), ValueError, ["padding", ">= 0", "-1"]),
        (dict(stride=0), ValueError, ["stride", ">= 1", "0"]),
        (dict(dilation=(1, 2)), ValueError, ["dilation", "1 value", "got 2"]),
        (dict(groups=0), ValueError, ["groups", "0"]),
        (dict(groups=1.5), TypeError, ["groups", "float", "1.5"]),
        (dict(in_channels=3.0), TypeError, ["in_channels", "float"]),
        (dict(kernel_size=0), ValueError, ["kernel_size", "0"]),
    ],
)
def test_constructor_errors(kwargs, exc, fragments):
    args = dict(in_channels=6, out_channels=12, kernel_size=3, groups=3)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        SharedConvTranspose1d(**args)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_output_padding_refused_as_nn_refuses():
    """Both refuse output_padding >= stride and >= dilation; both accept it below either."""
    x = torch.randn(1, 4, 5)
    with pytest.raises(RuntimeError, match="output padding must be smaller"):
        nn.ConvTranspose1d(4, 4, 3, output_padding=1)(x)
    with pytest.raises(ValueError, match="output_padding must be smaller"):
        SharedConvTranspose1d(4, 4, 3, output_padding=1)
    for stride, dilation in ((2, 1), (1, 2)):
        nn_y = nn.ConvTranspose1d(4, 4, 3, stride=stride, output_padding=1, dilation=dilation)(x)
        ours = SharedConvTranspose1d(4, 4, 3, stride=stride, output_padding=1, dilation=dilation)
        assert ours(x).shape == nn_y.shape


@pytest.mark.parametrize(
    "layer,x,exc,fragments",
    [
        (SharedConvTranspose1d(6, 12, 3, groups=3), torch.randn(2, 4, 10), ValueError,
         ["6 input channels", "groups=3", "2 channels per group", "got 4", "(2, 4, 10)"]),
        (SharedConvTranspose1d(6, 12, 3, groups=3), torch.randn(5, 10), ValueError,
         ["6 input channels", "got 5"]),
        (SharedConvTranspose2d(3, 6, 3), torch.randn(1, 3, 4, 4, 4), ValueError,
         ["3-D (unbatched) or 4-D (batched)", "5-D", "(1, 3, 4, 4, 4)"]),
        (SharedConvTranspose3d(3, 6, 3), torch.randn(3, 4), ValueError, ["4-D", "5-D", "2-D"]),
        (SharedConvTranspose1d(2, 4, 3, groups=2), torch.ones(1, 2, 8, dtype=torch.int64),
         TypeError, ["floating-point", "torch.int64"]),
        (SharedConvTranspose1d(2, 4, 3, groups=2), torch.ones(1, 2, 8, dtype=torch.float64),
         TypeError, ["torch.float32", "torch.float64"]),
        (SharedConvTranspose1d(2, 4, 3, groups=2), [[1.0, 2.0, 3.0]], TypeError,
         ["Tensor", "list"]),
        (SharedConvTranspose1d(2, 4, 3, padding=5), torch.randn(1, 2, 2), ValueError,
         ["spatial size (-6,)", "at least 1", "padding=(5,)", "(1, 2, 2)"]),
    ],
)
def test_forward_errors(layer, x, exc, fragments):
    with pytest.raises(exc) as info:
        layer(x)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@cuda
@pytest.mark.parametrize("case", GRID[::9], ids=[_case_id(c) for c in GRID[::9]])
def test_equals_tied_grouped_conv_transpose_cuda(case):
    torch.manual_seed(6)
    layer = _layer(case, device="cuda")
    x = torch.randn(3, layer.in_channels, *SIZES[case[0]], dtype=torch.float64, device="cuda")
    assert_matches_tied(layer, x, rtol=1e-10, atol=1e-10)
