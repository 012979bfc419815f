"""The roofline helpers: exact costs at any shape, a run's fields, its table and figure."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sharedconv import tuning
from sharedconv.lab import roofline

SEED2 = dict(B=8, G=8900, D=100, L=512, F=50, k=3)


def test_exact_costs_at_seed_2_without_memory():
    costs = roofline.exact_costs(SEED2, ("layer", "grouped_repeat"), unshared=True)
    x_bytes = 4 * 8 * 8900 * 100 * 512
    assert x_bytes / 2**30 == pytest.approx(13.58, abs=0.005)
    bank = 50 * 100 * 3
    assert costs["layer"].param_bytes == 4 * (bank + 50)
    assert costs["unshared"].param_bytes == 4 * 8900 * (bank + 50)
    assert costs["grouped_repeat"].saved_bytes == x_bytes + 4 * 8900 * bank
    assert len({c.flops for c in costs.values()}) == 1


def test_exact_costs_refuses_unknown_approaches():
    with pytest.raises(ValueError, match="approaches must be among"):
        roofline.exact_costs(SEED2, ("layer", "conv2d"))


def _fake_run():
    points = []
    for name in roofline.SHAPES:
        for approach, seconds in (("layer", 1e-3), ("loop", 5e-3), ("tuned", 8e-4)):
            point = {"shape_name": name, "shape": roofline.SHAPES[name],
                     "approach": approach, "seconds": seconds, "ratio": seconds / 1e-3}
            if approach != "tuned":
                point.update(flops=10**8, moved_bytes=10**7 * (1 + (approach == "loop")))
            points.append(point)
    meta = {"device_type": "cpu", "cpu_model": "Some CPU", "cpu_capability": "AVX2",
            "threads": 2}
    return {"meta": meta, "roof": {"bandwidth": 1e10, "peak": 2e11, "tf32": False},
            "points": points}


def test_table_places_each_approach_under_the_roof():
    text = roofline.table(_fake_run())
    assert "Some CPU (AVX2), 2 threads" in text
    assert "ridge at 20.0 FLOP/byte" in text
    # the layer: intensity 10, 100 GFLOP/s, under a roof of 1e10 * 10 = 100 GFLOP/s
    assert any(line.split()[:6] == ["streams", "layer", "10.00", "100.0", "100%", "memory"]
               for line in text.splitlines())
    assert max(len(line) for line in text.splitlines()) <= 88  # fits a notebook's page


def test_plot_draws_one_panel_per_run():
    import matplotlib

    matplotlib.use("Agg")
    fig = roofline.plot([_fake_run(), _fake_run()], ["stored", "yours"])
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "yours"
    assert fig.get_size_inches()[0] <= 6.5


def test_stored_runs_name_their_machine():
    runs = roofline.stored_runs()
    assert runs, "a roofline run ships with the package"
    for run in runs:
        for field in ("cpu_model", "cpu_capability", "threads", "torch"):
            assert field in run["meta"]
        assert run["roof"]["bandwidth"] > 0 and run["roof"]["peak"] > 0
        timed = {(p["shape_name"], p["approach"]) for p in run["points"]}
        assert timed == {(s, a) for s in roofline.SHAPES for a in roofline.TIMED}
        assert set(run["parts"]) == set(roofline.SHAPES)
        for rows in run["parts"].values():
            assert {r["part"] for r in rows} == set(roofline.PARTS)
        if run["meta"]["device_type"] == "cpu":
            for rows in run["primitives"].values():
                assert {"forward_training", "backward_data", "backward_weights"} <= {
                    r["kind"] for r in rows}


@pytest.mark.slow
def test_run_in_a_fresh_process_records_every_point():
    shapes = {"streams": dict(B=2, G=4, D=1, L=64, F=4, k=3)}
    result = roofline.run("cpu", shapes, rounds=1, min_time=0.001)
    assert result["meta"]["allocator"].startswith("glibc malloc, tuned")
    assert {p["approach"] for p in result["points"]} == set(roofline.TIMED)
    for point in result["points"]:
        assert point["seconds"] > 0
        assert ("flops" in point) == (point["approach"] != "tuned")
    tuned = next(p for p in result["points"] if p["approach"] == "tuned")
    assert set(tuned["choice"]) == set(tuning.PARTS)


def test_measure_roof_is_positive_and_says_how():
    roof = roofline.measure_roof("cpu", copy_mib=4, sizes=(64,), samples=1)
    assert roof["bandwidth"] > 0 and roof["peak"] > 0 and roof["peak_at"] == 64


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "sharedconv.lab.roofline", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--threads" in out and "--out" in out and "--shapes" in out


# ------------------------------------------------------------------ where the time goes

SMALL = dict(B=2, G=4, D=3, L=20, F=5, k=3)


def test_part_costs_count_what_each_part_reads_and_writes():
    costs = roofline.part_costs(SMALL)
    n, d, length, f, k = 2 * 4, 3, 20, 5, 3
    x, w, b, y = n * d * length, f * d * k, f, n * f * length  # 'same' padding
    macs = n * f * length * d * k
    for part in ("forward", "input_grad", "weight_grad"):
        # every strategy does the same multiply-adds
        assert {costs[part, s][0] for s in ("fold", "grouped", "unfold")} == {2 * macs}
    assert costs["forward", "fold"][1] == 4 * (x + w + b + y)  # read x, w, b; write y
    assert costs["input_grad", "fold"][1] == 4 * (y + x + w + x)  # read y', x, w; write x'
    assert costs["weight_grad", "fold"][1] == 4 * (y + x + w + w)  # write w'
    assert costs["bias_grad", "sum"] == (0, 4 * (y + b))  # a sum: no multiply-adds
    # grouped: G copies of the bank are written and read besides
    assert costs["forward", "grouped"][1] > costs["forward", "fold"][1] + 4 * 4 * w


def test_time_parts_times_every_strategy_of_every_part():
    rows = roofline.time_parts(SMALL, rounds=1)
    got = {(r["part"], r["strategy"]) for r in rows}
    assert got == set(roofline.part_costs(SMALL))
    assert {p for p, _ in got} == set(roofline.PARTS) == set(tuning.PARTS)
    assert all(r["seconds"] > 0 for r in rows)


@pytest.mark.skipif(not __import__("torch").backends.mkldnn.is_available(),
                    reason="PyTorch was built without oneDNN")
def test_primitives_come_from_onednn_log_of_one_step():
    rows = roofline.primitives(SMALL, threads=1)
    convolutions = [r["kind"] for r in rows if r["primitive"] == "convolution"]
    # one step: the forward, then the input's and the weights' gradients
    assert convolutions == ["forward_training", "backward_data", "backward_weights"]
    (data,) = [r for r in rows if r["kind"] == "backward_data"]
    assert {"src", "wei", "dst"} <= set(data["formats"])  # oneDNN's memory descriptors
    assert all(r["ms"] >= 0 for r in rows)
    assert all(r["bytes"] > 0 for r in rows if r["kind"] == "reorder")
    text = roofline.primitive_table(rows)
    assert "backward_data" in text and "reorders" in text.splitlines()[-1]


def _fake_parts_run():
    run = _fake_run()  # roof: 1e10 B/s, 2e11 FLOP/s
    rows = []
    for part, timings in (("forward", {"fold": 2e-3, "unfold": 1e-3}),
                          ("input_grad", {"fold": 4e-3, "unfold": 3e-3}),
                          ("weight_grad", {"fold": 1e-3, "unfold": 2e-3}),
                          ("bias_grad", {"fold": 5e-4, "sum": 1e-4})):
        for strategy, seconds in timings.items():
            moved = 10**7 if strategy in ("fold", "sum") else 3 * 10**7
            rows.append({"part": part, "strategy": strategy, "seconds": seconds,
                         "flops": 0 if part == "bias_grad" else 10**8,
                         "moved_bytes": moved})
    run["parts"] = {"streams": rows}
    return run


def test_best_parts_and_the_parts_table():
    run = _fake_parts_run()
    best = roofline.best_parts(run, "streams")
    assert best["best"] == {"forward": "unfold", "input_grad": "unfold",
                            "weight_grad": "fold", "bias_grad": "sum"}
    assert best["seconds"] == pytest.approx(1e-3 + 3e-3 + 1e-3 + 1e-4)
    # the layer's 1e8 FLOPs and 1e7 bytes: 0.5 ms of arithmetic, 1 ms of memory
    assert best["roof_s"] == pytest.approx(1e-3)
    # each part's least time is its cheapest strategy's: 1e7 bytes, 1 ms
    assert roofline.part_roof(run, run["parts"]["streams"], "forward") == pytest.approx(1e-3)
    lines = roofline.parts_table(run).splitlines()
    assert any(line.split()[-3:] == ["1.00", "1.0", "*"] for line in lines)  # fwd unfold
    assert any(line.split()[-2:] == ["4.00", "4.0"] for line in lines)  # input_grad fold


def test_parts_plot_has_a_panel_per_shape():
    import matplotlib

    matplotlib.use("Agg")
    fig = roofline.parts_plot(_fake_parts_run())
    assert [ax.get_title() for ax in fig.axes] == ["streams"]
    assert fig.get_size_inches()[0] <= 6.5
