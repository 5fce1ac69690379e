"""Non-finite steps, decided and counted on the device: no host sync per step."""

from __future__ import annotations

import torch


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
