"""What a GPU must show beyond the oracles: the tuner timing for real and checkpointing on
CUDA, the output's memory format as cuDNN gives it, the masked path, complex dtypes, TF32,
and CUDA graph capture under the tuner. Every test here needs a CUDA device
(``python3 dev.py gpu`` runs them with ``-m cuda``)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import SHARED, assert_format_like_nn, cuda, tied_conv
from torch.utils.checkpoint import checkpoint

import sharedconv
from sharedconv import tuning
from sharedconv.masked import naive_masked_shared_conv1d


@pytest.fixture(autouse=True)
def _fresh_tuner():
    tuning.clear_cache()
    yield
    tuning.clear_cache()


@cuda
@pytest.mark.parametrize("dim", [1, 2])
def test_real_tuning_with_checkpointing_on_cuda(dim):
    torch.manual_seed(0)
    size = {1: (300,), 2: (24, 20)}[dim]
    layer = SHARED[dim](16 * 2, 16 * 8, 3, groups=16, padding=1, device="cuda",
                        dtype=torch.float64)
    reference = tied_conv(layer)
    x = torch.randn(4, 32, *size, device="cuda", dtype=torch.float64)
    for _ in range(2):  # the first step tunes, the second runs the choices
        with sharedconv.autotune():
            xg = x.clone().requires_grad_()
            y = checkpoint(layer, xg, use_reentrant=False)
            (y * y).sum().backward()
        xr = x.clone().requires_grad_()
        (reference(xr) ** 2).sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad)
    (choice,) = tuning.cache().values()
    assert {choice.forward, choice.input_grad, choice.weight_grad} <= set(tuning.STRATEGIES)


@cuda
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_output_memory_format_is_nn_convnds_on_cuda(dim, dtype):
    for transposed, groups, cl_x, cl_w in itertools.product((False, True), (1, 4),
                                                            (False, True), (False, True)):
        kind = f"SharedConvTranspose{dim}d" if transposed else f"SharedConv{dim}d"
        layer = getattr(sharedconv, kind)(2 * groups, 3 * groups, 3, groups=groups,
                                          device="cuda", dtype=dtype)
        x = torch.randn(2, 2 * groups, *(6,) * dim, device="cuda", dtype=dtype)
        assert_format_like_nn(layer, x, cl_x, cl_w, tol=1e-2)


@cuda
def test_masked_path_on_cuda_equals_the_naive_one():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 50, device="cuda", dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 30, 50, device="cuda") < 0.3).double()
    w = torch.randn(8, 16, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    fast = sharedconv.masked_shared_conv1d(x, mask, w, padding=2)
    slow = naive_masked_shared_conv1d(x, mask, w, padding=2)
    torch.testing.assert_close(fast, slow)
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (x, w), g), torch.autograd.grad(slow, (x, w), g),
                    strict=True):
        torch.testing.assert_close(a, b)


@cuda
def test_complex_on_cuda_as_nn_conv1d():
    torch.manual_seed(2)
    layer = sharedconv.SharedConv1d(6, 12, 3, groups=3, device="cuda", dtype=torch.complex64)
    x = torch.randn(2, 6, 20, device="cuda", dtype=torch.complex64)
    torch.testing.assert_close(layer(x), tied_conv(layer)(x), rtol=1e-4, atol=1e-4)


@cuda
def test_float32_with_tf32_is_within_its_rounding():
    """With cuDNN's TF32 allowed (PyTorch's default for convolutions), a float32 layer
    stays within TF32's rounding of the float64 result: relative error under 1e-2."""
    torch.manual_seed(3)
    layer = sharedconv.SharedConv1d(64 * 8, 64 * 16, 5, groups=64, padding=2, device="cuda")
    x = torch.randn(8, 64 * 8, 256, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        y = layer(x)
    ref = tied_conv(layer).double()(x.double())
    error = (y.double() - ref).norm() / ref.norm()
    assert error < 1e-2, error.item()


@cuda
def test_cuda_graph_capture_under_the_tuner_runs_the_fold():
    layer = sharedconv.SharedConv1d(8, 32, 3, groups=8, padding=1, device="cuda")
    x = torch.randn(4, 8, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        layer(x)  # warm-up outside the capture, as CUDA graphs need
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with sharedconv.autotune(), torch.no_grad(), torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, tied_conv(layer)(x))
    assert tuning.cache() == {}  # nothing was timed during the capture
