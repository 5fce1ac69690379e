"""Metrics of a run: the steps between two log steps summed on the host and reduced over ranks
in one collective, and one JSON line per record in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed as D


@dataclass
class StepWindow:
    """The steps since the last log step (from the start of the first, so saves and evaluations
    between them are not counted): host-side sums, and the last step's device values."""

    start: float = 0.0
    steps: int = 0
    wait: float = 0.0
    studies: int = 0
    tokens: int = 0
    flops: float = 0.0
    lr: float = 0.0
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None

    def add(self, step: dict, started: float, wait: float) -> None:
        """A step's numbers (as :class:`~hlip_fast.train.step.TrainStep` returns them)."""
        self.start = started if self.steps == 0 else self.start
        self.steps, self.wait = self.steps + 1, self.wait + wait
        self.studies, self.tokens, self.flops = (
            self.studies + step["studies"],
            self.tokens + step["tokens"],
            self.flops + step["flops"],
        )
        self.lr, self.loss, self.grad_norm = step["lr"], step["loss"], step["grad_norm"]

    def reduce(
        self, host: dict[str, float], device: dict[str, torch.Tensor], dist: D.Dist
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Over ranks, in one collective and one host sync: the sums of the window's studies,
        tokens and FLOPs and of ``host``; the means of the last loss and gradient norm and of
        ``device`` (device scalars)."""
        sums = {"studies": self.studies, "tokens": self.tokens, "flops": self.flops, **host}
        means = {"loss": self.loss, "grad_norm": self.grad_norm, **device}
        packed = torch.cat(
            [
                torch.tensor(list(sums.values()), dtype=torch.float64).to(dist.device),
                torch.stack([v.reshape(()) for v in means.values()]).double(),
            ]
        )
        values = D.reduce_packed(packed)
        mean = {k: v / dist.world_size for k, v in zip(means, values[len(sums) :])}
        return dict(zip(sums, values)), mean

    def row(
        self, sums: dict, means: dict, seconds: float, skipped: int, peak: float | None, world: int
    ) -> dict:
        """The window's metrics row from its reduced ``sums`` and ``means`` over ``seconds``: last
        loss, learning rate, temperature, gradient norm, non-finite counts, the ``skipped``
        studies so far, throughput and model FLOP utilisation (of ``peak`` TFLOP/s per rank)."""
        studies, tokens, flops = sums["studies"], sums["tokens"], sums["flops"]
        return {
            "loss": means["loss"],
            "lr": self.lr,
            "logit_scale": means["logit_scale"],
            "grad_norm": means["grad_norm"],
            "nonfinite_steps": round(means["nonfinite"]),
            "nonfinite_streak": round(means["streak"]),
            "skipped_studies": skipped,
            "studies": int(studies),
            "tokens": int(tokens),
            "studies_per_s": studies / seconds,
            "tokens_per_s": tokens / seconds,
            "data_wait": self.wait / seconds,
            "tflops_per_s": flops / seconds / 1e12,
            "mfu": flops / seconds / (peak * 1e12 * world) if peak else None,
            "step_s": seconds / self.steps,
        }


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
