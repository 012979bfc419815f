"""Layers whose number of groups is read from each input (SharedConvNd.per_group)."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import KERNELS, SHARED, SIZES

import sharedconv


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("D", [1, 3])
def test_equals_the_fixed_layer_for_every_group_count(dim, D):
    torch.manual_seed(0)
    flexible = SHARED[dim].per_group(D, 2, KERNELS[dim], padding=1, padding_mode="reflect",
                                     dtype=torch.float64)
    assert flexible.groups is None and flexible.in_channels is None
    assert flexible.weight.shape == (2, D, *KERNELS[dim])
    for G in (1, 2, 5):
        fixed = SHARED[dim](G * D, G * 2, KERNELS[dim], padding=1, padding_mode="reflect",
                            groups=G, dtype=torch.float64)
        fixed.load_state_dict(flexible.state_dict())  # the same weight shape, any G
        x = torch.randn(2, G * D, *SIZES[dim], dtype=torch.float64)
        torch.testing.assert_close(flexible(x), fixed(x), rtol=0, atol=0)
        torch.testing.assert_close(flexible(x[0]), fixed(x[0]), rtol=0, atol=0)  # unbatched


@pytest.mark.parametrize("G", [1, 4, 7])
def test_outputs_and_gradients_against_the_grouped_conv(G):
    torch.manual_seed(1)
    layer = sharedconv.SharedConv1d.per_group(2, 3, 5, stride=2, dilation=2, padding=3,
                                              dtype=torch.float64)
    grouped = torch.nn.Conv1d(G * 2, G * 3, 5, stride=2, dilation=2, padding=3, groups=G,
                              dtype=torch.float64)
    with torch.no_grad():
        grouped.weight.copy_(torch.cat([layer.weight] * G))
        grouped.bias.copy_(torch.cat([layer.bias] * G))
    x = torch.randn(3, G * 2, 19, dtype=torch.float64)
    y, y_ref = layer(x), grouped(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    y_ref.backward(upstream)
    torch.testing.assert_close(layer.weight.grad, grouped.weight.grad.view(G, 3, 2, 5).sum(0))
    torch.testing.assert_close(layer.bias.grad, grouped.bias.grad.view(G, 3).sum(0))
    conv = layer.to_conv(groups=G)
    assert conv.groups == G and conv.weight.shape == (G * 3, 2, 5)
    torch.testing.assert_close(conv(x), y_ref, rtol=1e-12, atol=1e-12)


def test_one_weight_trained_by_sets_of_different_sizes():
    torch.manual_seed(2)
    layer = sharedconv.SharedConv1d.per_group(1, 4, 3, padding=1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for n_streams in (3, 8, 2):
        opt.zero_grad()
        layer(torch.randn(5, n_streams, 16)).square().mean().backward()
        assert layer.weight.grad is not None
        opt.step()
    assert layer.weight.shape == (4, 1, 3)


def test_initialisation_is_the_fixed_layers():
    torch.manual_seed(3)
    a = sharedconv.SharedConv2d.per_group(3, 8, 3)
    torch.manual_seed(3)
    b = sharedconv.SharedConv2d(3 * 5, 8 * 5, 3, groups=5)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


@pytest.mark.parametrize(
    "x,fragments",
    [
        (torch.randn(2, 7, 10), ["multiple of 3", "got 7", "(2, 7, 10)"]),
        (torch.randn(2, 0, 10), ["positive multiple of 3", "got 0"]),
        (torch.randn(2, 6, 10, 1), ["2-D (unbatched) or 3-D (batched)", "4-D"]),
        (torch.ones(2, 6, 10, dtype=torch.int64), ["floating-point", "int64"]),
    ],
)
def test_errors(x, fragments):
    layer = sharedconv.SharedConv1d.per_group(3, 2, 3)
    with pytest.raises((ValueError, TypeError)) as info:
        layer(x)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_to_conv_needs_groups_and_repr():
    layer = sharedconv.SharedConv1d.per_group(2, 4, 3, bias=False)
    with pytest.raises(ValueError, match="pass the number of groups"):
        layer.to_conv()
    with pytest.raises(ValueError, match="groups must be a positive int"):
        layer.to_conv(groups=0)
    fixed = sharedconv.SharedConv1d(4, 8, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2, got groups=3"):
        fixed.to_conv(groups=3)
    assert fixed.to_conv(groups=2).groups == 2
    assert repr(layer) == (
        "SharedConv1d(in_per_group=2, out_per_group=4, kernel_size=(3,), stride=(1,), "
        "groups=read from the input, bias=False, shared_weight=(4, 2, 3))"
    )


def test_pickle_round_trip():
    layer = sharedconv.SharedConv1d.per_group(1, 4, 3)
    clone = pickle.loads(pickle.dumps(layer))
    x = torch.randn(2, 5, 9)
    assert clone.groups is None and torch.equal(clone(x), layer(x))


@pytest.mark.slow
def test_compile_fullgraph_with_changing_group_counts():
    torch._dynamo.reset()
    torch.manual_seed(4)
    layer = sharedconv.SharedConv1d.per_group(1, 4, 3, padding=1)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for n_streams in (3, 6, 9):
        x = torch.randn(2, n_streams, 12)
        torch.testing.assert_close(compiled(x), layer(x))
