"""The layer against PyTorch's grouped convolution with tied banks, over a grid."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNELS, SHARED, SIZES, assert_matches_grouped_conv, cuda

import sharedconv

PADDINGS = {  # ints, per-dimension tuples, and the two strings
    1: [0, 2, (1,), "same", "valid"],
    2: [0, 2, (1, 2), "same", "valid"],
    3: [0, 2, (1, 0, 2), "same", "valid"],
}


def _grid():
    for dim in (1, 2, 3):
        for stride, padding, dilation, mode, bias, G, D in itertools.product(
            (1, 2),
            PADDINGS[dim],
            (1, 2),
            ("zeros", "reflect", "replicate", "circular"),
            (True, False),
            (1, 2, 5),
            (1, 3),
        ):
            if padding == "same" and stride != 1:
                continue  # rejected by design, tested in test_errors
            yield dim, stride, padding, dilation, mode, bias, G, D


GRID = list(_grid())


def _case_id(case):
    dim, stride, padding, dilation, mode, bias, G, D = case
    return f"{dim}d-s{stride}-p{padding}-d{dilation}-{mode}-b{int(bias)}-G{G}-D{D}"


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_equals_tied_grouped_conv(case):
    dim, stride, padding, dilation, mode, bias, G, D = case
    torch.manual_seed(len(GRID))
    F_out = 2
    layer = SHARED[dim](
        G * D,
        G * F_out,
        KERNELS[dim],
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=G,
        bias=bias,
        padding_mode=mode,
        dtype=torch.float64,
    )
    x = torch.randn(3, G * D, *SIZES[dim], dtype=torch.float64)
    assert_matches_grouped_conv(layer, x, rtol=1e-12, atol=1e-12)


def test_grid_covers_the_requested_axes():
    axes = list(zip(*GRID, strict=True))
    assert set(axes[0]) == {1, 2, 3}
    assert {type(p) for p in axes[2]} == {int, tuple, str}
    assert set(axes[4]) == {"zeros", "reflect", "replicate", "circular"}
    assert set(axes[6]) == {1, 2, 5} and set(axes[7]) == {1, 3}


def _per_group_loop(x, weight, bias, groups, **options):
    """The forum's first attempt, generalised: one convolution per group, then ``cat``."""
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    D = weight.shape[1]
    outs = [conv(x[:, g * D : (g + 1) * D], weight, bias, **options) for g in range(groups)]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("D", [1, 3])
def test_equals_per_channel_loop(dim, D):
    """Second oracle: the loop over channels (groups) the first seed started from."""
    torch.manual_seed(1)
    G, F_out = 4, 3
    weight = torch.randn(F_out, D, *KERNELS[dim], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(F_out, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, G * D, *SIZES[dim], dtype=torch.float64, requires_grad=True)
    options = dict(stride=1, padding=1, dilation=2)
    y = sharedconv.shared_conv(x, weight, bias, groups=G, **options)
    y_loop = _per_group_loop(x, weight, bias, G, **options)
    torch.testing.assert_close(y, y_loop, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight, bias), g)
    grads_loop = torch.autograd.grad(y_loop, (x, weight, bias), g)
    for a, b in zip(grads, grads_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dim,mode,padding,stride",
    [(1, "zeros", 1, 2), (1, "reflect", "same", 1), (2, "circular", 1, 1), (3, "replicate", 1, 2)],
)
def test_gradcheck_and_gradgradcheck(dim, mode, padding, stride):
    torch.manual_seed(2)
    G, D, F_out = 3, 2, 2
    size = {1: (7,), 2: (5, 4), 3: (4, 4, 3)}[dim]
    x = torch.randn(2, G * D, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(F_out, D, *KERNELS[dim], dtype=torch.float64, requires_grad=True)
    b = torch.randn(F_out, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return sharedconv.shared_conv(
            x, w, b, stride=stride, padding=padding, groups=G, padding_mode=mode
        )

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@cuda
@pytest.mark.parametrize("case", GRID[::7], ids=[_case_id(c) for c in GRID[::7]])
def test_equals_tied_grouped_conv_cuda(case):
    dim, stride, padding, dilation, mode, bias, G, D = case
    torch.manual_seed(3)
    layer = SHARED[dim](
        G * D, G * 2, KERNELS[dim], stride=stride, padding=padding, dilation=dilation,
        groups=G, bias=bias, padding_mode=mode, dtype=torch.float64, device="cuda",
    )
    x = torch.randn(3, G * D, *SIZES[dim], dtype=torch.float64, device="cuda")
    assert_matches_grouped_conv(layer, x, rtol=1e-10, atol=1e-10)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_low_precision_matches_grouped_conv(dtype):
    torch.manual_seed(4)
    layer = sharedconv.SharedConv2d(3 * 8, 16 * 8, 3, groups=8, padding=1, device="cuda")
    layer = layer.to(dtype)
    x = torch.randn(4, 24, 16, 16, device="cuda", dtype=dtype)
    tol = {torch.float32: {}, torch.float16: dict(rtol=1e-2, atol=1e-2),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    assert_matches_grouped_conv(layer, x, **tol)


def test_per_sample_gradients_with_torch_func():
    """vmap over grad (per-sample gradients, as in differential privacy) works."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(6)
    layer = sharedconv.SharedConv1d(4, 8, 3, groups=4, padding=1, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(5, 4, 12, dtype=torch.float64)

    def loss(p, sample):
        return functional_call(layer, p, (sample[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(5):
        expected = torch.autograd.grad(loss(dict(layer.named_parameters()), x[i]),
                                       list(layer.parameters()))
        torch.testing.assert_close(per_sample["weight"][i], expected[0])
        torch.testing.assert_close(per_sample["bias"][i], expected[1])
