"""Fixtures for the fault suite: a pristine tiny corpus to damage copies of, and a small disk."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from hlip_fast.data import PrepareConfig
from hlip_fast.data.synth import SIZES, synthesize


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """12 tiny studies in 3 shards of 4 (the pristine copy: tests damage copies of it)."""
    root = tmp_path_factory.mktemp("faults") / "shards"
    synthesize(root, replace(SIZES["tiny"], num_studies=12), PrepareConfig(studies_per_shard=4))
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs folder of ``size`` bytes (a full disk on demand): ``mount(size)``, ``resize(size)``.
    Skipped where this process may not mount (not root, no CAP_SYS_ADMIN)."""
    folder = tmp_path / "disk"
    folder.mkdir()

    class Disk:
        path = folder

        @staticmethod
        def mount(size: int) -> Path:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                pytest.skip(f"cannot mount a small tmpfs here to fill a disk: {done.stderr.strip()}")
            return folder

        @staticmethod
        def resize(size: int) -> None:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)

    yield Disk
    subprocess.run(["umount", str(folder)], capture_output=True)
