"""nn.ConvNd's behaviour in the corners: export with a dynamic length in every padding mode,
complex dtypes, the bias's dtype and device, FX on the masked layer, no labels at all,
the output's memory format, and the cost counter's writes through ``out=``."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CONV,
    KERNELS,
    SHARED,
    SIZES,
    assert_format_like_nn,
    assert_matches_grouped_conv,
    tied_conv,
)
from torch import nn

import sharedconv
from sharedconv.lab.memory import step_cost
from sharedconv.masked import naive_masked_shared_conv1d

MODES = ("zeros", "reflect", "replicate", "circular")


_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.slow
@pytest.mark.skipif(_TORCH < (2, 13), reason="before torch 2.13 (seen on 2.4 and 2.11) the "
                    "exporter guards the fold's view of a dynamic length (min(L, 6L) == L)")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", [2, "same"])
def test_export_with_a_dynamic_length_in_every_padding_mode(mode, padding):
    """The length is a named ``Dim``: the exported program serves other lengths, as the
    exported ``nn.Conv1d`` does (padding after the fold keeps the sizes plain products)."""
    torch.manual_seed(0)
    layer = sharedconv.SharedConv1d(6, 12, 5, groups=3, padding=padding, padding_mode=mode)
    length = torch.export.Dim("length", min=8, max=512)
    x = torch.randn(2, 6, 32)
    program = torch.export.export(layer, (x,), dynamic_shapes={"input": {2: length}})
    conv = tied_conv(layer)
    reference = torch.export.export(conv, (x,), dynamic_shapes={"input": {2: length}})
    for size in (9, 32, 101):
        other = torch.randn(2, 6, size)
        torch.testing.assert_close(program.module()(other), layer(other))
        torch.testing.assert_close(program.module()(other), reference.module()(other))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_dtypes_as_nn_convnd(dim, dtype):
    torch.manual_seed(1)
    layer = SHARED[dim](6, 12, KERNELS[dim], groups=3, padding=1, dtype=dtype)
    conv = CONV[dim](6, 12, KERNELS[dim], groups=3, padding=1, dtype=dtype)
    assert layer.weight.dtype == conv.weight.dtype == dtype
    x = torch.randn(2, 6, *SIZES[dim], dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.complex64 else {}
    assert_matches_grouped_conv(layer, x, **tol)
    with sharedconv.autotune():  # the tuner leaves complex calls to the fold
        torch.testing.assert_close(layer(x), tied_conv(layer)(x), **tol)
    assert sharedconv.tuning.cache() == {}


@pytest.mark.parametrize("dtype", [torch.complex64])
def test_complex_transposed_as_nn_convtranspose(dtype):
    torch.manual_seed(2)
    layer = sharedconv.SharedConvTranspose1d(6, 12, 3, groups=3, stride=2, dtype=dtype)
    conv = layer.to_conv()
    x = torch.randn(2, 6, 9, dtype=dtype)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)


def test_complex_masked_layer_is_refused_at_construction():
    with pytest.raises(TypeError, match="real floating-point dtypes, got torch.complex64"):
        sharedconv.MaskedSharedConv1d(4, 3, 3, dtype=torch.complex64)


def test_bias_of_another_dtype_or_device_is_refused():
    x, w = torch.randn(2, 4, 10), torch.randn(3, 2, 3)
    with pytest.raises(TypeError, match="bias must have the weight's dtype torch.float32, "
                                        "got torch.float64"):
        sharedconv.shared_conv(x, w, torch.randn(3, dtype=torch.float64), groups=2)
    with pytest.raises(ValueError, match="bias must be on the weight's device cpu, got meta"):
        sharedconv.shared_conv(x, w, torch.empty(3, device="meta"), groups=2)
    # as nn.Conv1d: a float64 bias with float32 weights is an error there too
    with pytest.raises(RuntimeError):
        F.conv1d(x, w.repeat(2, 1, 1), torch.randn(6, dtype=torch.float64), groups=2)


def test_fx_symbolic_trace_of_the_masked_layer():
    torch.manual_seed(3)
    layer = sharedconv.MaskedSharedConv1d(4, 3, 3, padding=1)
    traced = torch.fx.symbolic_trace(layer)
    x, mask = torch.randn(2, 4, 12), (torch.rand(2, 5, 12) < 0.5).float()
    torch.testing.assert_close(traced(x, mask), layer(x, mask))
    calls = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert calls == [sharedconv.masked.masked_shared_conv1d]


@pytest.mark.parametrize("padding", [0, 1, "same"])
def test_no_labels_gives_an_empty_output_on_both_paths(padding):
    x = torch.randn(2, 4, 12, requires_grad=True)
    w = torch.randn(3, 4, 3, requires_grad=True)
    mask = torch.zeros(2, 0, 12)
    fast = sharedconv.masked_shared_conv1d(x, mask, w, padding=padding)
    naive = naive_masked_shared_conv1d(x, mask, w, padding=padding)
    length = 12 if padding in (1, "same") else 10
    assert fast.shape == naive.shape == (2, 0, length)
    naive.sum().backward()  # still a function of its inputs, with zero gradients
    assert x.grad is not None and not x.grad.any()


_FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_output_memory_format_is_nn_convnds(dim, dtype, transposed):
    """Wherever an operand is channels_last, the output's strides are nn.ConvNd's (float64
    3-d convolutions on the CPU, for one, give a contiguous output)."""
    fmt = _FORMATS[dim]
    torch.manual_seed(4)
    for groups, cl_x, cl_w, batch in itertools.product((1, 3), (False, True), (False, True),
                                                        (1, 2)):
        if transposed:
            layer = getattr(sharedconv, f"SharedConvTranspose{dim}d")(
                3 * groups, 2 * groups, 3, groups=groups, dtype=dtype)
        else:
            layer = SHARED[dim](3 * groups, 2 * groups, 3, groups=groups, dtype=dtype)
        x = torch.randn(batch, 3 * groups, *(6,) * dim, dtype=dtype)
        assert_format_like_nn(layer, x, cl_x, cl_w, tol=2e-2)
    if dim == 3 and dtype == torch.float64 and not transposed:  # the case reported
        x = torch.randn(2, 6, 5, 5, 5, dtype=dtype).contiguous(memory_format=fmt)
        layer = SHARED[3](6, 6, 3, groups=3, dtype=dtype)
        assert layer(x).is_contiguous() and nn.Conv3d(6, 4, 3, groups=1, dtype=dtype)(
            x).is_contiguous()


def test_step_cost_counts_writes_through_out():
    a = torch.randn(4, 8, 16, requires_grad=True)
    b = torch.randn(4, 16, 8)

    def product(a, b):
        out = torch.empty(4, 8, 8)
        torch.bmm(a.detach(), b, out=out)  # the write is a kwarg: 4 * 8 * 8 floats
        return (a * 1.0).sum() + out.sum()

    def plain(a, b):
        return (a * 1.0).sum() + torch.bmm(a.detach(), b).sum()

    written, returned = step_cost(product, a, b), step_cost(plain, a, b)
    assert written.moved_bytes == returned.moved_bytes > 4 * 8 * 8 * 4


def test_step_cost_refuses_a_step_without_gradients():
    x = torch.randn(2, 4, 10)
    w = torch.randn(3, 2, 3)
    with pytest.raises(ValueError, match="some input or parameter must require a gradient"):
        step_cost(lambda x, w: sharedconv.shared_conv(x, w, groups=2), x, w)
