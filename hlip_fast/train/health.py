"""A run's health: non-finite steps, decided and counted on the device (no host sync per step),
the error that stops a run whose weights or data went bad, and the stop of an abandoned step."""

from __future__ import annotations

from pathlib import Path

import torch

from hlip_fast.errors import RunStopped


class TrainingStopped(RunStopped):
    """The run stopped before its last step (divergence, non-finite weights, too many damaged
    studies); the message says what to do."""


class Interrupted(Exception):
    """A stop signal arrived between the micro-batches of a step: the step is abandoned."""


class NonfiniteSteps:
    """How many steps had a non-finite loss or gradient norm (on any rank), and how many of the
    latest ones in a row. Such a step's update is skipped on the device (fused AdamW's
    ``found_inf``), so the weights are still those from before the streak when the host reads
    the counts, at log steps and saves."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.streak = torch.zeros((), dtype=torch.float64, device=device)

    def record(self, bad: torch.Tensor) -> None:
        """Count a step: ``bad`` is 1.0 when its update was skipped, else 0.0 (a device scalar)."""
        self.total += bad
        self.streak.add_(1).mul_(bad)

    def restore(self, total: int) -> None:
        self.total.fill_(total)
        self.streak.zero_()

    def count(self) -> int:
        """Non-finite steps so far (a host sync)."""
        return int(self.total.item())


def streak_too_long(streak: int, step: int, newest: Path | None) -> TrainingStopped:
    """A run with ``streak`` non-finite steps in a row at ``step``: past ``--max-nonfinite``."""
    return TrainingStopped(
        f"{streak} consecutive steps with a non-finite loss or gradient (step {step}); "
        f"stopped. Weights from before the first of them: {newest}. "
        "Lower --lr, raise --warmup or use --precision fp32 and resume from there."
    )


def streak_at_end(streak: int, newest: Path | None) -> TrainingStopped:
    """A run whose last ``streak`` steps were non-finite: its weights are not exported."""
    return TrainingStopped(
        f"the run ended on {streak} steps with a non-finite loss or gradient: its "
        f"weights give non-finite results and were not exported. Weights from before them: "
        f"{newest}. Lower --lr or raise --warmup and resume from there."
    )


def nonfinite_weights(names: list[str], step: int, newest: Path | None) -> TrainingStopped:
    """Weights that are not finite after ``step`` (``names``: this rank's; empty when only
    another rank's are): they are not saved."""
    shown = ", ".join(names[:3]) or "on another rank"
    return TrainingStopped(
        f"the weights are not finite after step {step} ({shown}{', ...' if len(names) > 3 else ''}); "
        f"they were not saved. Newest good checkpoint: {newest}. Lower --lr (or keep "
        "--grad-clip-norm) and resume from it"
    )
