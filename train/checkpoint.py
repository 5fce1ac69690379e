"""Training checkpoints: written atomically (temporary file, fsync, rename), the last K kept,
read back with ``weights_only=True``; plus the RNG states a run needs to resume exactly."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

PATTERN = re.compile(r"step_(\d+)\.pt")


class Checkpoints:
    """``folder/step_00000100.pt`` files; at most ``keep`` of them after each save."""

    def __init__(self, folder: str | os.PathLike, keep: int):
        self.folder, self.keep = Path(folder), keep

    def all(self) -> list[Path]:
        found = [
            (int(m.group(1)), p) for p in self.folder.glob("step_*.pt") if (m := PATTERN.fullmatch(p.name))
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: dict, step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:08d}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        for old in self.all()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """torch (CPU and this process's CUDA device), Python and NumPy global generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
