"""The training loop and its signals; ``hlip-train`` runs it.

One process on the CPU or a GPU, or one per GPU under ``torchrun`` (DDP, or FSDP2 with
``--fsdp``); every rank runs the same number of steps over its own shards. :class:`Trainer`
wires the components: run folder and resume policy (``run_folder``), model built, wrapped and
exported (``model``), one step with its optimiser (``step``), the batches with their
damaged-study budget (``batch_stream``), the checkpointable state over them
(``training_state``), metrics rows and profiling (``log``, ``profiling``).

A run never ends with wrong weights and exit 0: settings that could never train are refused
before any work, a resume verifies its checkpoint and refuses changed settings unless
``--resume-override`` names them, weights are checked finite before every save, damaged
studies stop the run past ``--max-skipped``, and SIGTERM/SIGINT stop it cleanly between
micro-batches with a checkpoint that resumes exactly.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import torch

from hlip_fast.cli_options import autocast_dtype
from hlip_fast.clip import HLIPModel
from hlip_fast.console import Console
from hlip_fast.data.batching import Batch
from hlip_fast.errors import problem_list
from hlip_fast.models.registry import get_config
from hlip_fast.pretrained import save_pretrained

from . import distributed as D
from .batch_stream import BatchStream, DamagedStudies
from .config import TrainConfig
from .data import plan_epoch, plan_problems, reader_description, total_steps, train_loader
from .evaluate import ZeroShotEval
from .flops import peak_tflops
from .health import Interrupted, TrainingStopped, nonfinite_weights, streak_at_end, streak_too_long
from .log import MetricsLog, StepWindow
from .model import WrappedModel, build_model, text_model_source
from .profiling import phase, profile_report, run_profiler
from .run_folder import RunFolder
from .step import TrainStep
from .training_state import TrainingState

log = logging.getLogger("hlip_fast.train")


class Trainer:
    """One run: checks the data plan, locks the run folder (released by :meth:`close` or on
    leaving a ``with`` block), resumes when asked, builds model, optimiser and schedule."""

    def __init__(self, cfg: TrainConfig, dist: D.Dist, console: Console | None = None):
        self.cfg, self.dist = cfg, dist
        self.console = console or Console.silent()
        vision = get_config(cfg.model)
        self.plan = plan_epoch(cfg, vision.patch_size, cfg.max_scans or vision.max_num_scans or None)
        if problems := plan_problems(cfg, self.plan, vision.patch_size, dist.world_size):
            raise ValueError(problem_list("these data and settings cannot train", problems))
        name = cfg.name or D.broadcast(datetime.now().strftime("hlip-%Y%m%d-%H%M%S"))
        self.run_dir = Path(cfg.logs) / name
        self.folder = RunFolder(self.run_dir, cfg.keep)
        try:
            self._setup(name)
        except BaseException:
            self.close()
            raise

    def _setup(self, name: str) -> None:
        cfg, dist = self.cfg, self.dist
        settings = cfg.to_dict()
        resumed = self.folder.to_resume(cfg.resume, settings, cfg.resume_override)
        D.on_main(lambda: self.folder.write_config(settings, name, resumed))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        dtype = autocast_dtype(cfg.precision, dist.device.type)
        model = build_model(cfg, text_model_source(cfg, self.run_dir, self.console), dist)
        # before the optimizer: FSDP2 replaces the parameters
        self.wrapped = WrappedModel(model, dist, fsdp=cfg.fsdp, meta_init=cfg.meta_init, dtype=dtype)
        self.total_steps = total_steps(cfg, self.plan, dist.world_size)
        self.console.say(self.plan.describe(dist, cfg.accum_freq, self.total_steps))
        stop_requested = lambda: self._stop_requested()  # noqa: E731 - looked up at call time
        self.stepper = TrainStep.build(cfg, self.wrapped, dtype, self.total_steps, stop_requested)
        self.damaged = DamagedStudies(self.run_dir, self.plan.studies, cfg.max_skipped, dist)
        loader = lambda epoch: train_loader(cfg, model, dist, epoch)  # noqa: E731
        self.stream = BatchStream(loader, self.damaged, cfg.train_data, dist.rank)
        self.state = TrainingState(self.wrapped, self.stepper, self.stream, self.damaged, settings, cfg.seed)
        self.saved_step = -1
        self.peak = cfg.peak_tflops or peak_tflops(dist.device)
        self.evaluator = ZeroShotEval(cfg, model, self.console) if cfg.prompts else None
        self.stop_signal: str | None = None
        torch.manual_seed(cfg.seed + 1000 * dist.rank)  # per-rank randomness from here on
        if resumed is not None:
            path, state, _ = resumed
            self.state.load_state_dict(state, path)
            self.saved_step = self.state.step
            self.stepper.set_hyperparameters(cfg)

    def close(self) -> None:
        """Release the run folder's lock."""
        self.folder.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model(self) -> HLIPModel:
        return self.wrapped.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.optimizer

    @property
    def step(self) -> int:
        return self.state.step

    def batches(self) -> Iterator[Batch]:
        """This rank's batches, epoch after epoch, from the saved position on."""
        return self.stream.batches()

    def train_step(self, micro: list[Batch]) -> dict:
        """One step on ``micro`` (:class:`~hlip_fast.train.step.TrainStep`)."""
        return self.stepper(micro)

    def model_for_export(self) -> HLIPModel | None:
        """The plain model with full weights (under FSDP a collective; on rank 0 only)."""
        return self.wrapped.export()

    # --- the loop ------------------------------------------------------------------------
    def fit(self) -> dict:
        """Steps to ``total_steps``. An ordinary step makes no host sync; a log step makes one
        (:meth:`_log`), as do saves and evaluations."""
        cfg, state = self.cfg, self.state
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        metrics = MetricsLog(self.run_dir, cfg.report_to, enabled=self.dist.main)
        bar = self.console.progress(
            self.total_steps, "train", "steps", every=cfg.log_every, initial=state.step
        )
        self.console.say(f"waiting for the first batch ({reader_description(cfg)})")
        data, window, last = self.batches(), StepWindow(), {}
        trace_dir = self.run_dir if self.dist.main else None
        profiler = run_profiler(cfg.profile_steps, state.step, self.total_steps, self.dist.device, trace_dir)
        try:
            while state.step < self.total_steps:
                position, started = self.stream.state_dict(), time.perf_counter()
                profiler.begin(state.step)
                try:
                    with phase("data_wait"):
                        micro = self.stream.next_step(
                            data, cfg.accum_freq, self._stop_requested, lambda: self.stop_signal is not None
                        )
                    waited = time.perf_counter() - started
                    window.add(self.train_step(micro), started, waited)
                except Interrupted:
                    self.stream.load_state_dict(position)  # the abandoned step is redone on resume
                    self.stepper.zero_grad()
                    self.save()
                    return self._stopped(last)
                state.step += 1
                if not last or self._is_log_step():  # the first step of a run or resume too
                    last, stop = self._log(metrics, window, first=not last)
                    window = StepWindow()
                else:
                    stop = self._local_checks()
                bar.update(1, loss=f"{last['loss']:.4f}", studies_s=f"{last['studies_per_s']:.1f}")
                if self.evaluator and cfg.zeroshot_every and state.step % cfg.zeroshot_every == 0:
                    metrics.write(state.step, self.evaluator.run(state.step, self.run_dir, self.dist))
                if state.step % cfg.save_every == 0 or stop:
                    self.save()
                if profiler.done(state.step):
                    paused = time.perf_counter()
                    row, line = profile_report(
                        profiler.steps, profiler.finish(), self.dist.device, self.run_dir
                    )
                    metrics.write(state.step, row)
                    self.console.say(line)
                    window.start += time.perf_counter() - paused  # not step time
                if stop:
                    return self._stopped(last)
            return self._finish(metrics, last)
        finally:
            bar.close()
            metrics.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_signal = signal.Signals(signum).name

    def _stop_requested(self) -> bool:
        """Whether to abandon a step between its micro-batches: a stop signal, in one process.
        Ranks agree on theirs at the next log step, in the collective that step makes anyway."""
        return self.dist.world_size == 1 and self.stop_signal is not None

    def _stopped(self, last: dict) -> dict:
        log.warning(
            "stopped by %s at step %d; checkpoint saved; resume with --resume latest",
            self.stop_signal,
            self.step,
        )
        return {"step": self.step, "stopped": self.stop_signal, **last}

    def _finish(self, metrics: MetricsLog, last: dict) -> dict:
        """After the last step (a log step): refuse to export weights that end a non-finite
        streak, save, evaluate, export."""
        if last.get("nonfinite_streak"):
            raise streak_at_end(last["nonfinite_streak"], self.folder.checkpoints.latest())
        if self.saved_step != self.step:
            self.save()
        if self.evaluator and self.cfg.zeroshot_every != 0 and self.step % self.cfg.zeroshot_every:
            metrics.write(self.step, self.evaluator.run(self.step, self.run_dir, self.dist))
        export = self.model_for_export()  # collective under FSDP: every rank takes part
        D.on_main(lambda: save_pretrained(export, self.run_dir / "final"))
        return {"step": self.step, "stopped": None, **last}

    def _is_log_step(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step in (1, self.total_steps)

    def _local_checks(self) -> bool:
        """Between log steps, in one process only (host values, no collective): absorb the
        studies the reader skipped, and say whether a stop signal came. Ranks agree on both at
        log steps."""
        if self.dist.world_size > 1:
            return False
        if self.damaged.new:
            self._absorb_damaged()
        return self.stop_signal is not None

    def _absorb_damaged(self) -> None:
        try:
            self.damaged.absorb(self.step)
        except TrainingStopped:
            self.save()  # the weights are sound: keep them for a resume once the data is repaired
            raise

    def _log(self, metrics: MetricsLog, window: StepWindow, first: bool) -> tuple[dict, bool]:
        """A log step: the window, stop signals, damaged-study counts, non-finite counts and the
        temperature over ranks in one collective; the metrics row; a save at the start of a
        non-finite streak (its updates were skipped: the weights from before it); a stop past
        ``--max-nonfinite`` or ``--max-skipped``. Returns the row and whether any rank got a
        stop signal."""
        health = self.stepper.health
        host = {"stops": float(self.stop_signal is not None), "new_skips": float(len(self.damaged.new))}
        device = {"nonfinite": health.total, "streak": health.streak}
        device["logit_scale"] = D.full_tensor(self.model.logit_scale).detach().exp()
        sums, means = window.reduce(host, device, self.dist)
        seconds = time.perf_counter() - window.start
        if first:
            self.console.say(f"first step done in {seconds:.1f} s (loss {means['loss']:.4f})")
        if sums["new_skips"]:
            self._absorb_damaged()
        values = window.row(sums, means, seconds, len(self.damaged.skipped), self.peak, self.dist.world_size)
        row = {"epoch": self.stream.epoch, **values}
        metrics.write(self.step, row)
        streak = means["streak"]
        if streak and self.saved_step != self.step:
            self.save()
        if streak >= self.cfg.max_nonfinite:
            raise streak_too_long(round(streak), self.step, self.folder.checkpoints.latest())
        return row, sums["stops"] > 0

    def save(self) -> Path | None:
        """Check the weights finite on every rank (nothing is saved when not), then write the
        checkpoint of this step (rank 0)."""
        bad = self.wrapped.nonfinite_weights()
        if D.reduce_sum(len(bad), self.dist.device):
            raise nonfinite_weights(bad, self.step, self.folder.checkpoints.latest())
        state = self.state.state_dict()
        path = D.on_main(lambda: self.folder.checkpoints.save(state, self.step))
        self.saved_step = self.step
        return path
