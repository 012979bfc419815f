"""torch.compile captures the layer in one graph and computes the same thing."""

from __future__ import annotations

import shutil

import pytest
import torch

import sharedconv
from sharedconv import tuning

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("cc") is None,
    reason="inductor on CPU needs a C++ compiler",
)


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("in_per_group,out_per_group", [(1, 8), (3, 6), (8, 16)])
def test_compile_fullgraph_inductor(mode, in_per_group, out_per_group):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = sharedconv.SharedConv1d(4 * in_per_group, 4 * out_per_group, 5, groups=4,
                                    padding=2, padding_mode=mode)
    x = torch.randn(3, 4 * in_per_group, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)  # raises on any graph break
    y, y_ref = compiled(x), layer(x)
    torch.testing.assert_close(y, y_ref)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref)


@pytest.mark.slow
@pytest.mark.parametrize("dim", [2, 3])
def test_compile_fullgraph_functional(dim):
    """The functional form with 'same' padding (uneven kernel) traces without breaks."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    k = (2,) * dim
    w = torch.randn(4, 2, *k)
    b = torch.randn(4)
    x = torch.randn(2, 6, *(6,) * dim)

    def f(x, w, b):
        return sharedconv.shared_conv(x, w, b, padding="same", groups=3).relu()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))


@pytest.mark.slow
def test_compile_under_autotune_is_the_fold(monkeypatch):
    """Inside autotune(), a compiled layer still traces the fold: one convolution, no
    timing, nothing cached."""
    torch._dynamo.reset()
    tuning.clear_cache()
    monkeypatch.setattr(tuning, "timer", lambda *a: pytest.fail("timed under compile"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layer = sharedconv.SharedConv1d(8, 32, 3, groups=8, padding=1)
    x = torch.randn(2, 8, 40, requires_grad=True)
    with sharedconv.autotune():
        y = torch.compile(layer, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(y, layer(x))
    (graph,) = graphs
    calls = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert sum("conv1d" in c for c in calls) == 1, calls
    assert tuning.cache() == {}
