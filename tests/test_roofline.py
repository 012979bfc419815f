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
