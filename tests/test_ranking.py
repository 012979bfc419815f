"""The ranking case study: the synthetic task, the two models, training (sharedconv.lab.ranking)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sharedconv
from sharedconv.lab.ranking import (
    FREQUENCIES,
    EquivariantLinear,
    MixingRanker,
    SharedRanker,
    StreamSet,
    accuracy,
    fit,
    make_streams,
    permute_streams,
)

F64 = {"rtol": 1e-12, "atol": 1e-12}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- the task


def test_make_streams_shapes_and_targets():
    data = make_streams(300, 5, length=40, generator=0)
    assert isinstance(data, StreamSet)
    assert data.x.shape == (300, 5, 40) and data.x.dtype == torch.float32
    assert data.top.shape == (300,) and data.top.dtype == torch.int64
    assert data.freq.shape == (300, 5)
    assert torch.equal(data.top, data.freq.argmax(dim=1))
    # distinct frequencies from the allowed set in every sample
    allowed = torch.tensor(FREQUENCIES)
    assert torch.isin(data.freq, allowed).all()
    assert (data.freq.sort(dim=1).values.diff(dim=1) > 0).all()
    # every position is the fastest one about equally often (300 / 5 = 60 expected)
    counts = torch.bincount(data.top, minlength=5)
    assert counts.min() > 30, counts


def test_make_streams_signal_model():
    data = make_streams(4, 3, length=50, noise=0.0, generator=3, dtype=torch.float64)
    # noise-free: a unit sine of the stated frequency (checked through its spectrum peak)
    spectrum = torch.fft.rfft(data.x, n=1000).abs()
    peak = spectrum.argmax(dim=-1).double() / 1000
    torch.testing.assert_close(peak, data.freq, atol=2e-3, rtol=0)
    assert data.x.abs().max() <= 1.0 + 1e-12


def test_make_streams_is_deterministic():
    a, b = make_streams(20, 4, generator=7), make_streams(20, 4, generator=7)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    gen = torch.Generator().manual_seed(7)
    c = make_streams(20, 4, generator=gen)
    assert torch.equal(c.x, a.x)
    d = make_streams(20, 4, generator=gen)  # the generator advanced
    assert not torch.equal(d.x, a.x)
    assert not torch.equal(make_streams(20, 4, generator=8).x, a.x)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_samples": 0}, ValueError, "n_samples"),
        ({"n_samples": 2.0}, TypeError, "n_samples"),
        ({"n_streams": 13}, ValueError, "n_streams must be <= 12"),
        ({"n_streams": 0}, ValueError, "n_streams"),
        ({"length": 0}, ValueError, "length"),
        ({"noise": -1.0}, ValueError, "noise"),
        ({"noise": "a"}, TypeError, "noise"),
        ({"generator": "seed"}, TypeError, "generator"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
    ],
)
def test_make_streams_errors(kwargs, error, match):
    args = {"n_samples": 3, "n_streams": 4, **kwargs}
    with pytest.raises(error, match=match):
        make_streams(**args)


def test_permute_streams_moves_streams_and_targets():
    data = make_streams(50, 6, generator=1)
    x, top, perm = permute_streams(data.x, data.top, generator=2)
    rows = torch.arange(50)
    assert torch.equal(perm.sort(dim=1).values, torch.arange(6).expand(50, 6))
    assert torch.equal(x, data.x[rows[:, None], perm])
    assert torch.equal(x[rows, top], data.x[rows, data.top])
    assert (perm != torch.arange(6)).any()
    again = permute_streams(data.x, data.top, generator=2)
    assert torch.equal(again[2], perm)
    with pytest.raises(ValueError, match="shape"):
        permute_streams(data.x[0], data.top)
    with pytest.raises(ValueError, match="top must have shape"):
        permute_streams(data.x, data.top[:3])
    with pytest.raises(TypeError, match="integer"):
        permute_streams(data.x, data.top.float())


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("n", [1, 3, 5, 12])
@pytest.mark.parametrize("context", [True, False])
def test_shared_ranker_is_permutation_equivariant(n, context):
    torch.manual_seed(0)
    model = SharedRanker(context=context, dtype=torch.float64)
    x = torch.randn(4, n, 32, dtype=torch.float64)
    perm = torch.randperm(n)
    torch.testing.assert_close(model(x[:, perm]), model(x)[:, perm], **F64)
    # the convolutions alone are exactly equivariant: each stream is convolved on its own
    h = model.conv1(x).unflatten(1, (n, -1))
    assert torch.equal(model.conv1(x[:, perm]).unflatten(1, (n, -1)), h[:, perm])


def test_shared_ranker_parameters_do_not_depend_on_n():
    model = SharedRanker(features=(6, 12), kernel_size=7, hidden=16)
    assert model.conv1.groups is None and model.conv2.groups is None  # read from the input
    expected = (6 * 7 + 6) + (12 * 6 * 7 + 12) + (2 * 12 * 16 + 16) + (16 + 1)
    assert n_params(model) == expected == 981
    for n in (2, 5, 11):
        assert model(torch.randn(2, n, 64)).shape == (2, n)
    assert n_params(SharedRanker(context=False)) == expected - 12 * 16


def test_mixing_ranker_is_not_equivariant_and_fixed_to_n():
    torch.manual_seed(0)
    model = MixingRanker(5, dtype=torch.float64)
    x = torch.randn(4, 5, 32, dtype=torch.float64)
    perm = torch.tensor([1, 0, 2, 3, 4])
    gap = (model(x[:, perm]) - model(x)[:, perm]).abs().max()
    assert gap > 1e-3
    with pytest.raises(ValueError, match="built for N=5 streams, got an input with 6"):
        model(torch.randn(2, 6, 32, dtype=torch.float64))
    counts = [n_params(MixingRanker(n)) for n in (3, 5, 8)]
    assert counts[0] < counts[1] < counts[2]
    assert counts[1] == (8 * 5 * 7 + 8) + (12 * 8 * 7 + 12) + (12 * 5 + 5) == 1037


def test_equivariant_linear():
    torch.manual_seed(1)
    layer = EquivariantLinear(3, 4).double()
    h = torch.randn(2, 6, 3, dtype=torch.float64)
    perm = torch.randperm(6)
    torch.testing.assert_close(layer(h[:, perm]), layer(h)[:, perm], **F64)
    assert layer.context is not None
    expected = layer.own(h) + layer.context(h.mean(dim=1, keepdim=True))
    torch.testing.assert_close(layer(h), expected, **F64)
    alone = EquivariantLinear(3, 4, context=False).double()
    torch.testing.assert_close(alone(h), alone.own(h), **F64)
    with pytest.raises(ValueError, match=r"\(B, N, features\)"):
        layer(h[0])
    with pytest.raises(TypeError, match="Tensor"):
        layer([1.0])


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: SharedRanker(features=(4,)), ValueError, "two ints"),
        (lambda: SharedRanker(kernel_size=4), ValueError, "odd"),
        (lambda: SharedRanker(hidden=0), ValueError, "hidden"),
        (lambda: MixingRanker(0), ValueError, "n_streams"),
        (lambda: MixingRanker(5, channels=(4, 4, 4)), ValueError, "two ints"),
        (lambda: MixingRanker(5.0), TypeError, "n_streams"),
        (lambda: EquivariantLinear(0, 3), ValueError, "in_features"),
    ],
)
def test_constructor_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_model_input_errors():
    with pytest.raises(ValueError, match=r"\(B, N, L\)"):
        SharedRanker()(torch.randn(5, 64))
    with pytest.raises(TypeError, match="Tensor"):
        SharedRanker()([[0.0]])


# ----------------------------------------------------------------------------- training


def test_accuracy():
    scores = torch.tensor([[0.0, 1.0, 0.5], [2.0, 1.0, 0.0]])
    assert accuracy(scores, torch.tensor([1, 2])) == 0.5
    with pytest.raises(ValueError, match="expected scores"):
        accuracy(scores, torch.tensor([1]))
    with pytest.raises(TypeError, match="tensors"):
        accuracy(scores, [1, 2])


def test_loss_gradient_ignores_the_order_of_the_streams():
    """Why the shared model trains the same on any reordering of its data (float64)."""
    torch.manual_seed(2)
    model = SharedRanker(dtype=torch.float64)
    data = make_streams(16, 5, generator=4, dtype=torch.float64)
    x_perm, top_perm, _ = permute_streams(data.x, data.top, generator=5)
    grads = []
    for x, top in ((data.x, data.top), (x_perm, top_perm)):
        model.zero_grad()
        F.cross_entropy(model(x), top).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_fit_reduces_the_loss_and_is_deterministic():
    train = make_streams(256, 4, length=32, noise=0.3, generator=0)
    test = make_streams(64, 4, length=32, noise=0.3, generator=1)
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SharedRanker(features=(4, 8), kernel_size=5, hidden=8)
        histories.append(fit(model, train, test, epochs=4, batch_size=32, lr=2e-2, seed=3))
    history = histories[0]
    assert set(history) == {"train_loss", "test_loss", "test_accuracy"}
    assert all(len(v) == 4 for v in history.values())
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["test_accuracy"][-1] > 0.5  # chance: 1/4
    assert histories[0] == histories[1]
    torch.manual_seed(0)
    mixing = MixingRanker(4)
    assert list(fit(mixing, train, epochs=1, batch_size=64)) == ["train_loss"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, "nn.Module"),
        ({"train": (1, 2)}, TypeError, "train must be a StreamSet"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_fit_errors(kwargs, error, match):
    args = {"model": SharedRanker(), "train": make_streams(4, 3, length=16), **kwargs}
    with pytest.raises(error, match=match):
        fit(**args)


def test_public_names():
    assert sharedconv.lab.ranking.__all__ == [
        "FREQUENCIES", "StreamSet", "make_streams", "permute_streams", "EquivariantLinear",
        "SharedRanker", "MixingRanker", "accuracy", "fit",
    ]
