"""Where a training step's time goes: ``torch.profiler`` over a few steps, by phase.

The step marks its phases with :func:`phase` (data wait, forward, backward, optimizer);
communication is the collectives' own time (NCCL kernels on a GPU, gloo operations on the CPU),
which overlaps the backward pass. Times are the GPU's on CUDA, the host's otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("data_wait", "forward", "backward", "optimizer")
TRACE = "profile_trace.json"
log = logging.getLogger("hlip_fast.train")


def phase(name: str) -> record_function:
    """A profiler range for one phase of a step (costs nothing when no profiler runs)."""
    return record_function(name)


def breakdown(prof: profile, device: torch.device) -> dict[str, float]:
    """Seconds of each phase and of communication in what ``prof`` recorded."""
    cuda = device.type == "cuda"
    seconds = dict.fromkeys((*PHASES, "communication"), 0.0)
    for event in prof.key_averages():
        name = event.key
        if name in PHASES:
            # On CUDA a phase's range also has the time of the kernels it launched.
            seconds[name] += (event.device_time_total if cuda else event.cpu_time_total) / 1e6
        elif cuda and name.lower().startswith("nccl") and event.device_time_total:
            seconds["communication"] += event.device_time_total / 1e6
        elif not cuda and name.startswith("gloo:"):
            seconds["communication"] += event.cpu_time_total / 1e6
    return seconds


class StepProfiler:
    """Profiles ``steps`` steps of a run from step index ``first``: :meth:`begin` before each step
    (with its index); once ``done(completed steps)``, :meth:`finish` returns the per-step seconds
    of each phase and writes a Chrome trace (``trace``, when given)."""

    def __init__(self, first: int, steps: int, device: torch.device, trace: Path | None = None) -> None:
        self.first, self.steps, self.device, self.trace = first, steps, device, trace
        self.prof: profile | None = None

    def begin(self, step: int) -> None:
        if self.steps and step == self.first:
            cuda = [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
            self.prof = profile(activities=[ProfilerActivity.CPU, *cuda])
            self.prof.__enter__()

    def done(self, completed: int) -> bool:
        return self.prof is not None and completed == self.first + self.steps

    def finish(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.__exit__(None, None, None)
        prof, self.prof = self.prof, None
        if self.trace is not None:
            prof.export_chrome_trace(str(self.trace))
        return {name: value / self.steps for name, value in breakdown(prof, self.device).items()}


def run_profiler(
    requested: int, step: int, total_steps: int, device: torch.device, run_dir: Path | None
) -> StepProfiler:
    """``requested`` steps (``--profile-steps``) from the second of this run (the first compiles
    and warms up; ``step`` is where the run starts), as many as the run has; the trace goes to
    ``run_dir`` (``None``: no trace, as on every rank but 0)."""
    first = step + 1
    steps = max(0, min(requested, total_steps - first))
    if steps < requested:
        log.warning(
            "--profile-steps %d: this run has %d step(s) after its first, so %d are profiled",
            requested,
            max(0, total_steps - first),
            steps,
        )
    return StepProfiler(first, steps, device, run_dir / TRACE if run_dir is not None else None)


def profile_report(
    steps: int, seconds: dict[str, float], device: torch.device, run_dir: Path
) -> tuple[dict, str]:
    """The profiled steps' mean seconds per phase as a metrics row and one console line."""
    row = {f"profile/{name}_s": value for name, value in seconds.items()}
    parts = ", ".join(f"{name.replace('_', ' ')} {value * 1e3:.1f} ms" for name, value in seconds.items())
    clock = "GPU" if device.type == "cuda" else "CPU"
    line = (
        f"profile, per step over {steps} ({clock} time; communication overlaps the backward): {parts}; "
        f"trace: {run_dir / TRACE}"
    )
    return row, line
