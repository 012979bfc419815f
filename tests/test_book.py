"""Guards for the book: table of contents, stored outputs, Colab cell, nbval, build."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def _toc_files() -> list[str]:
    files = [TOC["root"]]
    stack = list(TOC.get("chapters", [])) + [
        c for part in TOC.get("parts", []) for c in part.get("chapters", [])
    ]
    while stack:
        entry = stack.pop(0)
        if "file" in entry:
            files.append(entry["file"])
        stack.extend(entry.get("sections", []))
    return files


def _resolve(entry: str) -> Path | None:
    for suffix in (".ipynb", ".md"):
        if (ROOT / f"{entry}{suffix}").exists():
            return ROOT / f"{entry}{suffix}"
    return None


NOTEBOOKS = [p for p in map(_resolve, _toc_files()) if p is not None and p.suffix == ".ipynb"]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def hygiene_problems(nb: dict) -> list[str]:
    """Why nbval's comparison of this notebook would be incomplete or noisy (empty: fine)."""
    problems = []
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and _source(c).strip()]
    if not code:
        problems.append("no code cells")
    for expected, cell in enumerate(code, start=1):
        n = cell.get("execution_count")
        head = _source(cell).strip().splitlines()[0][:60]
        if n is None:
            problems.append(f"cell {head!r} is stored unexecuted")
        elif n != expected:
            problems.append(f"cell {head!r} has execution_count {n}, expected {expected}")
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                problems.append(f"cell {head!r} stores an error")
            if out["output_type"] == "stream" and out.get("name") == "stderr":
                problems.append(f"cell {head!r} writes to stderr: {''.join(out['text'])[:80]!r}")
            if "image/svg+xml" in out.get("data", {}):
                problems.append(f"cell {head!r} stores an SVG figure (use PNG)")
        if _source(cell).rstrip().endswith(";") and "NBVAL_IGNORE_OUTPUT" not in _source(cell):
            problems.append(f"cell {head!r} ends with ';'")
    if not any(cell.get("outputs") for cell in code):
        problems.append("no code cell has an output: nbval would compare nothing")
    return problems


def test_toc_entries_exist():
    missing = [entry for entry in _toc_files() if _resolve(entry) is None]
    assert missing == []
    assert TOC["root"] == "book/intro"
    assert NOTEBOOKS, "the book has no notebooks"


def test_every_notebook_in_book_is_in_the_toc():
    on_disk = {p.resolve() for p in (ROOT / "book").glob("*.ipynb")}
    assert on_disk == {p.resolve() for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_executed_and_clean(path):
    nb = json.loads(path.read_text())
    assert hygiene_problems(nb) == []
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_first_code_cell_is_the_colab_setup(path):
    nb = json.loads(path.read_text())
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    src = _source(first)
    url = CONFIG["repository"]["url"].rstrip("/")
    assert f"git+{url}" in src, "installs from the repository named in _config.yml"
    assert 'find_spec("sharedconv") is None' in src, "installs only when not importable"
    assert first["outputs"] == [], "prints nothing when sharedconv is installed"


def test_config_is_jupyter_book_1_with_stored_outputs():
    assert CONFIG["execute"]["execute_notebooks"] == "off"
    assert CONFIG["repository"]["branch"] == "main"
    assert CONFIG["launch_buttons"]["colab_url"].startswith("https://colab")
    extensions = CONFIG["sphinx"]["extra_extensions"]
    for ext in ("sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"):
        assert ext in extensions
    assert "amsmath" in CONFIG["parse"]["myst_enable_extensions"]
    assert (ROOT / CONFIG["bibtex_bibfiles"][0]).exists()


def test_hygiene_check_catches_a_notebook_saved_without_outputs():
    """The guard above is what makes nbval meaningful: it must reject a stripped notebook."""
    nb = json.loads(NOTEBOOKS[0].read_text())
    stripped = copy.deepcopy(nb)
    for cell in stripped["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    problems = hygiene_problems(stripped)
    assert any("stored unexecuted" in p for p in problems)
    assert any("nbval would compare nothing" in p for p in problems)
    reordered = copy.deepcopy(nb)
    code = [c for c in reordered["cells"] if c["cell_type"] == "code"]
    code[1]["execution_count"] = 7
    assert any("expected 2" in p for p in hygiene_problems(reordered))


def _nbval(path: Path, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval",
         "--nbval-current-env", "--nbval-sanitize-with", str(ROOT / "book" / "sanitize.cfg"),
         str(path)],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


@pytest.mark.slow
def test_nbval_compares_real_outputs(tmp_path):
    """A notebook whose stored output was altered fails nbval: the comparison is real."""
    nb = json.loads(NOTEBOOKS[0].read_text())
    for cell in nb["cells"]:
        streams = [o for o in cell.get("outputs", []) if o["output_type"] == "stream"]
        if streams:
            streams[0]["text"] = "a stored output that the code does not print\n"
            break
    else:
        pytest.fail("no stream output to alter")
    (tmp_path / "pyproject.toml").write_text("")  # keep the project's pytest options out
    altered = tmp_path / "altered.ipynb"
    altered.write_text(json.dumps(nb))
    result = _nbval(altered, tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 failed" in result.stdout


@pytest.mark.slow
def test_book_builds_without_warnings(tmp_path):
    result = subprocess.run(
        [Path(sys.executable).parent / "jupyter-book", "build", str(ROOT), "--path-output",
         str(tmp_path), "-W", "-n", "--keep-going"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "WARNING" not in result.stdout + result.stderr
    html = tmp_path / "_build" / "html"
    for entry in _toc_files():
        assert (html / f"{entry}.html").exists(), entry
    api = (html / "book" / "api.html").read_text()
    for name in ("SharedConv1d", "SharedConv2d", "SharedConv3d", "shared_conv", "to_conv"):
        assert name in api, f"autodoc did not render {name}"
