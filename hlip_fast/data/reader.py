"""The CPU reader: shards → studies (rank and worker sharding, shuffle buffer, per-epoch seeds)
→ decoded, normalised studies → token-budget batches, in DataLoader workers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batching import Batch, TokenBudget, collate
from .codec import decompress_slices
from .shards import RawStudy, list_shards, read_shard
from .transforms import ReaderConfig, Study, to_study

log = logging.getLogger(__name__)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if ready else 0 if rank is None else rank
        world_size = dist.get_world_size() if ready else 1 if world_size is None else world_size
    return rank, world_size


def decode_cpu(raw: RawStudy) -> list[torch.Tensor]:
    """The study's stored integer scans as CPU tensors ``(D, H, W)``, decoded with ``lz4``."""
    volume = torch.from_numpy(
        decompress_slices(raw.blob, raw.sizes, tuple(raw.meta["grid"]), raw.meta["dtype"])
    )
    return list(torch.split(volume, raw.depths))


class RawStudies(IterableDataset):
    """Stored studies of a prepared folder (or list of shards) for this rank and worker.

    Shards are dealt round-robin to the ``world_size × workers`` readers when there are enough,
    else every reader scans all shards and keeps every n-th study. Training shuffles the shard
    order and a ``shuffle_buffer`` of studies with seeds from ``(seed, epoch, rank, worker)``;
    call :meth:`set_epoch` each epoch. A damaged shard raises an error naming shard and study
    (``on_error="raise"``) or is logged, counted in ``errors`` and skipped (``"skip"``).
    """

    def __init__(
        self,
        source: str | Path | list,
        *,
        train: bool = False,
        shuffle_buffer: int = 256,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: str = "raise",
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.shards = [Path(p) for p in source] if isinstance(source, list) else list_shards(source)
        self.train, self.shuffle_buffer, self.seed, self.on_error = train, shuffle_buffer, seed, on_error
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.epoch = 0
        self.errors: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _reader_slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _studies(self, shards: list[Path]) -> Iterator[RawStudy]:
        for shard in shards:
            try:
                yield from read_shard(shard)
            except ValueError as error:
                if self.on_error == "raise":
                    raise
                log.warning("skipping the rest of a damaged shard: %s", error)
                self.errors.append(str(error))

    def __iter__(self) -> Iterator[RawStudy]:
        slot, parts = self._reader_slot()
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        shards = list(self.shards)
        if self.train:
            shards = [
                shards[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            ]
        if len(shards) >= parts:
            studies = self._studies(shards[slot::parts])
        else:
            studies = (s for i, s in enumerate(self._studies(shards)) if i % parts == slot)
        if not self.train:
            yield from studies
            return
        buffer: list[RawStudy] = []
        for study in studies:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(study)
                continue
            i = int(rng.integers(len(buffer)))
            yield buffer[i]
            buffer[i] = study
        yield from (buffer[i] for i in rng.permutation(len(buffer)))


@dataclass
class BatchConfig:
    """Token-budget batching (see :class:`~hlip_fast.data.batching.TokenBudget`)."""

    patch_size: tuple[int, int, int] = (8, 16, 16)
    max_tokens: int = 16384
    max_studies: int | None = None
    group_size: int = 64
    oversize: str = "alone"


def decoded_studies(
    decoded: Iterable[tuple[RawStudy, list[torch.Tensor]]], reader: ReaderConfig, train: bool, epoch: int
) -> Iterator[Study]:
    """Normalised (in training augmented) studies from ``(stored study, integer scans)`` pairs."""
    for raw, scans in decoded:
        yield to_study(raw, scans, reader, train, epoch)


def token_batches(studies: Iterable[Study], reader: ReaderConfig, batching: BatchConfig) -> Iterator[Batch]:
    """Studies grouped into token-budget steps and packed on the scans' device."""
    b = batching
    budget = TokenBudget(
        b.max_tokens, b.patch_size, max_studies=b.max_studies, group_size=b.group_size, oversize=b.oversize
    )
    pad = (0.0 - reader.mean) / reader.std
    for members in budget(studies):
        yield collate(members, b.patch_size, pad, b.max_tokens)


class StudyBatches(IterableDataset):
    """Decoded (in training augmented) studies grouped into :class:`Batch` steps.

    ``decode`` turns a stored study into its integer scans: :func:`decode_cpu` (the CPU reader,
    in DataLoader workers) or a GPU decoder such as :class:`~hlip_fast.data.gpu.NvcompDecoder`
    (iterate in the main process); everything after decoding runs on the scans' device.
    """

    def __init__(
        self,
        raw: RawStudies,
        reader: ReaderConfig | None = None,
        batching: BatchConfig | None = None,
        decode: Callable[[RawStudy], list[torch.Tensor]] = decode_cpu,
    ):
        self.raw, self.reader, self.batching = raw, reader or ReaderConfig(), batching or BatchConfig()
        self.decode = decode

    def set_epoch(self, epoch: int) -> None:
        self.raw.set_epoch(epoch)

    def studies(self) -> Iterator[Study]:
        pairs = ((raw, self.decode(raw)) for raw in self.raw)
        return decoded_studies(pairs, self.reader, self.raw.train, self.raw.epoch)

    def __iter__(self) -> Iterator[Batch]:
        return token_batches(self.studies(), self.reader, self.batching)


def cpu_loader(dataset: StudyBatches, num_workers: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose workers read, decode and batch (``batch_size=None``: steps come whole).
    Its own generator leaves the global torch RNG untouched, so resumed runs replay exactly."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator(),
    )
