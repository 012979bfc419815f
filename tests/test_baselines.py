"""Every baseline equals ``shared_conv``: outputs and the gradients of input, weight, bias."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import KERNELS, SIZES
from torch.utils._python_dispatch import TorchDispatchMode

from sharedconv import shared_conv
from sharedconv.lab.baselines import BASELINES, DIMS, fold, lift
from sharedconv.lab.memory import flops

TOL = {"rtol": 1e-12, "atol": 1e-12}

# (stride, padding, dilation) variants, each applied in every spatial dimension.
OPTIONS = [
    (1, 0, 1),
    (2, 1, 1),
    (1, "same", 2),
    (3, "valid", 2),
]
# Every (G, D, options) combination in 1-d and 2-d; the bias is on for half of them, so
# each option meets both a bias and no bias.
CASES = [
    (name, n, groups, d, opts, (gi + di + oi) % 2 == 0)
    for name in BASELINES
    for n in DIMS[name]
    if n < 3
    for (gi, groups), (di, d), (oi, opts) in itertools.product(
        enumerate((1, 3)), enumerate((1, 2)), enumerate(OPTIONS)
    )
]


def _make(n: int, groups: int, d: int, bias: bool, batch: int = 2, f: int = 4):
    g = torch.Generator().manual_seed(1000 * n + 100 * groups + 10 * d + bias)
    x = torch.randn(batch, groups * d, *SIZES[n], dtype=torch.float64, generator=g)
    w = torch.randn(f, d, *KERNELS[n], dtype=torch.float64, generator=g)
    b = torch.randn(f, dtype=torch.float64, generator=g) if bias else None
    return x, w, b


def _run(fn, x, w, b, upstream=None, **opts):
    """Output and gradients (input, weight, bias) of ``fn`` for one upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(*leaves, **opts)
    if upstream is None:
        g = torch.Generator().manual_seed(7)
        upstream = torch.randn(out.shape, dtype=out.dtype, generator=g)
    out.backward(upstream)
    return out, [t.grad if t is not None else None for t in leaves], upstream


def _assert_same(fn, x, w, b, **opts):
    ref, ref_grads, upstream = _run(shared_conv, x, w, b, **opts)
    out, grads, _ = _run(fn, x, w, b, upstream, **opts)
    torch.testing.assert_close(out, ref, **TOL)
    for got, expected in zip(grads, ref_grads, strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize(
    "name, n, groups, d, opts, bias",
    CASES,
    ids=[
        f"{c[0]}-{c[1]}d-G{c[2]}-D{c[3]}-s{c[4][0]}p{c[4][1]}d{c[4][2]}-{'b' if c[5] else 'nob'}"
        for c in CASES
    ],
)
def test_baseline_equals_shared_conv(name, n, groups, d, opts, bias):
    x, w, b = _make(n, groups, d, bias)
    stride, padding, dilation = opts
    _assert_same(
        BASELINES[name], x, w, b, groups=groups, stride=stride, padding=padding, dilation=dilation
    )


@pytest.mark.parametrize("name", [name for name in BASELINES if 3 in DIMS[name]])
def test_3d(name):
    x, w, b = _make(3, 2, 2, True)
    _assert_same(
        BASELINES[name], x, w, b, groups=2, stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)
    )


@pytest.mark.parametrize("name", list(BASELINES))
def test_per_dimension_tuples_and_uneven_same(name):
    """Tuples per dimension, and an even kernel with 'same' (padded unevenly, no warning)."""
    x, w, b = _make(1, 3, 2, True)
    w = torch.randn(4, 2, 4, dtype=torch.float64)  # even kernel: 'same' pads 1 left, 2 right
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(BASELINES[name], x, w, b, groups=3, padding="same", dilation=(1,))
        _assert_same(BASELINES[name], x, w, b, groups=3, stride=(2,), padding=(1,))
    if 2 in DIMS[name]:
        x2, w2, b2 = _make(2, 3, 1, True)
        w2 = torch.randn(4, 1, 2, 3, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _assert_same(BASELINES[name], x2, w2, b2, groups=3, padding="same", dilation=(2, 1))


@pytest.mark.parametrize("name", list(BASELINES))
def test_unbatched_input(name):
    x, w, b = _make(1, 3, 2, True, batch=1)
    out = BASELINES[name](x[0], w, b, groups=3, padding=1)
    assert out.shape == (3 * 4, SIZES[1][0])
    torch.testing.assert_close(out, shared_conv(x[0], w, b, groups=3, padding=1), **TOL)


@pytest.mark.parametrize("name", list(BASELINES))
def test_float32_and_shape(name):
    x = torch.randn(4, 6, 20)
    w = torch.randn(5, 2, 3)
    out = BASELINES[name](x, w, groups=3)
    assert out.shape == (4, 15, 18) and out.dtype == torch.float32
    torch.testing.assert_close(out, shared_conv(x, w, groups=3), rtol=1e-5, atol=1e-5)


def test_fold_is_the_layers_computation_exactly():
    x, w, b = _make(1, 3, 2, True)
    expected = shared_conv(x, w, b, groups=3, padding=1)
    assert torch.equal(fold(x, w, b, groups=3, padding=1), expected)


def test_registry():
    assert list(BASELINES) == ["loop", "lift", "grouped_expand", "grouped_repeat", "vmap", "fold"]
    assert set(DIMS) == set(BASELINES)
    assert DIMS["lift"] == (1,)


def test_lift_rejects_2d_and_3d_weights():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match=r"lift is defined for 1-d convolutions only.*4-D weight"):
        lift(x, w, groups=3)
    with pytest.raises(ValueError, match="1-d convolutions only"):
        lift(torch.randn(2, 3, 4, 8, 8), torch.randn(4, 1, 3, 3, 3), groups=3)


class _CountConvolutions(TorchDispatchMode):
    """Counts the convolutions that actually run (after vmap's batching rule)."""

    def __init__(self):
        super().__init__()
        self.forward = self.backward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward += 1
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(BASELINES))
def test_convolution_calls_and_flops(name):
    groups = 3
    x, w, b = (t.requires_grad_() for t in _make(1, groups, 2, True))
    with _CountConvolutions() as count:
        BASELINES[name](x, w, b, groups=groups, padding=1).sum().backward()
    calls = groups if name == "loop" else 1
    assert (count.forward, count.backward) == (calls, calls)
    # the same arithmetic: the loop's G small convolutions add up to the fold's one
    assert flops(BASELINES[name], x, w, b, groups=groups) == flops(fold, x, w, b, groups=groups)


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (("x", None), {"groups": 3}, TypeError, "expected a torch.Tensor input"),
        ((None, "w"), {"groups": 3}, TypeError, "weight must be a torch.Tensor"),
        ((None, None), {"groups": 0}, ValueError, "groups must be a positive int"),
        ((None, None), {"groups": 2}, ValueError, r"expected 4 input channels \(groups=2"),
        ((None, None), {"groups": 3, "stride": 0}, ValueError, "stride must be >= 1"),
        (
            (None, None),
            {"groups": 3, "stride": 2, "padding": "same"},
            ValueError,
            "padding='same' is only defined for stride 1",
        ),
        ((None, None), {"groups": 3, "padding": "full"}, ValueError, "padding must be 'same'"),
        ((None, None), {"groups": 3, "dilation": (1, 1)}, ValueError, "dilation must have 1 value"),
        (("int", None), {"groups": 3}, TypeError, "floating-point input"),
        (("rank", None), {"groups": 3}, ValueError, r"expected a 2-D \(unbatched\) or 3-D"),
        ((None, None, "bias"), {"groups": 3}, ValueError, r"bias must have shape \(4,\)"),
    ],
)
def test_errors_match_the_package(name, args, kwargs, error, match):
    x, w = torch.randn(2, 6, 10), torch.randn(4, 2, 3)
    replace = {
        "x": [[1.0]],
        "w": "weights",
        "int": torch.ones(2, 6, 10, dtype=torch.long),
        "rank": torch.randn(6),
        "bias": torch.randn(5),
    }
    values = [x, w, None]
    for i, arg in enumerate(args):
        if arg is not None:
            values[i] = replace[arg]
    with pytest.raises(error, match=match):
        BASELINES[name](*values, **kwargs)
    # and the same error as the package
    with pytest.raises(error, match=match):
        shared_conv(*values, **kwargs)
