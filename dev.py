#!/usr/bin/env python3
"""The project's commands. Each one sets up ``.venv`` (from requirements.txt) first.

    python3 dev.py test      run every test: package, notebooks (nbval), book build
    python3 dev.py book      build the book into _build/html
    python3 dev.py execute   re-run every notebook of the book in a fresh kernel, save outputs
    python3 dev.py test-with PYTHON [pytest args]
                             run the package tests with another environment's python
                             (another torch or Python), set up by you; installs nothing

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
            "build twine 'setuptools>=77'\n"
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


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("test", "book", "execute", "_execute", "test-with"):
        sys.exit(__doc__)
    command, rest = argv[0], argv[1:]
    if command == "_execute":  # the second half of `execute`, inside the venv
        execute(rest)
        return
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
