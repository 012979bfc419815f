#!/usr/bin/env python3
"""The project's commands. Each one sets up ``.venv`` (from requirements.txt) first.

    python3 dev.py test      run every test: package, notebooks (nbval), book build
    python3 dev.py book      build the book into _build/html
    python3 dev.py execute   re-run every notebook of the book in a fresh kernel, save outputs

Extra arguments after ``test`` go to pytest (``python3 dev.py test -k oracle``); after
``execute``, they name the notebooks to run (default: every notebook in _toc.yml).
Needs only Python 3.10+ (and a network connection, or a local wheel cache, for pip).
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


def ensure_env() -> None:
    """Create .venv and install requirements.txt, again whenever it or pyproject changes."""
    if sys.version_info < (3, 10):  # noqa: UP036 (dev.py may be run by an older python3)
        sys.exit(f"Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
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


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("test", "book", "execute", "_execute"):
        sys.exit(__doc__)
    command, rest = argv[0], argv[1:]
    if command == "_execute":  # the second half of `execute`, inside the venv
        execute(rest)
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
