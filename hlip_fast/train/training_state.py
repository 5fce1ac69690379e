"""What a checkpoint holds and a resume restores, as one ``state_dict()`` /
``load_state_dict()`` pair over the run's components (torchtitan's ``Stateful``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from . import distributed as D
from .batch_stream import BatchStream, DamagedStudies
from .model import WrappedModel
from .random_state import rng_state, set_rng_state
from .step import TrainStep

log = logging.getLogger("hlip_fast.train")


class TrainingState:
    """The step count, and through the components: the full weights and optimizer state (so
    any number of ranks can load them), schedule, loss scaler and non-finite count, every
    rank's data position and RNG states, the damaged studies so far; plus the run's
    ``settings`` (its config) for the resume check."""

    def __init__(
        self,
        wrapped: WrappedModel,
        train_step: TrainStep,
        stream: BatchStream,
        damaged: DamagedStudies,
        settings: dict,
        seed: int,
    ) -> None:
        self.wrapped, self.train_step, self.stream, self.damaged = wrapped, train_step, stream, damaged
        self.settings, self.seed, self.dist = settings, seed, wrapped.dist
        self.step = 0

    def state_dict(self) -> dict:
        """The checkpoint (a collective: every rank's position is gathered)."""
        # Before the first update the optimizer has no state; get_state_dict would create it with
        # a dummy step (and so change the run), so then only the model is saved.
        optimizer = self.train_step.optimizer
        model_state, optim_state = get_state_dict(
            self.wrapped.net,
            optimizer if optimizer.state else [],
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        return {
            "model": model_state,
            "optimizer": optim_state,
            **self.train_step.state_dict(),
            "step": self.step,
            "ranks": D.gather({**self.stream.state_dict(), "rng": rng_state()}),
            "skipped": self.damaged.state_dict(),
            "config": json.dumps(self.settings),
        }

    def load_state_dict(self, state: dict, source: Path) -> None:
        """Restore ``state`` (read from ``source``). Written by as many ranks as this run has, the
        run goes on exactly; by another number, the weights, optimizer and schedule resume and
        the data order restarts at the beginning of the earliest rank's epoch."""
        set_state_dict(
            self.wrapped.net,
            self.train_step.optimizer if state["optimizer"] else [],
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        self.train_step.load_state_dict(state)
        self.step = state["step"]
        self.damaged.load_state_dict(state.get("skipped", []))
        ranks, world, rank = state["ranks"], self.dist.world_size, self.dist.rank
        if len(ranks) == world:
            self.stream.load_state_dict(ranks[rank])
            set_rng_state(ranks[rank]["rng"])
        else:  # resharded: the full weights and optimizer state load on any number of ranks
            self.stream.load_state_dict({"epoch": min(r["epoch"] for r in ranks), "batch_in_epoch": 0})
            torch.manual_seed(self.seed + 1000 * rank + self.step)
            log.warning(
                "%s was written by %d rank(s), this run has %d: weights, optimizer and schedule resume as "
                "saved; the data order restarts at the beginning of epoch %d and the random draws differ "
                "from an uninterrupted run",
                source,
                len(ranks),
                world,
                self.stream.epoch,
            )
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            source,
            self.step,
            self.stream.epoch,
            self.stream.batch_in_epoch,
        )
