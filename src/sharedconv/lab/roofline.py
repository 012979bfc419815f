"""Rooflines: what a device can move and compute, and where each approach lands under it.

A training step that computes :math:`W` FLOPs and moves :math:`Q` bytes between memory and
the processor takes at least :math:`\\max(W / P, Q / \\beta)` seconds on a device whose
peak arithmetic rate is :math:`P` FLOP/s and whose memory bandwidth is :math:`\\beta`
bytes/s. Its *arithmetic intensity* :math:`I = W / Q` decides which bound applies: below
the ridge :math:`P / \\beta` the step is memory-bound and can reach at most
:math:`\\beta I` FLOP/s, above it compute-bound (Williams, Waterman and Patterson, 2009).

- :func:`measure_roof` measures :math:`\\beta` (a large tensor copy) and :math:`P` (square
  matrix products) on the device at hand, in a second or so.
- :func:`exact_costs` counts :math:`W` and :math:`Q` of each approach exactly
  (:func:`sharedconv.lab.memory.step_cost`, on ``meta`` tensors: nothing is computed).
- :func:`run` does both and times the approaches' training steps
  (:func:`sharedconv.lab.bench.compare`), in a fresh process with glibc's allocator tuned as
  the benchmark does (:func:`sharedconv.lab.bench.page_faults` shows why).
- :func:`time_parts` times each part of the step (forward, input, weight and bias
  gradients) by each strategy the tuner has, with its exact costs (:func:`part_costs`);
  :func:`primitives` lists the oneDNN primitives of the layer's step on a CPU, from
  oneDNN's own log, so that time spent converting layouts shows.
- :func:`table`, :func:`plot`, :func:`parts_table`, :func:`parts_plot` and
  :func:`primitive_table` show a run; :func:`stored_runs` are the runs that ship with the
  package; ``python -m sharedconv.lab.roofline`` writes one.

The counted bytes are a model: every operator reads each argument and writes each result
once, from and to main memory. Caches make a real step move less, so a point can sit
above the bandwidth line it is drawn under.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..tuning import PARTS
from . import bench
from .memory import StepCost, step_cost

__all__ = ["SHAPES", "APPROACHES", "TIMED", "PARTS", "measure_roof", "exact_costs",
           "cost_table", "run", "placement", "table", "plot", "machine_line", "stored_runs",
           "main", "part_costs", "time_parts", "primitives", "primitive_table",
           "roof_seconds", "part_roof", "parts_table", "best_parts", "parts_plot"]

#: The shapes a run times, one of each question, small enough for a notebook on a laptop.
SHAPES: dict[str, dict[str, int]] = {
    "streams": dict(B=8, G=64, D=1, L=512, F=16, k=5),
    "groups": dict(B=2, G=256, D=8, L=64, F=16, k=5),
}

#: The approaches a run places on the roofline, the layer and four ways people write it.
APPROACHES = ("layer", "loop", "lift", "grouped_repeat", "vmap")

#: The tuned layer is timed beside them (its bytes depend on what it chose).
TIMED = (*APPROACHES, "tuned")


def measure_roof(device: str | torch.device = "cpu", *, copy_mib: int = 256,
                 sizes: tuple[int, ...] | None = None, samples: int = 5) -> dict[str, Any]:
    """Memory bandwidth and peak FLOP rate of ``device``, each the best of ``samples``.

    Bandwidth: ``dst.copy_(src)`` of ``copy_mib`` MiB of float32, which reads and writes
    that many bytes each. Peak: float32 products of square matrices of each size in
    ``sizes`` (default 512, 1024 and 2048 on a CPU, 2048, 4096 and 8192 on a GPU; the best
    rate counts). On a GPU the products run with the TF32 setting cuDNN's convolutions
    use (``torch.backends.cudnn.allow_tf32``), so the roof is the one the convolutions
    run under. Returns ``bandwidth`` (bytes/s), ``peak`` (FLOP/s) and the settings.
    """
    from torch.utils.benchmark import Timer

    device = torch.device(device)
    cuda = device.type == "cuda"
    sizes = sizes or ((2048, 4096, 8192) if cuda else (512, 1024, 2048))
    threads = torch.get_num_threads()

    def best(stmt: str, values: dict[str, Any]) -> float:
        timer = Timer(stmt, globals=values, num_threads=threads)
        timer.timeit(1)  # warm-up: first touch of the pages, library initialisation
        number = max(1, int(0.02 / max(timer.timeit(1).median, 1e-6)))
        return min(timer.timeit(number).median for _ in range(samples))

    src = torch.randn(copy_mib * 2**18, device=device)
    seconds = best("dst.copy_(src); sync()", dict(src=src, dst=torch.empty_like(src),
                                                    sync=lambda: bench._sync(device)))
    bandwidth = 2 * src.nbytes / seconds
    del src
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    rates = []
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        for n in sizes:
            a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
            seconds = best("a @ b; sync()", dict(a=a, b=b, sync=lambda: bench._sync(device)))
            rates.append(2 * n**3 / seconds)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    return {"bandwidth": bandwidth, "peak": max(rates), "copy_mib": copy_mib,
            "sizes": list(sizes), "peak_at": sizes[rates.index(max(rates))],
            "tf32": bool(cuda and torch.backends.cudnn.allow_tf32)}


def _inputs(shape: dict[str, int], device: str | torch.device) -> tuple[torch.Tensor, ...]:
    B, G, D, L, F_, k = (shape[n] for n in ("B", "G", "D", "L", "F", "k"))
    x = torch.randn(B, G * D, L, device=device, requires_grad=True)
    w = torch.randn(F_, D, k, device=device, requires_grad=True)
    b = torch.randn(F_, device=device, requires_grad=True)
    return x, w, b


def exact_costs(shape: dict[str, int], approaches: tuple[str, ...] = APPROACHES,
                *, unshared: bool = False) -> dict[str, StepCost]:
    """Exact costs of one training step of each approach at ``shape`` (keys B, G, D, L, F, k).

    Counted on ``meta`` tensors, so any shape costs only the bookkeeping (the loop's
    ``G`` calls the most). The input requires a gradient, as a layer inside a network
    does. With ``unshared=True`` the result also has ``"unshared"``: ``nn.Conv1d`` with
    ``groups=G`` and its own ``G`` banks as parameters, what sharing saves.
    """
    from ..functional import shared_conv
    from . import baselines

    functions = {"layer": shared_conv, **baselines.BASELINES}
    unknown = [a for a in approaches if a not in functions]
    if unknown:
        raise ValueError(f"approaches must be among {sorted(functions)}, got {unknown}")
    G, k = shape["G"], shape["k"]
    x, w, b = _inputs(shape, "meta")
    costs = {}
    for name in approaches:
        fn = functions[name]
        costs[name] = step_cost(
            lambda x, w, b, fn=fn: fn(x, w, b, groups=G, padding=k // 2), x, w, b,
            params=(w, b))
    if unshared:
        conv = torch.nn.Conv1d(G * shape["D"], G * shape["F"], k, groups=G,
                               padding=k // 2, device="meta")
        costs["unshared"] = step_cost(conv, x, params=tuple(conv.parameters()))
    return costs


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def cost_table(costs: dict[str, StepCost]) -> str:
    """The exact costs of :func:`exact_costs` as a table, one approach per line."""
    lines = [f"{'approach':15s} {'GFLOP':>8s} {'moved':>11s} {'saved':>11s} {'peak':>11s}"
             f" {'parameters':>11s}"]
    for name, c in costs.items():
        lines.append(f"{name:15s} {c.flops / 1e9:8.2f} {_bytes(c.moved_bytes):>11s} "
                     f"{_bytes(c.saved_bytes):>11s} {_bytes(c.peak_bytes):>11s} "
                     f"{_bytes(c.param_bytes):>11s}")
    return "\n".join(lines)


def _run_here(device: str, shapes: dict[str, dict[str, int]], rounds: int,
              min_time: float) -> dict[str, Any]:
    dev = torch.device(device)
    meta = {**bench.run_meta(dev), "rounds": rounds, "min_time_s": min_time}
    roof = measure_roof(dev)
    points = []
    parts: dict[str, list[dict[str, Any]]] = {}
    steps: dict[str, list[dict[str, Any]]] = {}
    for name, shape in shapes.items():
        costs = exact_costs(shape)
        record = bench.compare(shape, TIMED, dev, rounds=rounds, min_time=min_time)
        for approach, timed in record["approaches"].items():
            point: dict[str, Any] = {"shape_name": name, "shape": shape,
                                     "approach": approach,
                                     "seconds": timed["forward_backward_s"],
                                     "ratio": timed["forward_backward_ratio"]}
            if approach in costs:
                point.update(flops=costs[approach].flops,
                             moved_bytes=costs[approach].moved_bytes)
            if "tuning" in timed:
                choice = timed["tuning"]["choices"]["forward_backward"]
                point["choice"] = {part: choice[part] for part in (
                    "forward", "input_grad", "weight_grad", "bias_grad")}
            points.append(point)
        parts[name] = time_parts(shape, dev, rounds=rounds)
        if dev.type == "cpu":
            steps[name] = primitives(shape, torch.get_num_threads())
    return {"meta": meta, "roof": roof, "points": points, "parts": parts,
            "primitives": steps}


def run(device: str | torch.device = "cpu", shapes: dict[str, dict[str, int]] | None = None,
        *, rounds: int = 5, min_time: float = 0.03, threads: int | None = None,
        fresh_process: bool = True) -> dict[str, Any]:
    """Measure the roof of ``device`` and time ``TIMED`` at each of ``shapes``.

    ``TIMED`` is :data:`APPROACHES` and ``tuned``. Returns ``{"meta": the machine,
    "roof": measure_roof(...), "points": [...], "parts": {...}, "primitives": {...}}``:
    one point per shape and approach, with its median training-step seconds over
    ``rounds`` interleaved rounds, its ratio to the layer, the exact ``flops`` and
    ``moved_bytes`` (not for ``tuned``, whose bytes depend on the strategies it chose:
    ``choice`` says which); per shape, each part of the step by each strategy
    (:func:`time_parts`) and, on a CPU, the oneDNN primitives of the layer's step
    (:func:`primitives`). With ``fresh_process`` (the default) it runs in a new Python process, with
    glibc's tunables set as the benchmark sets them, so that the allocator of the calling
    process (a notebook kernel's, say) does not decide the times.
    """
    shapes = shapes or SHAPES
    if not fresh_process:
        if threads is not None:
            torch.set_num_threads(threads)
        return _run_here(str(device), shapes, rounds, min_time)
    env = {**os.environ}
    if sys.platform == "linux" and "LD_PRELOAD" not in env:
        env.update(bench.TUNED_ENV)
    args = [sys.executable, "-m", "sharedconv.lab.roofline", "--device", str(device),
            "--rounds", str(rounds), "--min-time", str(min_time), "--out", "-",
            "--shapes", json.dumps(shapes)]
    if threads is not None:
        args += ["--threads", str(threads)]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def machine_line(run: dict[str, Any]) -> str:
    """One line naming what a run's figures depend on."""
    m = run["meta"]
    if m["device_type"] == "cuda":
        return f"{m['gpu']}, CUDA {m['cuda']}, TF32 {'on' if run['roof']['tf32'] else 'off'}"
    return f"{m['cpu_model']} ({m['cpu_capability']}), {m['threads']} threads"


def placement(run: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """Where one point of a run sits under the run's roof.

    Returns its ``intensity`` (FLOPs per byte moved), the FLOP ``rate`` it reached, the
    ``attainable`` rate at its intensity (``min(peak, bandwidth * intensity)``), its
    ``share`` of that, and ``bound``: ``"memory"`` below the ridge, ``"compute"`` above.
    """
    roof = run["roof"]
    intensity = point["flops"] / point["moved_bytes"]
    attainable = min(roof["peak"], roof["bandwidth"] * intensity)
    rate = point["flops"] / point["seconds"]
    bound = "memory" if intensity < roof["peak"] / roof["bandwidth"] else "compute"
    return {"intensity": intensity, "rate": rate, "attainable": attainable,
            "share": rate / attainable, "bound": bound}


def table(run: dict[str, Any]) -> str:
    """The run as text: the roof, then each approach's intensity, rate and share of roof."""
    roof = run["roof"]
    lines = [machine_line(run),
             f"roof: {roof['bandwidth'] / 1e9:.1f} GB/s, {roof['peak'] / 1e9:.0f} GFLOP/s,"
             f" ridge at {roof['peak'] / roof['bandwidth']:.1f} FLOP/byte",
             f"{'shape':8s} {'approach':15s} {'FLOP/B':>7s} {'GFLOP/s':>8s} "
             f"{'of roof':>8s}  {'bound':7s} {'step ms':>8s} {'/ layer':>8s}"]
    for p in run["points"]:
        ms = f"{p['seconds'] * 1e3:8.2f} {p['ratio']:8.2f}"
        if "flops" not in p:
            lines.append(f"{p['shape_name']:8s} {p['approach']:15s} {'':>7s} {'':>8s} "
                         f"{'':>8s}  {'':7s} {ms}")
            continue
        at = placement(run, p)
        lines.append(f"{p['shape_name']:8s} {p['approach']:15s} {at['intensity']:7.2f} "
                     f"{at['rate'] / 1e9:8.1f} {at['share']:8.0%}  {at['bound']:7s} {ms}")
    return "\n".join(lines)


_STYLE = {"layer": ("k", "o"), "loop": ("C0", "s"), "lift": ("C1", "^"),
          "grouped_repeat": ("C2", "D"), "vmap": ("C4", "v")}


def plot(runs: list[dict[str, Any]], titles: list[str] | None = None) -> Any:
    """One roofline panel per run, side by side, on shared axes; returns the figure.

    Each panel draws its run's roof (the bandwidth line up to the ridge, then the peak)
    and each approach's training step at each shape: intensity across, achieved FLOP/s
    up; filled markers for a run's first shape, open ones for its second.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(runs), figsize=(6.4, 3.5), sharey=True, squeeze=False,
                             layout="constrained")
    points = [p for r in runs for p in r["points"] if "flops" in p]
    intensities = [p["flops"] / p["moved_bytes"] for p in points]
    grid = np.geomspace(min(intensities) / 2, max(intensities) * 4, 200)
    for i, (ax, r) in enumerate(zip(axes[0], runs, strict=True)):
        roof = r["roof"]
        ax.plot(grid, np.minimum(roof["peak"], roof["bandwidth"] * grid) / 1e9, color="0.4",
                lw=1.5)
        ax.axvline(roof["peak"] / roof["bandwidth"], color="0.6", ls=":", lw=1)
        names = list(dict.fromkeys(p["shape_name"] for p in r["points"]))
        for p in (p for p in r["points"] if "flops" in p):
            color, marker = _STYLE.get(p["approach"], ("C7", "x"))
            filled = p["shape_name"] == names[0]
            at = placement(r, p)
            ax.plot(at["intensity"], at["rate"] / 1e9, marker,
                    color=color, ms=6, mfc=color if filled else "none",
                    label=p["approach"] if filled else None)
        ax.set(xscale="log", yscale="log", xlabel="FLOPs per byte moved")
        ax.set_title(titles[i] if titles else machine_line(r), fontsize=9)
    axes[0][0].set_ylabel("GFLOP/s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    names = list(dict.fromkeys(p["shape_name"] for p in runs[0]["points"]))
    for name, face in zip(names[:2], ("0.3", "none"), strict=False):
        handles.append(axes[0][0].plot([], [], "o", color="0.3", mfc=face, ms=6)[0])
        labels.append(f"{name} ({'filled' if face != 'none' else 'open'})")
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=9)
    return fig


def stored_runs() -> list[dict[str, Any]]:
    """The roofline runs that ship with the package (``sharedconv/lab/results/roofline/``)."""
    from importlib.resources import files

    folder = files("sharedconv.lab") / "results" / "roofline"
    runs = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            result = json.loads(entry.read_text())
            result["file"] = entry.name
            runs.append(result)
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m sharedconv.lab.roofline",
        description="Measure this device's roofline and place every approach's training "
                    "step under it (see the module's documentation).")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--min-time", type=float, default=0.1,
                        help="seconds per timed sample")
    parser.add_argument("--shapes", type=json.loads, default=None,
                        help="JSON {name: {B, G, D, L, F, k}} (default: SHAPES)")
    parser.add_argument("--out", default=None,
                        help="JSON file, '-' for standard output (default: "
                        "src/sharedconv/lab/results/roofline/<device>[-<threads>t].json)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = _run_here(device, args.shapes or SHAPES, args.rounds, args.min_time)
    if args.out == "-":
        print(json.dumps(result))
        return result
    out = args.out
    if out is None:
        name = bench._slug(result["meta"]["device"].split(" (")[0])
        if device == "cpu":
            name += f"-{result['meta']['threads']}t"
        out = Path("src") / "sharedconv" / "lab" / "results" / "roofline" / f"{name}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(parts_table(result))
    for name, rows in result["primitives"].items():
        print(f"{name}, the layer's step in oneDNN primitives:")
        print(primitive_table(rows))
    print(f"\nwrote {out}")
    return result



# ------------------------------------------------------------------ where the time goes



def _part_calls(shape: dict[str, int], device: str | torch.device
                ) -> dict[tuple[str, str], Any]:
    """Each part of the step at ``shape`` by each strategy the tuner may run there, as a
    call on fresh tensors of ``device`` (``meta`` to count): ``{(part, strategy): fn}``,
    to be called without gradient mode, as the tuner times them.

    The weight gradient is the bank's alone; the bias gradient is either the fold's
    convolution backward asked for the bias alone (``fold``) or a sum (``sum``)."""
    from .. import tuning

    B, G, D, L, F_, k = (shape[n] for n in ("B", "G", "D", "L", "F", "k"))
    # as in a training step: the input and the parameters require gradients
    xf = torch.randn(B * G, D, L, device=device, requires_grad=True)
    w = torch.randn(F_, D, k, device=device, requires_grad=True)
    b = torch.randn(F_, device=device, requires_grad=True)
    o = tuning._Options(G, (1,), (k // 2,), (1,))
    grad = torch.randn(B * G, F_, tuning._out_length(L, k, o), device=device)
    calls: dict[tuple[str, str], Any] = {}
    for name in tuning._candidates(xf, w, o):
        calls["forward", name] = lambda n=name: tuning._FORWARD[n](xf, w, b, o)
        calls["input_grad", name] = lambda n=name: tuning._INPUT_GRAD[n](grad, xf, w, o)
        calls["weight_grad", name] = lambda n=name: tuning._WEIGHT_GRAD[n](
            grad, xf, w, o, False)
    calls["bias_grad", "fold"] = lambda: tuning._conv_backward(
        "fold", grad, xf, w, o, [False, False, True])
    calls["bias_grad", "sum"] = lambda: tuning._bias_sum(grad)
    return calls


def part_costs(shape: dict[str, int]) -> dict[tuple[str, str], tuple[int, int]]:
    """Exact ``(flops, moved_bytes)`` of each part by each strategy at ``shape``, counted
    on ``meta`` tensors as :func:`~sharedconv.lab.memory.step_cost` counts a step (a sum
    has no multiply-adds: its FLOPs count zero)."""
    from .memory import _flop_counter, _traffic_mode

    costs = {}
    for key, call in _part_calls(shape, "meta").items():
        counter, traffic = _flop_counter(), _traffic_mode()
        with counter, traffic, torch.no_grad():
            call()
        costs[key] = (counter.get_total_flops(), traffic.moved)
    return costs


def time_parts(shape: dict[str, int], device: str | torch.device = "cpu", *,
               rounds: int = 7) -> list[dict[str, Any]]:
    """Each part of the step at ``shape`` by each strategy: its median seconds over
    ``rounds`` interleaved samples (:func:`sharedconv.tuning.measure`, the tuner's own
    timing), its exact FLOPs and bytes, and ``roof_s``, the least time the roof of
    :func:`measure_roof` allows it (filled in by :func:`run`)."""
    import statistics

    from .. import tuning

    device = torch.device(device)
    calls = _part_calls(shape, device)
    costs = part_costs(shape)
    rows = []
    with torch.no_grad():
        for part in PARTS:
            mine = {s: fn for (p, s), fn in calls.items() if p == part}
            samples = tuning.measure(mine, device, part, rounds)
            for strategy, values in samples.items():
                flops, moved = costs[part, strategy]
                rows.append({"part": part, "strategy": strategy,
                             "seconds": statistics.median(values), "flops": flops,
                             "moved_bytes": moved})
    return rows


_VERBOSE_PROBE = """
import torch
from sharedconv.functional import shared_conv
from sharedconv.lab import roofline
torch.set_num_threads({threads})
x, w, b = roofline._inputs({shape}, "cpu")
grad = torch.randn_like(shared_conv(x, w, b, groups={G}, padding={k} // 2))
def step():
    y = shared_conv(x, w, b, groups={G}, padding={k} // 2)
    torch.autograd.grad(y, (x, w, b), grad)
for _ in range(3):
    step()
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    step()
"""


def primitives(shape: dict[str, int], threads: int | None = None) -> list[dict[str, Any]]:
    """The oneDNN primitives one training step of the layer runs at ``shape`` on this CPU,
    in order: ``{"primitive", "implementation", "kind", "formats", "problem", "ms",
    "bytes"}``.

    Read from oneDNN's own log (``torch.backends.mkldnn.verbose``) in a fresh process,
    with glibc's tunables set as the benchmark sets them, after three warm-up steps. ``kind`` is the
    convolution's propagation (``forward_training``, ``backward_data``,
    ``backward_weights``) or, for a ``reorder`` (a copy into or out of oneDNN's blocked
    layout), ``reorder``; ``formats`` maps each tensor of the primitive (``src``, ``wei``,
    ``dst``, ...; for a backward, ``src`` is the input's gradient) to oneDNN's description
    of its memory, ``dtype:flags:blocked:layout`` (flag ``p``: padded to whole blocks);
    ``bytes`` is what a reorder reads and writes (float32, unpadded). Empty where PyTorch
    has no oneDNN.
    """
    if not torch.backends.mkldnn.is_available():
        return []
    env = {**os.environ}
    if sys.platform == "linux" and "LD_PRELOAD" not in env:
        env.update(bench.TUNED_ENV)
    code = _VERBOSE_PROBE.format(shape=dict(shape), G=shape["G"], k=shape["k"],
                                 threads=threads or torch.get_num_threads())
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split(",")
        if len(fields) < 10 or fields[:4] != ["onednn_verbose", "v1", "primitive", "exec"]:
            continue
        primitive, implementation, kind = fields[5], fields[6], fields[7]
        problem, ms = fields[-2], float(fields[-1])
        formats = dict(part.split(":", 1) for part in fields[8].split() if ":" in part)
        row = {"primitive": primitive, "implementation": implementation,
               "kind": kind if primitive == "convolution" else primitive,
               "formats": formats, "problem": problem, "ms": ms, "bytes": 0}
        if primitive == "reorder":
            row["bytes"] = 2 * 4 * math.prod(int(n) for n in problem.split("x"))
        rows.append(row)
    return rows


def primitive_table(rows: list[dict[str, Any]]) -> str:
    """:func:`primitives` as text, reorders of a few bytes (the bank's) left out."""
    lines = [f"{'primitive':17s} {'implementation':16s} {'ms':>7s} {'moved':>10s}"]
    for r in rows:
        if r["kind"] == "reorder" and r["bytes"] < 2**16:
            continue
        moved = _bytes(r["bytes"]) if r["bytes"] else ""
        lines.append(f"{r['kind']:17s} {r['implementation']:16s} {r['ms']:7.2f} "
                     f"{moved:>10s}")
    total = sum(r["ms"] for r in rows)
    share = sum(r["ms"] for r in rows if r["kind"] == "reorder") / total if total else 0
    lines.append(f"{'all':17s} {'':16s} {total:7.2f}   (reorders {share:.0%})")
    return "\n".join(lines)


def roof_seconds(run: dict[str, Any], flops: float, moved_bytes: float) -> float:
    """The least time the roof of ``run`` allows ``flops`` FLOPs and ``moved_bytes`` bytes."""
    return max(flops / run["roof"]["peak"], moved_bytes / run["roof"]["bandwidth"])


def part_roof(run: dict[str, Any], rows: list[dict[str, Any]], part: str) -> float:
    """The least time the roof of ``run`` allows ``part``: that of the strategy that
    counts the fewest FLOPs and bytes (the others make temporaries the part does not
    need)."""
    return min(roof_seconds(run, r["flops"], r["moved_bytes"])
               for r in rows if r["part"] == part)


def parts_table(run: dict[str, Any]) -> str:
    """The run's parts: each part's time by each strategy, and how many times the part's
    least time under the roof (:func:`part_roof`) that is; the fastest marked ``*``."""
    lines = [machine_line(run)]
    for name, rows in run.get("parts", {}).items():
        lines.append(f"{name}: {'part':12s} {'strategy':9s} {'ms':>7s} {'x roof':>7s}")
        for part in PARTS:
            mine = [r for r in rows if r["part"] == part]
            best = min(r["seconds"] for r in mine)
            roof = part_roof(run, rows, part)
            for r in mine:
                lines.append(f"{'':{len(name) + 2}s}{part:12s} {r['strategy']:9s} "
                             f"{r['seconds'] * 1e3:7.2f} {r['seconds'] / roof:7.1f}"
                             f"{' *' if r['seconds'] == best else ''}")
    return "\n".join(lines)


def best_parts(run: dict[str, Any], shape_name: str) -> dict[str, Any]:
    """The fastest strategy of each part at one of the run's shapes, with the sum of
    their times (a step built from the best parts, as if each ran alone) and the roof's
    time for the step's counted FLOPs and bytes."""
    rows = run["parts"][shape_name]
    best = {part: min((r for r in rows if r["part"] == part), key=lambda r: r["seconds"])
            for part in PARTS}
    layer = next(p for p in run["points"]
                 if p["shape_name"] == shape_name and p["approach"] == "layer")
    return {"best": {part: r["strategy"] for part, r in best.items()},
            "seconds": sum(r["seconds"] for r in best.values()),
            "roof_s": roof_seconds(run, layer["flops"], layer["moved_bytes"])}


def parts_plot(run: dict[str, Any]) -> Any:
    """Where the step's time goes: per shape, each part's time by each strategy as a
    multiple of the least time the roof allows the part (:func:`part_roof`; 1 is the
    roof). Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    shapes = list(run.get("parts", {}))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.4, 2.8), sharey=True,
                             sharex=True, squeeze=False, layout="constrained")
    style = {"fold": ("k", "o"), "grouped": ("C2", "D"), "unfold": ("C1", "s"),
             "sum": ("C0", "v")}
    labels = {"forward": "forward", "input_grad": "input gradient",
              "weight_grad": "weight gradient", "bias_grad": "bias gradient"}
    for ax, name in zip(axes[0], shapes, strict=True):
        rows = run["parts"][name]
        ax.axvline(1, color="0.5", lw=1)
        for i, part in enumerate(PARTS):
            roof = part_roof(run, rows, part)
            for r in (r for r in rows if r["part"] == part):
                color, marker = style[r["strategy"]]
                ax.plot(r["seconds"] / roof, i, marker, color=color, ms=7, mfc="none",
                        mew=1.5, label=r["strategy"])
        ax.set_yticks(range(len(PARTS)), [labels[p] for p in PARTS])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.5, 1, 2, 5, 10, 20]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
        ax.set(ylim=(len(PARTS) - 0.5, -0.5), xlabel="time / the roof's least time",
               title=name)
    handles, names = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncols=4,
               fontsize=9)
    return fig

if __name__ == "__main__":
    main()
