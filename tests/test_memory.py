"""The cost counters are exact: checked against hand-computed values."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import sharedconv
from sharedconv.lab import baselines, memory
from sharedconv.lab.memory import flops, op_counts, parameter_bytes, saved_tensors

#: torch.func transforms accept saved-tensor hooks from torch 2.5 on
FUNC_TAKES_HOOKS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def test_saved_tensors_of_a_conv_is_its_input_and_weight():
    conv = torch.nn.Conv1d(4, 8, 3)
    x = torch.randn(2, 4, 10, requires_grad=True)
    report = saved_tensors(conv, x)
    weight_bytes = 8 * 4 * 3 * 4
    assert report.nbytes == x.numel() * 4 + weight_bytes
    excluded = saved_tensors(conv, x, exclude=conv.parameters())
    assert excluded.nbytes == x.numel() * 4
    assert excluded.excluded_nbytes == weight_bytes


def test_saved_tensors_counts_a_shared_storage_once():
    x = torch.randn(100, requires_grad=True)
    report = saved_tensors(lambda t: t * t, x)  # mul saves both operands: the same tensor
    assert report.count == 2
    assert report.nbytes == 400


def test_saved_tensors_is_zero_without_grad():
    assert saved_tensors(lambda t: t.exp(), torch.randn(10)).nbytes == 0


def _approaches(dim):
    """(name, fn of x) for the layer, the tuned layer and every baseline of ``dim``."""
    torch.manual_seed(dim)
    G, D, F_out = 3, 2, 4
    x = torch.randn(2, G * D, *(9, 8, 7)[:dim], requires_grad=True)
    w = torch.randn(F_out, D, *(3,) * dim, requires_grad=True)
    b = torch.randn(F_out, requires_grad=True)
    shared = {1: sharedconv.SharedConv1d, 2: sharedconv.SharedConv2d, 3: sharedconv.SharedConv3d}
    layer = shared[dim](G * D, G * F_out, 3, groups=G, padding=1)

    def tuned(x):
        with sharedconv.autotune():
            return layer(x)

    fns = {"shared_conv": lambda x: sharedconv.shared_conv(x, w, b, groups=G, padding=1),
           "layer": layer, "tuned": tuned}
    fns.update({name: (lambda x, fn=fn: fn(x, w, b, groups=G, padding=1))
                for name, fn in baselines.BASELINES.items() if dim in baselines.DIMS[name]})
    return x, [w, b, *layer.parameters()], fns


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_saved_tensors_on_the_graph_equal_the_hooks(dim):
    """Reading the saved tensors off the autograd graph (what saved_tensors does where
    torch.func refuses the hooks, before torch 2.5) gives the hooks' bytes and count."""
    x, params, fns = _approaches(dim)
    excluded = {memory._storage_key(t) for t in params}
    for name, fn in fns.items():
        by_graph = memory._saved_in_graph(fn(x), excluded)
        if name == "vmap" and not FUNC_TAKES_HOOKS:
            by_hooks = by_graph  # refused there: the case the graph is read for
        else:
            by_hooks = saved_tensors(fn, x, exclude=params)
            assert by_hooks.method == "hooks"
        assert by_graph.method == "graph"
        assert (by_graph.nbytes, by_graph.count, by_graph.excluded_nbytes) == (
            by_hooks.nbytes, by_hooks.count, by_hooks.excluded_nbytes), name
        assert by_graph.nbytes >= x.numel() * x.element_size(), name  # the input, or a copy


def test_saved_tensors_of_vmap_on_every_torch():
    """torch.vmap's saved tensors are measured on every supported torch (read off the graph
    where the hooks are refused) and are the moved copy of the input."""
    x = torch.randn(2, 6, 10, requires_grad=True)
    w, b = torch.randn(4, 2, 3), torch.randn(4)
    report = saved_tensors(baselines.vmap, x, w, b, groups=3, exclude=(w, b))
    assert report.nbytes == x.numel() * 4
    assert report.method == ("hooks" if FUNC_TAKES_HOOKS else "graph")
    beyond = saved_tensors(baselines.vmap, x, w, b, groups=3, exclude=(w, b, x))
    assert beyond.nbytes == x.numel() * 4  # a copy, not the input itself


def test_saved_tensors_falls_back_to_the_graph_when_hooks_are_refused(monkeypatch):
    x, params, fns = _approaches(1)
    expected = {n: saved_tensors(fn, x, exclude=params) for n, fn in fns.items()
                if n != "vmap" or FUNC_TAKES_HOOKS}

    @contextlib.contextmanager
    def refused(pack, unpack):  # what torch.func transforms raised before torch 2.5
        raise RuntimeError("torch.func transforms don't yet support saved tensor hooks. "
                           "Please open an issue with your use case.")
        yield

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", refused)
    for name, report in expected.items():
        got = saved_tensors(fns[name], x, exclude=params)
        assert got.method == "graph"
        assert (got.nbytes, got.count) == (report.nbytes, report.count), name


def test_saved_tensors_does_not_swallow_other_errors():
    def broken(x):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        saved_tensors(broken, torch.randn(3, requires_grad=True))


def test_flops_of_a_conv():
    B, C, L, F_out, k = 2, 4, 10, 8, 3
    x = torch.randn(B, C, L)
    w = torch.randn(F_out, C, k)
    L_out = L - k + 1
    assert flops(F.conv1d, x, w) == 2 * B * F_out * L_out * C * k
    x.requires_grad_()
    w.requires_grad_()
    # backward: gradients of input and weight, each as costly as the forward
    assert flops(F.conv1d, x, w, backward=True) == 3 * 2 * B * F_out * L_out * C * k


def test_flops_of_the_layer_equal_the_grouped_conv():
    layer = sharedconv.SharedConv1d(12, 8, 5, groups=4, bias=False)
    grouped = layer.to_conv()
    x = torch.randn(3, 12, 32)
    assert flops(layer, x) == flops(grouped, x) > 0


def test_op_counts():
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(4, 1, 3, requires_grad=True)

    def loop(x):
        return torch.cat([F.conv1d(x[:, i : i + 1], w) for i in range(3)], dim=1)

    ops = ("aten::convolution", "aten::convolution_backward")
    assert op_counts(loop, x, ops=ops, backward=True) == {
        "aten::convolution": 3, "aten::convolution_backward": 3,
    }
    # the layer: one convolution and its one backward, whatever the bank and the groups
    products = ops + ("aten::bmm", "aten::baddbmm")
    for c_in, c_out, k in ((15, 48, 3), (3, 48, 5), (3, 24, 3), (96, 96, 1)):
        layer = sharedconv.SharedConv1d(c_in, c_out, k, groups=3)
        x_in = torch.randn(2, c_in, 64, requires_grad=True)
        assert op_counts(layer, x_in, ops=products, backward=True) == {
            "aten::convolution": 1, "aten::convolution_backward": 1,
            "aten::bmm": 0, "aten::baddbmm": 0,
        }


def test_parameter_bytes():
    layer = sharedconv.SharedConv1d(6, 12, 3, groups=3, dtype=torch.float64)
    n = 4 * 2 * 3 + 4
    assert parameter_bytes(layer, with_grad=False) == 8 * n
    assert parameter_bytes(layer) == 16 * n


def test_largest_tensor_sees_forward_and_backward():
    from sharedconv.lab.memory import largest_tensor

    x = torch.randn(100, 20, requires_grad=True)
    w = torch.randn(20, 30)
    nbytes, op = largest_tensor(lambda a: (a @ w).sum(1), x)
    assert nbytes == 100 * 30 * 4 and "mm" in op  # the product, larger than x and w
    # backward of mm: grad_x = g @ w.T, (100, 20); the (100, 30) product stays the largest
    assert largest_tensor(lambda a: a @ w, x, backward=True)[0] == 100 * 30 * 4
    # a backward-only tensor is seen: sum's backward expands the scalar gradient
    big = torch.randn(5, 1000, requires_grad=True)
    assert largest_tensor(lambda a: a.sum(), big)[0] == 4
    assert largest_tensor(lambda a: a.sum(), big, backward=True)[0] == 5 * 1000 * 4


def test_op_counts_under_vmap_counts_one_call():
    x = torch.randn(2, 3, 16)
    w = torch.randn(4, 1, 3)

    def vmapped(x):
        return torch.vmap(lambda xg: F.conv1d(xg, w), in_dims=1, out_dims=1)(x[:, :, None])

    assert op_counts(vmapped, x) == {"aten::convolution": 1}


# ----------------------------------------------------------------------------- step_cost


def _shared(shape, device):
    B, G, D, L, F_, k = shape
    x = torch.randn(B, G * D, L, device=device, requires_grad=True)
    w = torch.randn(F_, D, k, device=device, requires_grad=True)
    b = torch.randn(F_, device=device, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("name", ["layer", *baselines.BASELINES])
def test_step_cost_on_meta_equals_the_cost_on_the_cpu(name):
    fn = {"layer": sharedconv.functional.shared_conv, **baselines.BASELINES}[name]
    shape = (2, 4, 3, 16, 5, 3)
    costs = []
    for device in ("meta", "cpu"):
        x, w, b = _shared(shape, device)
        costs.append(memory.step_cost(lambda x, w, b: fn(x, w, b, groups=4, padding=1),
                                      x, w, b, params=(w, b)))
    assert costs[0] == costs[1]


def test_step_cost_of_the_fold_by_hand():
    """One convolution: reads x, w, b and writes y; its backward reads the output gradient,
    x and w, and writes the three gradients. The peak is y and the gradients."""
    B, G, D, L, F_, k = shape = (2, 8, 1, 32, 4, 5)
    x, w, b = _shared(shape, "meta")
    cost = memory.step_cost(lambda x, w, b: baselines.fold(x, w, b, groups=G, padding=2),
                            x, w, b, params=(w, b))
    nx, nw, nb, ny = (4 * n for n in (B * G * D * L, F_ * D * k, F_, B * G * F_ * L))
    assert cost.forward_flops == 2 * B * G * F_ * L * D * k
    assert cost.flops == 3 * cost.forward_flops
    assert cost.moved_bytes == 3 * nx + 3 * nw + 2 * nb + 2 * ny
    assert cost.peak_bytes == ny + nx + nw + nb
    assert cost.saved_bytes == nx  # the bank is a parameter, excluded
    assert cost.param_bytes == nw + nb
    assert cost.intensity == cost.flops / cost.moved_bytes


def test_step_cost_counts_grouped_gradients_once():
    """torch's formula counts a grouped convolution's weight gradient G times; the step's
    FLOPs of a grouped convolution with repeated banks equal the fold's."""
    shape = (2, 16, 2, 32, 4, 3)
    x, w, b = _shared(shape, "meta")
    fold, repeat = (
        memory.step_cost(lambda x, w, b, fn=fn: fn(x, w, b, groups=16, padding=1), x, w, b,
                         params=(w, b))
        for fn in (baselines.fold, baselines.grouped_repeat))
    assert fold.flops == repeat.flops == 3 * fold.forward_flops
    assert flops(lambda x: baselines.grouped_repeat(x, w, b, groups=16), x,
                 backward=True) == 3 * fold.forward_flops * 30 // 32  # valid padding


def test_step_cost_sees_the_copies_each_approach_makes():
    B, G, D, L, F_, k = shape = (2, 8, 1, 32, 4, 5)
    x, w, b = _shared(shape, "meta")
    costs = {name: memory.step_cost(lambda x, w, b, fn=fn: fn(x, w, b, groups=G, padding=2),
                                    x, w, b, params=(w, b))
             for name, fn in baselines.BASELINES.items()}
    nx, ny = 4 * B * G * D * L, 4 * B * G * F_ * L
    fold = costs["fold"]
    # the lift copies its output once, out of the Conv2d's filter-major layout
    assert costs["lift"].moved_bytes == fold.moved_bytes + 2 * ny
    # vmap moves the groups first and back: copies of the input and the output, of the
    # output's gradient, and of the input's gradient (into the input's own layout)
    assert costs["vmap"].moved_bytes == fold.moved_bytes + 4 * nx + 4 * ny
    # the grouped convolutions save the G copies of the bank for their backward
    assert costs["grouped_repeat"].saved_bytes == fold.saved_bytes + 4 * G * F_ * D * k
    # the loop's backward makes one input-sized zero gradient per group
    assert costs["loop"].moved_bytes > G * nx
    assert len({c.flops for c in costs.values()}) == 1


def test_step_cost_leaves_the_gradients_as_they_were():
    x, w, b = _shared((2, 4, 1, 16, 3, 3), "cpu")
    w.grad = torch.ones_like(w)
    first = memory.step_cost(lambda x, w, b: baselines.fold(x, w, b, groups=4), x, w, b,
                             params=(w, b))
    assert x.grad is None and b.grad is None and torch.equal(w.grad, torch.ones_like(w))
    assert memory.step_cost(lambda x, w, b: baselines.fold(x, w, b, groups=4), x, w, b,
                            params=(w, b)) == first  # nothing accumulated


def test_step_cost_releases_what_the_step_frees():
    """The peak sees temporaries that die before the end: a big intermediate counts."""
    x = torch.randn(1000, device="meta", requires_grad=True)
    cost = memory.step_cost(lambda x: x.repeat(100).sum(), x)
    assert cost.peak_bytes >= 4 * 100_000
    assert cost.moved_bytes >= 2 * 4 * 100_000


def test_step_cost_of_vmap_where_hooks_are_refused(monkeypatch):
    x, w, b = _shared((2, 4, 1, 16, 3, 3), "cpu")
    expected = memory.step_cost(lambda x: baselines.vmap(x, w, b, groups=4), x,
                                params=(w, b))
    real = torch.autograd.graph.saved_tensors_hooks

    class Refused(real):  # as torch 2.4 refuses hooks inside torch.func transforms
        def __enter__(self):
            raise RuntimeError("torch.func transforms don't yet support saved tensor hooks")

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", Refused)
    assert memory.step_cost(lambda x: baselines.vmap(x, w, b, groups=4), x,
                            params=(w, b)) == expected
