"""kernels/ and train/ install under the hlip_fast namespace, for regular and editable installs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "hlip_fast", "kernels", "train"]
PROBE = "import hlip_fast, hlip_fast.kernels, hlip_fast.train; print(hlip_fast.kernels.__file__)"


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


def test_regular_install_keeps_kernels_and_train_inside_the_package(tmp_path):
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
    assert not (site / "kernels").exists() and not (site / "train").exists()
    assert run_probe(tmp_path, PYTHONPATH=str(site)) == site / "hlip_fast" / "kernels" / "__init__.py"


def test_editable_install_maps_kernels_to_the_source_folder(tmp_path):
    query = (
        "from importlib.metadata import distribution as d; print(d('hlip-fast').read_text('direct_url.json'))"
    )
    installed = subprocess.run([sys.executable, "-c", query], cwd=tmp_path, capture_output=True, text=True)
    if '"editable": true' not in installed.stdout:
        pytest.skip("hlip-fast is not installed in editable mode")
    assert run_probe(tmp_path) == REPO / "kernels" / "__init__.py"
