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


def _graph_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``out``."""
    names, stack, seen = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("D", [1, 2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize(
    "stride,padding,dilation", [(1, 0, 1), (2, 3, 1), (3, 2, 2), (1, "same", 3)]
)
def test_1d_gradient_routes_equal_grouped_conv(D, stride, padding, dilation):
    """1-d input and weight gradients from the grouped convolution (D in
    GROUPED_INPUT_GRAD, GROUPED_WEIGHT_GRAD) or from the folded one (other D)."""
    torch.manual_seed(5)
    G, F_out = 3, 16  # 16 filters of 5 taps: 80 weights or more, the forward runs folded
    layer = sharedconv.SharedConv1d(G * D, G * F_out, 5, stride=stride, padding=padding,
                                    dilation=dilation, groups=G, dtype=torch.float64)
    x = torch.randn(2, G * D, 70, dtype=torch.float64, requires_grad=True)
    functional = sharedconv.functional
    FOLD, GROUPED = functional.FOLD, functional.GROUPED
    expected = (FOLD, GROUPED if D in functional.GROUPED_INPUT_GRAD else FOLD,
                GROUPED if D in functional.GROUPED_WEIGHT_GRAD else FOLD)
    routed = expected != (FOLD, FOLD, FOLD)
    route = functional._cpu_route(x, layer.weight, G)
    assert route == (expected if routed else None)
    assert ("_Conv1dSharedCPUBackward" in _graph_nodes(layer(x))) == routed
    assert_matches_grouped_conv(layer, x, rtol=1e-12, atol=1e-12)
    # autograd keeps what the bare folded convolution keeps: the (padded) input, one bank
    from sharedconv.baselines import fold
    from sharedconv.memory import saved_tensors

    options = dict(groups=G, stride=stride, padding=padding, dilation=dilation)
    bare = saved_tensors(fold, x, layer.weight, layer.bias, **options, exclude=[layer.weight])
    assert saved_tensors(layer, x, exclude=[layer.weight]).nbytes == bare.nbytes > 0


@pytest.mark.parametrize("D,F_out", [(1, 4), (1, 8), (2, 8), (4, 16), (8, 16), (8, 4)])
def test_cpu_routes_gradgradcheck(D, F_out):
    torch.manual_seed(9)
    x = torch.randn(2, 3 * D, 40, dtype=torch.float64, requires_grad=True)
    w = torch.randn(F_out, D, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(F_out, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return sharedconv.shared_conv(x, w, b, groups=3, padding=2, stride=2, dilation=2)

    assert sharedconv.functional._cpu_route(x, w, 3) is not None
    assert "_Conv1dSharedCPUBackward" in _graph_nodes(fn(x, w, b))
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_cpu_routes_only_when_they_help():
    route = sharedconv.functional._cpu_route
    w = torch.randn(16, 2, 3, requires_grad=True)  # 96 weights: not a small bank
    x = torch.randn(2, 8, 64, requires_grad=True)  # (B, G * D, L) with G = 4, D = 2
    assert route(x, w, 4) == ("fold", "grouped", "fold")  # input gradient grouped
    assert route(x.detach(), w, 4) is None  # the input's gradient is not needed
    with torch.no_grad():
        assert route(x, w, 4) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert route(x, w, 4) is None
    assert route(x, w, 1) is None  # one group: the grouped convolution is the fold
    x6 = torch.randn(2, 24, 64, requires_grad=True)
    assert route(x6, torch.randn(16, 6, 3), 4) is None  # D = 6: folded is faster
    x8 = torch.randn(2, 32, 64, requires_grad=True)
    w8 = torch.randn(16, 8, 3, requires_grad=True)
    assert route(x8, w8, 4) == ("fold", "grouped", "grouped")  # D = 8: both gradients
    assert route(x8, w8.detach(), 4) == ("fold", "grouped", "fold")
    # bank copies larger than the input: not worth the memory
    assert route(torch.randn(2, 8, 4, requires_grad=True), w, 4) is None
    assert route(x.to("meta"), w.to("meta"), 4) is None  # not on the CPU


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


@pytest.mark.parametrize("G,D,F_out", [(4, 3, 8), (8, 3, 4), (16, 2, 4), (5, 2, 15)])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 2, 1), (2, "valid", 2)])
def test_1d_grouped_forward_route(G, D, F_out, stride, padding, dilation):
    """Few filters, small copies: the forward runs grouped, on a temporary bank copy."""
    torch.manual_seed(7)
    layer = sharedconv.SharedConv1d(G * D, G * F_out, 3, stride=stride, padding=padding,
                                    dilation=dilation, groups=G, dtype=torch.float64)
    x = torch.randn(2, G * D, 256, dtype=torch.float64, requires_grad=True)
    route = sharedconv.functional._cpu_route(x, layer.weight, G)
    assert route is not None and route[0] == "grouped"
    assert "_Conv1dSharedCPUBackward" in _graph_nodes(layer(x))
    assert_matches_grouped_conv(layer, x, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no Function without a gradient, the same numbers
        torch.testing.assert_close(layer(x), layer.to_conv()(x), rtol=1e-12, atol=1e-12)
    # autograd keeps the input and the one bank, not G copies of it
    from sharedconv.memory import saved_tensors

    report = saved_tensors(layer, x)
    assert report.nbytes == 8 * (x.numel() + layer.weight.numel())


def test_grouped_forward_route_only_when_copies_are_small():
    def grouped_forward(x, w, groups):
        route = sharedconv.functional._cpu_route(x, w, groups)
        return route is not None and route[0] == "grouped"

    # banks too large to unfold (more than 64 weights, or more taps than filters)
    x = torch.randn(1, 256, 512)
    assert grouped_forward(x[:, :12], torch.randn(8, 3, 3), 4)  # 4 x 72 = 288 weights
    assert grouped_forward(x[:, :32], torch.randn(4, 2, 3), 16)  # 16 x 24 = 384
    assert not grouped_forward(x[:, :32], torch.randn(4, 2, 5), 16)  # 640: above 512
    assert not grouped_forward(x[:, :192], torch.randn(8, 3, 3), 64)  # 4608
    assert not grouped_forward(x[:, :16], torch.randn(16, 4, 3), 4)  # 16 filters: a block
    assert not grouped_forward(x[:, :24], torch.randn(8, 3, 3), 1)  # one group
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not grouped_forward(x[:, :12], torch.randn(8, 3, 3), 4)


def test_cpu_function_apply_without_the_binding_shortcut(monkeypatch):
    """With torch's own apply (as when its internals differ), the same numbers."""
    torch.manual_seed(10)
    x = torch.randn(2, 8, 40, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert sharedconv.functional._cpu_route(x, w, 4) == ("grouped", "grouped", "fold")
    fast = sharedconv.shared_conv(x, w, groups=4, padding=1)
    fast_grads = torch.autograd.grad(fast.square().sum(), (x, w))
    monkeypatch.setattr(sharedconv.functional, "_SINGLE_LEVEL", None)
    plain = sharedconv.shared_conv(x, w, groups=4, padding=1)
    plain_grads = torch.autograd.grad(plain.square().sum(), (x, w))
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------- the unfolded route

SMALL_BANKS = [(1, 8, 3), (1, 8, 7), (1, 4, 4), (2, 8, 3), (1, 16, 4), (2, 16, 2)]


@pytest.mark.parametrize("D,F_out,k", SMALL_BANKS)
@pytest.mark.parametrize(
    "stride,padding,dilation", [(1, 0, 1), (1, "same", 1), (2, 3, 1), (3, 2, 2), (1, "same", 3)]
)
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_1d_unfold_route_equals_grouped_conv(D, F_out, k, stride, padding, dilation,
                                             chunk_bytes, monkeypatch):
    """Small banks: every part as matrix products over the unfolded windows, in one
    chunk or (chunk_bytes=1) one sample at a time; the same numbers, the same memory."""
    functional = sharedconv.functional
    if chunk_bytes is not None:
        monkeypatch.setattr(functional, "UNFOLD_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(11)
    G = 3
    layer = sharedconv.SharedConv1d(G * D, G * F_out, k, stride=stride, padding=padding,
                                    dilation=dilation, groups=G, dtype=torch.float64)
    x = torch.randn(2, G * D, 41, dtype=torch.float64, requires_grad=True)
    left, right = functional._explicit_padding(
        layer.padding if isinstance(layer.padding, str) else tuple(layer.padding), (k,),
        (dilation,))
    # an uneven 'same' is padded before the route; an even padding is the route's own
    seen = (x, left) if left == right else (F.pad(x, (left, right)), 0)
    assert functional._cpu_route(seen[0], layer.weight, G, seen[1], stride, dilation) == (
        "unfold", "unfold", "unfold")
    assert "_Conv1dSharedCPUBackward" in _graph_nodes(layer(x))
    assert_matches_grouped_conv(layer, x, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the forward alone, without the Function
        torch.testing.assert_close(layer(x), layer.to_conv()(x), rtol=1e-12, atol=1e-12)
    # the windows are temporaries: autograd keeps what the bare fold keeps
    from sharedconv.baselines import fold
    from sharedconv.memory import saved_tensors

    options = dict(groups=G, stride=stride, padding=padding, dilation=dilation)
    bare = saved_tensors(fold, x, layer.weight, layer.bias, **options, exclude=[layer.weight])
    assert saved_tensors(layer, x, exclude=[layer.weight]).nbytes == bare.nbytes > 0


@pytest.mark.parametrize("needs", ["x", "w", "b", "wb", "xb"])
def test_unfold_route_computes_only_the_gradients_needed(needs):
    torch.manual_seed(12)
    x = torch.randn(2, 8, 30, dtype=torch.float64, requires_grad="x" in needs)
    w = torch.randn(8, 1, 3, dtype=torch.float64, requires_grad="w" in needs)
    b = torch.randn(8, dtype=torch.float64, requires_grad="b" in needs)
    assert sharedconv.functional._cpu_route(x, w, 8, 1)[0] == "unfold"
    y = sharedconv.shared_conv(x, w, b, groups=8, padding=1)
    ref = F.conv1d(x, w.repeat(8, 1, 1), b.repeat(8), padding=1, groups=8)
    torch.testing.assert_close(y, ref)
    leaves = [t for t in (x, w, b) if t.requires_grad]
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g),
                         strict=True):
        torch.testing.assert_close(got, want)


def test_unfold_route_chunked_gradgradcheck(monkeypatch):
    monkeypatch.setattr(sharedconv.functional, "UNFOLD_CHUNK_BYTES", 200)  # several chunks
    torch.manual_seed(13)
    x = torch.randn(2, 6, 25, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return sharedconv.shared_conv(x, w, b, groups=3, padding=1, stride=2)

    assert len(sharedconv.functional._chunks(6, 2 * 3 * 13 * 8)) == 6
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_unfold_route_only_for_small_banks():
    route = sharedconv.functional._cpu_route
    x = torch.randn(2, 4 * 4, 64, requires_grad=True)  # G = 4 groups of up to 4 channels
    unfold = ("unfold", "unfold", "unfold")
    assert route(x[:, :4], torch.randn(8, 1, 8), 4) == unfold  # 64 weights, 8 taps
    assert route(x[:, :4], torch.randn(16, 1, 4), 4) == unfold
    assert route(x[:, :8], torch.randn(8, 2, 4), 4) == unfold  # D * k = 8 = F
    assert route(x[:, :4], torch.randn(13, 1, 5), 4) != unfold  # 65 weights
    assert route(x[:, :4], torch.randn(4, 1, 5), 4) != unfold  # 5 taps, 4 filters
    assert route(x[:, :8], torch.randn(8, 2, 5), 4) != unfold  # D * k = 10 > 8
    with torch.no_grad():  # the forward is worth it without a gradient too
        assert route(x[:, :4], torch.randn(8, 1, 3), 4) == unfold
    # without it, the grouped rules (few filters, small copies; one input channel)
    assert route(x[:, :4], torch.randn(8, 1, 3), 4, unfold=False) == (
        "grouped", "grouped", "fold")
    assert route(x[:, :4], torch.randn(8, 1, 3), 1) is None  # one group: the conv itself
    assert route(x[:, :4].to("meta"), torch.randn(8, 1, 3, device="meta"), 4) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert route(x[:, :4], torch.randn(8, 1, 3), 4) is None
    # an input shorter than one window: left to the convolution, which says so
    short = torch.randn(1, 4, 2)
    assert route(short, torch.randn(8, 1, 3), 4) is None
    with pytest.raises(RuntimeError, match="[Kk]ernel size"):
        sharedconv.shared_conv(short, torch.randn(8, 1, 3), groups=4)
    assert route(short, torch.randn(8, 1, 3), 4, padding=1) == unfold


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfold_route_low_precision(dtype):
    """float32 and bfloat16 on the unfolded route agree with the grouped convolution."""
    torch.manual_seed(14)
    x = torch.randn(4, 16, 200, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 1, 5, dtype=dtype, requires_grad=True)
    assert sharedconv.functional._cpu_route(x, w, 16, 2)[0] == "unfold"
    y = sharedconv.shared_conv(x, w, groups=16, padding=2)
    ref = F.conv1d(x.double(), w.double().repeat(16, 1, 1), padding=2, groups=16)
    # the reference is computed in float64 from the same (rounded) values
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref, **tol)
    g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    g = g.double()
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    gx_ref, gw_ref = torch.autograd.grad(
        F.conv1d(x64, w64.repeat(16, 1, 1), padding=2, groups=16), (x64, w64), g)
    assert gx.dtype == gw.dtype == dtype
    torch.testing.assert_close(gx.double(), gx_ref, **tol)
    # the weight gradient sums 4 x 16 x 200 products: compare relative to its size
    scale = gw_ref.abs().max()
    torch.testing.assert_close(gw.double() / scale, gw_ref / scale, **tol)
