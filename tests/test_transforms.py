"""The layers behave like nn.ConvNd under export, FX, forward AD, vmap and odd inputs.

Each test runs the same thing on the shared layer and checks it against the plain grouped
``nn.ConvNd`` with tied banks (``to_conv``), or against the structure the transform
should see: one convolution on a folded view.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KERNELS, SHARED, SIZES
from torch.func import hessian, jacfwd, jvp, vmap

import sharedconv

DIMS = [1, 2, 3]


def _layer(dim, G=3, D=2, F_out=4, **options):
    torch.manual_seed(dim)
    return SHARED[dim](G * D, G * F_out, KERNELS[dim], groups=G, dtype=torch.float64,
                       **options)


def _input(dim, G=3, D=2, batch=2, **kw):
    return torch.randn(batch, G * D, *SIZES[dim], dtype=torch.float64, **kw)


def _exported_ops(module, x):
    with warnings.catch_warnings():  # torch.export's own pytree deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(module, (x,)).run_decompositions()
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


# the operators a fold may add around its one convolution
FOLD_OPS = ("aten.view", "aten._unsafe_view", "aten.reshape", "aten.constant_pad_nd",
            "aten.unsqueeze", "aten.squeeze", "aten.clone")


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("options", [{}, {"padding": "same", "padding_mode": "zeros"},
                                     {"padding": 1, "padding_mode": "circular"}])
def test_export_graph_is_one_convolution_whatever_requires_grad(dim, options):
    layer = _layer(dim, **options)
    # what nn.ConvNd's own padding decomposes to (circular padding: slices and copies)
    padding_ops = set(_exported_ops(layer.to_conv(), _input(dim))) | set(FOLD_OPS)
    graphs = []
    for requires_grad in (False, True):
        ops = _exported_ops(layer, _input(dim, requires_grad=requires_grad))
        assert sum(op.startswith("aten.convolution") for op in ops) == 1, ops
        others = {op for op in ops if not op.startswith("aten.convolution")}
        assert {op for op in others if not op.startswith(FOLD_OPS)} <= padding_ops, ops
        graphs.append(ops)
    assert graphs[0] == graphs[1]


def test_export_matches_and_runs_inside_autotune():
    layer = _layer(1)
    x = _input(1)
    with sharedconv.autotune():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.export(layer, (x,))
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("conv1d" in op for op in ops) == 1, ops
    torch.testing.assert_close(program.module()(x), layer(x))


@pytest.mark.parametrize("dim", DIMS)
def test_fx_symbolic_trace_records_one_call_and_reproduces(dim):
    layer = _layer(dim, padding=1, padding_mode="reflect")
    traced = torch.fx.symbolic_trace(layer)
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert len(calls) == 1 and calls[0].target.__name__ == "_layer_conv"
    x = _input(dim)
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)
    # bad input is still refused when the traced module runs
    with pytest.raises(ValueError, match="input channels"):
        traced(x[:, :-1])


def test_fx_traces_per_group_layers_and_the_functional_forms():
    layer = sharedconv.SharedConv1d.per_group(2, 4, 3, padding=1, dtype=torch.float64)
    traced = torch.fx.symbolic_trace(layer)
    for groups in (1, 5):
        x = torch.randn(2, 2 * groups, 9, dtype=torch.float64)
        torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 2, 3, dtype=torch.float64))

        def forward(self, x):
            a = sharedconv.shared_conv(x, self.weight, groups=3)
            b = sharedconv.functional.shared_conv(x, self.weight, groups=3)
            return a + b

    module = Functional()
    traced = torch.fx.symbolic_trace(module)
    assert sum(n.op == "call_function" and "shared_conv" in str(n.target)
               for n in traced.graph.nodes) == 2
    x = _input(1)
    torch.testing.assert_close(traced(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("dim", DIMS)
def test_forward_mode_ad_matches_grouped_conv(dim):
    layer = _layer(dim, padding=1, stride=2)
    conv = layer.to_conv()
    x, tangent = _input(dim), _input(dim)
    out, jv = jvp(layer, (x,), (tangent,))
    out_ref, jv_ref = jvp(conv, (x,), (tangent,))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(jv, jv_ref)
    # the same through torch.autograd.forward_ad, inside autotune (which must step aside)
    import torch.autograd.forward_ad as fwAD

    with sharedconv.autotune(), fwAD.dual_level():
        dual = layer(fwAD.make_dual(x, tangent))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, jv_ref)


def test_jacfwd_and_hessian_of_the_functional_form():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    w = torch.randn(2, 2, 3, dtype=torch.float64)

    def shared(w):
        return sharedconv.shared_conv(x, w, groups=2, padding=1).tanh().sum()

    def tied(w):
        return torch.nn.functional.conv1d(x, w.repeat(2, 1, 1), groups=2,
                                          padding=1).tanh().sum()

    torch.testing.assert_close(jacfwd(shared)(w), jacfwd(tied)(w))
    torch.testing.assert_close(hessian(shared)(w), hessian(tied)(w))
    with sharedconv.autotune():
        torch.testing.assert_close(hessian(shared)(w), hessian(tied)(w))


@pytest.mark.parametrize("dim", DIMS)
def test_vmap_over_an_extra_batch_dimension(dim):
    layer = _layer(dim, padding=1)
    xs = torch.randn(4, 2, 6, *SIZES[dim], dtype=torch.float64)
    with sharedconv.autotune():
        out = vmap(layer)(xs)
    expected = torch.stack([layer.to_conv()(x) for x in xs])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("tuned", [False, True])
def test_empty_batch_forward_and_backward(dim, tuned):
    layer = _layer(dim, padding=1)
    x = _input(dim, batch=0, requires_grad=True)
    with sharedconv.autotune(tuned):
        y = layer(x)
        y.sum().backward()
    assert y.shape == layer.to_conv()(x).shape and y.shape[0] == 0
    assert x.grad.shape == x.shape
    torch.testing.assert_close(layer.weight.grad, torch.zeros_like(layer.weight))


@pytest.mark.parametrize("dim", DIMS)
def test_numpy_integer_sizes(dim):
    k = tuple(np.int64(v) for v in KERNELS[dim])
    layer = SHARED[dim](np.int64(6), np.int32(12), k, stride=np.int64(1),
                        padding=np.int64(1), dilation=np.int16(1), groups=np.int64(3))
    assert layer.groups == 3 and type(layer.groups) is int
    assert all(type(v) is int for v in layer.kernel_size + layer.stride + layer.padding)
    assert layer.weight.shape == (4, 2, *KERNELS[dim])
    x = torch.randn(2, 6, *SIZES[dim])
    torch.testing.assert_close(layer(x), layer.to_conv()(x))
    w = torch.randn(4, 2, *KERNELS[dim])
    assert sharedconv.shared_conv(x, w, groups=np.int64(3), stride=np.int64(1)).shape[1] == 12
    with pytest.raises(TypeError, match="bool"):
        SHARED[dim](6, 12, KERNELS[dim], groups=np.bool_(True))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("where", ["input", "weight"])
@pytest.mark.parametrize("tuned", [False, True])
def test_channels_last_output_as_nn_conv_gives_it(dim, where, tuned, monkeypatch):
    """float32, where nn.ConvNd runs oneDNN (as cuDNN does on a GPU): a channels_last
    operand gives a channels_last output. (ATen's slow float64 3-d kernel returns a
    contiguous one; the layer keeps the oneDNN/cuDNN behaviour in every dtype.)"""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dim]
    layer = _layer(dim, padding=1).float()
    conv = layer.to_conv()
    x = _input(dim).float()
    if where == "input":
        x = x.contiguous(memory_format=fmt)
    else:
        layer = layer.to(memory_format=fmt)
        conv = conv.to(memory_format=fmt)
    # tuned: the grouped strategy (a fake timer, nothing timed), the same output format
    monkeypatch.setattr(sharedconv.tuning, "timer",
                        lambda c, device, part: {n: float(n != "grouped") for n in c})
    sharedconv.tuning.clear_cache()
    with sharedconv.autotune(tuned):
        y = layer(x)
    y_ref = conv(x)
    torch.testing.assert_close(y, y_ref)
    if tuned:
        (choice,) = sharedconv.tuning.cache().values()
        assert choice.forward == "grouped"
    sharedconv.tuning.clear_cache()
    assert y_ref.is_contiguous(memory_format=fmt) and not y_ref.is_contiguous()
    assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()
    x_plain = _input(dim).float()
    assert layer.to(memory_format=torch.contiguous_format)(x_plain).is_contiguous()


# ---- TorchScript: tracing records the one convolution; scripting is not supported (api.md)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_jit_trace_records_one_convolution(dim):
    torch.manual_seed(0)
    layer = SHARED[dim](6, 6 * 2, KERNELS[dim], groups=3, padding=1).double()
    x = torch.randn(2, 6, *SIZES[dim], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the checks read sizes
        for category in (DeprecationWarning, FutureWarning):  # TorchScript's own notice
            warnings.simplefilter("ignore", category)
        traced = torch.jit.trace(layer, (x,))
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert sum(k in ("aten::_convolution", f"aten::conv{dim}d") for k in kinds) == 1, kinds
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)


def test_jit_script_is_refused_as_the_api_page_says():
    api = (Path(__file__).resolve().parents[1] / "book" / "api.md").read_text()
    assert "TorchScript (`torch.jit.script`) is not" in api
    with warnings.catch_warnings(), pytest.raises(Exception, match="nn.Parameter"):
        for category in (DeprecationWarning, FutureWarning):  # TorchScript's own notice
            warnings.simplefilter("ignore", category)
        torch.jit.script(SHARED[1](4, 8, 3, groups=4))
