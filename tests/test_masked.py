"""masked_shared_conv1d equals the literal masked path, on outputs and on every gradient."""

from __future__ import annotations

import itertools
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharedconv
from sharedconv.lab.memory import saved_tensors
from sharedconv.masked import (
    MaskedSharedConv1d,
    masked_shared_conv1d,
    naive_masked_shared_conv1d,
)

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
    from sharedconv.lab.memory import largest_tensor

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


# ------------------------------------------------------------------ the layer


def _layer_like(w, b, **options):
    F_, D, k = w.shape
    layer = MaskedSharedConv1d(D, F_, k, bias=b is not None, dtype=w.dtype, **options)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


@pytest.mark.parametrize("options,bias", list(itertools.product(OPTIONS, (True, False))))
def test_layer_equals_functional_and_naive_path(options, bias):
    s, p, d = options
    x, mask, w, b = _inputs(bias=bias)
    layer = _layer_like(w, b, stride=s, padding=p, dilation=d)
    params = [layer.weight] + ([layer.bias] if bias else [])
    y = layer(x, mask)
    y_fn = masked_shared_conv1d(x, mask, layer.weight, layer.bias, stride=s, padding=p,
                                dilation=d)
    y_ref = naive_masked_shared_conv1d(x, mask, w, b, stride=s, padding=p, dilation=d)
    torch.testing.assert_close(y, y_fn, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, [x, mask, *params], upstream)
    wrt_ref = [x, mask, w] + ([b] if bias else [])
    grads_ref = torch.autograd.grad(y_ref, wrt_ref, upstream)
    for got, expected in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_layer_initialises_as_conv1d():
    D, F_, k = 6, 7, 5
    torch.manual_seed(0)
    conv = nn.Conv1d(D, F_, k)
    torch.manual_seed(0)
    layer = MaskedSharedConv1d(D, F_, k)
    assert layer.weight.shape == conv.weight.shape == (F_, D, k)
    assert layer.bias is not None and layer.bias.shape == (F_,)
    # the same draws from the same interval, in the same order
    torch.testing.assert_close(layer.weight, conv.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, conv.bias, rtol=0, atol=0)
    bound = 1 / math.sqrt(D * k)
    big = MaskedSharedConv1d(64, 32, 5)
    for t in (big.weight, big.bias):
        assert t.abs().max() <= 1 / math.sqrt(64 * 5)
        assert t.abs().max() > 0.9 / math.sqrt(64 * 5)  # and fills it
    assert layer.weight.abs().max() <= bound


def test_layer_options_repr_and_factory():
    layer = MaskedSharedConv1d(4, 3, 5, stride=2, padding=1, dilation=2, bias=False,
                               dtype=torch.float64)
    assert layer.bias is None and layer.weight.dtype == torch.float64
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == (
        (5,), (2,), (1,), (2,))
    assert repr(layer) == (
        "MaskedSharedConv1d(4, 3, kernel_size=(5,), stride=(2,), padding=(1,), "
        "dilation=(2,), bias=False)"
    )
    assert repr(MaskedSharedConv1d(64, 32, 5)) == (
        "MaskedSharedConv1d(64, 32, kernel_size=(5,), stride=(1,))"
    )
    same = MaskedSharedConv1d(4, 3, 4, padding="same")
    assert "padding=same" in repr(same)
    y = same(torch.randn(2, 4, 9), torch.rand(2, 6, 9) < 0.5)  # bool mask, T read from it
    assert y.shape == (2, 6 * 3, 9)
    assert [n for n, _ in layer.named_parameters()] == ["weight"]


@pytest.mark.parametrize(
    "make,exc,fragments",
    [
        (lambda: MaskedSharedConv1d(0, 3, 3), ValueError, ["in_channels", "positive"]),
        (lambda: MaskedSharedConv1d(3, 3.0, 3), TypeError, ["out_channels", "int"]),
        (lambda: MaskedSharedConv1d(3, 3, 0), ValueError, ["kernel_size", ">= 1"]),
        (lambda: MaskedSharedConv1d(3, 3, 3, stride=2, padding="same"), ValueError,
         ["'same'", "stride"]),
        (lambda: MaskedSharedConv1d(3, 3, 3, dilation=0), ValueError, ["dilation"]),
        (lambda: MaskedSharedConv1d(3, 3, 3, padding="full"), ValueError, ["'full'"]),
    ],
)
def test_layer_construction_errors(make, exc, fragments):
    with pytest.raises(exc) as info:
        make()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize(
    "x,mask,exc,fragments",
    [
        (torch.randn(2, 5, 13), torch.rand(2, 4, 13), ValueError, ["5 channels", "D=3"]),
        (torch.randn(2, 3, 13), torch.rand(2, 4, 12), ValueError, ["(2, T, 13)"]),
        (torch.randn(2, 3, 13).double(), torch.rand(2, 4, 13).double(), TypeError,
         ["float64", "float32"]),
        (torch.randn(3, 13), torch.rand(4, 13), ValueError, ["(B, D, L)"]),
    ],
)
def test_layer_forward_errors(x, mask, exc, fragments):
    layer = MaskedSharedConv1d(3, 5, 3, padding=1)
    with pytest.raises(exc) as info:
        layer(x, mask)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_layer_saves_only_the_input_and_mask():
    x, mask, _, _ = _inputs(B=2, D=8, L=32, T=16, F_=4, k=5)
    layer = MaskedSharedConv1d(8, 4, 5, padding=2, dtype=torch.float64)
    report = saved_tensors(layer, x, mask, exclude=layer.parameters())
    assert report.nbytes == 8 * (x.numel() + mask.numel())
    assert report.excluded_nbytes == 8 * layer.weight.numel()


# ------------------------------------------------------------------ torch.func


@pytest.mark.parametrize("options", OPTIONS)
def test_vmap_over_a_leading_dimension_equals_a_loop(options):
    s, p, d = options
    V = 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(V, 2, 3, 13, generator=g, dtype=torch.float64)
    mask = torch.rand(V, 2, 4, 13, generator=g, dtype=torch.float64)
    _, _, w, b = _inputs()
    w, b = w.detach(), b.detach()

    def fn(x, mask, w=w, b=b):
        return masked_shared_conv1d(x, mask, w, b, stride=s, padding=p, dilation=d)

    got = torch.func.vmap(fn)(x, mask)
    expected = torch.stack([fn(x[i], mask[i]) for i in range(V)])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # over the mask alone, the batch dimension last; and over the parameters
    got = torch.func.vmap(fn, in_dims=(None, 3), out_dims=1)(x[0], mask[0].unsqueeze(3).repeat(
        1, 1, 1, V))
    torch.testing.assert_close(got, fn(x[0], mask[0]).unsqueeze(1).expand_as(got))
    ws = torch.randn(V, *w.shape, generator=g, dtype=torch.float64)
    bs = torch.randn(V, *b.shape, generator=g, dtype=torch.float64)
    got = torch.func.vmap(lambda w, b: fn(x[0], mask[0], w, b))(ws, bs)
    expected = torch.stack([naive_masked_shared_conv1d(x[0], mask[0], ws[i], bs[i], stride=s,
                                                       padding=p, dilation=d) for i in range(V)])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the layer under vmap
    layer = _layer_like(w, b, stride=s, padding=p, dilation=d)
    torch.testing.assert_close(torch.func.vmap(layer)(x, mask),
                               torch.func.vmap(fn)(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("options", OPTIONS[:4])
def test_func_grad_equals_autograd(options):
    s, p, d = options
    x, mask, w, b = _inputs()

    def loss(w, x, mask, b, fn=masked_shared_conv1d):
        return fn(x, mask, w, b, stride=s, padding=p, dilation=d).pow(2).sum()

    got = torch.func.grad(loss)(w, x, mask, b)
    (expected,) = torch.autograd.grad(loss(w, x, mask, b), [w])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (naive,) = torch.autograd.grad(loss(w, x, mask, b, naive_masked_shared_conv1d), [w])
    torch.testing.assert_close(got, naive, rtol=1e-12, atol=1e-12)
    # all four at once, and per sample: vmap of grad over the batch
    got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(w, x, mask, b)
    expected = torch.autograd.grad(loss(w, x, mask, b), [w, x, mask, b])
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)

    def per_sample(x, mask, fn=masked_shared_conv1d):
        return torch.func.grad(loss)(w, x[None], mask[None], b, fn)

    torch.testing.assert_close(
        torch.func.vmap(per_sample)(x, mask),
        torch.stack([per_sample(x[i], mask[i], naive_masked_shared_conv1d) for i in range(2)]),
        rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "options,which",
    [(o, (True,) * 4) for o in OPTIONS]
    + [(OPTIONS[1], which) for which in itertools.product((True, False), repeat=4)
       if any(which) and not all(which)],
)
def test_func_jvp_equals_the_naive_path(options, which):
    s, p, d = options
    x, mask, w, b = (t.detach() for t in _inputs())
    g = torch.Generator().manual_seed(11)
    primals = (x, mask, w, b)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in primals)

    def restrict(fn):  # only the inputs in `which` carry a tangent
        def f(*moving):
            it = iter(moving)
            args = [next(it) if m else t for t, m in zip(primals, which, strict=True)]
            return fn(*args, stride=s, padding=p, dilation=d)
        return f

    moving = tuple(t for t, m in zip(primals, which, strict=True) if m)
    dirs = tuple(t for t, m in zip(tangents, which, strict=True) if m)
    out, tangent = torch.func.jvp(restrict(masked_shared_conv1d), moving, dirs)
    out_ref, tangent_ref = torch.func.jvp(restrict(naive_masked_shared_conv1d), moving, dirs)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, tangent_ref, rtol=1e-12, atol=1e-12)


def test_forward_ad_and_batched_gradcheck():
    """The jvp and the vmap rule against finite differences, as gradcheck checks them."""
    x, mask, w, b = _inputs(B=1, D=2, L=7, T=2, F_=2, k=3, seed=3)

    def fn(x, mask, w, b):
        return masked_shared_conv1d(x, mask, w, b, stride=2, padding=1, dilation=2)

    assert torch.autograd.gradcheck(fn, (x, mask, w, b), check_forward_ad=True,
                                    check_batched_grad=True, check_batched_forward_grad=True)


def test_hessian_vector_product_forward_over_reverse():
    x, mask, w, b = (t.detach() for t in _inputs())

    def loss(w, fn=masked_shared_conv1d):
        return fn(x, mask, w, b, padding=1).pow(2).sum()

    v = torch.randn_like(w)
    _, hvp = torch.func.jvp(torch.func.grad(loss), (w,), (v,))
    _, hvp_ref = torch.func.jvp(torch.func.grad(lambda w: loss(w, naive_masked_shared_conv1d)),
                                (w,), (v,))
    torch.testing.assert_close(hvp, hvp_ref, rtol=1e-12, atol=1e-12)



def test_jacfwd_equals_jacrev_and_reverse_over_forward():
    x, mask, w, b = (t.detach() for t in _inputs(B=1, D=2, L=7, T=2, F_=2, k=3))

    def fn(w, x, fn=masked_shared_conv1d):
        return fn(x, mask, w, b, stride=2, padding=1, dilation=2)

    jf = torch.func.jacfwd(fn, argnums=(0, 1))(w, x)  # vmap over the jvp
    jr = torch.func.jacrev(fn, argnums=(0, 1))(w, x)  # vmap over the backward
    jn = torch.func.jacrev(lambda w, x: fn(w, x, naive_masked_shared_conv1d), argnums=(0, 1))(w, x)
    for a, r, n in zip(jf, jr, jn, strict=True):
        torch.testing.assert_close(a, n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r, n, rtol=1e-12, atol=1e-12)
    v = torch.randn_like(x)

    def tangent_norm(w, base=masked_shared_conv1d):  # reverse over forward
        return torch.func.jvp(lambda x: fn(w, x, base), (x,), (v,))[1].pow(2).sum()

    torch.testing.assert_close(
        torch.func.grad(tangent_norm)(w),
        torch.func.grad(lambda w: tangent_norm(w, naive_masked_shared_conv1d))(w),
        rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("cc") is None,
    reason="inductor on CPU needs a C++ compiler",
)
def test_compile_fullgraph():
    """The custom jvp stays out of compiled code: the layer compiles in one graph."""
    torch._dynamo.reset()
    x, mask, w, b = (t.detach().float() for t in _inputs())
    x.requires_grad_()
    layer = _layer_like(w, b, padding=1)
    compiled = torch.compile(layer, fullgraph=True)  # raises on any graph break
    y, y_ref = compiled(x, mask), layer(x, mask)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(torch.autograd.grad(y.square().sum(), x)[0],
                               torch.autograd.grad(y_ref.square().sum(), x)[0])
