"""Benchmarks: ``python -m sharedconv.bench --help``.

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
import json
import os
import platform
import random
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

__all__ = ["Approach", "Case", "main", "run_case", "describe_allocator", "SUITES"]

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


def device_name(device: torch.device) -> str:
    """A human name of the device: the GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


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
    for name, timer in timers.items():
        timer.timeit(1)  # warm-up (allocations, lazy init, oneDNN primitive caches)
        once = timer.timeit(2).median
        number[name] = max(1, int(min_time / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in timers}
    order = list(timers)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            _sync(device)
            samples[name].append(timers[name].timeit(number[name]).median)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_case(case: Case, device: torch.device, rounds: int, min_time: float) -> dict[str, Any]:
    """Check, measure and time every approach of ``case``; return its JSON record."""
    outputs = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for a in case.approaches:
        with torch.no_grad():
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
        entry = {
            "param_bytes": sum(p.numel() * p.element_size() for p in a.params),
            "forward_flops": flops(a.run, *a.inputs),
            # the least memory traffic of a forward: read the inputs, write the output once
            "min_forward_bytes": sum(t.numel() * t.element_size() for t in a.inputs
                                     if isinstance(t, torch.Tensor))
            + result.numel() * result.element_size(),
        }
        if not case.forward_only:
            entry["saved_bytes"] = saved_tensors(a.run, *a.inputs, exclude=a.params).nbytes
        if device.type == "cuda" and not case.forward_only:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _fwd_bwd(a)
            _zero_grads(a)
            torch.cuda.synchronize(device)
            entry["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        record["approaches"][a.name] = entry
    for kind in ("forward",) if case.forward_only else ("forward", "forward_backward"):
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

    from .masked import masked_shared_conv1d, naive_masked_shared_conv1d

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
#: input's bytes of memory traffic (275 GB at G = 4096, D = 64), about a minute per step.
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


def _shared_cases(
    suite: str, shapes: list[dict[str, int]], device: torch.device, dtype: torch.dtype
) -> list[Case]:
    """The layer against every baseline of :mod:`sharedconv.baselines`, at each shape."""
    from . import baselines
    from .functional import shared_conv

    cases = []
    for shape in shapes:
        B, G, D, L, F_, k = (shape[n] for n in ("B", "G", "D", "L", "F", "k"))
        x, w, b = _conv_inputs(B, G, D, L, F_, k, device, dtype)
        options = dict(groups=G, padding=k // 2)

        def layer(x, w, b, options=options):
            return shared_conv(x, w, b, **options)

        approaches = [Approach("layer", layer, (x, w, b), (w, b))]
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


def input_grad_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """The rule behind ``GROUPED_INPUT_GRAD``: a 1-d backward pass, folded or grouped.

    From the same output gradient ``(B, G * F, L)``, for ``D`` input channels per group:
    the input gradient, and the weight and bias gradients, each computed by
    ``aten::convolution_backward`` on the folded view (one bank, a batch of ``B * G``) and
    on the grouped view (``G`` groups, with ``G`` copies of the bank made in the timed
    call and, for the weight, the ``G`` bank gradients summed). Forward timing only: the
    approaches *are* backward passes. Ratios are to the folded input gradient.
    """
    from .functional import _repeat_bank  # the layer's own copies

    channels = (1, 4, 8, 16) if quick else tuple(range(1, 17))
    configs = [(2, 16, 128, 16, 5)] if quick else [(4, 64, 512, 16, 5), (2, 1024, 64, 32, 3)]
    backward = torch.ops.aten.convolution_backward
    cases = []
    for B, G, L, F_, k in configs:
        for D in channels:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, G * D, L, generator=g).to(device, dtype)
            w = torch.randn(F_, D, k, generator=g).to(device, dtype)
            grad = torch.randn(B, G * F_, L, generator=g).to(device, dtype)
            conv = ([1], [k // 2], [1], False, [0])

            def folded_input(grad, x, w, G=G, conv=conv):
                n = x.shape[0] * G
                return backward(grad.view(n, -1, grad.shape[2]), x.view(n, -1, x.shape[2]),
                                w, None, *conv, 1, [True, False, False])[0].view(x.shape)

            def grouped_input(grad, x, w, G=G, conv=conv):
                copies = _repeat_bank(w, G)
                return backward(grad, x, copies, None, *conv, G, [True, False, False])[0]

            def folded_weight(grad, x, w, G=G, conv=conv):
                n = x.shape[0] * G
                return backward(grad.view(n, -1, grad.shape[2]), x.view(n, -1, x.shape[2]),
                                w, [w.shape[0]], *conv, 1, [False, True, True])[1]

            def grouped_weight(grad, x, w, G=G, conv=conv):
                copies = _repeat_bank(w, G)
                out = backward(grad, x, copies, [copies.shape[0]], *conv, G,
                               [False, True, True])
                return out[1].view(G, *w.shape).sum(0)

            approaches = [Approach(name, fn, (grad, x, w)) for name, fn in (
                ("folded_input_grad", folded_input), ("grouped_input_grad", grouped_input),
                ("folded_weight_grad", folded_weight), ("grouped_weight_grad", grouped_weight),
            )]
            shape = dict(B=B, G=G, D=D, L=L, F=F_, k=k)
            cases.append(Case("input_grad", shape, approaches,
                              reference="folded_input_grad", forward_only=True,
                              # PyTorch's folded weight gradient: a second reference
                              agree_with={"grouped_weight_grad": "folded_weight_grad",
                                          "folded_weight_grad": "folded_weight_grad"}))
    return cases


def small_bank_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """The rule behind ``UNFOLD_WEIGHTS``: small banks, unfolded or not (1-d, CPU).

    For banks of ``F`` filters over ``D`` channels and ``k`` taps, shared by ``G`` groups:
    the bare fold and the grouped convolution on expanded banks (the baselines), the
    layer's unfolded route (matrix products over the unfolded windows, every part), and
    the route the layer takes without it (``routed``: the grouped and folded parts chosen
    by the other constants). Ratios are to the bare fold. The CPU only: the routes are
    the CPU's (on a GPU the layer is the bare fold).
    """
    if device.type != "cpu":
        return []
    from . import baselines
    from .functional import _Conv1dSharedCPU, _cpu_route

    if quick:
        configs, banks = [(4, 16, 256)], [(1, 8, 3), (2, 16, 7)]
    else:
        configs = [(8, 64, 512), (8, 256, 128)]
        banks = [(D, F_, k) for D in (1, 2, 4) for F_ in (8, 16, 32, 64) for k in (3, 7)]
    cases = []
    for B, G, L in configs:
        for D, F_, k in banks:
            x, w, b = _conv_inputs(B, G, D, L, F_, k, device, dtype)
            pad = k // 2
            routed = _cpu_route(x, w, G, pad, unfold=False) or ("fold",) * 3

            def through(route, G=G, pad=pad):
                return lambda xs, ws, bs: _Conv1dSharedCPU.apply(xs, ws, bs, (G, 1, pad, 1, route))

            approaches = [
                Approach("fold", lambda x, w, b, G=G, pad=pad: baselines.fold(
                    x, w, b, groups=G, padding=pad), (x, w, b), (w, b)),
                Approach("grouped_expand", lambda x, w, b, G=G, pad=pad:
                         baselines.grouped_expand(x, w, b, groups=G, padding=pad),
                         (x, w, b), (w, b)),
                Approach("unfolded", through(("unfold",) * 3), (x, w, b), (w, b)),
                Approach("routed", through(routed), (x, w, b), (w, b)),
            ]
            shape = dict(B=B, G=G, D=D, L=L, F=F_, k=k)
            cases.append(Case("small_banks", shape, approaches, reference="fold",
                              notes={"routed": list(routed)}))
    return cases


SUITES: dict[str, Callable[[torch.device, torch.dtype, bool], list[Case]]] = {
    "input_grad": input_grad_cases,
    "small_banks": small_bank_cases,
    "streams": streams_cases,
    "groups": groups_cases,
    "masked": masked_cases,
}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sharedconv.bench",
        description=(
            "Time, memory and FLOPs of the shared convolution against the other ways of "
            "computing it. Approaches are timed interleaved and reported as median ratios "
            "to the suite's reference, measured in the same run."
        ),
    )
    parser.add_argument("--suite", action="append", choices=sorted(SUITES),
                        help="suite(s) to run (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="one small shape per suite, few rounds (well under a minute)")
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA if present), 'cpu' or 'cuda'")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 is meant for GPUs")
    parser.add_argument("--allocator", default="tuned", choices=["tuned", "default"],
                        help="'tuned' re-runs with glibc's malloc tunables raised (CPU); "
                        "'default' leaves the environment as it is")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 7, quick 3)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds per timed sample (default 0.2, quick 0.05)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/<device>.json, "
                        "with -default-malloc and -quick suffixes when they apply)")
    return parser.parse_args(argv)


def _maybe_reexec(args: argparse.Namespace, argv: list[str]) -> None:
    """Re-run this process with glibc's tunables set, unless a choice was already made."""
    if args.allocator != "tuned" or sys.platform != "linux":
        return
    if "LD_PRELOAD" in os.environ or any(k in os.environ for k in TUNED_ENV):
        return
    env = {**os.environ, **TUNED_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "sharedconv.bench", *argv], env)


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
    rounds = args.rounds or (3 if args.quick else 7)
    min_time = args.min_time or (0.05 if args.quick else 0.2)
    suites = args.suite or sorted(SUITES)

    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": args.dtype,
        "allocator": describe_allocator() if device.type == "cpu" else "CUDA caching allocator",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "rounds": rounds,
        "min_time_s": min_time,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"device: {meta['device']} | allocator: {meta['allocator']} | dtype: {args.dtype}",
          flush=True)
    records = []
    for suite in suites:
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

    result = {"meta": meta, "results": records}
    out = args.out
    if out is None:
        name = _slug(meta["device"].split(" (")[0])
        if device.type == "cpu" and "default" in meta["allocator"]:
            name += "-default-malloc"
        if args.quick:
            name += "-quick"
        out = Path("benchmarks") / "results" / f"{name}.json"
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
