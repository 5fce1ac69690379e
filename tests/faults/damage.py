"""Damage on demand: byte flips, truncations, a user without rights, worker processes that die."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


class DiesOn:
    """Wraps a prepare job runner (picklable, for spawned pool workers): the worker running job
    ``target`` kills itself with SIGKILL, as the out-of-memory killer would; with a ``marker``
    file only the first time."""

    def __init__(self, run, target, marker: Path | None = None):
        self.run, self.target, self.marker = run, target, marker

    def __call__(self, job):
        if job == self.target and (self.marker is None or not self.marker.exists()):
            if self.marker is not None:
                self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.run(job)
