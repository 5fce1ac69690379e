"""This rank's training batches, epoch after epoch from a saved position, and the budget of
damaged studies the reader may skip (``--on-error skip``) before the run stops."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hlip_fast.data.batching import Batch

from . import distributed as D
from .health import Interrupted, TrainingStopped


def _skip_key(record: dict) -> tuple:
    return record["shard"], record["key"], record["study_id"]


class DamagedStudies:
    """The damaged studies left out over the whole run, each counted once however many ranks
    and epochs meet it, listed in ``skipped.jsonl``; more than ``max_skipped`` (a fraction of
    the ``studies`` of an epoch, or a count) stops the run."""

    def __init__(self, run_dir: Path, studies: int, max_skipped: float, dist: D.Dist) -> None:
        self.run_dir, self.studies, self.max_skipped, self.dist = run_dir, studies, max_skipped, dist
        self.limit = int(max_skipped) if max_skipped >= 1 else math.floor(max_skipped * studies)
        self.skipped: dict[tuple, dict] = {}
        self.new: list[dict] = []  # this rank's, since the last absorb

    def state_dict(self) -> list[dict]:
        return list(self.skipped.values())

    def load_state_dict(self, records: list[dict]) -> None:
        self.skipped = {_skip_key(r): r for r in records}

    def absorb(self, step: int) -> None:
        """Gather the studies every rank skipped since the last call (a collective), count them
        once each, record them in ``skipped.jsonl``, and stop the run past the budget."""
        new = [r for records in D.gather(self.new) for r in records]
        self.new = []
        fresh = [r for r in new if _skip_key(r) not in self.skipped]
        for record in fresh:
            self.skipped.setdefault(_skip_key(record), record)
        if fresh and self.dist.main:
            with open(self.run_dir / "skipped.jsonl", "a") as handle:
                handle.writelines(json.dumps({"step": step, **r}) + "\n" for r in fresh)
        if len(self.skipped) > self.limit:
            first = next(iter(self.skipped.values()))
            raise TrainingStopped(
                f"{len(self.skipped)} of {self.studies} training studies were damaged and skipped, over "
                f"--max-skipped {self.max_skipped} ({self.limit} studies); "
                f"first: {first['reason']}. All are listed in {self.run_dir / 'skipped.jsonl'}; "
                "repair or re-prepare the data and resume"
            )


class BatchStream:
    """Batches of ``loader(epoch)``, from position (``epoch``, ``batch_in_epoch``) on; the
    studies each loader skipped as damaged go to ``damaged.new``."""

    def __init__(
        self, loader: Callable[[int], Iterable[Batch]], damaged: DamagedStudies, source: str, rank: int
    ) -> None:
        self.loader, self.damaged, self.source, self.rank = loader, damaged, source, rank
        self.epoch, self.batch_in_epoch = 0, 0

    def state_dict(self) -> dict:
        """The position: this rank's epoch and the batches of it already taken."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]

    def batches(self) -> Iterator[Batch]:
        """This rank's batches, epoch after epoch, from the current position on."""
        while True:
            skip = self.batch_in_epoch
            loader = self.loader(self.epoch)
            seen = 0
            for index, batch in enumerate(loader):
                self.damaged.new += loader.skipped[seen:]
                seen = len(loader.skipped)
                if index < skip:
                    continue
                self.batch_in_epoch = index + 1
                yield batch
            self.damaged.new += loader.skipped[seen:]
            if self.batch_in_epoch == 0:
                raise ValueError(f"{self.source}: rank {self.rank} got no training batch")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def next_step(
        self,
        data: Iterator[Batch],
        accum_freq: int,
        stop_requested: Callable[[], bool],
        signalled: Callable[[], bool],
    ) -> list[Batch]:
        """``accum_freq`` batches of ``data``; :class:`Interrupted` when a stop is requested
        between two of them, or a read fails after a signal (Ctrl-C also reached the DataLoader
        workers)."""
        micro = []
        for i in range(accum_freq):
            if i and stop_requested():
                raise Interrupted
            try:
                micro.append(next(data))
            except RuntimeError:
                if signalled():
                    raise Interrupted from None
                raise
        return micro
