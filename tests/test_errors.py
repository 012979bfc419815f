"""Every bad input gets a ValueError/TypeError naming what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import sharedconv
from sharedconv import SharedConv1d, SharedConv2d, SharedConv3d, shared_conv


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [
        (dict(in_channels=10, out_channels=12, groups=3), ValueError, ["in_channels", "10", "3"]),
        (dict(in_channels=9, out_channels=10, groups=3), ValueError, ["out_channels", "10", "3"]),
        (dict(padding_mode="mirror"), ValueError, ["padding_mode", "'mirror'", "zeros"]),
        (dict(padding="same", stride=2), ValueError, ["'same'", "stride", "2"]),
        (dict(padding="full"), ValueError, ["padding", "'full'"]),
        (dict(padding=-1), ValueError, ["padding", "-1"]),
        (dict(stride=0), ValueError, ["stride", ">= 1", "0"]),
        (dict(dilation=(1, 2)), ValueError, ["dilation", "1 value", "got 2"]),
        (dict(groups=0), ValueError, ["groups", "0"]),
        (dict(groups=1.5), TypeError, ["groups", "float", "1.5"]),
        (dict(in_channels=3.0), TypeError, ["in_channels", "float"]),
        (dict(kernel_size="3"), TypeError, ["kernel_size", "str"]),
        (dict(kernel_size=0), ValueError, ["kernel_size", "0"]),
        (dict(stride=True), TypeError, ["stride", "bool"]),
    ],
)
def test_constructor_errors(kwargs, exc, fragments):
    args = dict(in_channels=6, out_channels=12, kernel_size=3, groups=3)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        SharedConv1d(**args)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_tuple_length_names_the_dimension():
    with pytest.raises(ValueError, match=r"kernel_size must have 2 values .* got 3: \(3, 3, 3\)"):
        SharedConv2d(3, 6, (3, 3, 3))


@pytest.mark.parametrize(
    "layer,x,exc,fragments",
    [
        # channel count mismatch: 4 channels for groups=3 x 2 channels per group
        (SharedConv1d(6, 12, 3, groups=3), torch.randn(2, 4, 10), ValueError,
         ["6 input channels", "groups=3", "2 channels per group", "got 4", "(2, 4, 10)"]),
        # unbatched with the wrong channel count is caught as well
        (SharedConv1d(6, 12, 3, groups=3), torch.randn(5, 10), ValueError, ["6", "got 5"]),
        # rank: a 2-d layer gets a 5-d tensor
        (SharedConv2d(3, 6, 3), torch.randn(1, 3, 4, 4, 4), ValueError,
         ["3-D (unbatched) or 4-D (batched)", "5-D", "(1, 3, 4, 4, 4)"]),
        (SharedConv3d(3, 6, 3), torch.randn(3, 4), ValueError, ["4-D", "5-D", "2-D"]),
        # non-floating input
        (SharedConv1d(2, 4, 3, groups=2), torch.ones(1, 2, 8, dtype=torch.int64), TypeError,
         ["floating-point", "torch.int64"]),
        # dtype mismatch with the weight, outside autocast
        (SharedConv1d(2, 4, 3, groups=2), torch.ones(1, 2, 8, dtype=torch.float64), TypeError,
         ["torch.float32", "torch.float64"]),
        # not a tensor at all
        (SharedConv1d(2, 4, 3, groups=2), [[1.0, 2.0, 3.0]], TypeError, ["Tensor", "list"]),
    ],
)
def test_forward_errors(layer, x, exc, fragments):
    with pytest.raises(exc) as info:
        layer(x)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize(
    "x,w,b,kwargs,exc,fragments",
    [
        (torch.randn(2, 6, 9), torch.randn(4, 2, 3), None, dict(groups=2), ValueError,
         ["4 input channels", "groups=2", "got 6"]),
        (torch.randn(2, 6, 9), torch.randn(4, 2), None, dict(groups=3), ValueError,
         ["3-D to 5-D", "2-D", "(4, 2)"]),
        (torch.randn(2, 6, 9), torch.randn(4, 2, 3), torch.randn(3), dict(groups=3), ValueError,
         ["bias", "(4,)", "(3,)"]),
        (torch.randn(2, 6, 9), torch.randn(4, 2, 3), torch.randn(4, 1), dict(groups=3),
         ValueError, ["(4,)", "(4, 1)"]),
        (torch.randn(2, 6, 9), torch.randn(4, 2, 3).int(), None, dict(groups=3), TypeError,
         ["weight", "floating", "torch.int32"]),
        (torch.randn(2, 6, 9), torch.randn(4, 2, 3), None, dict(groups=3, padding="same",
         stride=2), ValueError, ["'same'", "stride=(2,)"]),
        (torch.randn(2, 6, 9), torch.randn(4, 2, 3), None, dict(groups=3, padding_mode="wrap"),
         ValueError, ["padding_mode", "'wrap'"]),
        (torch.randn(2, 6, 9), torch.randn(4, 2, 3), None, dict(groups=3, stride=(1, 1)),
         ValueError, ["stride", "1 value", "got 2"]),
        (torch.randn(2, 6, 9), torch.randn(4, 2, 3), None, dict(groups="3"), TypeError,
         ["groups", "str"]),
        (torch.randn(2, 6, 9), "weights", None, dict(groups=3), TypeError, ["weight", "str"]),
    ],
)
def test_functional_errors(x, w, b, kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        shared_conv(x, w, b, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_errors_come_before_any_work(monkeypatch):
    """A rejected input never reaches the convolution."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the convolution ran on a bad input")

    monkeypatch.setitem(sharedconv.functional._CONV, 1, spy)
    layer = SharedConv1d(6, 12, 3, groups=3)
    for bad in (torch.randn(2, 5, 10), torch.ones(2, 6, 10, dtype=torch.int32),
                torch.randn(2, 6, 10, 1)):
        with pytest.raises((ValueError, TypeError)):
            layer(bad)
    assert calls == []
    with pytest.raises(AssertionError, match="ran on a bad input"):
        layer(torch.randn(2, 6, 10))  # the spy is reachable: a good input gets there
