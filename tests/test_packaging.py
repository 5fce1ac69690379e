"""``hlip_fast`` is the only name the repository root can import, so that nothing run from the
root (``python -m pytest``, ``python -m hlip_fast.train.demo``) shadows an installed
distribution: a top-level ``kernels/`` folder here once hid Hugging Face's ``kernels``, which
transformers 5 imports when it builds a model. Regular and editable installs hold one package."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "hlip_fast"]
PROBE = "import hlip_fast, hlip_fast.kernels, hlip_fast.train; print(hlip_fast.kernels.__file__)"
OWN_DISTRIBUTIONS = {"hlip-fast", "hlip_fast"}
MODULE_SUFFIXES = tuple(importlib.machinery.all_suffixes())  # .py, .pyc, extension modules


def importable_names(root: Path) -> set[str]:
    """Top-level names a Python started in ``root`` imports from ``root`` itself: regular packages
    (folders with ``__init__.py``) and modules. A folder without ``__init__.py`` (``bench/``,
    ``tests/``) is only a namespace portion, which any installed package of its name outranks."""
    names = set()
    for entry in root.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file() and entry.name.isidentifier():
            names.add(entry.name)
        elif entry.is_file() and entry.name.endswith(MODULE_SUFFIXES):
            stem = entry.name.split(".", 1)[0]
            if stem.isidentifier():
                names.add(stem)
    return names


def shadowed(root: Path, distributions: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each name importable from ``root`` that another installed distribution also provides,
    with those distributions."""
    found = {}
    for name in sorted(importable_names(root)):
        others = sorted(set(distributions.get(name, ())) - OWN_DISTRIBUTIONS)
        if others:
            found[name] = others
    return found


def test_the_root_imports_only_hlip_fast():
    assert importable_names(REPO) == {"hlip_fast"}


MAX_MODULE_LINES = 400  # the README's promise: small modules, one concern each


def test_no_module_of_the_package_is_over_400_lines():
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "hlip_fast").rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


# The folders the README's commands put first on ``sys.path``: the root (``python -m``), the test
# folders (pytest prepends each folder of test files without ``__init__.py``) and ``bench/``
# (``python bench/<script>.py``).
FIRST_ON_PATH = {
    "root": REPO,
    "tests": REPO / "tests",
    "faults": REPO / "tests" / "faults",
    "bench": REPO / "bench",
}


@pytest.mark.parametrize("folder", FIRST_ON_PATH.values(), ids=FIRST_ON_PATH.keys())
def test_no_name_first_on_the_path_shadows_an_installed_distribution(folder):
    assert shadowed(folder, packages_distributions()) == {}


def test_the_shadow_check_finds_a_package_or_module_but_not_a_namespace_folder(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "train.py").write_text("")
    (tmp_path / "bench").mkdir()  # no __init__.py: an installed ``bench`` would win
    (tmp_path / "bench" / "x.py").write_text("")
    installed = {"kernels": ["kernels"], "train": ["train-lib"], "bench": ["bench"]}
    installed["hlip_fast"] = ["hlip-fast"]  # this project's own
    assert importable_names(tmp_path) == {"kernels", "train"}
    assert shadowed(tmp_path, installed) == {"kernels": ["kernels"], "train": ["train-lib"]}


def test_transformers_builds_and_loads_a_model_from_the_repository_root(tmp_path):
    """The README's commands run Python from the root; so does this (``-c`` puts the current folder
    first on ``sys.path`` as ``-m`` does). transformers imports its optional dependencies (such as
    ``kernels``) while building and loading models."""
    script = (
        "import sys, torch\n"
        "from hlip_fast.text import TextConfig, TextTower, build_tiny_text_model\n"
        "reports = ['No nodule. Small left effusion.', 'Consolidation in the right lower lobe.']\n"
        "path = build_tiny_text_model(sys.argv[1], reports, mlm_steps=1)\n"
        "tower = TextTower(TextConfig(str(path)), 8).eval()\n"
        "with torch.no_grad():\n"
        "    out = tower(tower.tokenize(reports))\n"
        "assert out.shape == (2, 8) and torch.isfinite(out).all(), out\n"
        "print('built from', sys.path[0] or '<current folder>')\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "bert")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built from <current folder>" in result.stdout


def run_probe(cwd: Path, **env: str) -> Path:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(result.stdout.strip())


def test_regular_install_holds_only_the_hlip_fast_package(tmp_path):
    source, site = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for part in SOURCES:  # build from a copy so that no build files land in the checkout
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / part, source / part)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    assert (site / "hlip_fast" / "kernels" / "__init__.py").is_file()
    assert (site / "hlip_fast" / "train" / "__init__.py").is_file()
    assert (site / "hlip_fast" / "evaluation" / "prompts" / "synth_ct.yaml").is_file()  # package data
    top_level = {entry.name for entry in site.iterdir() if not entry.name.endswith(".dist-info")}
    assert top_level - {"bin"} == {"hlip_fast"}
    assert run_probe(tmp_path, PYTHONPATH=str(site)) == site / "hlip_fast" / "kernels" / "__init__.py"


def test_editable_install_imports_the_source_folders(tmp_path):
    query = (
        "from importlib.metadata import distribution as d; print(d('hlip-fast').read_text('direct_url.json'))"
    )
    installed = subprocess.run([sys.executable, "-c", query], cwd=tmp_path, capture_output=True, text=True)
    if '"editable": true' not in installed.stdout:
        pytest.skip("hlip-fast is not installed in editable mode")
    assert run_probe(tmp_path) == REPO / "hlip_fast" / "kernels" / "__init__.py"
