"""Finding recorded results whose names carry a triton version (``KIND_triton-<version>_<date>.json``):
the build report and the candidate matrix are made once per triton version."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def newest_per_triton(kind: str) -> dict[str, Path]:
    """The newest ``bench/results/KIND_triton-*`` file of each triton version, by version."""
    newest: dict[str, Path] = {}
    for file in sorted(RESULTS.glob(f"{kind}_triton-*_*.json")):  # ISO dates sort in time order
        newest[file.name.removeprefix(f"{kind}_triton-").rsplit("_", 1)[0]] = file
    return newest
