"""The benchmark CLI runs a tiny grid and writes JSON with every field (no timing claims)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sharedconv.lab import bench

FIELDS = {"saved_bytes", "param_bytes", "forward_flops", "forward_s", "forward_ratio",
          "forward_backward_s", "forward_backward_ratio"}


def test_cli_help_explains_itself():
    result = subprocess.run([sys.executable, "-m", "sharedconv.lab.bench", "--help"],
                            capture_output=True, text=True, check=True)
    for word in ("--suite", "--quick", "--allocator", "--device", "--threads", "ratios",
                 "interleaved"):
        assert word in result.stdout


@pytest.mark.slow
def test_cli_writes_json_with_every_field(tmp_path):
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run(
        [sys.executable, "-m", "sharedconv.lab.bench", "--quick", "--suite", "masked",
         "--rounds", "1", "--min-time", "0.001", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tuned" in result.stdout  # re-executed with the allocator tunables
    data = json.loads(out.read_text())
    assert data["meta"]["allocator"].startswith("glibc malloc, tuned")
    assert data["meta"]["device_type"] == "cpu"
    for field in ("cpu_model", "cpu_capability", "threads", "torch", "onednn"):
        assert field in data["meta"], field
    (record,) = data["results"]
    assert record["suite"] == "masked" and record["reference"] == "masked_shared"
    assert set(record["approaches"]) == {"masked_shared", "naive_layer", "naive_repeat"}
    for entry in record["approaches"].values():
        assert FIELDS <= set(entry)
        assert entry["forward_s"] > 0 and entry["forward_backward_s"] > 0
    assert record["approaches"]["masked_shared"]["forward_ratio"] == 1.0
    naive = record["approaches"]["naive_layer"]
    fast = record["approaches"]["masked_shared"]
    assert naive["forward_flops"] > 10 * fast["forward_flops"]  # exact counts, not timings
    assert naive["saved_bytes"] > 10 * fast["saved_bytes"]


def test_describe_allocator(monkeypatch):
    for key in ("LD_PRELOAD", *bench.TUNED_ENV):
        monkeypatch.delenv(key, raising=False)
    assert bench.describe_allocator() == "glibc malloc, default"
    for key, value in bench.TUNED_ENV.items():
        monkeypatch.setenv(key, value)
    assert "tuned" in bench.describe_allocator()
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert bench.describe_allocator().startswith("jemalloc")


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["streams", "groups"])
def test_quick_suites_agree_and_record(suite):
    """Every quick case checks its approaches against each other before timing them, and
    records the tuned layer's choices and what tuning them cost."""
    import torch

    cases = bench.SUITES[suite](torch.device("cpu"), torch.float32, True)
    assert cases
    for case in cases:
        record = bench.run_case(case, torch.device("cpu"), rounds=1, min_time=0.001)
        record["suite"] = suite
        names = set(record["approaches"])
        assert names == {a.name for a in case.approaches}
        assert {"layer", "tuned", "fold", "only_grouped", "only_unfold", *bench.OTHERS} <= names
        assert record["approaches"][case.reference]["forward_ratio"] == 1.0
        fold = record["approaches"]["fold"]
        for name in ("layer", "tuned", "only_grouped", "only_unfold"):
            # whatever runs, autograd keeps the input and one bank, as the bare fold does
            assert record["approaches"][name]["saved_bytes"] == fold["saved_bytes"], name
            assert record["approaches"][name]["forward_flops"] == fold["forward_flops"], name
        tuning = record["approaches"]["tuned"]["tuning"]
        assert set(tuning["choices"]) == {"forward", "forward_backward"}
        training = tuning["choices"]["forward_backward"]
        parts = {"forward", "input_grad", "weight_grad", "bias_grad"}  # and the step, if the
        assert set(training["timings"]) - {"step"} == parts  # plan was not the fold
        assert set(training["timings"]["forward"]) == {"fold", "grouped", "unfold"}
        assert all(v > 0 for v in training["tuning_s"].values())
        (row,) = bench.goal_rows([record])
        assert row["saved_equal_fold"] and row["tuning_steps"] > 0
        assert row["forward"]["best_own"] in ("layer", "only_grouped", "only_unfold")
        assert row["forward_backward"]["best_other"] in bench.OTHERS
        assert "tuned/own" in bench.goal_table([row])


def test_machine_names_what_the_figures_depend_on():
    """The record is read when it is made (the thread count of that moment) and names the
    instruction set and the oneDNN release in the forms the chapters print."""
    import re

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = bench.machine(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert info["threads"] == 1 and info["cpu_model"]
    assert info["cpu_capability"] in {"NO AVX", "DEFAULT", "AVX2", "AVX512", "ZVECTOR",
                                      "VSX", "SVE256"}
    if torch.backends.mkldnn.is_available():
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", info["onednn"]), info["onednn"]


def test_a_case_catches_a_wrong_approach():
    import torch

    (case,) = bench.streams_cases(torch.device("cpu"), torch.float32, True)
    wrong = next(a for a in case.approaches if a.name == "only_unfold")
    wrong.run = lambda x, w, b, run=wrong.run: run(x, w, b) * 1.5
    with pytest.raises(AssertionError, match="only_unfold disagrees"):
        bench.run_case(case, torch.device("cpu"), rounds=1, min_time=0.001)


def test_timers_use_the_threads_the_json_records(monkeypatch):
    """torch.utils.benchmark.Timer defaults to one thread; the bench must not."""
    import torch
    import torch.utils.benchmark as tub

    seen = []
    real = tub.Timer

    def recording_timer(*args, **kwargs):
        seen.append(kwargs.get("num_threads", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(tub, "Timer", recording_timer)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not Timer's default of one
    try:
        x = torch.randn(4)
        approach = bench.Approach("sum", lambda x: x.sum(), (x,))
        bench._time_interleaved([approach], "forward", rounds=1, min_time=0.001,
                                device=torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert seen == [2]
