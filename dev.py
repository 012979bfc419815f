#!/usr/bin/env python3
"""The project's commands. Each one sets up ``.venv`` (from requirements.txt) first.

    python3 dev.py test      run every test: package, notebooks (nbval), book build
    python3 dev.py book      build the book into _build/html
    python3 dev.py execute   re-run every notebook of the book in a fresh kernel, save outputs
    python3 dev.py test-with PYTHON [pytest args]
                             run the package tests with another environment's python
                             (another torch or Python), set up by you; installs nothing
    python3 dev.py gpu OUTDIR [--dry-run] [--python PYTHON] [--chapters N,N]
                             everything a GPU must show, in one run: the CUDA tests,
                             every chapter on the GPU (scratch copies), the benchmark and
                             the roofline; results under OUTDIR (see gpu_main)
    python3 dev.py margins OUTDIR [--tf32 nearest|truncate] [--chapters 07,09]
                             run the chapters with trained models again with other
                             seeds and data draws, optionally with TF32's rounding
                             emulated (sharedconv.lab.tf32): do their asserts hold?

Extra arguments after ``test`` go to pytest (``python3 dev.py test -k oracle``); after
``execute``, they name the notebooks to run (default: every notebook in _toc.yml).
``test``, ``book`` and ``execute`` need Python 3.11+, the book's Python (chapter 8 loads
its data sets with aeon, which needs 3.11), and a network connection or a local wheel
cache for pip. The package alone works on Python 3.10: ``test-with`` runs with 3.10 too.

``test-with`` checks that PYTHON imports torch, pytest, nbval and the others the tests
need, and this tree's ``sharedconv`` (``PYTHON -m pip install --no-deps -e .``), then runs
``PYTHON -m pytest tests --ignore tests/test_book.py`` (the book's tests need Jupyter Book
and build a wheel). Arguments that name files or folders replace ``tests``, so
``python3 dev.py test-with PYTHON book/03_building_the_layer.ipynb`` runs that notebook in
place under nbval in that environment; others (``-k oracle``, ``-x``) go to pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".requirements.sha256"


def _run(*cmd: object) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


#: The Python that the book needs: chapter 8 loads its data sets with aeon (3.11 or newer).
#: The package itself (pyproject.toml) needs only 3.10; ``test-with`` accepts that.
BOOK_PYTHON = (3, 11)


def _too_old(version: tuple[int, ...], which: str) -> None:
    if tuple(version[:2]) < BOOK_PYTHON:
        found = ".".join(map(str, version[:3]))
        need = ".".join(map(str, BOOK_PYTHON))
        sys.exit(
            f"dev.py test, book and execute need Python {need} or newer, the book's Python "
            f"(chapter 8 loads its data sets with aeon, which needs {need}); {which} is "
            f"Python {found}.\nRun dev.py with python{need} or newer (and remove an older "
            f".venv), or test the package alone, which supports Python 3.10, with "
            f"`python3 dev.py test-with PYTHON` (see the README)."
        )


def ensure_env() -> None:
    """Create .venv and install requirements.txt, again whenever it or pyproject changes."""
    if not PYTHON.exists():
        _too_old(sys.version_info, "this python3")
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    else:  # an existing .venv keeps the Python it was made with
        found = subprocess.run([str(PYTHON), "-c", "import sys; print(*sys.version_info[:3])"],
                               capture_output=True, text=True, check=True).stdout.split()
        _too_old(tuple(int(v) for v in found), f"the Python of {VENV}")
    digest = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        digest.update((ROOT / name).read_bytes())
    if not STAMP.exists() or STAMP.read_text() != digest.hexdigest():
        _run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        _run(PYTHON, "-m", "pip", "install", "--quiet", "-r", "requirements.txt")
        STAMP.write_text(digest.hexdigest())


def toc_notebooks() -> list[Path]:
    """The notebooks named in _toc.yml, in book order."""
    import re

    files = re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def execute(paths: list[str]) -> None:
    """Run in the venv: execute notebooks top to bottom in fresh kernels, save in place."""
    import nbformat
    from nbclient import NotebookClient

    notebooks = [Path(p).resolve() for p in paths] or toc_notebooks()
    for path in notebooks:
        print(f"executing {path.relative_to(ROOT)}", flush=True)
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
        nbformat.write(nb, path)


#: What the package tests import besides the standard library (import names), and what
#: running a notebook in place needs; test_release.py also runs `python -m build` and twine.
TEST_IMPORTS = ("torch", "numpy", "matplotlib", "yaml", "pytest", "nbval", "ipykernel",
                "build", "twine", "setuptools")

_CHECK = """
import importlib.util, json, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
info = {"missing": missing, "python": sys.version.split()[0]}
if "torch" not in missing:
    import torch
    info["torch"] = torch.__version__
    try:
        import sharedconv
        info["sharedconv"] = sharedconv.__file__
    except ImportError as error:
        info["sharedconv_error"] = str(error)
print(json.dumps(info))
"""


def test_with(python: str, rest: list[str]) -> None:
    """Run the package tests with ``python``, after checking what it can import."""
    import json
    import shutil

    exe = shutil.which(python) or python
    if not Path(exe).exists():
        sys.exit(f"test-with: no python at {python!r}")
    probe = subprocess.run([exe, "-c", _CHECK, *TEST_IMPORTS], cwd=ROOT,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"test-with: {exe} failed to start:\n{probe.stderr}")
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    source = ROOT / "src" / "sharedconv"
    problems = []
    if info["missing"]:
        problems.append(f"it cannot import {', '.join(info['missing'])}")
    if "sharedconv" in info and Path(info["sharedconv"]).resolve().parent != source:
        problems.append(f"its sharedconv is {info['sharedconv']}, not this tree's")
    elif "sharedconv_error" in info:
        problems.append(f"it cannot import sharedconv ({info['sharedconv_error']})")
    if problems:
        sys.exit(
            f"test-with: {exe} (Python {info['python']}): " + "; ".join(problems) + ".\n"
            "Set it up with, for example:\n"
            f"  {exe} -m pip install torch==VERSION "
            "--index-url https://download.pytorch.org/whl/cpu\n"
            f"  {exe} -m pip install numpy matplotlib pyyaml pytest nbval ipykernel "
            "build twine packaging scikit-learn 'setuptools>=77'\n"
            f"  {exe} -m pip install 'aeon>=1.0'  # chapter 8's data sets (Python 3.11+)\n"
            f"  {exe} -m pip install --no-deps -e {ROOT}"
        )
    print(f"test-with: Python {info['python']}, torch {info['torch']}", flush=True)
    # a path names what to run, unless it is the value of an option (--ignore PATH)
    valued = {"--ignore", "--ignore-glob", "--deselect", "-k", "-m", "-p", "-o", "-c",
              "--rootdir", "--basetemp", "--junitxml"}
    named = [a for i, a in enumerate(rest) if not a.startswith("-") and (ROOT / a).exists()
             and (i == 0 or rest[i - 1] not in valued)]
    targets = [] if named else ["tests", "--ignore", "tests/test_book.py"]
    _run(exe, "-m", "pytest", *targets, *rest)


def _take_values(args: list[str], command: str, flags: tuple[str, ...]) -> dict[str, str]:
    """Remove each ``--flag value`` of ``flags`` from ``args``; the values by flag."""
    values = {}
    for flag in flags:
        if flag in args:
            i = args.index(flag)
            if i + 1 >= len(args):
                sys.exit(f"{command}: {flag} needs a value")
            values[flag] = args[i + 1]
            del args[i:i + 2]
    return values


def _chapter_list(value: str | None) -> list[str] | None:
    """``"01,06"`` as ``["01", "06"]``; None when the flag was not given."""
    return None if value is None else [c.strip() for c in value.split(",") if c.strip()]


# ---------------------------------------------------------------------------- the GPU


def run_notebook(source: Path, target: Path) -> int:
    """Execute the notebook ``source`` cell by cell in this process, as a fresh kernel
    would, and write it with its new outputs to ``target``; 0 if every cell ran.

    No Jupyter is needed (a borrowed GPU machine has torch, not Jupyter): each code cell
    runs in one namespace, its printed text and the value of a last expression become its
    output, and figures left open are saved as PNG outputs, as the inline backend shows
    them. The first failing cell stops the run; its traceback is its output.
    """
    import ast
    import base64
    import contextlib
    import io
    import json
    import traceback

    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    plt.show = lambda *args, **kwargs: None  # figures are collected after each cell
    nb = json.loads(source.read_text())
    namespace: dict = {"__name__": "__main__"}
    status = 0
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        code = "".join(cell["source"])
        out, outputs = io.StringIO(), []
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                tree = ast.parse(code)
                last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) \
                    else None
                body = tree.body[:-1] if last is not None else tree.body
                exec(compile(ast.Module(body, []), f"<cell {count}>", "exec"), namespace)
                if last is not None:
                    value = eval(compile(ast.Expression(last.value), f"<cell {count}>",
                                         "eval"), namespace)
                    if value is not None:
                        print(repr(value))
        except BaseException:  # noqa: BLE001 - the cell's failure is the result
            out.write(traceback.format_exc())
            status = 1
        if out.getvalue():
            outputs.append({"output_type": "stream", "name": "stdout",
                            "text": out.getvalue()})
        for number in plt.get_fignums():
            png = io.BytesIO()
            plt.figure(number).savefig(png, format="png")
            outputs.append({"output_type": "display_data", "metadata": {},
                            "data": {"image/png": base64.b64encode(png.getvalue())
                                     .decode()}})
        plt.close("all")
        cell["outputs"], cell["execution_count"] = outputs, count
        if status:
            cell.setdefault("metadata", {})["gpu_run_failed"] = True
            break
    target.write_text(json.dumps(nb, indent=1) + "\n")
    return status


#: What the GPU run probes about the device (printed and written as environment.json).
_GPU_PROBE = """
import json, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
print(json.dumps(info))
"""


def _step(name: str, cmd: list[str], log: Path, timeout: float, env: dict) -> dict:
    """Run one step of the GPU run, its output to ``log``; return its record."""
    import time

    start = time.perf_counter()
    print(f"[gpu] {name}: {' '.join(str(c) for c in cmd[:6])} ...", flush=True)
    with log.open("w") as out:
        try:
            done = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout, env=env)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = round(time.perf_counter() - start, 1)
    print(f"[gpu] {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {seconds} s",
          flush=True)
    return {"step": name, "returncode": code, "seconds": seconds, "log": log.name}


def gpu_main(argv: list[str]) -> int:
    """``python3 dev.py gpu OUTDIR [--dry-run] [--python PYTHON] [--chapters 01,06]``.

    Everything a GPU must show, in one run of at most about 10 minutes on one GPU:

    1. ``environment.json``: the GPU, its driver, CUDA, cuDNN, torch, and the TF32
       settings every timing ran under (PyTorch's defaults: TF32 allowed for cuDNN's
       convolutions, not for matrix products);
    2. the CUDA tests (``pytest -m cuda``): ``cuda-tests.log`` and ``cuda-tests.xml``;
    3. every chapter of the book executed on the GPU from a scratch copy (the stored
       notebooks are not touched), each alone in a fresh process: ``chapters/NN.ipynb``
       with the outputs it printed, and whether every cell (every assert) held;
    4. the benchmark and the roofline on the GPU: their JSON goes where the chapters read
       stored runs (``src/sharedconv/lab/results/``) and into ``results/`` under OUTDIR;
    5. ``summary.json`` and one summary line; and everything above packed into
       ``OUTDIR/gpu-run.tar.gz``, so that a borrowed machine's run comes back in one
       piece (``tar xzf`` it, and copy ``results/`` into ``src/sharedconv/lab/results/``).

    Without a CUDA device it says so and exits with 2. ``--dry-run`` runs the same steps
    on the CPU at small sizes (one chapter, the quick benchmark, a short roofline), which
    the tests do. ``--python`` names the interpreter to run with, installing nothing (a
    GPU machine's own Python with torch; ``sharedconv`` is taken from ``src``); without
    it the command sets up ``.venv`` as the others do. Exit status: 0 when every step
    held, 1 when one failed, 2 without a GPU.
    """
    import json
    import shutil
    import tarfile
    import time

    args = list(argv)
    dry = "--dry-run" in args
    if dry:
        args.remove("--dry-run")
    values = _take_values(args, "gpu", ("--python", "--chapters"))
    python = values.get("--python")
    if python is not None:
        python = shutil.which(python) or python
    chapters = _chapter_list(values.get("--chapters"))
    if len(args) != 1:
        sys.exit("usage: python3 dev.py gpu OUTDIR [--dry-run] [--python PYTHON] "
                 "[--chapters 01,06]")
    out = Path(args[0]).resolve()
    if python is None:
        ensure_env()
        python = str(PYTHON)
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1",
           "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                       os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([python, "-c", _GPU_PROBE], capture_output=True, text=True,
                           env=env, cwd=ROOT)
    if probe.returncode != 0:
        sys.exit(f"gpu: {python} cannot import torch:\n{probe.stderr[-2000:]}")
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    if not info["cuda_available"] and not dry:
        print(f"gpu: no CUDA device is visible to {python} (torch {info['torch']}); "
              "nothing was run. Use --dry-run to run the steps on the CPU.", flush=True)
        return 2
    device = "cpu" if dry else "cuda"
    if out.exists():
        shutil.rmtree(out)
    work = out / "gpu-run"
    for folder in ("chapters", "results/roofline", "logs"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    info.update(dry_run=dry, device=device, date=time.strftime("%Y-%m-%d %H:%M"))
    (work / "environment.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"[gpu] {info.get('gpu', 'CPU (dry run)')}, torch {info['torch']}, CUDA "
          f"{info['cuda']}, cuDNN {info['cudnn']}, TF32 for convolutions "
          f"{info['cudnn_allow_tf32']}, for matrix products {info['matmul_allow_tf32']}",
          flush=True)
    steps = []

    # 2. the CUDA tests (without nbval's options: a GPU machine may have no Jupyter)
    steps.append(_step("cuda tests", [
        python, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider",
        "-o", "addopts=-ra --strict-markers", f"--junitxml={work / 'cuda-tests.xml'}"],
        work / "logs" / "cuda-tests.log", 240, env))

    # 3. the chapters, each alone in a fresh process from a scratch copy
    notebooks = toc_notebooks()
    if chapters:
        notebooks = [p for p in notebooks if p.name.split("_")[0] in chapters]
    elif dry:
        notebooks = notebooks[:1]
    scratch = work / "scratch"
    missing = set(json.loads(subprocess.run(
        [python, "-c", "import importlib.util, json; print(json.dumps([m for m in "
         "('aeon', 'sklearn') if importlib.util.find_spec(m) is None]))"],
        capture_output=True, text=True, env=env).stdout or "[]"))

    def chapter(path: Path) -> dict:
        needs = {m for m in ("aeon", "sklearn")
                 if f"import {m}" in path.read_text() or f"from {m}" in path.read_text()}
        if needs & missing:  # its Colab cell would pip install it: no network here
            return {"chapter": path.name, "ok": None, "seconds": 0.0,
                    "skipped": f"{', '.join(sorted(needs & missing))} not installed"}
        copy = scratch / path.stem / path.name
        copy.parent.mkdir(parents=True)
        shutil.copy(path, copy)
        target = work / "chapters" / path.name
        start = time.perf_counter()
        try:
            done = subprocess.run([python, str(ROOT / "dev.py"), "_notebook", str(copy),
                                   str(target)], cwd=copy.parent, env=env,
                                  capture_output=True, text=True, timeout=300)
            code, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired:
            code, stderr = "timeout", ""
        seconds = round(time.perf_counter() - start, 1)
        cells = json.loads(target.read_text())["cells"] if target.exists() else []
        failed = [i for i, c in enumerate(cells)
                  if c.get("metadata", {}).get("gpu_run_failed")]
        ok = code == 0 and not failed
        print(f"[gpu] chapter {path.name}: {'ok' if ok else 'FAILED'} in {seconds} s",
              flush=True)
        return {"chapter": path.name, "ok": ok, "seconds": seconds,
                "failed_cell": failed[0] if failed else None,
                "stderr": stderr[-2000:] if code else ""}

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1 if dry else 3) as pool:  # 16 cores, one GPU
        results = list(pool.map(chapter, notebooks))
    shutil.rmtree(scratch, ignore_errors=True)

    # 4. the benchmark and the roofline, written where the chapters read stored runs
    stored = ROOT / "src" / "sharedconv" / "lab" / "results"
    bench_args = (["--quick", "--suite", "streams", "--allocator", "default"] if dry
                  else ["--rounds", "7", "--min-time", "0.02"])
    bench_step = _step("benchmark", [
        python, "-m", "sharedconv.lab.bench", "--device", device, *bench_args,
        "--out", work / "results" / "bench.json"], work / "logs" / "bench.log", 240, env)
    steps.append(bench_step)
    roof_args = (["--rounds", "2", "--min-time", "0.01", "--shapes",
                  '{"tiny": {"B": 2, "G": 4, "D": 1, "L": 64, "F": 4, "k": 3}}']
                 if dry else ["--rounds", "7", "--min-time", "0.02"])
    steps.append(_step("roofline", [
        python, "-m", "sharedconv.lab.roofline", "--device", device, *roof_args,
        "--out", work / "results" / "roofline" / "roofline.json"],
        work / "logs" / "roofline.log", 180, env))
    if not dry:  # name the runs after the GPU, beside the stored CPU runs
        name = "".join(ch if ch.isalnum() else "-" for ch in info["gpu"].lower()).strip("-")
        for src, dst in ((work / "results" / "bench.json", stored / f"{name}.json"),
                         (work / "results" / "roofline" / "roofline.json",
                          stored / "roofline" / f"{name}.json")):
            if src.exists():
                src.rename(src.with_name(dst.name))
                shutil.copy(src.with_name(dst.name), dst)

    # 5. the summary, and one archive of everything
    tests = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    xml = work / "cuda-tests.xml"
    if xml.exists():
        import xml.etree.ElementTree as ElementTree

        suite = ElementTree.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        total = int(suite.get("tests", 0))
        tests.update(failed=int(suite.get("failures", 0)), errors=int(suite.get("errors", 0)),
                     skipped=int(suite.get("skipped", 0)))
        tests["passed"] = total - tests["failed"] - tests["errors"] - tests["skipped"]
    ok = (all(s["returncode"] == 0 for s in steps)
          and all(r["ok"] is not False for r in results)
          and tests["failed"] == tests["errors"] == 0)
    summary = {"ok": ok, "environment": info, "cuda_tests": tests, "steps": steps,
               "chapters": results}
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.copy(work / "summary.json", out / "summary.json")
    with tarfile.open(out / "gpu-run.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="gpu-run")
    shutil.rmtree(work)
    chapters_ok = sum(r["ok"] is True for r in results)
    skipped = [r["chapter"][:2] for r in results if r["ok"] is None]
    print(f"gpu: {'OK' if ok else 'FAILED'} | {info.get('gpu', 'CPU dry run')} | CUDA tests "
          f"{tests['passed']} passed, {tests['failed'] + tests['errors']} failed, "
          f"{tests['skipped']} skipped | chapters {chapters_ok}/{len(results)} ok"
          + (f" ({', '.join(skipped)} skipped: see summary.json)" if skipped else "")
          + " | "
          + " | ".join(f"{s['step']} {'ok' if s['returncode'] == 0 else 'FAILED'}"
                       for s in steps[1:])
          + f" | {out / 'gpu-run.tar.gz'}", flush=True)
    return 0 if ok else 1


#: The chapters whose asserts rest on trained models, and the runs that test their margins:
#: each run is a list of (text, replacement) edits to the chapter's code cells. Chapter 7
#: trains from ``SEED``; chapter 8 trains five seeds in every run; chapter 9 trains three
#: seeds and draws its split and its sets from the seeds replaced here.
MARGIN_RUNS = {
    "07": [[("SEED = 0\n", f"SEED = {seed}\n")] for seed in (0, 1, 2)],
    "08": [[]],
    "09": [[("split = torch.Generator().manual_seed(0)",
             f"split = torch.Generator().manual_seed({draw})"),
            ("draw_sets(train_idx, 5, 4000, seed=1)",
             f"draw_sets(train_idx, 5, 4000, seed={10 * draw + 1})"),
            ("draw_sets(test_idx, 5, 2000, seed=2)",
             f"draw_sets(test_idx, 5, 2000, seed={10 * draw + 2})")]
           for draw in (0, 1, 2)],
}


def trained_outputs(cells: list[dict]) -> list[str]:
    """What a chapter printed in its cells whose output varies between machines (marked
    ``# NBVAL_IGNORE_OUTPUT``): the trained values behind its margins."""
    texts = []
    for cell in cells:
        if cell["cell_type"] == "code" and "".join(cell["source"]).startswith(
                "# NBVAL_IGNORE_OUTPUT"):
            text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))
            if text.strip():
                texts.append(text.strip())
    return texts


def margins_main(argv: list[str]) -> int:
    """``python3 dev.py margins OUTDIR [--tf32 nearest|truncate] [--chapters 07,09]``.

    Runs each chapter of :data:`MARGIN_RUNS` once per run listed there, each in a fresh
    process from an edited scratch copy (the stored notebooks are not touched), and
    reports whether every cell, so every assert, held. With ``--tf32`` a first cell enters
    :class:`sharedconv.lab.tf32.emulate_tf32` for the whole chapter, so that its float32
    convolutions round their operands as a GPU with TF32 does. Writes
    ``OUTDIR/margins.json`` (the machine, the runs, the failures with their tracebacks)
    and the executed copies; exit status 0 when every run held.
    """
    import json
    import shutil
    import time

    args = list(argv)
    values = _take_values(args, "margins", ("--tf32", "--chapters"))
    rounding, chapters = values.get("--tf32"), _chapter_list(values.get("--chapters"))
    if len(args) != 1:
        sys.exit("usage: python3 dev.py margins OUTDIR [--tf32 nearest|truncate] "
                 "[--chapters 07,09]")
    if rounding not in (None, "nearest", "truncate"):
        sys.exit(f"margins: --tf32 takes nearest or truncate, got {rounding!r}")
    if chapters and not set(chapters) <= set(MARGIN_RUNS):
        sys.exit(f"margins: --chapters takes some of {sorted(MARGIN_RUNS)}, got {chapters}")
    ensure_env()
    out = Path(args[0]).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}
    machine = subprocess.run(  # what the chapters ran on, as the benchmark describes it
        [PYTHON, "-c", "import json, torch; from sharedconv.lab.bench import machine; "
         "print(json.dumps(machine(torch.device('cuda' if torch.cuda.is_available() "
         "else 'cpu'))))"], capture_output=True, text=True, env=env, check=True).stdout
    summary = {"machine": json.loads(machine), "tf32": rounding,
               "date": time.strftime("%Y-%m-%d"), "runs": []}
    prelude = ("from sharedconv.lab.tf32 import emulate_tf32\n"
               f"_tf32 = emulate_tf32({rounding!r})\n_tf32.__enter__()\n")
    books = {p.name[:2]: p for p in toc_notebooks()}
    for chapter, runs in MARGIN_RUNS.items():
        if chapters and chapter not in chapters:
            continue
        for number, edits in enumerate(runs):
            nb = json.loads(books[chapter].read_text())
            code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
            for old, _ in edits:  # an edit that matched nothing would test nothing new
                if not any(old in "".join(c["source"]) for c in code_cells):
                    sys.exit(f"margins: chapter {chapter} no longer contains {old!r}")
            for cell in code_cells:
                code = "".join(cell["source"])
                for old, new in edits:
                    code = code.replace(old, new)
                cell["source"] = code
            if rounding:
                first = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code")
                nb["cells"].insert(first + 1, {"cell_type": "code", "metadata": {},
                                               "source": prelude, "outputs": [],
                                               "execution_count": None})
                nb["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [],
                                    "execution_count": None, "source": (
                    "assert _tf32.rounded_calls > 0, 'no operator was rounded'\n"
                    "print('operator calls rounded to TF32:', _tf32.rounded_calls)\n")})
            folder = out / f"{chapter}-{number}"
            folder.mkdir()
            copy = folder / books[chapter].name
            copy.write_text(json.dumps(nb, indent=1) + "\n")
            start = time.perf_counter()
            done = subprocess.run([PYTHON, __file__, "_notebook", copy, copy],
                                  cwd=folder, env=env, capture_output=True, text=True)
            cells = json.loads(copy.read_text())["cells"]
            failed = [c for c in cells if c.get("metadata", {}).get("gpu_run_failed")]
            run = {"chapter": chapter, "run": number, "edits": edits,
                   "ok": done.returncode == 0 and not failed,
                   "seconds": round(time.perf_counter() - start, 1)}
            run["trained"] = trained_outputs(cells)
            if failed:
                run["failed_cell"] = failed[0].get("id")
                run["traceback"] = "".join(o.get("text", "") for o in failed[0]["outputs"])
                run["traceback"] = run["traceback"][-3000:]
            elif done.returncode:
                run["stderr"] = done.stderr[-3000:]
            summary["runs"].append(run)
            print(f"[margins] chapter {chapter} run {number}: "
                  f"{'ok' if run['ok'] else 'FAILED'} in {run['seconds']} s", flush=True)
    (out / "margins.json").write_text(json.dumps(summary, indent=1) + "\n")
    ok = all(r["ok"] for r in summary["runs"])
    print(f"margins: {'OK' if ok else 'FAILED'} ({len(summary['runs'])} runs, TF32 "
          f"{rounding or 'off'}) | {out / 'margins.json'}", flush=True)
    return 0 if ok else 1


def main(argv: list[str]) -> None:
    commands = ("test", "book", "execute", "_execute", "test-with", "gpu", "margins",
                "_notebook")
    if not argv or argv[0] not in commands:
        sys.exit(__doc__)
    command, rest = argv[0], argv[1:]
    if command == "_execute":  # the second half of `execute`, inside the venv
        execute(rest)
        return
    if command == "_notebook":  # one chapter, in this process (the gpu command's runner)
        sys.exit(run_notebook(Path(rest[0]), Path(rest[1])))
    if command == "gpu":
        sys.exit(gpu_main(rest))
    if command == "margins":
        sys.exit(margins_main(rest))
    if command == "test-with":  # another environment, as it is: nothing is installed
        if not rest:
            sys.exit("usage: python3 dev.py test-with PYTHON [pytest args]")
        os.environ.setdefault("PYTHONHASHSEED", "0")
        test_with(rest[0], rest[1:])
        return
    ensure_env()
    # Deterministic kernels and hash seeds for the notebooks and their checks.
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if command == "test":
        _run(PYTHON, "-m", "pytest", *rest)
    elif command == "book":
        _run(BIN / "jupyter-book", "build", ".", "-W", "-n", "--keep-going")
        print(f"the book is in {ROOT / '_build' / 'html'}/index.html")
    else:
        _run(PYTHON, __file__, "_execute", *rest)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode)
