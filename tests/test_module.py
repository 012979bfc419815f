"""Module behaviour: shapes, options, initialisation, conversions and serialisation."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from conftest import (
    CONV,
    KERNELS,
    SHARED,
    SIZES,
    assert_drawn_like,
    assert_matches_grouped_conv,
    tied_conv,
)
from torch import nn

import sharedconv


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_groups_1_is_nn_conv(dim):
    """With groups=1 the weight has nn.ConvNd's shape and the outputs are the same."""
    torch.manual_seed(0)
    layer = SHARED[dim](3, 5, KERNELS[dim], padding=1, dtype=torch.float64)
    conv = CONV[dim](3, 5, KERNELS[dim], padding=1, dtype=torch.float64)
    assert layer.weight.shape == conv.weight.shape and layer.bias.shape == conv.bias.shape
    conv.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, *SIZES[dim], dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_parameter_shapes_and_count(dim):
    G, D, F_out = 7, 3, 4
    layer = SHARED[dim](G * D, G * F_out, KERNELS[dim], groups=G)
    assert layer.weight.shape == (F_out, D, *KERNELS[dim])
    assert layer.bias.shape == (F_out,)
    grouped = CONV[dim](G * D, G * F_out, KERNELS[dim], groups=G)
    n_shared = sum(p.numel() for p in layer.parameters())
    n_grouped = sum(p.numel() for p in grouped.parameters())
    assert n_grouped == G * n_shared  # G copies of the same bank
    assert (layer.in_per_group, layer.out_per_group) == (D, F_out)


def test_seed_shapes():
    """Seed 1: N streams, one bank of F filters. Seed 2: T groups of D channels."""
    N, F_out, k = 5, 16, 7
    streams = sharedconv.SharedConv1d(N, N * F_out, k, groups=N)
    y = streams(torch.randn(8, N, 100))
    assert y.shape == (8, N * F_out, 94) and streams.weight.shape == (F_out, 1, k)
    assert y.unflatten(1, (N, F_out)).shape == (8, N, F_out, 94)
    T, D = 50, 6
    labels = sharedconv.SharedConv1d(T * D, T * F_out, 3, groups=T, padding=1)
    assert labels.weight.shape == (F_out, D, 3)
    assert labels(torch.randn(2, T * D, 20)).shape == (2, T * F_out, 20)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_initialisation_matches_nn_conv(dim):
    """Same distribution as nn.ConvNd: U(-b, b) with b = 1/sqrt(fan_in), weight and bias."""
    torch.manual_seed(0)
    G, D, F_out = 4, 6, 64
    k = {1: (9,), 2: (3, 3), 3: (3, 3, 1)}[dim]
    layer = SHARED[dim](G * D, G * F_out, k, groups=G)
    conv = CONV[dim](G * D, G * F_out, k, groups=G)
    fan_in = D * math.prod(k)
    bound = 1 / math.sqrt(fan_in)
    assert_drawn_like(layer, conv, bound)  # n = 64*6*9 = 3456 draws


def test_reset_parameters_redraws():
    layer = sharedconv.SharedConv1d(4, 8, 3, groups=2)
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)


def test_no_bias():
    layer = sharedconv.SharedConv2d(6, 4, 3, groups=2, bias=False)
    assert layer.bias is None
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    assert "bias=False" in repr(layer)
    assert layer.to_conv().bias is None


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_unbatched_input_equals_batch_of_one(dim):
    torch.manual_seed(0)
    layer = SHARED[dim](6, 4, KERNELS[dim], groups=2, padding=1, padding_mode="reflect")
    x = torch.randn(6, *SIZES[dim])
    y = layer(x)
    assert y.shape == layer(x[None]).shape[1:]
    torch.testing.assert_close(y, layer(x[None])[0])
    torch.testing.assert_close(y, tied_conv(layer)(x))  # nn.ConvNd accepts it the same way


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_zero_size_batch(mode):
    layer = sharedconv.SharedConv2d(6, 4, 3, groups=2, padding=1, padding_mode=mode)
    x = torch.randn(0, 6, 5, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


def test_non_contiguous_and_channels_last_inputs():
    torch.manual_seed(0)
    layer = sharedconv.SharedConv2d(6, 9, 3, groups=3, padding=1, dtype=torch.float64)
    base = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    reference = layer(base)
    transposed = base.transpose(2, 3).contiguous().transpose(2, 3)  # same values, odd strides
    assert not transposed.is_contiguous()
    channels_last = base.to(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    sliced = torch.randn(2, 12, 9, 7, dtype=torch.float64)[:, ::2]
    for x in (transposed, channels_last):
        torch.testing.assert_close(layer(x), reference, rtol=1e-12, atol=1e-12)
        assert_matches_grouped_conv(layer, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(sliced), layer(sliced.contiguous()), rtol=0, atol=0)
    layer_cl = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer_cl(channels_last), reference, rtol=1e-12, atol=1e-12)


def test_device_and_dtype_kwargs():
    layer = sharedconv.SharedConv1d(4, 6, 3, groups=2, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert layer.weight.device.type == "cpu"
    meta = sharedconv.SharedConv3d(4, 6, 3, groups=2, device="meta")
    assert meta.weight.is_meta
    assert meta(torch.empty(1, 4, 5, 5, 5, device="meta")).shape == (1, 6, 3, 3, 3)
    half = sharedconv.SharedConv1d(4, 6, 3, groups=2).to(torch.bfloat16)
    assert half(torch.randn(1, 4, 9, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_to_conv_is_equivalent_and_independent(dim, mode):
    torch.manual_seed(0)
    layer = SHARED[dim](6, 9, KERNELS[dim], groups=3, padding="same", padding_mode=mode,
                        dilation=2, dtype=torch.float64)
    conv = layer.to_conv()
    assert type(conv) is CONV[dim]
    assert conv.weight.shape == (9, 2, *KERNELS[dim]) and conv.groups == 3
    assert (conv.padding, conv.dilation, conv.padding_mode) == ("same", (2,) * dim, mode)
    x = torch.randn(2, 6, *SIZES[dim], dtype=torch.float64)
    torch.testing.assert_close(conv(x), layer(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        conv.weight.zero_()
    assert layer.weight.abs().sum() > 0  # a copy, not a view of the shared bank


def test_extra_repr():
    layer = sharedconv.SharedConv2d(12, 24, (3, 5), stride=2, padding=(1, 2), dilation=1,
                                    groups=3, padding_mode="circular")
    assert repr(layer) == (
        "SharedConv2d(12, 24, kernel_size=(3, 5), stride=(2, 2), padding=(1, 2), groups=3, "
        "padding_mode=circular, shared_weight=(8, 4, 3, 5))"
    )
    assert repr(sharedconv.SharedConv1d(2, 2, 3)) == (
        "SharedConv1d(2, 2, kernel_size=(3,), stride=(1,), shared_weight=(2, 2, 3))"
    )


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = sharedconv.SharedConv1d(6, 12, 3, groups=3)
    b = sharedconv.SharedConv1d(6, 12, 3, groups=3)
    assert not torch.equal(a.weight, b.weight)
    assert set(a.state_dict()) == {"weight", "bias"}
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 6, 10)
    assert torch.equal(a(x), b(x))
    # a state dict of another shape is refused by nn.Module's own check
    c = sharedconv.SharedConv1d(6, 12, 3, groups=2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        c.load_state_dict(a.state_dict())


def test_pickle_and_deepcopy_round_trip():
    torch.manual_seed(0)
    layer = sharedconv.SharedConv2d(6, 12, 3, groups=3, padding="same", padding_mode="reflect")
    x = torch.randn(2, 6, 7, 7)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert repr(clone) == repr(layer)
        assert torch.equal(clone(x), layer(x))
        assert clone.weight is not layer.weight


def test_autocast_bfloat16_cpu():
    torch.manual_seed(0)
    layer = sharedconv.SharedConv1d(8, 32, 5, groups=4, padding=2)
    x = torch.randn(4, 8, 64)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


def test_training_step_moves_the_one_bank():
    """One optimizer step on a loss from every group updates the single shared tensor."""
    torch.manual_seed(0)
    layer = sharedconv.SharedConv1d(4, 8, 3, groups=4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    layer(torch.randn(3, 4, 10)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, layer.weight)
    assert len(list(layer.parameters())) == 2


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_no_warnings(dim):
    """'same' padding with an even kernel warns in nn.ConvNd; the layer pads explicitly."""
    layer = SHARED[dim](4, 4, (2,) * dim, groups=2, padding="same")
    x = torch.randn(1, 4, *SIZES[dim], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
        y.sum().backward()
    assert y.shape[2:] == x.shape[2:]
    torch.testing.assert_close(y, tied_conv(layer)(x))


def test_layer_is_an_nn_module_citizen():
    model = nn.Sequential(sharedconv.SharedConv1d(3, 12, 3, groups=3), nn.ReLU())
    assert isinstance(model[0], nn.Module)
    assert sum(p.numel() for p in model.parameters()) == 4 * 1 * 3 + 4
