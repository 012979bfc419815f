"""masked_shared_conv1d equals the literal masked path, on outputs and on every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import sharedconv
from sharedconv.masked import masked_shared_conv1d, naive_masked_shared_conv1d
from sharedconv.memory import saved_tensors

OPTIONS = [  # (stride, padding, dilation)
    (1, 0, 1), (1, 2, 1), (2, 1, 1), (1, "same", 2), (3, 3, 2), (1, "valid", 3), (2, 0, 2),
]


def _inputs(B=2, D=3, L=13, T=4, F_=5, k=3, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, L, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, T, L, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(F_, D, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(F_, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    return x, mask, w, b


@pytest.mark.parametrize(
    "options,bias,k", list(itertools.product(OPTIONS, (True, False), (1, 3, 4)))
)
def test_equals_naive_path_outputs_and_gradients(options, bias, k):
    s, p, d = options
    x, mask, w, b = _inputs(k=k, bias=bias)
    y = masked_shared_conv1d(x, mask, w, b, stride=s, padding=p, dilation=d)
    y_ref = naive_masked_shared_conv1d(x, mask, w, b, stride=s, padding=p, dilation=d)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y_ref)
    wrt = [t for t in (x, mask, w, b) if t is not None]
    grads = torch.autograd.grad(y, wrt, upstream)
    grads_ref = torch.autograd.grad(y_ref, wrt, upstream)
    for got, expected in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_naive_path_is_the_repeated_weight_grouped_conv():
    """The reference itself, against the forum's formulation with T weight copies."""
    x, mask, w, b = _inputs()
    T = mask.shape[1]
    masked = (x[:, None] * mask[:, :, None]).flatten(1, 2)  # (B, T*D, L)
    expected = F.conv1d(masked, w.repeat(T, 1, 1), b.repeat(T), padding=1, groups=T)
    torch.testing.assert_close(naive_masked_shared_conv1d(x, mask, w, b, padding=1), expected)
    layer = sharedconv.SharedConv1d(T * 3, T * 5, 3, groups=T, padding=1, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    torch.testing.assert_close(layer(masked), expected)


def test_boolean_mask_and_partial_gradients():
    x, mask, w, b = _inputs()
    boolean = mask.detach() > 0.5
    y = masked_shared_conv1d(x, boolean, w, b, padding=1)
    torch.testing.assert_close(y, naive_masked_shared_conv1d(x, boolean.double(), w, b, padding=1))
    (gw,) = torch.autograd.grad(y.sum(), [w])  # only the weight asks for a gradient
    assert gw.shape == w.shape


def test_gradcheck_and_gradgradcheck():
    x, mask, w, b = _inputs(B=1, D=2, L=7, T=2, F_=2, k=3, seed=3)

    def fn(x, mask, w, b):
        return masked_shared_conv1d(x, mask, w, b, stride=2, padding=1, dilation=2)

    assert torch.autograd.gradcheck(fn, (x, mask, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, mask, w, b))


def test_saves_only_its_inputs():
    """Autograd keeps x, the mask and the weight: nothing of size B*T*F*L or B*T*D*L."""
    x, mask, w, b = _inputs(B=2, D=8, L=32, T=16, F_=4, k=5)
    report = saved_tensors(masked_shared_conv1d, x, mask, w, b, padding=2)
    assert report.nbytes == 8 * (x.numel() + mask.numel() + w.numel())
    naive = saved_tensors(naive_masked_shared_conv1d, x, mask, w, b, padding=2)
    assert naive.nbytes > 8 * x.numel() * mask.shape[1]  # the masked tensor, B*T*D*L


def test_output_layout_and_values():
    x, mask, w, b = _inputs()
    y = masked_shared_conv1d(x, mask, w, b, padding=1)
    assert y.shape == (2, 4 * 5, 13)
    assert y.stride(1) == 1  # channels innermost: a view of the (B, L, T, F) product
    torch.testing.assert_close(y.contiguous(), naive_masked_shared_conv1d(x, mask, w, b, padding=1))


@pytest.mark.parametrize(
    "args,exc,fragments",
    [
        (dict(x=torch.randn(2, 3)), ValueError, ["(B, D, L)", "2-D"]),
        (dict(mask=torch.rand(2, 4)), ValueError, ["mask", "(B, T, L)", "2-D"]),
        (dict(mask=torch.rand(3, 4, 13)), ValueError, ["(2, T, 13)", "(3, 4, 13)"]),
        (dict(mask=torch.rand(2, 4, 12)), ValueError, ["(2, T, 13)", "(2, 4, 12)"]),
        (dict(w=torch.randn(5, 2, 3)), ValueError, ["3 channels", "D=2"]),
        (dict(w=torch.randn(5, 3, 3, 3)), ValueError, ["(F, D, k)", "(5, 3, 3, 3)"]),
        (dict(b=torch.randn(4)), ValueError, ["bias", "(5,)", "(4,)"]),
        (dict(x=torch.ones(2, 3, 13, dtype=torch.int64)), TypeError, ["x", "floating", "int64"]),
        (dict(mask=torch.ones(2, 4, 13, dtype=torch.int64)), TypeError, ["mask", "int64"]),
        (dict(mask=torch.ones(2, 4, 13, dtype=torch.float64)), TypeError, ["float64", "float32"]),
        (dict(stride=2, padding="same"), ValueError, ["'same'", "stride"]),
        (dict(dilation=0), ValueError, ["dilation", "0"]),
        (dict(x=torch.randn(2, 3, 2), mask=torch.rand(2, 4, 2)), ValueError, ["shorter", "kernel"]),
    ],
)
def test_errors(args, exc, fragments):
    values = dict(x=torch.randn(2, 3, 13), mask=torch.rand(2, 4, 13), w=torch.randn(5, 3, 3),
                  b=torch.randn(5))
    options = {k: args.pop(k) for k in ("stride", "padding", "dilation") if k in args}
    values.update(args)
    with pytest.raises(exc) as info:
        masked_shared_conv1d(values["x"], values["mask"], values["w"], values["b"], **options)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_never_materialises_the_masked_tensor():
    """Forward and backward: no tensor is as large as B*T*D*L (the naive path makes one)."""
    from sharedconv.memory import largest_tensor

    B, D, L, T, F_, k = 2, 16, 40, 12, 4, 5
    x = torch.randn(B, D, L, requires_grad=True)
    mask = torch.rand(B, T, L, requires_grad=True)
    w = torch.randn(F_, D, k, requires_grad=True)
    masked_bytes = B * T * D * L * 4
    fast, _ = largest_tensor(masked_shared_conv1d, x, mask, w, padding=2, backward=True)
    slow, _ = largest_tensor(naive_masked_shared_conv1d, x, mask, w, padding=2, backward=True)
    assert slow >= masked_bytes
    # the largest are the output, (B, T, F, L), and the mask windows, (B, L, T, k)
    assert fast == B * T * max(F_, k) * L * 4 < masked_bytes
