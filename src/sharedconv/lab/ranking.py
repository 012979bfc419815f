r"""Ranking N streams with one shared filter bank: a synthetic task and two models.

The task (:func:`make_streams`): every sample holds ``N`` noisy sine waves, one per stream,
each with its own frequency; the target is the index of the stream with the highest
frequency. A model answers with one score per stream, trained with cross-entropy over the
``N`` scores, and its prediction is the stream with the highest score.

The two models have a similar number of parameters at the training ``N``:

- :class:`SharedRanker` sends every stream through the same convolutions
  (``SharedConv1d.per_group``, so ``N`` is read from each input), pools each stream over
  time, and scores each stream with the same head. The head is a Deep Sets layer
  (:class:`EquivariantLinear`): each stream's features plus a term computed from the mean
  over all streams. Permuting the streams of the input permutes the scores, and the model
  runs at any ``N``.
- :class:`MixingRanker` is an ordinary CNN: ``nn.Conv1d`` with the ``N`` streams as input
  channels (every filter mixes all streams), pooling over time, and a linear layer that
  outputs ``N`` scores. It is tied to the ``N`` it was built for and to the order of the
  streams.

:func:`fit` trains either model with Adam, :func:`accuracy` scores it, and
:func:`permute_streams` reorders the streams of a batch (and its targets) at random.
Everything is deterministic given a seed or a :class:`torch.Generator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import SharedConv1d

__all__ = [
    "FREQUENCIES",
    "StreamSet",
    "make_streams",
    "permute_streams",
    "EquivariantLinear",
    "SharedRanker",
    "MixingRanker",
    "accuracy",
    "fit",
]

#: The frequencies (cycles per time step) a stream of :func:`make_streams` can have; the
#: streams of one sample have distinct ones, so the highest is unique.
FREQUENCIES: tuple[float, ...] = tuple(round(0.04 + 0.02 * i, 2) for i in range(12))


class StreamSet(NamedTuple):
    """A batch of the ranking task, as returned by :func:`make_streams` (a named tuple)."""

    #: the signals, ``(n_samples, n_streams, length)``.
    x: Tensor
    #: index of the stream with the highest frequency, ``(n_samples,)``, int64.
    top: Tensor
    #: each stream's frequency in cycles per step, ``(n_samples, n_streams)``.
    freq: Tensor


def _check_int(name: str, value: object, minimum: int, func: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{func}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{func}: {name} must be >= {minimum}, got {value}")
    return value


def _check_conv_stack(
    name: str, widths: object, shape: str, kernel_size: object, who: str
) -> tuple[int, int]:
    """Two positive channel counts for two stacked convolutions, and an odd kernel size."""
    if not isinstance(widths, Sequence) or len(widths) != 2:
        raise ValueError(f"{who}: {name} must be two ints {shape}, got {widths!r}")
    first, second = (_check_int(name, w, 1, who) for w in widths)
    if _check_int("kernel_size", kernel_size, 1, who) % 2 == 0:
        raise ValueError(f"{who}: kernel_size must be odd, got {kernel_size}")
    return first, second


def _generator(generator: torch.Generator | int, func: str) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"{func}: generator must be a torch.Generator or an int seed, got "
                        f"{type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


def make_streams(
    n_samples: int,
    n_streams: int,
    length: int = 64,
    noise: float = 0.5,
    generator: torch.Generator | int = 0,
    dtype: torch.dtype = torch.float32,
) -> StreamSet:
    r"""Samples of ``n_streams`` noisy sine waves; the target is the fastest one.

    Stream ``n`` of a sample is :math:`x_{n,t} = \sin(2\pi f_n t + \varphi_n) +
    \sigma \varepsilon_{n,t}` for :math:`t = 0, \dots, \text{length} - 1`, with a uniform
    phase :math:`\varphi_n`, Gaussian noise :math:`\varepsilon_{n,t}` of standard deviation
    :math:`\sigma` = ``noise``, and :math:`f_n` drawn without replacement from
    :data:`FREQUENCIES`, so the streams of one sample have distinct frequencies and every
    stream is equally likely to be the fastest. Data are drawn on the CPU from ``generator``
    alone: the same seed gives the same tensors.

    Args:
        n_samples: number of samples, at least 1.
        n_streams: streams per sample, from 1 to ``len(FREQUENCIES)`` (12).
        length: time steps per stream, at least 1.
        noise: standard deviation of the noise, a float >= 0.
        generator: a :class:`torch.Generator` (its state advances) or an int seed.
        dtype: floating dtype of ``x`` and ``freq``.

    Returns:
        StreamSet: ``x`` ``(n_samples, n_streams, length)``, ``top`` ``(n_samples,)`` and
        ``freq`` ``(n_samples, n_streams)``.

    Raises:
        TypeError: a non-int count, a non-float noise, a generator that is neither a
            ``torch.Generator`` nor an int, or a non-floating dtype.
        ValueError: counts out of range or a negative noise.

    Example::

        >>> data = make_streams(100, 5, generator=0)
        >>> data.x.shape, data.top.shape
        (torch.Size([100, 5, 64]), torch.Size([100]))
        >>> bool((data.freq.argmax(1) == data.top).all())
        True
    """
    func = "make_streams"
    _check_int("n_samples", n_samples, 1, func)
    _check_int("n_streams", n_streams, 1, func)
    if n_streams > len(FREQUENCIES):
        raise ValueError(f"{func}: n_streams must be <= {len(FREQUENCIES)} (one distinct "
                         f"frequency per stream), got {n_streams}")
    _check_int("length", length, 1, func)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise TypeError(f"{func}: noise must be a float, got {type(noise).__name__}")
    if not noise >= 0:
        raise ValueError(f"{func}: noise must be >= 0, got {noise}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{func}: dtype must be a floating torch.dtype, got {dtype!r}")
    gen = _generator(generator, func)
    levels = torch.rand(n_samples, len(FREQUENCIES), generator=gen).argsort(dim=1)
    chosen = levels[:, :n_streams]                              # distinct levels per sample
    freq = torch.tensor(FREQUENCIES, dtype=torch.float64)[chosen]
    phase = 2 * math.pi * torch.rand(n_samples, n_streams, 1, generator=gen, dtype=torch.float64)
    t = torch.arange(length, dtype=torch.float64)
    clean = torch.sin(2 * math.pi * freq[..., None] * t + phase)
    eps = torch.randn(n_samples, n_streams, length, generator=gen, dtype=torch.float64)
    x = clean + noise * eps
    return StreamSet(x.to(dtype), chosen.argmax(dim=1), freq.to(dtype))


def permute_streams(
    x: Tensor, top: Tensor, generator: torch.Generator | int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Reorder the streams of every sample at random, and move the targets with them.

    Args:
        x: signals ``(B, N, L)``.
        top: target stream index of each sample, ``(B,)``, integer.
        generator: a :class:`torch.Generator` or an int seed.

    Returns:
        tuple: ``(x_perm, top_perm, perm)`` with ``x_perm[b, i] = x[b, perm[b, i]]`` and
        ``x_perm[b, top_perm[b]] = x[b, top[b]]``; ``perm`` is ``(B, N)``.

    Raises:
        TypeError: non-tensor arguments or non-integer targets.
        ValueError: shapes that do not fit ``(B, N, L)`` and ``(B,)``.

    Example::

        >>> data = make_streams(4, 3)
        >>> xp, tp, perm = permute_streams(data.x, data.top, generator=1)
        >>> bool(torch.equal(xp[torch.arange(4), tp], data.x[torch.arange(4), data.top]))
        True
    """
    func = "permute_streams"
    if not isinstance(x, Tensor) or not isinstance(top, Tensor):
        raise TypeError(f"{func}: x and top must be tensors, got {type(x).__name__} and "
                        f"{type(top).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{func}: x must have shape (B, N, L), got {tuple(x.shape)}")
    if top.shape != x.shape[:1]:
        raise ValueError(f"{func}: top must have shape (B,) = ({x.shape[0]},), got "
                         f"{tuple(top.shape)}")
    if top.is_floating_point() or top.is_complex() or top.dtype == torch.bool:
        raise TypeError(f"{func}: top must hold integer indices, got {top.dtype}")
    gen = _generator(generator, func)
    perm = torch.rand(x.shape[0], x.shape[1], generator=gen).argsort(dim=1).to(x.device)
    x_perm = torch.gather(x, 1, perm[..., None].expand_as(x))
    top_perm = (perm == top[:, None]).to(torch.int64).argmax(dim=1)
    return x_perm, top_perm, perm


def _check_streams(x: object, who: str, n_streams: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{who} expected streams of shape (B, N, L), got a {x.dim()}-D "
                         f"tensor of shape {tuple(x.shape)}")
    if n_streams is not None and x.shape[1] != n_streams:
        raise ValueError(f"{who} was built for N={n_streams} streams, got an input with "
                         f"{x.shape[1]} streams, shape {tuple(x.shape)}")
    return x


class EquivariantLinear(nn.Module):
    r"""A Deep Sets layer: the same linear map on every element, plus the set's mean.

    For a set of ``N`` feature vectors :math:`h_1, \dots, h_N` (a tensor ``(B, N, D)``),

    .. math::

        y_i = \Lambda h_i + \Gamma \, \frac{1}{N} \sum_{j=1}^{N} h_j + c,

    with :math:`\Lambda` and :math:`\Gamma` of shape ``(out_features, in_features)`` and the
    bias :math:`c`. This is the permutation-equivariant layer of Zaheer et al. (2017), with
    the mean in place of the sum so that the same weights suit any ``N``. Reordering the
    elements reorders the outputs the same way. With ``context=False``, :math:`\Gamma` is
    absent and each element is mapped on its own.

    Args:
        in_features: size :math:`D` of each element's features.
        out_features: size of each element's output.
        context: whether to add the :math:`\Gamma` term. Default: ``True``.

    Shape:
        Input ``(B, N, in_features)``, output ``(B, N, out_features)``, any ``N >= 1``.
    """

    def __init__(self, in_features: int, out_features: int, context: bool = True) -> None:
        super().__init__()
        _check_int("in_features", in_features, 1, "EquivariantLinear")
        _check_int("out_features", out_features, 1, "EquivariantLinear")
        self.own = nn.Linear(in_features, out_features)             # Lambda and c
        self.context = (nn.Linear(in_features, out_features, bias=False)  # Gamma
                        if context else None)

    def forward(self, h: Tensor) -> Tensor:
        if not isinstance(h, Tensor):
            raise TypeError(f"EquivariantLinear expected a torch.Tensor, got {type(h).__name__}")
        if h.dim() != 3:
            raise ValueError(f"EquivariantLinear expected (B, N, features), got a {h.dim()}-D "
                             f"tensor of shape {tuple(h.shape)}")
        y = self.own(h)
        if self.context is not None:
            y = y + self.context(h.mean(dim=1, keepdim=True))
        return y


class SharedRanker(nn.Module):
    """Scores each of ``N`` streams with the same filters and the same head; any ``N``.

    Two shared convolution layers (``SharedConv1d.per_group``: one bank, ``N`` read from
    the input) with ReLU, an average over time per stream and feature, then a Deep Sets head
    (:class:`EquivariantLinear`, ReLU, a linear map to one score per stream). No weight
    depends on ``N``, so the parameter count does not either, and permuting the input's
    streams permutes the scores.

    Args:
        features: filters of the two convolution layers, ``(F1, F2)``.
        kernel_size: width of every filter (odd, so that ``'same'`` padding is symmetric).
        hidden: width of the head.
        context: whether the head adds the mean over streams (the Deep Sets term).
        dtype: dtype of the parameters.

    Shape:
        Input ``(B, N, L)``, output ``(B, N)`` scores.

    Example::

        >>> model = SharedRanker()
        >>> model(torch.randn(2, 5, 64)).shape, model(torch.randn(2, 9, 64)).shape
        (torch.Size([2, 5]), torch.Size([2, 9]))
    """

    def __init__(
        self,
        features: Sequence[int] = (6, 12),
        kernel_size: int = 7,
        hidden: int = 16,
        context: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = "SharedRanker"
        f1, f2 = _check_conv_stack("features", features, "(F1, F2)", kernel_size, who)
        _check_int("hidden", hidden, 1, who)
        self.conv1 = SharedConv1d.per_group(1, f1, kernel_size, padding="same", dtype=dtype)
        self.conv2 = SharedConv1d.per_group(f1, f2, kernel_size, padding="same", dtype=dtype)
        self.head = EquivariantLinear(f2, hidden, context=context)
        self.score = nn.Linear(hidden, 1)
        if dtype is not None:
            self.head.to(dtype)
            self.score.to(dtype)

    def pooled(self, x: Tensor) -> Tensor:
        """Per-stream features after the convolutions and the average over time, ``(B, N, F2)``."""
        x = _check_streams(x, "SharedRanker")
        n = x.shape[1]
        h = F.relu(self.conv2(F.relu(self.conv1(x))))        # (B, N * F2, L), group-major
        return h.unflatten(1, (n, -1)).mean(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.head(self.pooled(x)))
        return self.score(h).squeeze(-1)


class MixingRanker(nn.Module):
    """An ordinary CNN for the same task: the ``N`` streams are the input channels.

    ``nn.Conv1d(N, C1, k)`` (every filter reads all streams), ReLU, ``nn.Conv1d(C1, C2,
    k)``, ReLU, an average over time, and ``nn.Linear(C2, N)`` that gives one score per
    stream position. It works for the ``N`` it was built for only, and its weights are tied
    to the positions of the streams.

    Args:
        n_streams: the number of streams ``N`` of every input.
        channels: output channels of the two convolution layers, ``(C1, C2)``.
        kernel_size: width of every filter (odd).
        dtype: dtype of the parameters.

    Shape:
        Input ``(B, N, L)``, output ``(B, N)`` scores.

    Raises:
        ValueError: (in forward) an input with another number of streams.

    Example::

        >>> model = MixingRanker(5)
        >>> model(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        n_streams: int,
        channels: Sequence[int] = (8, 12),
        kernel_size: int = 7,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = "MixingRanker"
        self.n_streams = _check_int("n_streams", n_streams, 1, who)
        c1, c2 = _check_conv_stack("channels", channels, "(C1, C2)", kernel_size, who)
        self.conv1 = nn.Conv1d(n_streams, c1, kernel_size, padding="same", dtype=dtype)
        self.conv2 = nn.Conv1d(c1, c2, kernel_size, padding="same", dtype=dtype)
        self.score = nn.Linear(c2, n_streams, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = _check_streams(x, "MixingRanker", self.n_streams)
        h = F.relu(self.conv2(F.relu(self.conv1(x))))          # (B, C2, L)
        return self.score(h.mean(dim=-1))


def accuracy(scores: Tensor, top: Tensor) -> float:
    """Fraction of samples whose highest score is at the target stream.

    Args:
        scores: ``(B, N)`` scores.
        top: ``(B,)`` target indices.

    Returns:
        float: accuracy in ``[0, 1]``; chance level is ``1 / N``.

    Raises:
        TypeError: non-tensor arguments.
        ValueError: shapes other than ``(B, N)`` and ``(B,)``.
    """
    if not isinstance(scores, Tensor) or not isinstance(top, Tensor):
        raise TypeError(f"accuracy: scores and top must be tensors, got "
                        f"{type(scores).__name__} and {type(top).__name__}")
    if scores.dim() != 2 or top.shape != scores.shape[:1]:
        raise ValueError(f"accuracy: expected scores (B, N) and top (B,), got "
                         f"{tuple(scores.shape)} and {tuple(top.shape)}")
    return float((scores.argmax(dim=1) == top).double().mean())


def fit(
    model: nn.Module,
    train: StreamSet,
    test: StreamSet | None = None,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Train a ranker with Adam on cross-entropy over the ``N`` scores of each sample.

    Mini-batches are drawn in an order fixed by ``seed``. After every epoch the mean
    training loss and, if ``test`` is given, the held-out loss and accuracy are recorded
    (computed without gradients, in evaluation mode).

    Args:
        model: a module mapping ``(B, N, L)`` to ``(B, N)`` scores.
        train: the training set (from :func:`make_streams`).
        test: an optional held-out set.
        epochs: passes over the training set, at least 1.
        batch_size: samples per step, at least 1.
        lr: Adam's learning rate, > 0.
        seed: seed of the mini-batch order.

    Returns:
        dict: lists with one entry per epoch: ``"train_loss"``, and with ``test`` also
        ``"test_loss"`` and ``"test_accuracy"``.

    Raises:
        TypeError: a model that is not an ``nn.Module``, sets that are not
            :class:`StreamSet`, or non-int counts.
        ValueError: counts or learning rate out of range.
    """
    func = "fit"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{func}: model must be an nn.Module, got {type(model).__name__}")
    for name, data in (("train", train), ("test", test)):
        if not (data is None and name == "test") and not isinstance(data, StreamSet):
            raise TypeError(f"{func}: {name} must be a StreamSet, got {type(data).__name__}")
    _check_int("epochs", epochs, 1, func)
    _check_int("batch_size", batch_size, 1, func)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{func}: lr must be a positive float, got {lr!r}")
    _check_int("seed", seed, 0, func)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history: dict[str, list[float]] = {"train_loss": []}
    if test is not None:
        history.update(test_loss=[], test_accuracy=[])
    n = train.x.shape[0]
    for _ in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(n, generator=gen).to(train.x.device).split(batch_size):
            loss = F.cross_entropy(model(train.x[idx]), train.top[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history["train_loss"].append(total / n)
        if test is not None:
            model.eval()
            with torch.no_grad():
                scores = model(test.x)
            history["test_loss"].append(float(F.cross_entropy(scores, test.top)))
            history["test_accuracy"].append(accuracy(scores, test.top))
    model.eval()
    return history
