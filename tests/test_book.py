"""Guards for the book: table of contents, stored outputs, Colab cell, nbval, build."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from html import unescape as html_unescape
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


#: the width of a figure on the page at 100 % in a 1280 px window (sphinx-book-theme,
#: measured in Chromium: 660 px; one more is rounding)
PAGE_PX = 661
#: words that speak of how the book was made, not to its reader (outside code spans)
INTERNAL_WORDS = (r"\bissues?\b", r"\bgoals?\b", r"left for later", r"\bthis run\b",
                  r"\bin this session\b", r"\bnow run\b")


def png_width(data: str | list[str]) -> int:
    """Pixel width of a base64 PNG as stored in a notebook (from its IHDR chunk)."""
    raw = base64.b64decode("".join(data) if isinstance(data, list) else data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(raw[16:20], "big")


def _output_text(out: dict) -> str:
    if out["output_type"] == "stream":
        text = out.get("text", "")
    else:
        text = out.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


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
    # the page column: every stored line of code and of text output fits 88 characters
    for cell in code:
        head = _source(cell).strip().splitlines()[0][:60]
        lines = _source(cell).splitlines()
        for out in cell.get("outputs", []):
            text = out.get("text") if out["output_type"] == "stream" else (
                out.get("data", {}).get("text/plain") if "image/png" not in out.get(
                    "data", {}) else None)
            if text:
                lines += ("".join(text) if isinstance(text, list) else text).splitlines()
        long = [line for line in lines if len(line) > 88]
        if long:
            problems.append(f"cell {head!r} has {len(long)} line(s) over 88 characters: "
                            f"{long[0][:60]!r}...")
    # figures: numbered and captioned (myst-nb's figure metadata), no wider than the page
    for cell in code:
        head = _source(cell).strip().splitlines()[0][:60]
        images = [o["data"]["image/png"] for o in cell.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        if not images:
            continue
        figure = cell.get("metadata", {}).get("mystnb", {}).get("figure", {})
        if not str(figure.get("caption", "")).strip() or not figure.get("name"):
            problems.append(f"figure cell {head!r} has no caption or name (mystnb.figure)")
        for png in images:
            width = png_width(png)
            if width > PAGE_PX:
                problems.append(f"figure cell {head!r} is {width} px wide, the page shows "
                                f"{PAGE_PX}: its text would shrink")
    # what the reader sees: headings without TeX (the navigation shows it raw), equation
    # labels never printed or written in code (the page shows numbers), no word about how
    # the book was made
    labels = set(re.findall(r"\$\$[ \t]*\(([\w-]+)\)", "".join(
        _source(c) for c in nb["cells"] if c["cell_type"] == "markdown")))
    for cell in nb["cells"]:
        text = _source(cell)
        head = text.strip().splitlines()[0][:60] if text.strip() else ""
        if cell["cell_type"] == "markdown":
            for line in text.splitlines():
                if line.startswith("#") and "$" in line:
                    problems.append(f"heading {line!r} holds TeX")
            prose = re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", "", text))  # no code, URLs
            for word in INTERNAL_WORDS:
                if re.search(word, prose, flags=re.IGNORECASE):
                    problems.append(f"markdown {head!r} speaks of how the book was made: "
                                    f"{word!r}")
        elif cell["cell_type"] == "code":
            shown = text + "".join(_output_text(o) for o in cell.get("outputs", []))
            for label in labels:
                if re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", shown):
                    problems.append(f"cell {head!r} shows the equation label {label!r}")
    # exercise solutions: hidden, input and output, until the reader opens them
    after_exercises = False
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown" and "## Exercises" in _source(cell):
            after_exercises = True
        elif after_exercises and cell["cell_type"] == "code" and _source(cell).strip():
            if "hide-cell" not in cell.get("metadata", {}).get("tags", []):
                head = _source(cell).strip().splitlines()[0][:60]
                problems.append(f"solution cell {head!r} is not tagged hide-cell")
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
    assert f'"git+{url}"' in src, "installs from the repository named in _config.yml"
    assert "sharedconv[diagrams] @ {repo}" in src, "with what the chapters need"
    assert 'find_spec("sharedconv") is None' in src, "installs only when not importable"
    assert "torch=={version('torch')}" in src, "keeps the runtime's torch"
    assert src.count("print(") <= 1, "prints at most one line"
    assert first["outputs"] == [], "prints nothing when sharedconv is installed"
    assert "hide-input" in first["metadata"].get("tags", []), "folded on the page"
    # a chapter that reads its data with aeon (chapter 8) installs that too when missing
    later = "".join(_source(c) for c in nb["cells"] if c["cell_type"] == "code" and c is not first)
    if re.search(r"^\s*(from|import) aeon\b", later, flags=re.M):
        assert 'find_spec("aeon") is None' in src, "installs aeon only when not importable"
    if re.search(r"^\s*(from|import) sklearn\b", later, flags=re.M):
        assert 'find_spec("sklearn") is None' in src, "installs scikit-learn when missing"


def _run_setup_cell(src: str, tmp_path: Path, absent: set[str]) -> tuple[list, str]:
    """Run a Colab setup cell with the modules in ``absent`` missing and pip replaced by a
    recorder: the arguments it would give pip (None: no call) and what it prints."""
    recorded = tmp_path / "pip-args.json"
    fake = (
        "import importlib.util, json, subprocess, sys\n"
        "real = importlib.util.find_spec\n"
        f"importlib.util.find_spec = lambda n, *a: None if n in {sorted(absent)!r} "
        "else real(n, *a)\n"
        f"subprocess.run = lambda args, check: open({str(recorded)!r}, 'w').write("
        "json.dumps(args))\n"
    )
    out = subprocess.run([sys.executable, "-c", fake + src], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    args = json.loads(recorded.read_text()) if recorded.exists() else None
    return args, out.stdout.strip()


def test_colab_setup_installs_aeon_where_a_chapter_needs_it(tmp_path):
    """Chapter 8's setup cell on a runtime without aeon (sharedconv present, or not):
    one pip call, aeon in it, the runtime's torch kept, one line printed."""
    from importlib.metadata import version

    chapter = next(p for p in NOTEBOOKS if p.name == "08_real_data.ipynb")
    nb = json.loads(chapter.read_text())
    src = _source(next(c for c in nb["cells"] if c["cell_type"] == "code"))
    url = CONFIG["repository"]["url"].rstrip("/")
    args, printed = _run_setup_cell(src, tmp_path, {"aeon"})
    assert args[1:4] == ["-m", "pip", "install"] and f"torch=={version('torch')}" in args
    assert any(a.startswith("aeon") for a in args)
    assert not any(a.startswith("sharedconv") for a in args)
    assert printed == "installed aeon>=1.0"
    args, printed = _run_setup_cell(src, tmp_path, {"aeon", "sharedconv"})
    assert f"sharedconv[diagrams] @ git+{url}" in args and "aeon>=1.0" in args
    assert printed.count("\n") == 0 and "sharedconv[diagrams]" in printed
    (tmp_path / "pip-args.json").unlink()
    args, printed = _run_setup_cell(src, tmp_path, set())
    assert args is None and printed == "", "does nothing where both are installed"


@pytest.mark.parametrize("distribution,runtime", [
    ("2.14.1", "2.14.1+cu130"),        # PyPI's CUDA wheel: no label on the distribution
    ("2.11.0+cu128", "2.11.0+cu128"),  # Colab's GPU runtime, from PyTorch's index
    ("2.11.0+cpu", "2.11.0+cpu"),      # Colab's CPU runtime
    ("2.13.0", "2.13.0"),              # a plain build
])
def test_colab_setup_keeps_the_runtime_torch(distribution, runtime, tmp_path):
    """Run the setup cell with sharedconv missing, pip replaced by a recorder and torch's
    installed distribution reporting ``distribution``: it asks for the package from the
    repository and pins torch to exactly the build installed, whatever its local label,
    so pip keeps it (the pin is made from the distribution's version, which is what pip
    compares: ``torch.__version__``, ``runtime`` here, may carry a label the distribution
    lacks, and a pin made from it would ask PyPI for a build it does not have)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    nb = json.loads(NOTEBOOKS[0].read_text())
    src = _source(next(c for c in nb["cells"] if c["cell_type"] == "code"))
    recorded = tmp_path / "pip-args.json"
    fake = (
        "import importlib.metadata, importlib.util, json, subprocess, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'sharedconv' else real(n, *a)\n"
        f"importlib.metadata.version = lambda name: {distribution!r} if name == 'torch' "
        "else None\n"
        f"subprocess.run = lambda args, check: open({str(recorded)!r}, 'w').write("
        "json.dumps(args))\n"
    )
    out = subprocess.run([sys.executable, "-c", fake + src], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    args = json.loads(recorded.read_text())
    url = CONFIG["repository"]["url"].rstrip("/")
    assert args[1:4] == ["-m", "pip", "install"]
    assert f"sharedconv[diagrams] @ git+{url}" in args
    (pin,) = [a for a in args if a.startswith("torch")]
    assert pin == f"torch=={distribution}"
    wanted = SpecifierSet(pin.removeprefix("torch"))
    # satisfied by what is installed, in both spellings: nothing for pip to replace
    assert Version(distribution) in wanted and Version(runtime) in wanted
    if "+" in runtime and "+" not in distribution:  # the pin a __version__ would make
        assert Version(distribution) not in SpecifierSet(f"=={runtime}")
    assert out.stdout.strip() == f"installed sharedconv from {url}"


def test_every_chapter_asks_colab_for_a_gpu():
    """Colab opens a notebook on the runtime its metadata asks for."""
    for path in NOTEBOOKS:
        meta = json.loads(path.read_text())["metadata"]
        assert meta.get("accelerator") == "GPU", path.name
        assert meta.get("colab", {}).get("gpuType"), path.name


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
    wide = copy.deepcopy(nb)
    next(c for c in wide["cells"] if c["cell_type"] == "code")["source"] += "\n# " + "x" * 90
    assert any("over 88 characters" in p for p in hygiene_problems(wide))
    shown = copy.deepcopy(nb)
    solution = [c for c in shown["cells"] if "hide-cell" in c.get("metadata", {}).get(
        "tags", [])][0]
    solution["metadata"]["tags"] = ["hide-input"]
    assert any("not tagged hide-cell" in p for p in hygiene_problems(shown))


def test_hygiene_check_catches_what_the_reader_should_not_see():
    nb = json.loads(NOTEBOOKS[1].read_text())  # a chapter with figures and equations
    assert any("image/png" in o.get("data", {}) for c in nb["cells"]
               for o in c.get("outputs", []))
    assert not hygiene_problems(nb)
    bad = copy.deepcopy(nb)
    figure = next(c for c in bad["cells"] if any(
        "image/png" in o.get("data", {}) for o in c.get("outputs", [])))
    figure["metadata"].pop("mystnb", None)
    wide_png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(8) + (2000).to_bytes(4, "big")
                                + bytes(8)).decode()
    figure["outputs"].append({"output_type": "display_data", "metadata": {},
                              "data": {"image/png": wide_png, "text/plain": "<Figure>"}})
    markdown = next(c for c in bad["cells"] if c["cell_type"] == "markdown")
    markdown["source"] = "## One bank for $N$ streams\n\nAs the issue asked, this run shows it."
    label = re.search(r"\$\$[ \t]*\(([\w-]+)\)", "".join(
        _source(c) for c in nb["cells"] if c["cell_type"] == "markdown")).group(1)
    code = [c for c in bad["cells"] if c["cell_type"] == "code"][2]
    code["source"] = _source(code) + f"\n# as in ({label})"
    problems = "\n".join(hygiene_problems(bad))
    assert "has no caption or name" in problems
    assert "2000 px wide" in problems
    assert "holds TeX" in problems
    assert "bissues" in problems and "this run" in problems
    assert f"shows the equation label {label!r}" in problems


def _nbval(path: Path, workdir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """nbval (strict: every stored output compared) on one notebook, in ``workdir``."""
    config = workdir.parent / f"{workdir.name}-pytest.ini"  # outside the notebook's folder
    config.write_text("[pytest]\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(config), "--rootdir", str(workdir),
         "-p", "no:cacheprovider", "-q", "--nbval", "--nbval-current-env",
         "--nbval-sanitize-with", str(ROOT / "book" / "sanitize.cfg"), str(path)],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})},
    )


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory) -> Path:
    """sharedconv as ``pip install`` lays it out: the wheel of this tree, unpacked.

    A notebook run with this folder first on ``PYTHONPATH`` imports the package from it,
    with exactly the files the wheel ships (the stored benchmark runs included), instead
    of the repository's ``src``.
    """
    # build from a copy of the sources, so that setuptools' build folder stays out of the tree
    tree = tmp_path_factory.mktemp("source")
    shutil.copytree(ROOT / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "LICENSE-BOOK"):
        shutil.copy(ROOT / name, tree / name)
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(tree)],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("sharedconv-*.whl")
    site = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_alone_as_on_colab(path, tmp_path, installed_package):
    """The chapter as a reader gets it from the launch button: the notebook alone in an
    empty folder, the package from its installed location, a fresh kernel. Every cell
    runs, and nbval compares each cell's output with the stored one."""
    alone = tmp_path / "content"
    alone.mkdir()
    shutil.copy(path, alone / path.name)
    env = {"PYTHONPATH": str(installed_package)}
    where = subprocess.run(
        [sys.executable, "-c", "import sharedconv; print(sharedconv.__file__)"],
        cwd=alone, capture_output=True, text=True, check=True,
        env={**os.environ, **env}).stdout.strip()
    assert where.startswith(str(installed_package)), where
    result = _nbval(alone / path.name, alone, env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


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
    work = tmp_path / "work"
    work.mkdir()
    altered = work / "altered.ipynb"
    altered.write_text(json.dumps(nb))
    result = _nbval(altered, work)
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
    # MathJax shows "\_" inside \text{} literally: names in formulas go in \mathrm{}
    assert not re.search(r"\\text\{[^}]*\\_", api)
    dead = dead_links(html)
    assert not dead, dead[:10]
    for page in html.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for title in re.findall(r"<title>(.*?)</title>", text, flags=re.S):
            assert "\\(" not in title and "$" not in title, (page, title)
        for nav in re.findall(r"<nav\b.*?</nav>", text, flags=re.S):
            assert "\\(" not in nav, (page, nav[:200])  # raw TeX in the navigation
    # the code column holds the notebooks' 88 characters (see _static/custom.css)
    assert "custom.css" in (html / "book" / "01_quick_tour.html").read_text()


def dead_links(html: Path) -> list[str]:
    """Links inside the built book whose page or anchor does not exist."""
    ids: dict[Path, set[str]] = {}
    dead = []
    for page in html.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for target, anchor in re.findall(r'href="([^"#:?]*\.html)?#([^"]+)"', text):
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                dead.append(f"{page.relative_to(html)} -> {target}")
                continue
            if path not in ids:
                ids[path] = set(re.findall(r'\bid="([^"]+)"', path.read_text(encoding="utf-8")))
            if html_unescape(anchor) not in ids[path]:
                dead.append(f"{page.relative_to(html)} -> {target}#{anchor}")
    return dead
