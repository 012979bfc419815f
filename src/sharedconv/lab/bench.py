"""Benchmarks: ``python -m sharedconv.lab.bench --help``.

Every suite compares several ways of computing the same thing, at several shapes. For each
shape, the approaches are first checked to agree, then timed *interleaved* (round after
round, every approach once per round, in a shuffled order) with
:class:`torch.utils.benchmark.Timer`, and reported as the median over rounds, as a ratio to
the suite's reference approach measured in the same run. Exact costs are recorded beside the
times: bytes saved for backward, parameter bytes, FLOPs.

The allocator matters on the CPU: glibc's ``malloc`` returns large blocks to the system on
``free`` and page-faults them in again on the next allocation, which can cost more than the
convolution itself. By default the benchmark re-executes itself with glibc's tunables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` raised (PyTorch's CPU performance
guide recommends a caching allocator such as jemalloc or tcmalloc for the same reason), and
records in the JSON which allocator ran; ``--allocator default`` measures the untuned one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .memory import flops, saved_tensors

__all__ = ["Approach", "Case", "main", "run_case", "compare", "page_faults",
           "describe_allocator", "SUITES"]

TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


@dataclass
class Approach:
    """One way of computing a case.

    ``run(*inputs)`` computes the output; ``params`` are the parameters it trains (counted
    as parameter bytes, not as saved bytes). The forward+backward pass back-propagates a
    fixed random gradient ``grad_out`` of the output's shape and memory layout (set by
    :func:`run_case`), so that only the approach's own backward is timed.
    """

    name: str
    run: Callable[..., torch.Tensor]
    inputs: tuple
    params: tuple = ()
    grad_out: torch.Tensor | None = None
    #: the approach autotunes (:func:`~sharedconv.tuning.autotune`): its tuning is timed first
    tuned: bool = False
    #: a context every call of the approach runs inside (the tuned layer's
    #: ``tuning.autotune``); a timed sample enters it once around all its calls, as a
    #: training loop enters ``autotune()`` once
    block: Callable[[], contextlib.AbstractContextManager[Any]] | None = None

    def within(self) -> contextlib.AbstractContextManager[Any]:
        """The approach's :attr:`block`, or a context that does nothing."""
        return self.block() if self.block is not None else contextlib.nullcontext()


@dataclass
class Case:
    """One shape of one suite: its approaches and the reference the ratios are taken to."""

    suite: str
    shape: dict[str, int]
    approaches: list[Approach]
    reference: str
    notes: dict[str, Any] = field(default_factory=dict)
    forward_only: bool = False  # the approaches compute a gradient themselves
    #: the approach each one must agree with, where that is not ``reference``; an
    #: approach named here as its own is a second reference, checked against nothing
    agree_with: dict[str, str] = field(default_factory=dict)


def describe_allocator() -> str:
    """Which allocator this process runs with, as far as the environment tells."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    if all(os.environ.get(k) == v for k, v in TUNED_ENV.items()):
        return "glibc malloc, tuned (MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ = 2**34)"
    if any(k in os.environ for k in TUNED_ENV):
        return "glibc malloc, custom tunables " + ", ".join(
            f"{k}={os.environ[k]}" for k in TUNED_ENV if k in os.environ
        )
    return "glibc malloc, default"


def cpu_model() -> str:
    """The CPU's model name, as the operating system reports it."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def device_name(device: torch.device) -> str:
    """A human name of the device: the GPU's name, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def machine(device: torch.device) -> dict[str, Any]:
    """What a figure depends on: CPU model, instruction set, threads, library versions, GPU.

    ``cpu_capability`` is the vector instruction set PyTorch's CPU kernels use
    (``torch.backends.cpu.get_cpu_capability()``: ``AVX2``, ``AVX512``, ...); oneDNN, which
    runs the CPU convolutions, picks its own kernels from the same instruction set.
    """
    onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onednn": onednn.group(1) if onednn else None,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                    driver=_nvidia_driver(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    # TF32: what float32 convolutions (cuDNN) and matrix products ran in
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    return info


def _nvidia_driver() -> str | None:
    """The NVIDIA driver's version, as ``nvidia-smi`` reports it; None where it cannot."""
    import subprocess

    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return found[0] if found else None


def run_meta(device: torch.device) -> dict[str, Any]:
    """What a stored run records about where it ran: the device, the allocator, the machine."""
    allocator = describe_allocator() if device.type == "cpu" else "CUDA caching allocator"
    return {"device": device_name(device), "device_type": device.type,
            "allocator": allocator, **machine(device)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(approach: Approach) -> None:
    approach.run(*approach.inputs).backward(approach.grad_out)


def _zero_grads(approach: Approach) -> None:
    for t in approach.inputs + approach.params:
        if isinstance(t, torch.Tensor):
            t.grad = None


def _time_interleaved(
    approaches: list[Approach], kind: str, rounds: int, min_time: float, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each approach, over ``rounds`` interleaved rounds."""
    from torch.utils.benchmark import Timer

    def stmt_for(a: Approach) -> Callable[[], None]:
        if kind == "forward":

            def fwd() -> None:
                with torch.no_grad():
                    a.run(*a.inputs)

            return fwd

        def fwd_bwd() -> None:
            _fwd_bwd(a)
            _zero_grads(a)

        return fwd_bwd

    # Timer runs with one thread unless told otherwise: time with the threads this
    # process has, the ones the recorded ``threads`` field names
    threads = torch.get_num_threads()
    timers = {a.name: Timer("f()", globals={"f": stmt_for(a)}, num_threads=threads)
              for a in approaches}
    # one calibration per approach: how many calls make one sample of ~min_time
    number = {}
    within = {a.name: a.within for a in approaches}
    for name, timer in timers.items():
        with within[name]():
            timer.timeit(1)  # warm-up (allocations, lazy init, oneDNN primitive caches)
            once = timer.timeit(2).median
        number[name] = max(1, int(min_time / max(once, 1e-6)))

    def sample(name: str) -> float:
        _sync(device)
        with within[name]():
            return timers[name].timeit(number[name]).median

    from ..tuning import interleaved

    return interleaved({name: functools.partial(sample, name) for name in timers}, rounds)


def _tune(approach: Approach, device: torch.device) -> dict[str, Any]:
    """Tune the two keys of a case from an empty cache, and record the choices.

    One forward without gradients (the inference key), then one forward + backward (the
    training key: its forward, input and weight gradients). What tuning cost is the
    tuner's own record, ``tuning_s`` per part, warm-up calls included; the wall times of
    the two first calls are kept beside it (they include the calls themselves and, for the
    first case of a process, one-time costs that any first call pays).
    """
    from .. import tuning

    tuning.clear_cache()
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), approach.within():
        out = approach.run(*approach.inputs)
    _sync(device)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    with approach.within():
        approach.run(*approach.inputs).backward(torch.ones_like(out))
    _sync(device)
    step_s = time.perf_counter() - start
    _zero_grads(approach)
    choices = {}
    for key, choice in tuning.cache().items():
        kind = "forward_backward" if any(key.needs) else "forward"
        choices[kind] = {"forward": choice.forward, "input_grad": choice.input_grad,
                         "weight_grad": choice.weight_grad, "bias_grad": choice.bias_grad,
                         "timings": choice.timings,
                         "tuning_s": choice.tuning_s}
    return {"first_forward_s": forward_s, "first_forward_backward_s": step_s,
            "choices": choices}


def run_case(case: Case, device: torch.device, rounds: int, min_time: float,
             kinds: tuple[str, ...] = ("forward", "forward_backward")) -> dict[str, Any]:
    """Check, measure and time every approach of ``case``; return its JSON record.

    ``kinds`` are the passes timed: ``"forward"`` (under ``no_grad``) and
    ``"forward_backward"`` (a training step); a forward-only case times its forward only.
    """
    outputs = {}
    tuned = {a.name: _tune(a, device) for a in case.approaches if a.tuned}
    gen = torch.Generator(device=device).manual_seed(0)
    for a in case.approaches:
        with torch.no_grad(), a.within():
            out = a.run(*a.inputs)
        # randn_like keeps the output's strides: a downstream elementwise op would too
        a.grad_out = torch.empty_like(out).normal_(generator=gen)
        outputs[a.name] = out.float()
    for name, out in outputs.items():
        ref_name = case.agree_with.get(name, case.reference)
        if ref_name == name:
            continue
        ref = outputs[ref_name]
        if out.shape != ref.shape:
            raise AssertionError(f"{case.suite} {case.shape}: {name} has shape "
                                 f"{tuple(out.shape)}, expected {tuple(ref.shape)}")
        scale = ref.abs().max().item() or 1.0
        err = (out - ref).abs().max().item() / scale
        if err > 1e-2:
            raise AssertionError(f"{case.suite} {case.shape}: {name} disagrees ({err:.2e})")
    del outputs

    record: dict[str, Any] = {"shape": case.shape, "reference": case.reference, "approaches": {}}
    for a in case.approaches:
        assert a.grad_out is not None
        result = a.grad_out  # of the output's shape and dtype
        with a.within():
            forward_flops = flops(a.run, *a.inputs)
        entry = {
            "param_bytes": sum(p.numel() * p.element_size() for p in a.params),
            "forward_flops": forward_flops,
            # the least memory traffic of a forward: read the inputs, write the output once
            "min_forward_bytes": sum(t.numel() * t.element_size() for t in a.inputs
                                     if isinstance(t, torch.Tensor))
            + result.numel() * result.element_size(),
        }
        if not case.forward_only:
            with a.within():
                entry["saved_bytes"] = saved_tensors(a.run, *a.inputs,
                                                     exclude=a.params).nbytes
        if a.name in tuned:
            entry["tuning"] = tuned[a.name]
        if device.type == "cuda" and not case.forward_only:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with a.within():
                _fwd_bwd(a)
            _zero_grads(a)
            torch.cuda.synchronize(device)
            entry["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        record["approaches"][a.name] = entry
    for kind in ("forward",) if case.forward_only else kinds:
        times = _time_interleaved(case.approaches, kind, rounds, min_time, device)
        for name, seconds in times.items():
            record["approaches"][name][f"{kind}_s"] = seconds
            ref_s = times[case.reference]
            record["approaches"][name][f"{kind}_ratio"] = seconds / ref_s
    record.update(case.notes)
    return record


# ----------------------------------------------------------------------------- suites


def masked_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Seed 2's masked inputs: the masked shared conv against the two naive paths."""
    import torch.nn.functional as F

    from ..masked import masked_shared_conv1d, naive_masked_shared_conv1d

    shapes = [dict(B=4, L=256, T=512, D=64, F=32, k=5)]
    if quick:
        shapes = [dict(B=2, L=128, T=128, D=64, F=32, k=5)]
    else:
        shapes += [
            dict(B=4, L=256, T=512, D=16, F=32, k=5),
            dict(B=4, L=256, T=512, D=128, F=32, k=5),
        ]
    cases = []
    for shape in shapes:
        B, L, T, D, F_, k = (shape[n] for n in ("B", "L", "T", "D", "F", "k"))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, D, L, generator=g).to(device, dtype).requires_grad_()
        mask = (torch.rand(B, T, L, generator=g) < 0.2).to(device, dtype)
        w = (torch.randn(F_, D, k, generator=g) / (D * k) ** 0.5).to(device, dtype)
        w.requires_grad_()
        b = torch.zeros(F_, device=device, dtype=dtype, requires_grad=True)
        pad = k // 2

        def masked(x, mask, w, b, pad=pad):
            return masked_shared_conv1d(x, mask, w, b, padding=pad)

        def naive_layer(x, mask, w, b, pad=pad):
            return naive_masked_shared_conv1d(x, mask, w, b, padding=pad)

        def naive_repeat(x, mask, w, b, T=T, pad=pad):
            z = (x[:, None] * mask[:, :, None]).flatten(1, 2)
            return F.conv1d(z, w.repeat(T, 1, 1), b.repeat(T), padding=pad, groups=T)

        approaches = [
            Approach(name, fn, (x, mask, w, b), (w, b))
            for name, fn in (
                ("masked_shared", masked),
                ("naive_layer", naive_layer),
                ("naive_repeat", naive_repeat),
            )
        ]
        cases.append(Case("masked", shape, approaches, reference="masked_shared"))
    return cases


#: The loop is not timed above this many groups: its backward gives each of the G slices
#: a zero-filled gradient the size of the whole input before adding them up, G times the
#: input's bytes of memory traffic (275 GB at G = 4096, D = 64 in the groups suite).
LOOP_MAX_GROUPS = 512


def _conv_inputs(
    B: int, G: int, D: int, L: int, F_: int, k: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ``(B, G * D, L)``, bank ``(F, D, k)`` and bias, all requiring gradients.

    Seeded, with ``nn.Conv1d``'s initialisation range for the bank and the bias.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, G * D, L, generator=g).to(device, dtype).requires_grad_()
    bound = 1 / (D * k) ** 0.5
    w = ((torch.rand(F_, D, k, generator=g) * 2 - 1) * bound).to(device, dtype)
    b = ((torch.rand(F_, generator=g) * 2 - 1) * bound).to(device, dtype)
    return x, w.requires_grad_(), b.requires_grad_()


#: The approaches that are the tuner's own strategies, besides the layer (the fold).
OWN = ("only_grouped", "only_unfold")

#: The other ways people compute it (:mod:`sharedconv.lab.baselines`), fold excluded.
OTHERS = ("loop", "lift", "grouped_expand", "grouped_repeat", "vmap")


def _only(strategy: str, groups: int, padding: int) -> Callable[..., torch.Tensor]:
    """The layer inside autotuning, with every part forced to one of the tuner's strategies.

    The same call as the ``tuned`` approach (argument checks, key, dispatch), so that the two
    differ only in the strategies they run.
    """
    from .. import tuning
    from ..functional import shared_conv

    choice = tuning.Choice(strategy, strategy, strategy,
                           "sum" if strategy == "unfold" else "fold")

    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with tuning._force(choice):
            return shared_conv(x, w, b, groups=groups, padding=padding)

    return run


def _shared_cases(
    suite: str, shapes: list[dict[str, int]], device: torch.device, dtype: torch.dtype
) -> list[Case]:
    """The layer, the tuned layer and the tuner's strategies against every baseline of
    :mod:`sharedconv.lab.baselines`, at each shape."""
    from .. import tuning
    from ..functional import shared_conv
    from . import baselines

    cases = []
    for shape in shapes:
        B, G, D, L, F_, k = (shape[n] for n in ("B", "G", "D", "L", "F", "k"))
        x, w, b = _conv_inputs(B, G, D, L, F_, k, device, dtype)
        options = dict(groups=G, padding=k // 2)

        def layer(x, w, b, options=options):
            return shared_conv(x, w, b, **options)


        approaches = [Approach("layer", layer, (x, w, b), (w, b)),
                      Approach("tuned", layer, (x, w, b), (w, b), tuned=True,
                               block=tuning.autotune)]
        o = tuning._Options(G, (1,), (k // 2,), (1,))
        for strategy in tuning._candidates(x.reshape(B * G, D, L), w, o)[1:]:
            approaches.append(Approach(f"only_{strategy}", _only(strategy, G, k // 2),
                                       (x, w, b), (w, b)))
        for name, fn in baselines.BASELINES.items():
            if name == "loop" and G > LOOP_MAX_GROUPS:
                continue  # see LOOP_MAX_GROUPS
            approaches.append(
                Approach(name, lambda x, w, b, fn=fn, o=options: fn(x, w, b, **o), (x, w, b),
                         (w, b))
            )
        cases.append(Case(suite, shape, approaches, reference="layer"))
    return cases


def streams_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Seed 1: N single-channel streams, one bank of F filters (D = 1, G = C)."""
    if quick:
        return _shared_cases("streams", [dict(B=8, G=16, D=1, L=512, F=16, k=5)], device, dtype)
    length = {4: 2048, 16: 1024, 64: 512, 256: 256}  # about the same work per shape
    shapes = [
        dict(B=8, G=C, D=1, L=length[C], F=F_, k=k)
        for C in (4, 16, 64, 256)
        for F_ in (8, 64)
        for k in (3, 7)
    ]
    return _shared_cases("streams", shapes, device, dtype)


def groups_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Seed 2: G groups of D channels sharing one bank of F filters."""
    if quick:
        return _shared_cases("groups", [dict(B=2, G=512, D=8, L=64, F=16, k=5)], device, dtype)
    shapes = [
        dict(B=4, G=64, D=8, L=512, F=16, k=5),
        dict(B=4, G=64, D=64, L=256, F=16, k=5),
        dict(B=4, G=512, D=8, L=256, F=16, k=5),
        dict(B=4, G=512, D=64, L=64, F=16, k=5),
        dict(B=2, G=4096, D=8, L=64, F=16, k=5),
        dict(B=2, G=4096, D=64, L=32, F=16, k=5),
    ]
    return _shared_cases("groups", shapes, device, dtype)


#: The seed of the held-out shapes (``--seed``): another seed draws shapes never seen.
HELDOUT_SEED = 0

#: The loop is among the held-out suite's other approaches up to this many groups.
HELDOUT_LOOP_GROUPS = 16


def heldout_shapes(seed: int, count: int) -> list[dict[str, Any]]:
    """``count`` random shapes outside the benchmark's grids, drawn from ``seed``.

    1-d and 2-d; batch 1 to 32, groups 2 to 1000, channels per group 1 to 16, filters 4
    to 64 (log-uniform); kernel 1 to 9 (1-d) or 1 to 5 (2-d); stride and dilation 1 or 2;
    padding ``'same'`` (stride 1), half the kernel's span, or none; lengths 16 to 1024
    (1-d), sides 8 to 48 (2-d). Shapes whose input or output would exceed 2**22 elements
    are drawn again, so each one times in about a second.
    """
    import random

    rng = random.Random(seed)

    def log_int(low: int, high: int) -> int:
        return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))

    shapes: list[dict[str, Any]] = []
    while len(shapes) < count:
        dim = rng.choice((1, 2))
        B, G, D, F_ = log_int(1, 32), log_int(2, 1000), log_int(1, 16), log_int(4, 64)
        k = rng.choice((1, 3, 5, 7, 9) if dim == 1 else (1, 3, 5))
        stride, dilation = rng.choice((1, 2)), rng.choice((1, 2))
        span = dilation * (k - 1)
        padding: int | str = rng.choice(("same", span // 2, 0) if stride == 1
                                        else (span // 2, 0))
        size = [log_int(16, 1024)] if dim == 1 else [log_int(8, 48), log_int(8, 48)]
        pad = span // 2 if padding == "same" else int(padding)
        out = [(s + 2 * pad - span - 1) // stride + 1 for s in size]
        if min(out) < 1:
            continue
        if B * G * D * math.prod(size) > 2**22 or B * G * F_ * math.prod(out) > 2**22:
            continue
        shapes.append(dict(dim=dim, B=B, G=G, D=D, F=F_, k=k, stride=stride,
                           dilation=dilation, padding=padding, size=size))
    return shapes


def heldout_cases(device: torch.device, dtype: torch.dtype, quick: bool,
                  seed: int | None = None, count: int | None = None) -> list[Case]:
    """The tuned layer against the bare fold, the grouped convolution on expanded banks
    and (for a few groups) the loop, at random shapes (:func:`heldout_shapes`)."""
    from .. import tuning
    from ..functional import shared_conv
    from . import baselines

    seed = HELDOUT_SEED if seed is None else seed
    count = count or (3 if quick else 24)
    cases = []
    for shape in heldout_shapes(seed, count):
        dim, B, G, D, F_, k = (shape[n] for n in ("dim", "B", "G", "D", "F", "k"))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(B, G * D, *shape["size"], generator=g).to(device, dtype)
        bound = 1 / (D * k**dim) ** 0.5
        w = ((torch.rand(F_, D, *(k,) * dim, generator=g) * 2 - 1) * bound).to(device, dtype)
        b = ((torch.rand(F_, generator=g) * 2 - 1) * bound).to(device, dtype)
        x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
        options = dict(groups=G, stride=shape["stride"], padding=shape["padding"],
                       dilation=shape["dilation"])

        def layer(x, w, b, options=options):
            return shared_conv(x, w, b, **options)


        # "layer_again" is the layer a second time: how far two timings of the same code
        # fall apart in this run, the resolution of every ratio (not an approach)
        approaches = [Approach("layer", layer, (x, w, b), (w, b)),
                      Approach("tuned", layer, (x, w, b), (w, b), tuned=True,
                               block=tuning.autotune),
                      Approach("layer_again", layer, (x, w, b), (w, b))]
        names = ["grouped_expand"] + (["loop"] if G <= HELDOUT_LOOP_GROUPS else [])
        for name in names:
            fn = baselines.BASELINES[name]
            approaches.append(Approach(
                name, lambda x, w, b, fn=fn, o=options: fn(x, w, b, **o), (x, w, b), (w, b)))
        cases.append(Case("heldout", shape, approaches, reference="layer",
                          notes={"seed": seed}))
    return cases


SUITES: dict[str, Callable[[torch.device, torch.dtype, bool], list[Case]]] = {
    "streams": streams_cases,
    "groups": groups_cases,
    "masked": masked_cases,
    "heldout": heldout_cases,
}


def compare(
    shape: dict[str, int],
    approaches: tuple[str, ...],
    device: str | torch.device = "cpu",
    *,
    rounds: int = 5,
    min_time: float = 0.05,
    kinds: tuple[str, ...] = ("forward_backward",),
) -> dict[str, Any]:
    """Time some approaches of the streams and groups suites at one shape, interleaved.

    ``shape`` has the keys ``B, G, D, L, F, k``; ``approaches`` names any of ``layer``,
    ``tuned``, ``only_grouped``, ``only_unfold`` (where the tuner has that strategy for the
    shape) and the baselines. Returns the record ``run_case`` returns: per approach
    the median seconds of each pass in ``kinds`` and its ratio to the layer (which is
    always timed), the exact FLOPs and saved bytes, and the tuner's choices for ``tuned``.
    """
    device = torch.device(device)
    (case,) = _shared_cases("compare", [dict(shape)], device, torch.float32)
    known = {a.name for a in case.approaches}
    unknown = [name for name in approaches if name not in known]
    if unknown:
        raise ValueError(f"approaches must be among {sorted(known)} for this shape, "
                         f"got {unknown}")
    case.approaches = [a for a in case.approaches
                       if a.name == "layer" or a.name in approaches]
    return run_case(case, device, rounds, min_time, kinds)


def page_faults(forwards: int = 20) -> dict[str, tuple[int, float]]:
    """Minor page faults and seconds per forward of the fold, under glibc's two settings.

    Runs ``forwards`` forward passes of the fold on ``B = 8`` samples of 64 streams of
    length 512 (16 filters of width 5; each output is 16 MiB) in two fresh processes,
    with glibc's default tunables and with ``bench.TUNED_ENV``, and returns
    ``{"default": (faults, seconds), "tuned": (faults, seconds)}``: the faults counted
    by ``getrusage`` over the timed forwards, after one warm-up forward. Empty where the C
    library is not glibc, whose tunables these are.
    """
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        return {}
    probe = (
        "import resource, time, torch\n"
        "from sharedconv.lab import baselines\n"
        "x, w = torch.randn(8, 64, 512), torch.randn(16, 1, 5)\n"
        "baselines.fold(x, w, None, groups=64, padding=2)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "start = time.perf_counter()\n"
        f"for _ in range({forwards}):\n"
        "    baselines.fold(x, w, None, groups=64, padding=2)\n"
        f"seconds = (time.perf_counter() - start) / {forwards}\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, seconds)\n"
    )
    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = {}
    for name, env in (("default", plain), ("tuned", {**plain, **TUNED_ENV})):
        out = subprocess.run([sys.executable, "-c", probe], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        result[name] = (int(out[0]), float(out[1]))
    return result


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sharedconv.lab.bench",
        description=(
            "Time, memory and FLOPs of the shared convolution against the other ways of "
            "computing it. Approaches are timed interleaved and reported as median ratios "
            "to the suite's reference, measured in the same run."
        ),
    )
    parser.add_argument("--suite", action="append", choices=sorted(SUITES),
                        help="suite(s) to run (repeatable; default: all but heldout)")
    parser.add_argument("--quick", action="store_true",
                        help="one small shape per suite, few rounds (well under a minute)")
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA if present), 'cpu' or 'cuda'")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 is meant for GPUs")
    parser.add_argument("--allocator", default="tuned", choices=["tuned", "default"],
                        help="'tuned' re-runs with glibc's malloc tunables raised (CPU); "
                        "'default' leaves the environment as it is")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads; default: as the process has)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 15, quick 3)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds per timed sample (default 0.1, quick 0.05)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seed of the heldout suite's random shapes (default "
                        f"{HELDOUT_SEED}; any other draws shapes never measured)")
    parser.add_argument("--count", type=int, default=None,
                        help="how many heldout shapes (default 24, quick 3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: <device>.json, with -<threads>t, "
                        "-default-malloc and -quick where they apply, in "
                        "src/sharedconv/lab/results/ when run from the repository, where the "
                        "book reads stored runs, else in the current folder)")
    return parser.parse_args(argv)


def _maybe_reexec(args: argparse.Namespace, argv: list[str]) -> None:
    """Re-run this process with glibc's tunables set, unless a choice was already made."""
    if args.allocator != "tuned" or sys.platform != "linux":
        return
    if "LD_PRELOAD" in os.environ or any(k in os.environ for k in TUNED_ENV):
        return
    env = {**os.environ, **TUNED_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "sharedconv.lab.bench", *argv], env)


def _table(records: list[dict[str, Any]]) -> str:
    lines = []
    for rec in records:
        shape = " ".join(f"{k}={v}" for k, v in rec["shape"].items())
        lines.append(f"\n[{rec['suite']}] {shape}   (ratios to {rec['reference']})")
        lines.append(f"  {'approach':20s} {'fwd ms':>9s} {'ratio':>7s} {'fwd+bwd ms':>11s} "
                     f"{'ratio':>7s} {'saved MiB':>10s} {'GFLOP':>8s}")
        for name, a in rec["approaches"].items():
            fb = a.get("forward_backward_s")
            both = (f"{fb * 1e3:11.2f} {a['forward_backward_ratio']:7.2f}" if fb is not None
                    else f"{'-':>11s} {'-':>7s}")
            saved = a.get("saved_bytes")
            saved_s = f"{saved / 2**20:10.2f}" if saved is not None else f"{'-':>10s}"
            lines.append(
                f"  {name:20s} {a['forward_s'] * 1e3:9.2f} {a['forward_ratio']:7.2f} "
                f"{both} {saved_s} {a['forward_flops'] / 1e9:8.3f}"
            )
    return "\n".join(lines)


def stored_runs(device_type: str | None = None) -> list[dict[str, Any]]:
    """The benchmark runs that ship with the package (``sharedconv/lab/results/*.json``).

    Each run is the JSON a full run of this program wrote: ``meta`` (the machine, the
    allocator, the settings) and ``results``. ``device_type`` (``"cpu"``, ``"cuda"``)
    keeps the runs of one kind of device. Sorted by file name.
    """
    from importlib.resources import files

    folder = files("sharedconv.lab") / "results"
    runs = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            run = json.loads(entry.read_text())
            run["file"] = entry.name
            if device_type is None or run["meta"]["device_type"] == device_type:
                runs.append(run)
    return runs


def goal_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The benchmark's three bounds (:data:`GOAL`), shape by shape, from one run's streams
    and groups suites.

    For each pass (``forward``, ``forward_backward``): the default layer against the bare
    fold (``layer / fold``), the tuned layer against the fastest of its own strategies
    (the layer, which is the fold, and ``only_*``) and against the fastest other approach
    (``OTHERS``: loop, lift, grouped with expanded or repeated banks, vmap), medians of
    the same interleaved rounds; saved bytes of the layer and the tuned layer against the
    fold's; the tuning cost of the training key in steps of the slowest of the tuner's
    strategies.
    """
    rows = []
    for rec in records:
        ap = rec["approaches"]
        if rec.get("suite") not in ("streams", "groups") or "tuned" not in ap:
            continue
        row: dict[str, Any] = {"suite": rec["suite"], "shape": rec["shape"]}
        own = ["layer", *(n for n in OWN if n in ap)]
        for kind in ("forward", "forward_backward"):
            t = {n: a[f"{kind}_s"] for n, a in ap.items()}
            others = [n for n in OTHERS if n in t]
            best_other = min(others, key=t.__getitem__)
            row[kind] = {
                "layer_vs_fold": t["layer"] / t["fold"],
                "tuned_vs_own": t["tuned"] / min(t[n] for n in own),
                "tuned_vs_other": t["tuned"] / t[best_other],
                "best_other": best_other,
                "best_own": min(own, key=t.__getitem__),
            }
        slowest = max(ap[n]["forward_backward_s"] for n in own)
        cost = sum(ap["tuned"]["tuning"]["choices"]["forward_backward"]["tuning_s"].values())
        row["tuning_steps"] = cost / slowest
        row["saved_equal_fold"] = (ap["layer"]["saved_bytes"] == ap["tuned"]["saved_bytes"]
                                   == ap["fold"]["saved_bytes"])
        rows.append(row)
    return rows


#: The bound for held-out shapes, the tuned layer's time over the fastest other approach's.
HELDOUT_GOAL = 1.10


def heldout_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each held-out shape and pass: the tuned layer over the fastest other approach
    (the bare fold, the grouped convolution on expanded banks, the loop where timed), the
    other that was fastest, the tuned strategies, and what tuning the keys cost."""
    rows = []
    for rec in records:
        ap = rec["approaches"]
        if rec.get("suite") != "heldout":
            continue
        row: dict[str, Any] = {"shape": rec["shape"]}
        for kind in ("forward", "forward_backward"):
            t = {n: a[f"{kind}_s"] for n, a in ap.items()}
            others = [n for n in t if n not in ("tuned", "layer_again")]
            best = min(others, key=t.__getitem__)
            row[kind] = {"tuned_vs_other": t["tuned"] / t[best], "best_other": best,
                         "tuned_vs_fold": t["tuned"] / t["layer"],
                         "same_code": t["layer_again"] / t["layer"]}
        choices = ap["tuned"]["tuning"]["choices"]
        parts = ("forward", "input_grad", "weight_grad", "bias_grad")
        row["choices"] = {kind: "/".join(str(c[p]) for p in parts if c.get(p))
                          for kind, c in choices.items()}
        row["tuning_s"] = {kind: sum(c["tuning_s"].values()) for kind, c in choices.items()}
        rows.append(row)
    return rows


def heldout_table(rows: list[dict[str, Any]]) -> str:
    """:func:`heldout_rows` as text, ratios above :data:`HELDOUT_GOAL` starred, and a
    summary line per pass."""
    def shape_text(s: dict[str, Any]) -> str:
        size = "x".join(map(str, s["size"]))
        return (f"{s['dim']}d B{s['B']} G{s['G']} D{s['D']} F{s['F']} k{s['k']} "
                f"s{s['stride']} r{s['dilation']} p{s['padding']} {size}")

    lines = [f"{'shape':48s} {'fwd':>6s} {'fwd+bwd':>8s} {'same code':>10s} "
             f"{'best other':>15s} {'tuned (fwd | step)':>26s} {'tuning ms':>10s}"]
    for row in rows:
        cells = [f"{row[k]['tuned_vs_other']:.2f}"
                 f"{'*' if row[k]['tuned_vs_other'] > HELDOUT_GOAL else ' '}"
                 for k in ("forward", "forward_backward")]
        chosen = " | ".join(row["choices"].get(k, "-") for k in ("forward",
                                                                  "forward_backward"))
        spent = sum(row["tuning_s"].values()) * 1e3
        same = "/".join(f"{row[k]['same_code']:.2f}" for k in ("forward", "forward_backward"))
        lines.append(f"{shape_text(row['shape']):48s} {cells[0]:>6s} {cells[1]:>8s} "
                     f"{same:>10s} {row['forward_backward']['best_other']:>15s} "
                     f"{chosen:>26s} {spent:10.1f}")
    for kind in ("forward", "forward_backward"):
        ratios = sorted(r[kind]["tuned_vs_other"] for r in rows)
        if ratios:
            over = sum(v > HELDOUT_GOAL for v in ratios)
            lines.append(f"{kind}: tuned / fastest other: median {statistics.median(ratios):.3f}"
                         f", worst {ratios[-1]:.3f}, {over} of {len(ratios)} above "
                         f"{HELDOUT_GOAL}")
    return "\n".join(lines)


#: The bounds the benchmark reports against (a maintainers' target, not a promise about
#: any machine), each a ratio of medians from one run, for the default layer over
#: the bare fold, the tuned layer over the fastest of its own strategies, and the tuned
#: layer over the fastest other approach.
GOAL = {"layer_vs_fold": 1.03, "tuned_vs_own": 1.05, "tuned_vs_other": 1.10}


def goal_table(rows: list[dict[str, Any]]) -> str:
    """:func:`goal_rows` as text: one line per shape, misses of :data:`GOAL` starred."""
    head = (f"{'shape':34s} {'pass':8s} {'layer/fold':>10s} {'tuned/own':>9s} "
            f"{'tuned/other':>11s} {'tune steps':>10s}")
    lines = [head]
    for row in rows:
        shape = " ".join(f"{k}={v}" for k, v in row["shape"].items() if k != "B")
        for kind, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            r = row[kind]
            cells = [f"{r[name]:.2f}{'*' if r[name] > GOAL[name] else ' '}"
                     for name in ("layer_vs_fold", "tuned_vs_own", "tuned_vs_other")]
            steps = f"{row['tuning_steps']:.1f}" if kind == "forward_backward" else ""
            lines.append(f"{shape:34s} {label:8s} {cells[0]:>10s} {cells[1]:>9s} "
                         f"{cells[2]:>11s} {steps:>10s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if __name__ == "__main__":
        _maybe_reexec(args, argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Many short rounds rather than a few long ones: on a shared machine the speed drifts
    # over seconds, and more interleaved rounds give the median more of the drift to
    # average out (the chapter "Performance" measures how far two runs of the same
    # computation then stay apart).
    rounds = args.rounds or (3 if args.quick else 15)
    min_time = args.min_time or (0.05 if args.quick else 0.1)
    suites = args.suite or [s for s in sorted(SUITES) if s != "heldout"]

    meta = {
        **run_meta(device),
        "dtype": args.dtype,
        "quick": args.quick,
        "rounds": rounds,
        "min_time_s": min_time,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"device: {meta['device']} | allocator: {meta['allocator'].split(' (')[0]} | "
          f"dtype: {args.dtype}", flush=True)
    records = []
    for suite in suites:
        if suite == "heldout":
            cases = heldout_cases(device, dtype, args.quick, args.seed, args.count)
        else:
            cases = SUITES[suite](device, dtype, args.quick)
        for i, case in enumerate(cases, 1):
            print(f"[{suite} {i}/{len(cases)}] {case.shape} ...", end=" ", flush=True)
            start = time.perf_counter()
            rec = run_case(case, device, rounds, min_time)
            rec["suite"] = suite
            rec["run"] = meta  # kept with the record when files are merged
            records.append(rec)
            print(f"{time.perf_counter() - start:.1f} s", flush=True)
    print(_table(records))
    goal = goal_rows(records)
    if goal:
        print("\n" + goal_table(goal))
    held = heldout_rows(records)
    if held:
        print("\n" + heldout_table(held))

    result = {"meta": meta, "results": records}
    out = args.out
    if out is None:
        name = _slug(meta["device"].split(" (")[0])
        if device.type == "cpu":
            name += f"-{meta['threads']}t"
        if device.type == "cpu" and "default" in meta["allocator"]:
            name += "-default-malloc"
        if args.quick:
            name += "-quick"
        stored = Path("src") / "sharedconv" / "lab" / "results"
        out = (stored if stored.is_dir() else Path()) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep the other suites' results of an earlier run
        try:
            earlier = json.loads(out.read_text())
            kept = [r for r in earlier.get("results", []) if r.get("suite") not in suites]
            result["results"] = kept + records
        except (ValueError, KeyError):
            pass
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
