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

On the first eager call for a new key (device, dtype, the folded input's shape and layout,
bank shape, stride, padding, dilation, groups, which gradients are needed,
``torch.get_num_threads()``) every correct *strategy* is timed on the actual tensors;
later calls with that key reuse the choice. The strategies are

``fold``
    the default: one convolution on the folded view;
``grouped``
    PyTorch's grouped convolution over ``groups`` temporary copies of the bank, made for
    the call and dropped after it (never saved for the backward);
``unfold``
    1-d only: matrix products of the bank with the unfolded input windows (``im2col``,
    the windows of one sample as the columns of a matrix), a few samples at a time so
    that the windows stay in the CPU's level-2 cache (its size is read from the operating
    system); the input gradient is one product per tap and ``k`` shifted additions.

The bias gradient has two ways (:data:`BIAS_STRATEGIES`): ``fold``, computed by the same
call of the convolution's backward as the weight gradient, or ``sum``, a reduction of its
own. Which is faster depends on the library: oneDNN's bias gradient inside a convolution's
backward can cost more than the weight gradient it comes with.

**A choice is a measured win, or the fold.** Each candidate is sampled in interleaved
rounds (:func:`measure`); a strategy other than the fold is chosen only when its median
beats the fold's by more than the spread of the samples (the larger interquartile range
of the two) and by at least :data:`MARGIN` (5 %), so a difference that the machine's noise
could have made keeps the fold. The medians and spreads are kept in the cache entry
(:class:`Choice`).

When gradients are needed, the forward, the input gradient, the weight gradient and the
bias gradient are chosen *each by its own timing* (the backward parts on the first backward pass, with the
real output gradient), so a step may run its forward one way and its backward another.
Then whole training steps are timed against the fold's step, by the same rule: each other
strategy for every part (its backward is then one call), and the parts as chosen one by
one. Parts can win alone and lose together (the extra autograd node costs some
microseconds, one call computes both gradients, the parts share caches), and the reverse.
Whatever the choice, autograd keeps the folded input and the one bank, exactly what the
fold's convolution keeps, so a recomputation (activation checkpointing, inside or outside
the block) saves the same tensors as the original pass. A strategy whose temporaries would
be larger than the tensors a step holds anyway (``G`` bank copies beyond the input and the
output, windows of one sample beyond the input) is not tried, so memory never grows with
the number of groups beyond what the step itself needs.

**Where nothing is timed.** Under ``torch.compile``, ``torch.export``, ``torch.jit``
tracing, ``torch.func`` transforms, forward-mode AD, autocast, CUDA graph capture and tensor
subclasses the fold runs. While a dispatch or function mode is active (``FlopCounterMode``,
fake tensors, the book's cost counters) nothing is timed, in the forward or the backward: a
choice already cached is used, a part not yet chosen runs the fold and stays unchosen.

**Per thread.** Whether tuning is on is a setting of the calling thread, as
``torch.autocast`` is: a block in one thread does not tune another thread's calls. The
cache is shared by the threads of the process and safe to use from several at once.

**Bounded.** The cache keeps at most :data:`CACHE_LIMIT` keys; the oldest is dropped when
a new one would exceed it. Keys are exact shapes, so training on many sequence lengths
would tune each one: ``autotune(dynamic=True)`` keys the batch and spatial sizes rounded up
to powers of two instead, so that one tuning serves every length from ``2**(j-1) + 1`` to
``2**j`` (a strategy whose memory rule a particular call breaks runs the fold there).

The cache can be read (:func:`cache`), saved and loaded (:func:`save_cache`,
:func:`load_cache`) so a run can be reproduced; :func:`clear_cache` empties it. Timing goes
through :data:`timer`, which tests may replace.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CACHE_LIMIT",
    "Choice",
    "BIAS_STRATEGIES",
    "Key",
    "PARTS",
    "STRATEGIES",
    "autotune",
    "cache",
    "clear_cache",
    "enable",
    "interleaved",
    "is_enabled",
    "load_cache",
    "measure",
    "save_cache",
]

#: The strategies, in the order they are tried; ``unfold`` exists for 1-d convolutions.
STRATEGIES = ("fold", "grouped", "unfold")

#: The parts of a convolution that are chosen separately.
PARTS = ("forward", "input_grad", "weight_grad", "bias_grad")

#: How the bias gradient may be computed. ``fold`` is the same call of the convolution's
#: backward as the weight gradient (where that is the fold's or the grouped convolution's);
#: ``sum`` is its own reduction of the output gradient over samples and positions.
BIAS_STRATEGIES = ("fold", "sum")

#: The most keys the cache holds; the oldest is dropped to make room for a new one.
CACHE_LIMIT = 1024

#: How many interleaved rounds a tuning samples each candidate in.
ROUNDS = 7

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_LAYOUTS = ("contiguous", "channels_last", "strided")
_SIZES = ("exact", "pow2")


# ------------------------------------------------------------------------------ switch


class _ThreadState(threading.local):
    """The calling thread's settings; every thread starts with tuning off."""

    enabled: bool = False
    dynamic: bool = False
    forced: Choice | None = None

    def __init__(self) -> None:
        self.saved: list[tuple[bool, bool]] = []  # the settings the open blocks replaced


_STATE = _ThreadState()


class autotune(contextlib.ContextDecorator):
    """Autotune the shared convolutions this thread runs inside the block.

    ``enabled=False`` turns tuning off inside the block. ``dynamic=True`` keys the batch
    and spatial sizes rounded up to powers of two, for inputs whose length varies (see the
    module's documentation). Restores the thread's previous setting on exit, so blocks
    nest; also usable as a decorator. Other threads are not affected.
    """

    def __init__(self, enabled: bool = True, *, dynamic: bool = False) -> None:
        self.enabled, self.dynamic = bool(enabled), bool(dynamic)

    def __enter__(self) -> None:
        state = _STATE
        state.saved.append((state.enabled, state.dynamic))
        state.enabled, state.dynamic = self.enabled, self.dynamic

    def __exit__(self, *exc: object) -> None:
        state = _STATE
        state.enabled, state.dynamic = state.saved.pop()


def enable(enabled: bool = True, *, dynamic: bool = False) -> None:
    """Turn autotuning on (or off) for the calling thread until changed, like
    ``torch.set_autocast_enabled``; other threads keep their own setting."""
    _STATE.enabled, _STATE.dynamic = bool(enabled), bool(dynamic)


def is_enabled() -> bool:
    """Whether this thread's shared convolutions are autotuned now."""
    return _STATE.enabled


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocasting(x: Tensor) -> bool:
    """Autocast is on for ``x``'s device (any device, where torch can say so cheaply)."""
    if _ANY_AUTOCAST is not None:
        return bool(_ANY_AUTOCAST())
    return torch.is_autocast_enabled(x.device.type)


def _modes_active() -> bool:
    """A dispatch or function mode is on (FlopCounterMode, fake tensors, ...): don't time."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled()


# ------------------------------------------------------------------------------- cache


class Key(NamedTuple):
    """What a tuned choice is valid for.

    ``input`` is the shape of the folded input ``(B * G, D, *S)`` after explicit padding
    (non-zero padding modes and uneven ``'same'`` are applied before the convolution), so
    the padding mode is part of it; ``padding`` is what the convolution itself pads.
    ``sizes`` is ``"exact"``, or ``"pow2"`` when the first and spatial sizes of ``input``
    were rounded up to powers of two (``autotune(dynamic=True)``).
    """

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
    sizes: str = "exact"


@dataclass
class Choice:
    """The strategy chosen for each part, with what its choice rests on.

    ``input_grad``, ``weight_grad`` and ``bias_grad`` stay ``None`` until a backward pass
    needed them; ``bias_grad`` is one of :data:`BIAS_STRATEGIES`.
    ``timings[part][strategy]`` is the median seconds of the candidate's samples,
    ``spread[part][strategy]`` their interquartile range (seconds), and ``tuning_s[part]``
    the wall time that tuning the part cost, warm-up included.
    """

    forward: str
    input_grad: str | None = None
    weight_grad: str | None = None
    bias_grad: str | None = None
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    spread: dict[str, dict[str, float]] = field(default_factory=dict)
    tuning_s: dict[str, float] = field(default_factory=dict)

    def is_fold(self, needs: tuple[bool, bool, bool]) -> bool:
        """Every part that ``needs`` (input, weight, bias gradients) asks for runs the fold."""
        return self.forward == "fold" and (not needs[0] or self.input_grad == "fold") and (
            not needs[1] or self.weight_grad == "fold") and (
            not needs[2] or self.bias_grad == "fold")


#: The cache: a call's raw key (:func:`_raw`, cheap to build) -> its :class:`Key` and the
#: choice. Insertion-ordered, so the first entry is the oldest.
_CACHE: dict[tuple, tuple[Key, Choice]] = {}
_LOCK = threading.RLock()


def _store(key: Key, choice: Choice, raw: tuple | None = None) -> None:
    raw = _raw_of(key) if raw is None else raw
    with _LOCK:
        _CACHE.pop(raw, None)
        while len(_CACHE) >= CACHE_LIMIT:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[raw] = (key, choice)


def _raw_of(key: Key) -> tuple:
    """The raw key of a :class:`Key`: what :func:`_conv` builds for a call of that key."""
    device = torch.device(key.device)
    index = -1 if device.type == "cpu" else (0 if device.index is None else device.index)
    return (tuple(key.input), getattr(torch, key.dtype), index, key.layout,
            tuple(key.bank), key.bias, tuple(key.stride), tuple(key.padding),
            tuple(key.dilation), key.groups, tuple(key.needs), key.threads, key.sizes)


def _key_of(raw: tuple) -> Key:
    (shape, dtype, index, layout, bank, bias, stride, padding, dilation, groups, needs,
     threads, sizes) = raw
    device = "cpu" if index < 0 else f"cuda:{index}"
    return Key(device, str(dtype).removeprefix("torch."), tuple(shape), layout,
               tuple(bank), bias, stride, padding, dilation, groups, needs, threads, sizes)


@contextlib.contextmanager
def _force(choice: Choice) -> Iterator[None]:
    """Tune as ``autotune`` does in this thread, but run ``choice`` for every key, timing
    nothing (the benchmark's single-strategy approaches)."""
    state = _STATE
    previous = state.enabled, state.forced
    state.enabled, state.forced = True, choice
    try:
        yield
    finally:
        state.enabled, state.forced = previous


def cache() -> dict[Key, Choice]:
    """A snapshot of the tuned choices: key, the strategy per part and its timings."""
    with _LOCK:
        return {key: copy.deepcopy(choice) for key, choice in _CACHE.values()}


def clear_cache() -> None:
    """Forget every choice: the next call of each shape is timed again."""
    with _LOCK:
        _CACHE.clear()


def save_cache(path: str | os.PathLike) -> None:
    """Write a snapshot of the cache as JSON, for :func:`load_cache` to reproduce a run.

    The file is written whole or not at all (a temporary file in the same folder, then
    renamed), so a reader never sees half of it.
    """
    with _LOCK:
        entries = [{"key": key._asdict(), **asdict(choice)} for key, choice in _CACHE.values()]
    text = json.dumps(entries, indent=1) + "\n"
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                               dir=target.parent if str(target.parent) else ".")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_cache(path: str | os.PathLike) -> int:
    """Add the choices saved by :func:`save_cache` (they replace equal keys); return how many.

    Every entry is checked before any is added: a complete key, known strategies, each one
    valid for the key (``unfold`` for 1-d only, ``grouped`` and ``unfold`` within the
    memory rule that tuning applies), the timings as numbers. A file that fails a check
    adds nothing and raises :class:`ValueError` naming the file and the entry. Loaded
    choices are used as they are, without timing: a run on the same machine then makes
    the same choices as the run that saved them.
    """
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"load_cache: cannot read {path} as JSON: {error}") from None
    if not isinstance(entries, list):
        raise ValueError(f"load_cache: {path} must hold a JSON list of entries, got "
                         f"{type(entries).__name__}")
    if len(entries) > CACHE_LIMIT:
        raise ValueError(f"load_cache: {path} holds {len(entries)} entries, more than the "
                         f"cache's limit of {CACHE_LIMIT}")
    loaded: dict[Key, Choice] = {}
    for index, entry in enumerate(entries):
        try:
            key, choice = _parse_entry(entry)
        except ValueError as error:
            raise ValueError(f"load_cache: {path}, entry {index}: {error}") from None
        loaded[key] = choice
    for key, choice in loaded.items():
        _store(key, choice)
    return len(entries)


def _ints(value: Any, what: str, length: int | None = None, minimum: int = 0
          ) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            type(v) is int and v >= minimum for v in value):
        raise ValueError(f"{what} must be a list of ints >= {minimum}, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{what} must have {length} values, got {value!r}")
    return tuple(value)


def _parse_entry(entry: Any) -> tuple[Key, Choice]:
    """One saved entry as a (key, choice) pair, every field checked; ValueError otherwise."""
    if not isinstance(entry, dict):
        raise ValueError(f"an entry must be an object, got {type(entry).__name__}")
    raw = entry.get("key")
    if not isinstance(raw, dict) or set(raw) != set(Key._fields):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"'key' must be an object with the fields {list(Key._fields)}, "
                         f"got {found}")
    try:
        device = torch.device(raw["device"])
    except (RuntimeError, TypeError):
        raise ValueError(f"'device' {raw['device']!r} is not a torch device") from None
    if not isinstance(getattr(torch, str(raw["dtype"]), None), torch.dtype):
        raise ValueError(f"'dtype' {raw['dtype']!r} is not a torch dtype")
    bank = _ints(raw["bank"], "'bank'", minimum=1)
    if not 3 <= len(bank) <= 5:
        raise ValueError(f"'bank' must have 3 to 5 sizes, got {list(bank)}")
    n = len(bank) - 2
    shape = _ints(raw["input"], "'input'", length=len(bank))
    if shape[1] != bank[1]:
        raise ValueError(f"'input' {list(shape)} must have the bank's {bank[1]} channels")
    for field_name, values in (("layout", _LAYOUTS), ("sizes", _SIZES)):
        if raw[field_name] not in values:
            raise ValueError(f"'{field_name}' must be one of {values}, got "
                             f"{raw[field_name]!r}")
    flags = raw["needs"]
    if not (isinstance(flags, list) and len(flags) == 3
            and all(isinstance(v, bool) for v in flags)):
        raise ValueError(f"'needs' must be a list of 3 booleans, got {flags!r}")
    if not isinstance(raw["bias"], bool):
        raise ValueError(f"'bias' must be a boolean, got {raw['bias']!r}")
    for count in ("groups", "threads"):
        if type(raw[count]) is not int or raw[count] < 1:
            raise ValueError(f"'{count}' must be a positive int, got {raw[count]!r}")
    if shape[0] % raw["groups"]:
        raise ValueError(f"'input' {list(shape)} must hold a multiple of groups="
                         f"{raw['groups']} samples")
    key = Key(str(device), raw["dtype"], shape, raw["layout"], bank, raw["bias"],
              _ints(raw["stride"], "'stride'", n, 1), _ints(raw["padding"], "'padding'", n),
              _ints(raw["dilation"], "'dilation'", n, 1), raw["groups"], tuple(flags),
              raw["threads"], raw["sizes"])
    unknown = set(entry) - {"key", *PARTS, "timings", "spread", "tuning_s"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    allowed = _candidate_names(key.input, key.bank, _options(key))
    parts: dict[str, str | None] = {}
    for part in PARTS:
        name: str | None = entry.get(part)
        needed = part == "forward" or key.needs[PARTS.index(part) - 1]
        if name is None and part != "forward":
            parts[part] = None
            continue
        known = _TIMED[part]
        if name not in known:
            raise ValueError(f"{part!r}: unknown strategy {name!r} (known: {known})")
        if not needed:
            raise ValueError(f"{part!r} is {name!r} for a key that does not need it")
        if part != "bias_grad" and name not in allowed:
            raise ValueError(f"{part!r}: {name!r} is not valid for this key (valid: "
                             f"{allowed}: 'unfold' is 1-d only, and 'grouped' and 'unfold' "
                             "only where their temporaries are no larger than what a step "
                             "holds anyway)")
        parts[part] = name
    extras: dict[str, Any] = {}
    for name in ("timings", "spread"):
        table = entry.get(name, {})
        if not (isinstance(table, dict) and all(
                p in _TIMED and isinstance(t, dict) and all(
                    s in _TIMED[p] and _seconds(v) for s, v in t.items())
                for p, t in table.items())):
            raise ValueError(f"{name!r} must map parts to strategies to seconds, got "
                             f"{table!r}")
        extras[name] = {p: dict(t) for p, t in table.items()}
    spent = entry.get("tuning_s", {})
    if not (isinstance(spent, dict) and all(p in _TIMED and _seconds(v)
                                            for p, v in spent.items())):
        raise ValueError(f"'tuning_s' must map parts to seconds, got {spent!r}")
    forward = parts["forward"]
    assert forward is not None  # checked above: the forward always has a strategy
    return key, Choice(forward, parts["input_grad"], parts["weight_grad"],
                       parts["bias_grad"], extras["timings"], extras["spread"], dict(spent))


#: What a choice's timings may name: each part's strategies, and whole steps (each
#: strategy for every part, and "plan", the parts chosen one by one).
_TIMED = {**{part: STRATEGIES for part in PARTS[:3]}, "bias_grad": BIAS_STRATEGIES,
          "step": (*STRATEGIES, "plan")}


def _seconds(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


# ------------------------------------------------------------------------------ timing


def measure(
    candidates: dict[str, Callable[[], object]], device: torch.device, part: str = "",
    rounds: int = ROUNDS,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one sample per round, timed interleaved.

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
    return _samples({name: functools.partial(seconds, fn, number[name])
                     for name, fn in candidates.items()}, rounds)


def _samples(samplers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """``rounds`` samples of each sampler, all of them sampled once per round in a
    shuffled (seeded, so reproducible) order."""
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    order = list(samplers)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples[name].append(samplers[name]())
    return samples


def interleaved(samplers: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """The median of ``rounds`` samples of each sampler, sampled as :func:`measure` does."""
    return {name: statistics.median(values)
            for name, values in _samples(samplers, rounds).items()}


#: The function that times candidates, ``timer(candidates, device, part)``, returning each
#: candidate's samples in seconds: :func:`measure` by default; tests replace it to check
#: which strategy is picked.
timer: Callable[..., dict[str, list[float]]] = measure


def _spread(values: Sequence[float]) -> float:
    """The interquartile range of ``values`` (zero for fewer than two)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


#: The least win, as a share of the fold's median, for which another strategy is chosen,
#: on top of beating the spread: a policy, not a measurement. Half the held-out goal's
#: tolerance (10 %), so a win given up costs less than the goal allows.
MARGIN = 0.05


def _decide(samples: dict[str, Sequence[float]]) -> tuple[str, dict[str, float],
                                                          dict[str, float]]:
    """The strategy to run from each candidate's samples: the fastest median, unless that
    is not the fold and its win over the fold is within the samples' spread (the larger
    interquartile range of the two) or below :data:`MARGIN` of the fold's median."""
    medians = {name: statistics.median(s) for name, s in samples.items()}
    spreads = {name: _spread(s) for name, s in samples.items()}
    order = {name: i for i, name in enumerate(("fold", *STRATEGIES[1:], "sum", "plan"))}
    fastest = min(medians, key=lambda name: (medians[name], order[name]))
    if fastest != "fold":
        win = medians["fold"] - medians[fastest]
        if win <= max(spreads["fold"], spreads[fastest], MARGIN * medians["fold"]):
            fastest = "fold"
    return fastest, medians, spreads


def _pick(choice: Choice, part: str, candidates: dict[str, Callable[[], object]],
          device: torch.device) -> str:
    """Time ``candidates`` for ``part`` (one needs no timing); record and return the choice.

    ``part="step"`` compares the chosen parts as a whole training step (``"plan"``) with
    the fold's; its timings are recorded, the decision is the caller's to apply.
    """
    if len(candidates) == 1:
        (best,) = candidates
        timings: dict[str, float] = {}
        spreads: dict[str, float] = {}
        spent = None
    else:
        start = time.perf_counter()
        with torch.no_grad():
            raw = timer(candidates, device, part)
        spent = time.perf_counter() - start
        samples: dict[str, Sequence[float]] = {
            name: [float(v) for v in s] if isinstance(s, (list, tuple))
            else [float(s)]  # type: ignore[arg-type]  # a fake timer's one number
            for name, s in raw.items()}
        best, timings, spreads = _decide(samples)
    with _LOCK:
        choice.timings[part], choice.spread[part] = timings, spreads
        if spent is not None:
            choice.tuning_s[part] = spent
        if part in PARTS:
            setattr(choice, part, best)
    return best


# -------------------------------------------------------------------------- strategies
#
# Every strategy takes the folded input ``xf`` of shape (B * G, D, *S), already padded
# where the padding is explicit, and returns (or takes the gradient of) the folded output
# (B * G, F, *S_out).


class _Options(NamedTuple):
    groups: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]


def _options(key: Key) -> _Options:
    return _Options(key.groups, key.stride, key.padding, key.dilation)


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


def _unfolded(t: Tensor, groups: int) -> Tensor:
    """``(B * G, C, *S)`` as ``(B, G * C, *S)``."""
    return t.reshape(t.shape[0] // groups, groups * t.shape[1], *t.shape[2:])


def _fold_forward(xf: Tensor, w: Tensor, b: Tensor | None, o: _Options) -> Tensor:
    return _CONV[w.dim() - 2](xf, w, b, o.stride, o.padding, o.dilation)


def _fold_input_grad(grad: Tensor, xf: Tensor, w: Tensor, o: _Options) -> Tensor:
    return _conv_backward("fold", grad, xf, w, o, [True, False, False])[0]


def _fold_weight_grad(grad: Tensor, xf: Tensor, w: Tensor, o: _Options, need_bias: bool
                      ) -> tuple[Tensor, Tensor | None]:
    return _conv_backward("fold", grad, xf, w, o, [False, True, need_bias])[1:]


def _grouped_forward(xf: Tensor, w: Tensor, b: Tensor | None, o: _Options) -> Tensor:
    bias = None if b is None else b.repeat(o.groups)
    out = _CONV[w.dim() - 2](_unfolded(xf, o.groups), _repeat_bank(w, o.groups), bias,
                             o.stride, o.padding, o.dilation, o.groups)
    return out.reshape(xf.shape[0], w.shape[0], *out.shape[2:])


def _grouped_input_grad(grad: Tensor, xf: Tensor, w: Tensor, o: _Options) -> Tensor:
    return _conv_backward("grouped", grad, xf, w, o, [True, False, False])[0]


def _grouped_weight_grad(grad: Tensor, xf: Tensor, w: Tensor, o: _Options, need_bias: bool
                         ) -> tuple[Tensor, Tensor | None]:
    return _conv_backward("grouped", grad, xf, w, o, [False, True, need_bias])[1:]


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


def _padded(xf: Tensor, padding: int) -> Tensor:
    return F.pad(xf, (padding, padding)) if padding else xf


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


def _unfold_forward(xf: Tensor, w: Tensor, b: Tensor | None, o: _Options) -> Tensor:
    """``bank (F, D*k) @ windows (D*k, L_out)`` for every sample, chunk by chunk."""
    f_out, d, k = w.shape
    samples = _padded(xf, o.padding[0])
    n, out_len = samples.shape[0], _out_length(xf.shape[2], k, o)
    bank = w.reshape(1, f_out, d * k)
    out = samples.new_empty(n, f_out, out_len)
    for i, j in _chunks(n, d * k * out_len * xf.element_size(), xf):
        windows = _windows(samples[i:j], k, o.stride[0], o.dilation[0])
        banks = bank.expand(j - i, f_out, d * k)
        if b is None:
            torch.bmm(banks, windows, out=out[i:j])
        else:
            torch.baddbmm(b.view(1, f_out, 1), banks, windows, out=out[i:j])
    return out


def _unfold_input_grad(grad: Tensor, xf: Tensor, w: Tensor, o: _Options) -> Tensor:
    """``bank^T @ grad`` is the gradient of every window; its ``k`` taps are added back at
    their offsets with ``k`` strided additions.

    The products of many samples go in one call: as many as keep the per-tap gradients
    (``D * k`` rows per sample) no larger than the input or the output gradient, whichever
    is larger, a temporary the step holds anyway.
    """
    f_out, d, k = w.shape
    n, length, pad = xf.shape[0], xf.shape[2], o.padding[0]
    stride, dilation = o.stride[0], o.dilation[0]
    out_len = grad.shape[2]
    # torch.matmul multiplies a matrix by a batch as one product, but not when an operand
    # requires a gradient (it expands the matrix then, several times slower); where no
    # graph is recorded (any backward but a double one), the bank is used detached
    bank = w if torch.is_grad_enabled() else w.detach()
    bank_t = bank.reshape(f_out, d * k).t()
    gx = grad.new_zeros(n, d, length + 2 * pad)
    step = max(1, max(xf.numel(), grad.numel()) // max(1, d * k * out_len))
    for i in range(0, n, step):
        j = min(i + step, n)
        per_tap = torch.matmul(bank_t, grad[i:j]).view(j - i, d, k, out_len)
        for tap in range(k):
            start = tap * dilation
            gx[i:j, :, start:start + stride * (out_len - 1) + 1:stride] += per_tap[:, :, tap]
    return gx[:, :, pad:pad + length]


def _unfold_weight_grad(grad: Tensor, xf: Tensor, w: Tensor, o: _Options, need_bias: bool
                        ) -> tuple[Tensor, Tensor | None]:
    """``grad @ windows^T`` summed over the samples, the windows made again chunk by chunk."""
    f_out, d, k = w.shape
    samples = _padded(xf, o.padding[0])
    n = samples.shape[0]
    gw: Tensor | None = None
    for i, j in _chunks(n, d * k * grad.shape[2] * xf.element_size(), xf):
        windows = _windows(samples[i:j], k, o.stride[0], o.dilation[0])
        part = torch.bmm(grad[i:j], windows.transpose(1, 2)).sum(0)
        gw = part if gw is None else gw + part
    assert gw is not None
    return gw.view(w.shape), _bias_sum(grad) if need_bias else None


_FORWARD = {"fold": _fold_forward, "grouped": _grouped_forward, "unfold": _unfold_forward}
_INPUT_GRAD = {"fold": _fold_input_grad, "grouped": _grouped_input_grad,
               "unfold": _unfold_input_grad}
_WEIGHT_GRAD = {"fold": _fold_weight_grad, "grouped": _grouped_weight_grad,
                "unfold": _unfold_weight_grad}


def _candidate_names(shape: Sequence[int], bank: Sequence[int], o: _Options
                     ) -> tuple[str, ...]:
    """The strategies worth timing for a folded input of ``shape`` and a bank of ``bank``:
    correct, and with temporaries no larger than the tensors a step holds anyway (the
    ``groups`` copies of the bank no larger than the input or the output, one sample's
    windows no larger than the input)."""
    names = ["fold"]
    numel = math.prod(shape)
    out = [(size + 2 * p - r * (k - 1) - 1) // s + 1 for size, k, s, p, r in zip(
        shape[2:], bank[2:], o.stride, o.padding, o.dilation, strict=True)]
    if min(out) < 1:
        return ("fold",)
    out_numel = shape[0] * bank[0] * math.prod(out)
    if o.groups > 1 and o.groups * math.prod(bank) <= max(numel, out_numel):
        names.append("grouped")
    if len(bank) == 3 and bank[1] * bank[2] * out[0] <= numel:  # one sample's windows
        names.append("unfold")
    return tuple(names)


def _candidates(xf: Tensor, w: Tensor, o: _Options) -> tuple[str, ...]:
    """The strategies worth timing for the folded input ``xf`` and the bank ``w``."""
    return _candidate_names(xf.shape, w.shape, o)


# ---------------------------------------------------------------------------- the call


def _may_time() -> bool:
    return not (_modes_active() or torch._C._are_functorch_transforms_active())


class _TunedConv(torch.autograd.Function):
    """The shared convolution of the folded input with each part run by its strategy.

    Saves the folded input and the one bank, as the fold's convolution does; copies and
    windows live only inside the part that uses them. The backward is written in
    differentiable operations, so a second derivative works as for the fold.
    """

    @staticmethod
    def forward(ctx, xf, weight, bias, o, choice, exact):  # type: ignore[override]
        ctx.save_for_backward(xf, weight)
        ctx.o, ctx.choice, ctx.exact, ctx.has_bias = o, choice, exact, bias is not None
        return _FORWARD[_usable(choice.forward, xf, weight, o, exact)](xf, weight, bias, o)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xf, weight = ctx.saved_tensors
        o, choice = ctx.o, ctx.choice
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        needs = (need_x, need_w, need_b and ctx.has_bias)
        if torch._C._are_functorch_transforms_active():
            # is_grads_batched and the like: the fold, whose operators have batching rules
            ways = ("fold", "fold", "fold")
        else:
            missing = ((need_x and choice.input_grad is None)
                       or (need_w and choice.weight_grad is None)
                       or (needs[2] and choice.bias_grad is None))
            if missing and _may_time():  # (under a counting mode: the fold, chosen later)
                _tune_backward(choice, grad, xf, weight, o, needs, ctx.has_bias)
            ways = (*(_usable(name or "fold", xf, weight, o, ctx.exact)
                      for name in (choice.input_grad, choice.weight_grad)),
                    choice.bias_grad or "fold")
        gx, gw, gb = _backward(ways, grad, xf, weight, o, needs)
        return gx, gw, gb, None, None, None


def _conv_backward(way: str, grad: Tensor, xf: Tensor, w: Tensor, o: _Options,
                   mask: list[bool]) -> tuple[Tensor | None, ...]:
    """The gradients ``mask`` asks for (input, bank, bias), in one call of PyTorch's
    convolution backward: the fold's (``way="fold"``) or the grouped convolution's."""
    need_b = mask[2]
    if way == "fold":
        gx, gw, gb = _bw(grad, xf, w, w.shape[0] if need_b else None, o, 1, mask)
        return gx, gw, gb if need_b else None
    g, f = o.groups, w.shape[0]
    gx, gw, gb = _bw(_unfolded(grad, g), _unfolded(xf, g), _repeat_bank(w, g),
                     g * f if need_b else None, o, g, mask)
    return (gx.reshape(xf.shape) if mask[0] else None,
            gw.view(g, *w.shape).sum(0) if mask[1] else None,
            gb.view(g, f).sum(0) if need_b else None)


def _bias_sum(grad: Tensor) -> Tensor:
    return grad.sum([0, *range(2, grad.dim())])


def _backward(ways: tuple[str, ...], grad: Tensor, xf: Tensor, w: Tensor, o: _Options,
              needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
    """The gradients ``needs`` asks for: the input's by ``ways[0]``, the bank's by
    ``ways[1]`` and the bias's by ``ways[2]`` (``"fold"``: in the weight gradient's call
    where that is a convolution's backward; ``"sum"``: its own reduction). One call of
    PyTorch's convolution backward where the input and the bank take the same one."""
    need_x, need_w, need_b = needs
    in_call = need_b and ways[2] == "fold"
    gx = gw = gb = None
    if need_x and need_w and ways[0] == ways[1] != "unfold":
        gx, gw, gb = _conv_backward(ways[0], grad, xf, w, o, [True, True, in_call])
    else:
        if need_x:
            gx = _INPUT_GRAD[ways[0]](grad, xf, w, o)
        if need_w:
            gw, gb = _WEIGHT_GRAD[ways[1]](grad, xf, w, o, in_call)
        elif in_call:
            gb = _conv_backward("fold", grad, xf, w, o, [False, False, True])[2]
    if need_b and gb is None:
        gb = _bias_sum(grad)
    return gx, gw, gb


def _tune_backward(choice: Choice, grad: Tensor, xf: Tensor, w: Tensor, o: _Options,
                   needs: tuple[bool, bool, bool], has_bias: bool) -> None:
    """Choose the backward parts a step needs, each by its own timing (the bias's after
    the bank's, in its call or by its own sum); then time whole training steps: the
    fold's, the parts so chosen (``"plan"``, where it is not the fold) and each other
    strategy for every part (whose backward is then one call), and keep the fastest by the
    rule of :func:`_decide` (the fold, unless another wins beyond the spread and the
    margin)."""
    names = _candidates(xf, w, o)
    need_x, need_w, need_b = needs
    if need_x and choice.input_grad is None:
        _pick(choice, "input_grad", {n: functools.partial(_INPUT_GRAD[n], grad, xf, w, o)
                                     for n in names}, xf.device)
    if need_w and choice.weight_grad is None:
        _pick(choice, "weight_grad", {
            n: functools.partial(_WEIGHT_GRAD[n], grad, xf, w, o, False) for n in names},
            xf.device)
    if need_b and choice.bias_grad is None:
        way = choice.weight_grad if need_w else "fold"
        assert way is not None  # chosen above
        if way == "unfold":  # the weight's call has no bias to give: a sum either way
            ways: dict[str, Callable[[], object]] = {"sum": lambda: None}
        else:
            def in_call() -> object:
                return _conv_backward(way, grad, xf, w, o, [False, need_w, True])

            def summed() -> object:
                gw = _conv_backward(way, grad, xf, w, o, [False, True, False]) if need_w \
                    else None
                return gw, _bias_sum(grad)

            ways = {"fold": in_call, "sum": summed}
        _pick(choice, "bias_grad", ways, xf.device)
    if len(names) == 1 and not (need_b and choice.bias_grad == "sum"):
        return

    def parts(forward: str, input_grad: str | None, weight_grad: str | None,
              bias_grad: str | None) -> Choice:
        return Choice(forward, input_grad if need_x else None,
                      weight_grad if need_w else None, bias_grad if need_b else None)

    plans = {"fold": parts("fold", "fold", "fold", "fold")}
    chosen = parts(choice.forward, choice.input_grad, choice.weight_grad, choice.bias_grad)
    for name in names[1:]:
        plans[name] = parts(name, name, name, "sum" if name == "unfold" else "fold")
    if not chosen.is_fold(needs) and chosen not in plans.values():
        plans["plan"] = chosen
    bias = w.new_zeros(w.shape[0]) if has_bias else None

    def step(plan: Choice) -> Callable[[], object]:
        def run() -> object:
            with torch.enable_grad():
                x_ = xf.detach().requires_grad_(need_x)
                w_ = w.detach().requires_grad_(need_w)
                b_ = None if bias is None else bias.detach().requires_grad_(need_b)
                y = (_fold_forward(x_, w_, b_, o) if plan.is_fold(needs)
                     else _TunedConv.apply(x_, w_, b_, o, plan, True))
                leaves = [t for t in (x_, w_, b_) if t is not None and t.requires_grad]
                return torch.autograd.grad(y, leaves, grad)
        return run

    best = plans[_pick(choice, "step", {n: step(p) for n, p in plans.items()}, xf.device)]
    with _LOCK:
        choice.forward = best.forward
        for part, need in zip(PARTS[1:], needs, strict=True):
            if need:
                setattr(choice, part, getattr(best, part))


def _usable(name: str, xf: Tensor, w: Tensor, o: _Options, exact: bool) -> str:
    """``name``, or the fold where a choice made for rounded sizes breaks this call's
    memory rule (exact keys were checked when they were tuned or loaded)."""
    if exact or name == "fold" or name in _candidates(xf, w, o):
        return name
    return "fold"


def _pow2(size: int) -> int:
    return 1 << max(0, size - 1).bit_length()


def _layout(xf: Tensor) -> str:
    if xf.is_contiguous():
        return "contiguous"
    if xf.dim() in (4, 5) and xf.is_contiguous(
            memory_format=torch.channels_last if xf.dim() == 4 else torch.channels_last_3d):
        return "channels_last"
    return "strided"


_PARAMETER = torch.nn.Parameter
_TRANSFORMS = torch._C._are_functorch_transforms_active
_TRACING = torch._C._is_tracing
_FORWARD_AD = torch.autograd.forward_ad
_GRAD = torch.is_grad_enabled
_THREADS = torch.get_num_threads


def _conv(xf: Tensor, w: Tensor, b: Tensor | None, stride: tuple[int, ...],
          padding: tuple[int, ...], dilation: tuple[int, ...], groups: int
          ) -> Tensor | None:
    """The tuned shared convolution of the folded, padded input ``(B * G, D, *S)``: the
    folded output ``(B * G, F, *S_out)``, or ``None`` where tuning does not apply (tensor
    subclasses, transforms, forward-mode AD, tracing, autocast, complex or empty inputs,
    devices other than CPU and CUDA, CUDA graph capture) and the caller runs the fold.

    Called for every eager call inside :func:`autotune`, so the way to a cached choice is
    kept short: a few checks, one tuple, one look-up.
    """
    tx, tw = type(xf), type(w)
    if (tx is not Tensor and tx is not _PARAMETER) or (tw is not Tensor and tw is not _PARAMETER):
        return None
    if _TRANSFORMS() or _FORWARD_AD._current_level >= 0 or _TRACING():
        return None
    if not (xf.is_cpu or xf.is_cuda) or _autocasting(xf) or xf.is_complex() or (
            xf.numel() == 0) or (xf.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    grad = _GRAD()
    needs = (grad and xf.requires_grad, grad and w.requires_grad,
             grad and b is not None and b.requires_grad)
    state = _STATE
    dynamic, forced = state.dynamic, state.forced
    shape: tuple[int, ...] = xf.shape
    if dynamic:
        shape = (groups * _pow2(shape[0] // groups), shape[1], *map(_pow2, shape[2:]))
    # the device as its index (-1: the CPU; only CPU and CUDA tensors come this far)
    raw = (shape, xf.dtype, xf.get_device(), "contiguous" if xf.is_contiguous() else _layout(xf),
           w.shape, b is not None, stride, padding, dilation, groups, needs, _THREADS(),
           "pow2" if dynamic else "exact")
    entry = _CACHE.get(raw) if forced is None else None
    if entry is not None and not dynamic:  # the way most calls take
        choice = entry[1]
        if choice.forward == "fold" and (not needs[0] or choice.input_grad == "fold") and (
                not needs[1] or choice.weight_grad == "fold"):
            return _CONV[len(stride)](xf, w, b, stride, padding, dilation)
    o = _Options(groups, stride, padding, dilation)
    if forced is not None:
        choice = forced
    elif entry is not None:
        choice = entry[1]
    else:
        if not _may_time():
            return _fold_forward(xf, w, b, o)
        names = _candidates(xf, w, o)
        if names == ("fold",):  # nothing to choose between, for any part
            choice = Choice("fold", "fold", "fold", "fold", {p: {} for p in PARTS},
                            {p: {} for p in PARTS})
        else:
            choice = Choice(forward="fold")

            def forward(name: str) -> Callable[[], object]:
                return lambda: _FORWARD[name](xf, w, b, o)

            _pick(choice, "forward", {n: forward(n) for n in names}, xf.device)
        _store(_key_of(raw), choice, raw)
    exact = forced is None and not dynamic
    if not (needs[0] or needs[1] or needs[2]):
        return _FORWARD[_usable(choice.forward, xf, w, o, exact)](xf, w, b, o)
    if choice.is_fold(needs):
        return _fold_forward(xf, w, b, o)
    return _TunedConv.apply(xf, w, b, o, choice, exact)
