"""Shared helpers for the package tests."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sharedconv

SHARED = {1: sharedconv.SharedConv1d, 2: sharedconv.SharedConv2d, 3: sharedconv.SharedConv3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# Spatial sizes and kernels that differ per dimension, so a swapped axis cannot pass.
SIZES = {1: (11,), 2: (9, 7), 3: (7, 6, 5)}
KERNELS = {1: (3,), 2: (3, 2), 3: (3, 2, 1)}



def cuda(test):
    """A test that needs a CUDA device: skipped without one, selected by ``-m cuda``
    (``python3 dev.py gpu`` runs exactly these)."""
    needs = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(needs(test))


def tied_conv(layer: sharedconv.modules._SharedConvNd) -> nn.Module:
    """The plain grouped ``nn.ConvNd`` whose G banks are copies of ``layer``'s bank.

    Built independently of ``layer.to_conv`` (which is itself under test).
    """
    n, g = layer._dim, layer.groups
    conv = CONV[n](
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=g,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.cat([layer.weight] * g, dim=0))
        if layer.bias is not None:
            conv.bias.copy_(torch.cat([layer.bias] * g, dim=0))
    return conv


def assert_matches_grouped_conv(layer, x: torch.Tensor, **tol) -> None:
    """Outputs and all gradients of ``layer`` equal those of the tied grouped conv.

    The shared weight's gradient must be the sum of the G banks' gradients, the shared
    bias's the sum of the G bias chunks' gradients.
    """
    layer.zero_grad(set_to_none=True)
    conv = tied_conv(layer)
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y1, y2 = layer(x1), conv(x2)
    torch.testing.assert_close(y1, y2, **tol)
    # A random upstream gradient, so every output element weighs differently.
    g = torch.randn_like(y2)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    G = layer.groups
    bank_grads = conv.weight.grad.unflatten(0, (G, -1))
    torch.testing.assert_close(layer.weight.grad, bank_grads.sum(0), **tol)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, conv.bias.grad.view(G, -1).sum(0), **tol)


def assert_drawn_like(layer: nn.Module, conv: nn.Module, bound: float) -> None:
    """``layer``'s weight and bias are drawn as ``conv``'s: from U(-bound, bound).

    Both stay within the bound; the shared weight uses the whole interval and has the
    uniform's mean and variance (5-sigma bands) and ``conv``'s quantiles.
    """
    for ours, theirs in ((layer.weight, conv.weight), (layer.bias, conv.bias)):
        assert ours.abs().max() <= bound
        assert theirs.abs().max() <= bound
    w = layer.weight.detach().flatten()
    assert w.abs().max() > 0.98 * bound  # the whole interval is used, not a narrower one
    # Uniform on (-b, b): mean 0, variance b^2 / 3
    n = w.numel()
    assert abs(w.mean().item()) < 5 * bound / math.sqrt(3 * n)
    assert abs(w.var().item() / (bound**2 / 3) - 1) < 5 * math.sqrt(0.8 / n)
    # the two layers' weights are indistinguishable in distribution (quantiles)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(
        torch.quantile(w, q), torch.quantile(conv.weight.detach().flatten(), q),
        rtol=0, atol=0.05 * bound,
    )


def assert_format_like_nn(layer, x: torch.Tensor, channels_last_input: bool,
                          channels_last_weight: bool, tol: float) -> None:
    """``layer``'s output has the strides (of dimensions longer than one) and the values of
    its ``to_conv()`` twin's, with the input and the weights stored as asked."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()]
    conv = layer.to_conv()
    if channels_last_input:
        x = x.contiguous(memory_format=fmt)
    if channels_last_weight:
        layer.weight.data = layer.weight.data.contiguous(memory_format=fmt)
        conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)
    with torch.no_grad():
        ours, theirs = layer(x), conv(x)

    def strides(t):
        return [s for s, n in zip(t.stride(), t.shape, strict=True) if n > 1]

    assert strides(ours) == strides(theirs), (channels_last_input, channels_last_weight)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
