"""The cost counters are exact: checked against hand-computed values."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import sharedconv
from sharedconv.memory import flops, op_counts, parameter_bytes, saved_tensors


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
    from sharedconv.memory import largest_tensor

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
