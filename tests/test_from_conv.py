"""``SharedConvNd.from_conv``: the inverse of ``to_conv``, and reducing differing banks."""

from __future__ import annotations

import pytest
import torch
from conftest import CONV, KERNELS, SHARED, SIZES, cuda
from torch import nn

import sharedconv

G, D, F_OUT = 3, 2, 4

# several option sets; each is run in every dimension, with and without bias
OPTIONS = [
    {},
    {"stride": 2, "padding": 1},
    {"padding": "same", "dilation": 2},
    {"padding": 1, "padding_mode": "reflect"},
    {"padding": "same", "padding_mode": "reflect"},
    {"padding": 2, "padding_mode": "circular", "dilation": 2},
    {"padding": "valid", "padding_mode": "replicate"},
]


def _attributes(layer):
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, layer.padding_mode,
            layer.bias is not None, layer.weight.device, layer.weight.dtype)


def _differing_conv(dim, bias=True, dtype=torch.float64):
    """A grouped conv whose G banks (and bias chunks) are all different."""
    torch.manual_seed(0)
    return CONV[dim](G * D, G * F_OUT, KERNELS[dim], groups=G, padding=1, bias=bias,
                     dtype=dtype)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(map(str, o.values())))
def test_round_trip_is_identical(dim, bias, options):
    """layer -> to_conv -> from_conv: same attributes, weight, bias and outputs (float64)."""
    torch.manual_seed(0)
    layer = SHARED[dim](G * D, G * F_OUT, KERNELS[dim], groups=G, bias=bias,
                        dtype=torch.float64, **options)
    back = SHARED[dim].from_conv(layer.to_conv())
    assert type(back) is SHARED[dim]
    assert _attributes(back) == _attributes(layer)
    assert repr(back) == repr(layer)
    assert torch.equal(back.weight, layer.weight)
    if bias:
        assert torch.equal(back.bias, layer.bias)
    else:
        assert back.bias is None
        assert [name for name, _ in back.named_parameters()] == ["weight"]
    x = torch.randn(2, G * D, *(s + 4 for s in SIZES[dim]), dtype=torch.float64)
    assert torch.equal(back(x), layer(x))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_from_plain_conv_with_tied_banks(dim):
    """A conv built by hand with equal banks (not by to_conv) gives its bank 0 and its outputs."""
    conv = _differing_conv(dim)
    with torch.no_grad():
        conv.weight.copy_(conv.weight[:F_OUT].repeat(G, *[1] * (dim + 1)))
        conv.bias.copy_(conv.bias[:F_OUT].repeat(G))
    layer = SHARED[dim].from_conv(conv)
    assert (layer.in_channels, layer.out_channels, layer.groups) == (G * D, G * F_OUT, G)
    assert layer.padding == conv.padding == (1,) * dim
    assert torch.equal(layer.weight, conv.weight[:F_OUT])
    assert torch.equal(layer.bias, conv.bias[:F_OUT])
    x = torch.randn(2, G * D, *SIZES[dim], dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)


def test_groups_1_takes_the_conv_as_is():
    conv = nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64)
    layer = sharedconv.SharedConv2d.from_conv(conv)
    assert layer.groups == 1 and torch.equal(layer.weight, conv.weight)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    assert torch.equal(layer(x), conv(x))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_check_refuses_differing_banks_with_the_difference(dim):
    conv = _differing_conv(dim)
    banks = conv.weight.detach().view(G, F_OUT, D, *KERNELS[dim])
    per_group = (banks - banks[:1]).abs().flatten(1).amax(1)
    worst = int(per_group.argmax())
    with pytest.raises(ValueError) as info:
        SHARED[dim].from_conv(conv)
    message = str(info.value)
    assert message.startswith(f"SharedConv{dim}d.from_conv: the conv's {G} weight banks")
    assert "not all equal" in message
    assert f"group {worst}'s differs most from group 0's" in message
    assert f"largest absolute difference {per_group[worst].item():.6g}" in message
    assert f"{G - 1} of the {G} banks differ" in message
    assert "reduce='mean'" in message
    # the same under the explicit default
    with pytest.raises(ValueError, match="not all equal"):
        SHARED[dim].from_conv(conv, reduce="check")


def test_check_refuses_differing_bias_and_names_the_group():
    layer = sharedconv.SharedConv1d(G * D, G * F_OUT, 3, groups=G, dtype=torch.float64)
    conv = layer.to_conv()
    with torch.no_grad():
        conv.bias[2 * F_OUT + 1] += 0.25  # group 2 only; the weight banks stay equal
    with pytest.raises(ValueError, match=r"bias banks .* group 2's differs most .* "
                                         r"difference 0\.25, and 1 of the 3 banks"):
        sharedconv.SharedConv1d.from_conv(conv)


def test_check_nan_equals_nan_but_not_a_number():
    layer = sharedconv.SharedConv1d(G * D, G * F_OUT, 3, groups=G, dtype=torch.float64)
    with torch.no_grad():
        layer.weight[0, 0, 0] = float("nan")
    conv = layer.to_conv()  # NaN in every bank at the same place: equal banks
    back = sharedconv.SharedConv1d.from_conv(conv)
    assert torch.equal(back.weight.isnan(), layer.weight.isnan())
    with torch.no_grad():
        conv.weight[F_OUT, 0, 0] = 1.0  # group 1: a number where bank 0 has NaN
    with pytest.raises(ValueError, match=r"group 1's .* difference nan \(a NaN against"):
        sharedconv.SharedConv1d.from_conv(conv)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_mean_takes_the_mean_bank(dim, bias):
    conv = _differing_conv(dim, bias=bias)
    layer = SHARED[dim].from_conv(conv, reduce="mean")
    banks = conv.weight.detach().view(G, F_OUT, D, *KERNELS[dim])
    assert layer.weight.shape == (F_OUT, D, *KERNELS[dim])
    torch.testing.assert_close(layer.weight, banks.mean(0), rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(layer.bias, conv.bias.detach().view(G, F_OUT).mean(0),
                                   rtol=0, atol=0)
    else:
        assert layer.bias is None
    # it computes the grouped conv whose banks are all replaced by their mean
    averaged = CONV[dim](G * D, G * F_OUT, KERNELS[dim], groups=G, padding=1, bias=bias,
                         dtype=torch.float64)
    with torch.no_grad():
        averaged.weight.copy_(banks.mean(0, keepdim=True).expand_as(banks).flatten(0, 1))
        if bias:
            averaged.bias.copy_(conv.bias.view(G, F_OUT).mean(0).repeat(G))
    x = torch.randn(2, G * D, *SIZES[dim], dtype=torch.float64)
    torch.testing.assert_close(layer(x), averaged(x), rtol=1e-12, atol=1e-12)


def test_mean_of_equal_banks_is_the_bank():
    layer = sharedconv.SharedConv2d(G * D, G * F_OUT, 3, groups=G, dtype=torch.float64)
    back = sharedconv.SharedConv2d.from_conv(layer.to_conv(), reduce="mean")
    torch.testing.assert_close(back.weight, layer.weight, rtol=1e-15, atol=0)
    torch.testing.assert_close(back.bias, layer.bias, rtol=1e-15, atol=0)


@pytest.mark.parametrize("reduce", ["max", "Mean", "", None, 0])
def test_bad_reduce_is_refused(reduce):
    conv = nn.Conv1d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"SharedConv1d\.from_conv: reduce must be one of "
                                         r"\('check', 'mean'\), got " + repr(reduce)):
        sharedconv.SharedConv1d.from_conv(conv, reduce=reduce)


@pytest.mark.parametrize(
    "cls, conv, got",
    [
        (sharedconv.SharedConv1d, nn.Conv2d(4, 4, 3, groups=2), "Conv2d"),
        (sharedconv.SharedConv2d, nn.Conv1d(4, 4, 3, groups=2), "Conv1d"),
        (sharedconv.SharedConv3d, nn.Conv2d(4, 4, 3), "Conv2d"),
        (sharedconv.SharedConv1d, nn.ConvTranspose1d(4, 4, 3, groups=2), "ConvTranspose1d"),
        (sharedconv.SharedConv2d, nn.ConvTranspose2d(4, 4, 3), "ConvTranspose2d"),
        (sharedconv.SharedConv1d, sharedconv.SharedConv1d(4, 4, 3, groups=2), "SharedConv1d"),
        (sharedconv.SharedConv1d, nn.Linear(4, 4), "Linear"),
        (sharedconv.SharedConv1d, torch.zeros(4, 2, 3), "Tensor object"),
        (sharedconv.SharedConv1d, "conv", "str object"),
        (sharedconv.SharedConv1d, None, "NoneType object"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_wrong_type_or_dimension_is_refused(cls, conv, got):
    n = cls._dim
    with pytest.raises(TypeError) as info:
        cls.from_conv(conv)
    assert str(info.value) == (
        f"{cls.__name__}.from_conv: expected an nn.Conv{n}d (a {n}-d convolution), got {got}"
    )


def test_lazy_conv_is_refused_until_initialised():
    lazy = nn.LazyConv1d(4, 3)
    with pytest.raises(ValueError, match="uninitialised parameters; run it on an input"):
        sharedconv.SharedConv1d.from_conv(lazy)
    lazy(torch.randn(1, 2, 9))  # now an nn.Conv1d with groups=1
    layer = sharedconv.SharedConv1d.from_conv(lazy)
    assert layer.in_channels == 2 and torch.equal(layer.weight, lazy.weight)


@pytest.mark.parametrize("reduce", ["check", "mean"])
def test_parameters_are_new_tensors(reduce):
    layer = sharedconv.SharedConv1d(G * D, G * F_OUT, 3, groups=G)
    conv = layer.to_conv()
    back = sharedconv.SharedConv1d.from_conv(conv, reduce=reduce)
    for ours, theirs in ((back.weight, conv.weight), (back.bias, conv.bias)):
        assert isinstance(ours, nn.Parameter) and ours.requires_grad
        assert ours.is_leaf and ours.grad_fn is None and ours.is_contiguous()
        storage = theirs.untyped_storage().data_ptr()
        assert ours.untyped_storage().data_ptr() != storage
    before = back.weight.detach().clone()
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
    assert torch.equal(back.weight, before) and back.bias.abs().sum() > 0
    # it trains on its own: a step moves the layer and leaves the conv alone
    back(torch.randn(2, G * D, 8)).sum().backward()
    assert back.weight.grad is not None and conv.weight.grad is None


def test_conv_that_does_not_require_grad_still_gives_trainable_parameters():
    conv = nn.Conv1d(4, 8, 3, groups=2).requires_grad_(False)
    layer = sharedconv.SharedConv1d.from_conv(conv, reduce="mean")
    assert all(p.requires_grad for p in layer.parameters())


def test_channels_last_conv():
    layer = sharedconv.SharedConv2d(G * D, G * F_OUT, 3, groups=G)
    conv = layer.to_conv().to(memory_format=torch.channels_last)
    back = sharedconv.SharedConv2d.from_conv(conv)
    assert torch.equal(back.weight, layer.weight) and back.weight.is_contiguous()


def test_draws_no_random_numbers():
    conv = nn.Conv1d(4, 8, 3, groups=2)
    state = torch.get_rng_state()
    sharedconv.SharedConv1d.from_conv(conv, reduce="mean")
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["check", "mean"])
def test_dtype_and_device_preserved_cpu(dtype, reduce):
    layer = sharedconv.SharedConv1d(G * D, G * F_OUT, 3, groups=G, dtype=dtype)
    back = sharedconv.SharedConv1d.from_conv(layer.to_conv(), reduce=reduce)
    for p in back.parameters():
        assert p.dtype == dtype and p.device.type == "cpu"
    if reduce == "check":
        assert torch.equal(back.weight, layer.weight)


def test_meta_conv():
    conv = nn.Conv3d(4, 6, 3, groups=2, device="meta")
    for reduce in ("check", "mean"):
        layer = sharedconv.SharedConv3d.from_conv(conv, reduce=reduce)
        assert layer.weight.is_meta and layer.weight.shape == (3, 2, 3, 3, 3)


def test_from_per_group_layer_via_to_conv():
    layer = sharedconv.SharedConv1d.per_group(2, 4, 3, padding=1, dtype=torch.float64)
    back = sharedconv.SharedConv1d.from_conv(layer.to_conv(groups=5))
    assert (back.groups, back.in_channels, back.out_channels) == (5, 10, 20)
    assert torch.equal(back.weight, layer.weight) and torch.equal(back.bias, layer.bias)
    x = torch.randn(2, 10, 7, dtype=torch.float64)
    assert torch.equal(back(x), layer(x))


def test_state_dict_of_a_grouped_conv():
    """The documented ways to load a grouped conv's state_dict agree."""
    torch.manual_seed(0)
    sd = nn.Conv1d(G * D, G * F_OUT, 3, groups=G).state_dict()
    conv = nn.Conv1d(G * D, G * F_OUT, 3, groups=G)
    conv.load_state_dict(sd)
    layer = sharedconv.SharedConv1d.from_conv(conv, reduce="mean")
    direct = sharedconv.SharedConv1d(G * D, G * F_OUT, 3, groups=G)
    direct.load_state_dict({"weight": sd["weight"].view(G, F_OUT, D, 3).mean(0),
                            "bias": sd["bias"].view(G, F_OUT).mean(0)})
    assert torch.equal(layer.weight, direct.weight) and torch.equal(layer.bias, direct.bias)


@cuda
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("reduce", ["check", "mean"])
def test_cuda_round_trip(dim, reduce):
    torch.manual_seed(0)
    layer = SHARED[dim](G * D, G * F_OUT, KERNELS[dim], groups=G, padding=1,
                        padding_mode="reflect", dtype=torch.float64, device="cuda")
    conv = layer.to_conv()
    back = SHARED[dim].from_conv(conv, reduce=reduce)
    for p in back.parameters():
        assert p.device == conv.weight.device and p.dtype == torch.float64
    torch.testing.assert_close(back.weight, layer.weight, rtol=1e-15, atol=0)
    x = torch.randn(2, G * D, *SIZES[dim], dtype=torch.float64, device="cuda")
    torch.testing.assert_close(back(x), layer(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not all equal"):
        SHARED[dim].from_conv(_differing_conv(dim).cuda())
