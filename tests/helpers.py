"""Random ragged inputs for the tests, and a job runner whose worker dies."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch

from hlip_fast import Layout


def random_layout(
    rng: np.random.Generator,
    max_studies: int = 4,
    max_scans: int = 3,
    max_depth: int = 4,
    max_side: int = 4,
    slice_depth: int | None = None,
) -> Layout:
    """A ragged layout: every study its own number of scans, every scan its own grid."""
    scans = rng.integers(1, max_scans + 1, size=rng.integers(1, max_studies + 1))
    grids = np.stack(
        [
            rng.integers(1, max_depth + 1, size=scans.sum()),
            rng.integers(1, max_side + 1, size=scans.sum()),
            rng.integers(1, max_side + 1, size=scans.sum()),
        ],
        axis=1,
    )
    depth = int(rng.integers(1, 3)) if slice_depth is None else slice_depth
    return Layout.build(grids, scans.tolist(), slice_depth=depth)


def random_rows(
    layout: Layout,
    level: str,
    class_tokens: bool | str,
    heads: int = 2,
    dim: int = 16,
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
    prefix: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v with a row per token, plus with ``class_tokens`` ``prefix`` per segment of
    ``level`` (or, when it names a finer level, of that level: spare rows follow ``level``'s)."""
    rows = layout.num_rows(level, class_tokens, prefix)
    return tuple(torch.randn(rows, heads, dim, dtype=dtype).requires_grad_(requires_grad) for _ in range(3))


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


def sleep_then_echo(job: int) -> int:
    """A pool job that takes a minute (a worker busy when its parent is killed)."""
    import time

    time.sleep(60)
    return job
