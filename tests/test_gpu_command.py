"""``python3 dev.py gpu``: the one command a GPU session runs. Its dry run takes the same
steps on the CPU at small sizes; its notebook runner executes a chapter as a kernel would."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _text(cell: dict) -> str:
    """What a code cell printed or returned, as nbval compares it (figures aside)."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append("".join(out["text"]))
        elif "text/plain" in out.get("data", {}) and "image/png" not in out["data"]:
            parts.append("".join(out["data"]["text/plain"]) + "\n")
    return "".join(parts).strip()


@pytest.mark.slow
def test_the_dry_run_takes_every_step_and_packs_them(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "dev.py"), "gpu", str(out),
                           "--dry-run", "--python", sys.executable],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu: OK | CPU dry run | CUDA tests") and "chapters 1/1 ok" in last
    assert sorted(p.name for p in out.iterdir()) == ["gpu-run.tar.gz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["environment"]["dry_run"]
    assert [s["step"] for s in summary["steps"]] == ["cuda tests", "benchmark", "roofline"]
    # every CUDA test was collected, and (no GPU here) skipped
    assert summary["cuda_tests"]["skipped"] > 400 and summary["cuda_tests"]["failed"] == 0
    with tarfile.open(out / "gpu-run.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    run = tmp_path / "gpu-run"
    for name in ("environment.json", "cuda-tests.xml", "results/bench.json",
                 "results/roofline/roofline.json", "chapters/01_quick_tour.ipynb"):
        assert (run / name).is_file(), name
    environment = json.loads((run / "environment.json").read_text())
    assert {"torch", "cuda", "cudnn", "cudnn_allow_tf32", "matmul_allow_tf32"} <= set(environment)
    bench = json.loads((run / "results/bench.json").read_text())
    assert bench["meta"]["device_type"] == "cpu" and bench["results"]
    # the chapter ran as a fresh kernel runs it: every compared output is the stored one
    stored = json.loads((ROOT / "book/01_quick_tour.ipynb").read_text())["cells"]
    fresh = json.loads((run / "chapters/01_quick_tour.ipynb").read_text())["cells"]
    compared = 0
    for a, b in zip(stored, fresh, strict=True):
        if a["cell_type"] == "code" and "NBVAL_IGNORE_OUTPUT" not in "".join(a["source"]):
            assert _text(b) == _text(a), "".join(a["source"])[:200]
            compared += 1
    assert compared >= 10


def test_the_runner_reports_the_failing_cell(tmp_path):
    cells = [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
              "source": source} for source in ("x = 2\nprint(x)", "x + 1",
                                               "assert x == 3, 'x is not 3'", "print('never')")]
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    source, target = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    source.write_text(json.dumps(nb))
    done = subprocess.run([sys.executable, str(ROOT / "dev.py"), "_notebook", str(source),
                           str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1
    ran = json.loads(target.read_text())["cells"]
    assert [_text(c) for c in ran[:2]] == ["2", "3"]
    assert "AssertionError: x is not 3" in _text(ran[2])
    assert ran[2]["metadata"]["gpu_run_failed"] and ran[3]["outputs"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "dev.py"), "gpu", str(tmp_path / "o"),
                           "--python", sys.executable], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device is visible" in done.stdout and not (tmp_path / "o").exists()
