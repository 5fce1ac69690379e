"""Helpers shared by the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# Releases that can move a figure: a result file names them, so that a drift can be told apart.
PACKAGES = ("transformers", "tokenizers", "timm", "numpy", "triton")


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call, per name, with the calls taken in turn (each repeat runs every ``fn``
    once, in reverse order every other repeat), so that a machine whose speed drifts during the
    run slows every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        measure(fn, 0, warmup)
    for repeat in range(repeats):
        names = list(fns) if repeat % 2 == 0 else list(reversed(fns))
        for name in names:
            times[name] += measure(fns[name], 1, warmup=0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, object]:
    """What ran the benchmark: enough to tell two result files apart."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {
        "date": dt.date.today().isoformat(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": commit,
        "packages": {name: _version(name) for name in PACKAGES},
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def write_results(name: str, payload: dict[str, object]) -> Path:
    """Write ``payload`` plus the command and machine to ``bench/results/<name>_<date>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    payload = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": info, **payload}
    path = RESULTS / f"{name}_{info['date']}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
