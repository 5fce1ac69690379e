"""Metrics of a run: one JSON line per record in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    """Writes on the main rank only (``enabled``); numbers also go to TensorBoard when asked."""

    def __init__(self, run_dir: Path, report_to: str = "", enabled: bool = True):
        self.enabled, self.tensorboard = enabled, None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError("--report-to tensorboard needs the tensorboard package") from error
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in _flatten(values).items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


def _flatten(values: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
