"""Damage on demand: byte flips, truncations, a user without rights (dying workers: ``helpers.DiesOn``)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of ``path`` with ``mask``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def copy_corpus(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@contextlib.contextmanager
def without_rights():
    """Run the block as a user without rights to root's files (as root: effective uid nobody)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
