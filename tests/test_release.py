"""The release: an sdist and a wheel that `twine check` accepts, and a wheel that installs.

`python -m build` runs on a copy of the sources (so that no build folder lands in the tree)
without build isolation, with the setuptools of the test environment, so the test needs no
network. The wheel is then installed, without dependencies, into a fresh virtual
environment that sees torch from the test environment and nothing else of it.
"""

from __future__ import annotations

import email
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import sharedconv

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("src", "pyproject.toml", "README.md", "LICENSE", "LICENSE-BOOK")


def _build_requirement_met() -> tuple[bool, str]:
    """Whether this environment's setuptools meets pyproject's build requirement: the
    release is built without isolation, with what is installed (Colab's runtime, for one,
    has setuptools 75, where a pip install builds in an isolated environment instead)."""
    import re
    from importlib.metadata import version

    from packaging.version import Version

    wanted = re.search(r'"setuptools>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    have = version("setuptools")
    assert wanted, "pyproject.toml names its setuptools"
    return Version(have) >= Version(wanted.group(1)), (
        f"building without isolation needs setuptools>={wanted.group(1)}, this environment "
        f"has {have}")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    met, why = _build_requirement_met()
    if not met:
        pytest.skip(why)
    tree = tmp_path_factory.mktemp("tree")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, tree / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
                    "--outdir", str(out), str(tree)], check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_twine_accepts_the_sdist_and_the_wheel(dist):
    files = sorted(dist.iterdir())
    assert sorted(f.suffix for f in files) == [".gz", ".whl"], files
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2


@pytest.mark.slow
def test_the_wheel_holds_the_package_its_data_and_licences_not_the_tests(dist):
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert f"sharedconv-{sharedconv.__version__}.dist-info/licenses/LICENSE" in names
    assert f"sharedconv-{sharedconv.__version__}.dist-info/licenses/LICENSE-BOOK" in names
    assert "sharedconv/py.typed" in names
    stored = {n for n in names if n.startswith("sharedconv/lab/results/") and n.endswith(".json")}
    results = ROOT / "src/sharedconv/lab/results"
    on_disk = {f"sharedconv/lab/results/{p.relative_to(results).as_posix()}"
               for p in results.rglob("*.json")}
    assert stored == on_disk and stored  # the runs the chapters read at run time
    modules = {n for n in names if n.endswith(".py")}
    src = ROOT / "src"
    assert {p.relative_to(src).as_posix() for p in (src / "sharedconv").rglob("*.py")} == modules
    assert "sharedconv/lab/__init__.py" in modules  # the instruments' subpackage ships too
    assert not any(n.startswith(("tests/", "book/")) for n in names)
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(
        f"sharedconv-{sharedconv.__version__}.dist-info/METADATA"))
    assert meta["Version"] == sharedconv.__version__  # the one place the version is written
    assert meta["License-Expression"] == "MIT AND CC-BY-4.0"
    assert meta["Requires-Python"] == ">=3.10"


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_environment_and_imports(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    python = env / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    # torch from this environment (a path entry, which does not run its .pth files, so the
    # editable sharedconv of this environment stays invisible)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    torch_dir = Path(sysconfig.get_paths()["purelib"])
    (Path(site.stdout.strip()) / "torch-from-tests.pth").write_text(f"{torch_dir}\n")
    probe = (
        "import json, importlib.metadata, torch, sharedconv\n"
        "from sharedconv.lab import bench, roofline\n"
        "layer = sharedconv.SharedConv1d(4, 4 * 3, 3, groups=4)\n"
        "y = layer(torch.randn(2, 4, 10))\n"
        "print(json.dumps({'file': sharedconv.__file__, 'version': sharedconv.__version__,\n"
        "  'dist': importlib.metadata.version('sharedconv'), 'shape': list(y.shape),\n"
        "  'runs': len(bench.stored_runs()), 'rooflines': len(roofline.stored_runs())}))\n"
    )
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout)
    assert Path(seen["file"]).is_relative_to(env), seen["file"]  # the wheel's copy
    assert seen["version"] == seen["dist"] == sharedconv.__version__
    assert seen["shape"] == [2, 12, 8]  # no padding: 10 - 3 + 1
    assert seen["runs"] == len(list((ROOT / "src/sharedconv/lab/results").glob("*.json")))
    rooflines = list((ROOT / "src/sharedconv/lab/results/roofline").glob("*.json"))
    assert seen["rooflines"] == len(rooflines) > 0


def test_the_layers_never_import_the_instruments():
    """``import sharedconv`` and a call of every layer load nothing of ``sharedconv.lab``."""
    probe = (
        "import sys, torch, sharedconv\n"
        "x = torch.randn(2, 4, 10)\n"
        "sharedconv.SharedConv1d(4, 8, 3, groups=4)(x)\n"
        "sharedconv.SharedConvTranspose1d(4, 8, 3, groups=4)(x)\n"
        "sharedconv.MaskedSharedConv1d(2, 3, 3)(torch.randn(2, 2, 10), torch.ones(2, 2, 10))\n"
        "with sharedconv.autotune():\n"
        "    sharedconv.SharedConv1d(4, 8, 3, groups=4)(x)\n"
        "print(sorted(m for m in sys.modules if m.startswith('sharedconv.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = eval(result.stdout)
    assert loaded and not [m for m in loaded if m.startswith("sharedconv.lab")], loaded
    top = ROOT / "src" / "sharedconv"
    names_lab = re.compile(r"^\s*(from\s+(\.+|sharedconv\.)lab\b|from\s+(\.|sharedconv)\s+"
                           r"import\s.*\blab\b|import\s+sharedconv\.lab\b)", re.MULTILINE)
    for path in top.glob("*.py"):  # and no layer module names it, even lazily
        assert not names_lab.search(path.read_text()), path
    assert names_lab.search("    from .lab import bench") and names_lab.search(
        "from . import functional, lab")
