"""Opt-in autotuning: time the correct strategies once per shape, on this machine.

By default a shared convolution is the fold (``sharedconv.functional``): one ordinary
convolution on a view that puts the groups into the batch. Which *kernel* is fastest for a
given shape depends on the machine (its instruction set, caches, thread count, GPU) and
on the shape itself, so no fixed rule is right everywhere. Like
``torch.backends.cudnn.benchmark``, :func:`~sharedconv.tuning.autotune` measures instead
of guessing:

.. code-block:: python

    with sharedconv.autotune():
        for x, y in loader:            # the first step of each new shape is timed
            loss = criterion(model(x), y)
            loss.backward()

On the first eager call for a new key (device, dtype, input shape and layout, bank shape,
stride, padding, dilation, groups, which gradients are needed, ``torch.get_num_threads()``)
every correct *strategy* is timed on the actual tensors and the fastest is cached; later
calls with that key reuse it. The strategies are

``fold``
    the default: one convolution on the folded view;
``grouped``
    PyTorch's grouped convolution over ``groups`` temporary copies of the bank, made for
    the call and dropped after it (never saved for the backward);
``unfold``
    1-d only: batched matrix products of the bank with the unfolded input windows
    (``im2col``), processed a few samples at a time so that the windows stay in the
    CPU's level-2 cache (its size is read from the operating system).

Why the fold is not always fastest: on a CPU its convolution runs in oneDNN, whose kernels
block channels by the vector width (16 float32 with AVX-512, 8 with AVX2) and are built
for convolutions that mix many channels; with one channel per group they are thin, and
the grouped or unfolded strategies can beat them. Which one does changes with the
instruction set and the shape (``MAINTAINERS.md`` in the repository has the details).

When gradients are needed, the forward, the input gradient and the weight gradient are
chosen *each by its own timing* (the backward parts on the first backward pass, with the
real output gradient), so a step may run its forward one way and its backward another.
Whatever the choice, autograd keeps only the input and the one bank, as the fold does;
a strategy whose temporaries would be larger than the input (``G`` bank copies for many
groups, windows of a tiny batch) is not tried, so memory never grows with the number of
groups.

Under ``torch.compile``, ``torch.export``, ``torch.jit`` tracing, ``torch.func`` transforms,
forward-mode AD, autocast, CUDA graph capture, tensor subclasses and dispatch modes, the
fold runs (under a dispatch mode, such as ``FlopCounterMode``, a choice already cached is
still used, but nothing is timed). The cache can be read (:func:`cache`), saved and loaded
(:func:`save_cache`, :func:`load_cache`) so a run can be reproduced; :func:`clear_cache`
empties it. Timing goes through :data:`timer`, which tests may replace.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Choice",
    "Key",
    "STRATEGIES",
    "autotune",
    "cache",
    "clear_cache",
    "enable",
    "is_enabled",
    "load_cache",
    "measure",
    "save_cache",
]

#: The strategies, in the order they are tried; ``unfold`` exists for 1-d convolutions.
STRATEGIES = ("fold", "grouped", "unfold")

#: The parts of a convolution that are chosen separately.
PARTS = ("forward", "input_grad", "weight_grad")

_ENABLED = False

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ------------------------------------------------------------------------------ switch


@contextlib.contextmanager
def autotune(enabled: bool = True) -> Iterator[None]:
    """Autotune the shared convolutions run inside this block (``enabled=False``: don't).

    Restores the previous setting on exit, so blocks nest. Also usable as a decorator.
    :func:`sharedconv.tuning.enable` is the global switch.
    """
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    try:
        yield
    finally:
        _ENABLED = previous


def enable(enabled: bool = True) -> None:
    """Turn autotuning on (or off) for the whole process, like ``cudnn.benchmark = True``."""
    global _ENABLED
    _ENABLED = bool(enabled)


def is_enabled() -> bool:
    """Whether shared convolutions are autotuned now."""
    return _ENABLED


def _applies(x: Tensor, weight: Tensor, groups: int) -> bool:
    """Whether an eager call may leave the fold: nothing is tracing, transforming or casting."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
    ):
        return False
    if type(x) is not Tensor or not isinstance(weight, Tensor) or x.numel() == 0:
        return False
    if x.device.type not in ("cpu", "cuda") or torch.is_autocast_enabled(x.device.type):
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _modes_active() -> bool:
    """A dispatch or function mode is on (FlopCounterMode, fake tensors, ...): don't time."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled()


# ------------------------------------------------------------------------------- cache


class Key(NamedTuple):
    """What a tuned choice is valid for. ``input`` is the shape after explicit padding
    (non-zero padding modes and uneven ``'same'`` are applied before the convolution),
    so the padding mode is part of it."""

    device: str
    dtype: str
    input: tuple[int, ...]
    layout: str
    bank: tuple[int, ...]
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    needs: tuple[bool, bool, bool]
    threads: int


@dataclass
class Choice:
    """The strategy chosen for each part, and the seconds each candidate took.

    ``input_grad`` and ``weight_grad`` stay ``None`` until a backward pass needed them.
    ``timings[part][strategy]`` is the median of the timed calls; ``tuning_s[part]`` the
    wall time that tuning the part cost, warm-up included.
    """

    forward: str
    input_grad: str | None = None
    weight_grad: str | None = None
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    tuning_s: dict[str, float] = field(default_factory=dict)

    def is_fold(self, needs: tuple[bool, bool, bool]) -> bool:
        """Every part that ``needs`` (input, weight, bias gradients) asks for runs the fold."""
        return self.forward == "fold" and (not needs[0] or self.input_grad == "fold") and (
            not needs[1] or self.weight_grad == "fold")


_CACHE: dict[Key, Choice] = {}

#: A choice that every tuned call uses instead of the cache (the benchmark's strategies).
_FORCED: Choice | None = None


@contextlib.contextmanager
def _force(choice: Choice) -> Iterator[None]:
    """Tune as ``autotune`` does, but run ``choice`` for every key, timing nothing."""
    global _ENABLED, _FORCED
    previous = _ENABLED, _FORCED
    _ENABLED, _FORCED = True, choice
    try:
        yield
    finally:
        _ENABLED, _FORCED = previous


def cache() -> dict[Key, Choice]:
    """The tuned choices so far (a copy): key, the strategy per part and its timings."""
    return dict(_CACHE)


def clear_cache() -> None:
    """Forget every choice: the next call of each shape is timed again."""
    _CACHE.clear()


def save_cache(path: str | os.PathLike) -> None:
    """Write the cache as JSON, to reproduce a run's choices with :func:`load_cache`."""
    entries = [{"key": key._asdict(), **asdict(choice)} for key, choice in _CACHE.items()]
    Path(path).write_text(json.dumps(entries, indent=1) + "\n")


def load_cache(path: str | os.PathLike) -> int:
    """Add the choices saved by :func:`save_cache` (they replace equal keys); return how many.

    Loaded choices are used as they are, without timing: a run on the same machine then
    makes the same choices as the run that saved them.
    """
    entries = json.loads(Path(path).read_text())
    for entry in entries:
        raw = entry.pop("key")
        key = Key._make(tuple(v) if isinstance(v, list) else v for v in map(raw.get, Key._fields))
        unknown = {entry.get(p) for p in PARTS} - {None, *STRATEGIES}
        if unknown:
            raise ValueError(f"load_cache: unknown strategy {unknown.pop()!r} in {path}")
        _CACHE[key] = Choice(**entry)
    return len(entries)


# ------------------------------------------------------------------------------ timing


def measure(
    candidates: dict[str, Callable[[], object]], device: torch.device, part: str = "",
    rounds: int = 5,
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed interleaved on ``device``.

    ``part`` (``"forward"``, ``"input_grad"`` or ``"weight_grad"``) says what is timed;
    the measurement does not depend on it.

    Each candidate is called once to warm up (oneDNN and cuDNN set up their kernels on a
    first call), then sampled ``rounds`` times in a shuffled order, so that a slow moment
    of the machine falls on all of them alike. A sample starts with one untimed call,
    which brings this candidate's data into the caches as a steady loop would (the
    previous sample was another candidate's), and then times the call, repeated until the
    sample lasts half a millisecond (at most 50 calls), so that the clock's resolution
    does not decide.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(fn: Callable[[], object], number: int) -> float:
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return (time.perf_counter() - start) / number

    number = {name: max(1, min(50, round(5e-4 / max(seconds(fn, 1), 1e-9))))
              for name, fn in candidates.items()}
    return interleaved({name: functools.partial(seconds, fn, number[name])
                        for name, fn in candidates.items()}, rounds)


def interleaved(samplers: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """The median of ``rounds`` samples of each sampler, all of them sampled once per round
    in a shuffled (seeded, so reproducible) order."""
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    order = list(samplers)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples[name].append(samplers[name]())
    return {name: statistics.median(values) for name, values in samples.items()}


#: The function that times candidates, ``timer(candidates, device, part) -> {name: seconds}``:
#: :func:`measure` by default; tests replace it to check which strategy is picked.
timer: Callable[[dict[str, Callable[[], object]], torch.device, str], dict[str, float]] = measure


def _pick(choice: Choice, part: str, candidates: dict[str, Callable[[], object]],
          device: torch.device) -> str:
    """Time ``candidates`` for ``part`` (one needs no timing), record and return the fastest."""
    if len(candidates) == 1:
        (best,) = candidates
        choice.timings[part] = {}
    else:
        start = time.perf_counter()
        with torch.no_grad():
            times = timer(candidates, device, part)
        choice.tuning_s[part] = time.perf_counter() - start
        choice.timings[part] = dict(times)
        best = min(candidates, key=lambda name: (times[name], STRATEGIES.index(name)))
    setattr(choice, part, best)
    return best


# -------------------------------------------------------------------------- strategies


class _Options(NamedTuple):
    groups: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]


def _repeat_bank(weight: Tensor, groups: int) -> Tensor:
    """``groups`` copies of the bank, ``(groups * F, D, *k)``: one temporary tensor."""
    return weight.expand(groups, *weight.shape).reshape(groups * weight.shape[0],
                                                        *weight.shape[1:])


def _bw(grad: Tensor, x: Tensor, weight: Tensor, bias_size: int | None, o: _Options,
        groups: int, mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    n = weight.dim() - 2
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None if bias_size is None else [bias_size], list(o.stride),
        list(o.padding), list(o.dilation), False, [0] * n, groups, mask)


def _folded(t: Tensor, groups: int) -> Tensor:
    """``(B, G * C, *S)`` as ``(B * G, C, *S)``."""
    return t.reshape(t.shape[0] * groups, t.shape[1] // groups, *t.shape[2:])


def _fold_forward(x: Tensor, w: Tensor, b: Tensor | None, o: _Options) -> Tensor:
    out = _CONV[w.dim() - 2](_folded(x, o.groups), w, b, o.stride, o.padding, o.dilation)
    return out.reshape(x.shape[0], o.groups * w.shape[0], *out.shape[2:])


def _fold_input_grad(grad: Tensor, x: Tensor, w: Tensor, o: _Options) -> Tensor:
    gx = _bw(_folded(grad, o.groups), _folded(x, o.groups), w, None, o, 1,
             [True, False, False])[0]
    return gx.reshape(x.shape)


def _fold_weight_grad(grad: Tensor, x: Tensor, w: Tensor, o: _Options, need_bias: bool
                      ) -> tuple[Tensor, Tensor | None]:
    _, gw, gb = _bw(_folded(grad, o.groups), _folded(x, o.groups), w,
                    w.shape[0] if need_bias else None, o, 1, [False, True, need_bias])
    return gw, gb if need_bias else None


def _grouped_forward(x: Tensor, w: Tensor, b: Tensor | None, o: _Options) -> Tensor:
    bias = None if b is None else b.repeat(o.groups)
    return _CONV[w.dim() - 2](x, _repeat_bank(w, o.groups), bias, o.stride, o.padding,
                              o.dilation, o.groups)


def _grouped_input_grad(grad: Tensor, x: Tensor, w: Tensor, o: _Options) -> Tensor:
    return _bw(grad, x, _repeat_bank(w, o.groups), None, o, o.groups,
               [True, False, False])[0]


def _grouped_weight_grad(grad: Tensor, x: Tensor, w: Tensor, o: _Options, need_bias: bool
                         ) -> tuple[Tensor, Tensor | None]:
    g, f = o.groups, w.shape[0]
    _, gw, gb = _bw(grad, x, _repeat_bank(w, g), g * f if need_bias else None, o, g,
                    [False, True, need_bias])
    return gw.view(g, *w.shape).sum(0), gb.view(g, f).sum(0) if need_bias else None


def _cache_bytes() -> int:
    """The CPU's level-2 cache per core, as Linux reports it; 1 MiB where it does not."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 2**10, "M": 2**20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 2**20


#: Bytes of unfolded windows processed at a time on the CPU (the level-2 cache per core).
_CHUNK_BYTES = _cache_bytes()


def _chunks(n: int, per_sample: int, x: Tensor) -> list[tuple[int, int]]:
    """Ranges of samples whose windows take at most a cache (CPU) or the input (GPU)."""
    limit = _CHUNK_BYTES if x.device.type == "cpu" else x.numel() * x.element_size()
    step = max(1, limit // max(1, per_sample))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _samples(x: Tensor, groups: int, padding: int) -> Tensor:
    """``x`` ``(B, G * D, L)`` as ``(B * G, D, L + 2 * padding)``, zero-padded."""
    folded = _folded(x, groups)
    return F.pad(folded, (padding, padding)) if padding else folded


def _windows(samples: Tensor, k: int, stride: int, dilation: int) -> Tensor:
    """The windows of ``samples`` ``(n, D, L)`` as ``(n, D * k, L_out)``, a copy.

    Row ``c * k + j`` holds tap ``j`` of channel ``c`` at every output position: the order
    of the bank's ``(F, D, k)`` weights flattened to ``(F, D * k)``.
    """
    windows = samples.unfold(2, dilation * (k - 1) + 1, stride)  # (n, D, L_out, span)
    if dilation > 1:
        windows = windows[..., ::dilation]
    n, d = samples.shape[:2]
    return windows.transpose(2, 3).contiguous().view(n, d * k, -1)


def _out_length(length: int, k: int, o: _Options) -> int:
    return (length + 2 * o.padding[0] - o.dilation[0] * (k - 1) - 1) // o.stride[0] + 1


def _unfold_forward(x: Tensor, w: Tensor, b: Tensor | None, o: _Options) -> Tensor:
    """``bank (F, D*k) @ windows (D*k, L_out)`` for every sample, chunk by chunk."""
    f_out, d, k = w.shape
    samples = _samples(x, o.groups, o.padding[0])
    n, out_len = samples.shape[0], _out_length(x.shape[2], k, o)
    bank = w.reshape(1, f_out, d * k)
    out = samples.new_empty(n, f_out, out_len)
    for i, j in _chunks(n, d * k * out_len * x.element_size(), x):
        windows = _windows(samples[i:j], k, o.stride[0], o.dilation[0])
        banks = bank.expand(j - i, f_out, d * k)
        if b is None:
            torch.bmm(banks, windows, out=out[i:j])
        else:
            torch.baddbmm(b.view(1, f_out, 1), banks, windows, out=out[i:j])
    return out.view(x.shape[0], o.groups * f_out, out_len)


def _unfold_input_grad(grad: Tensor, x: Tensor, w: Tensor, o: _Options) -> Tensor:
    """``bank^T @ grad`` is the gradient of every window; its ``k`` taps are added back at
    their offsets with ``k`` strided additions."""
    f_out, d, k = w.shape
    n, length, pad = x.shape[0] * o.groups, x.shape[2], o.padding[0]
    stride, dilation = o.stride[0], o.dilation[0]
    per_sample = grad.reshape(n, f_out, grad.shape[2])
    out_len = per_sample.shape[2]
    bank_t = w.reshape(1, f_out, d * k).transpose(1, 2)
    gx = per_sample.new_zeros(n, d, length + 2 * pad)
    for i, j in _chunks(n, d * k * out_len * x.element_size(), x):
        per_tap = torch.bmm(bank_t.expand(j - i, d * k, f_out), per_sample[i:j])
        per_tap = per_tap.view(j - i, d, k, out_len)
        for tap in range(k):
            start = tap * dilation
            gx[i:j, :, start:start + stride * (out_len - 1) + 1:stride] += per_tap[:, :, tap]
    return gx[:, :, pad:pad + length].reshape(x.shape)


def _unfold_weight_grad(grad: Tensor, x: Tensor, w: Tensor, o: _Options, need_bias: bool
                        ) -> tuple[Tensor, Tensor | None]:
    """``grad @ windows^T`` summed over the samples, the windows made again chunk by chunk."""
    f_out, d, k = w.shape
    samples = _samples(x, o.groups, o.padding[0])
    n = samples.shape[0]
    per_sample = grad.reshape(n, f_out, grad.shape[2])
    gw: Tensor | None = None
    for i, j in _chunks(n, d * k * per_sample.shape[2] * x.element_size(), x):
        windows = _windows(samples[i:j], k, o.stride[0], o.dilation[0])
        part = torch.bmm(per_sample[i:j], windows.transpose(1, 2)).sum(0)
        gw = part if gw is None else gw + part
    assert gw is not None
    return gw.view(w.shape), per_sample.sum((0, 2)) if need_bias else None


_FORWARD = {"fold": _fold_forward, "grouped": _grouped_forward, "unfold": _unfold_forward}
_INPUT_GRAD = {"fold": _fold_input_grad, "grouped": _grouped_input_grad,
               "unfold": _unfold_input_grad}
_WEIGHT_GRAD = {"fold": _fold_weight_grad, "grouped": _grouped_weight_grad,
                "unfold": _unfold_weight_grad}


def _candidates(x: Tensor, w: Tensor, o: _Options) -> tuple[str, ...]:
    """The strategies worth timing: correct, and with temporaries no larger than the input."""
    names = ["fold"]
    if o.groups > 1 and o.groups * w.numel() <= x.numel():
        names.append("grouped")
    if w.dim() == 3:
        d, k = w.shape[1], w.shape[2]
        out_len = _out_length(x.shape[2], k, o)
        if out_len > 0 and d * k * out_len <= x.numel():  # one sample's windows
            names.append("unfold")
    return tuple(names)


# ---------------------------------------------------------------------------- the call


class _TunedConv(torch.autograd.Function):
    """The shared convolution with each part run by the strategy chosen for it.

    Saves the input and the one bank, as the fold's convolution does; copies and windows
    live only inside the part that uses them. The backward is written in differentiable
    operations, so a second derivative works as for the fold.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, o, key, choice):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.o, ctx.key, ctx.choice, ctx.has_bias = o, key, choice, bias is not None
        return _FORWARD[choice.forward](x, weight, bias, o)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        o, choice = ctx.o, ctx.choice
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        gx = gw = gb = None
        names = _candidates(x, weight, o)
        if need_x:
            how = choice.input_grad
            if how is None:
                how = _pick(choice, "input_grad", {
                    n: (lambda n=n: _INPUT_GRAD[n](grad, x, weight, o)) for n in names},
                    x.device)
            gx = _INPUT_GRAD[how](grad, x, weight, o)
        if need_w:
            how = choice.weight_grad
            if how is None:
                how = _pick(choice, "weight_grad", {
                    n: (lambda n=n: _WEIGHT_GRAD[n](grad, x, weight, o, need_b))
                    for n in names}, x.device)
            gw, gb = _WEIGHT_GRAD[how](grad, x, weight, o, need_b)
        elif need_b:
            gb = grad.reshape(x.shape[0] * o.groups, weight.shape[0], -1).sum((0, 2))
        return gx, gw, gb, None, None, None


def _key(x: Tensor, w: Tensor, b: Tensor | None, o: _Options,
         needs: tuple[bool, bool, bool]) -> Key:
    if x.is_contiguous():
        layout = "contiguous"
    elif x.dim() in (4, 5) and x.is_contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d):
        layout = "channels_last"
    else:
        layout = "strided"
    return Key(str(x.device), str(x.dtype).removeprefix("torch."), tuple(x.shape), layout,
               tuple(w.shape), b is not None, o.stride, o.padding, o.dilation, o.groups,
               needs, torch.get_num_threads())


def _run(x: Tensor, w: Tensor, b: Tensor | None, o: _Options, key: Key, choice: Choice
         ) -> Tensor:
    """Apply ``choice``: the plain fold where it chose the fold for every part."""
    if not any(key.needs):
        return _FORWARD[choice.forward](x, w, b, o)
    if choice.is_fold(key.needs):
        return _fold_forward(x, w, b, o)
    return _TunedConv.apply(x, w, b, o, key, choice)


def _conv(x: Tensor, w: Tensor, b: Tensor | None, stride: tuple[int, ...],
          padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Tensor:
    """The tuned shared convolution of a batched, padded input (called by the fold)."""
    o = _Options(groups, tuple(stride), tuple(padding), tuple(dilation))
    grad = torch.is_grad_enabled()
    needs = (grad and x.requires_grad, grad and w.requires_grad,
             grad and b is not None and b.requires_grad)
    key = _key(x, w, b, o, needs)
    choice = _FORCED or _CACHE.get(key)
    if choice is None:
        if _modes_active():
            return _fold_forward(x, w, b, o)
        names = _candidates(x, w, o)
        if names == ("fold",):  # nothing to choose between, for any part
            choice = Choice("fold", "fold", "fold", {p: {} for p in PARTS})
        else:
            choice = Choice(forward="fold")
            def forward(name: str) -> Callable[[], object]:
                return lambda: _FORWARD[name](x, w, b, o)

            _pick(choice, "forward", {n: forward(n) for n in names}, x.device)
        _CACHE[key] = choice
    return _run(x, w, b, o, key, choice)
