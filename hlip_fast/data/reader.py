"""The CPU reader: shards → studies (rank and worker sharding, shuffle buffer, per-epoch seeds)
→ decoded, normalised studies → token-budget batches, in DataLoader workers.

Damaged studies are never lost silently. With ``on_error="raise"`` the first one stops the
reader with a :class:`~hlip_fast.errors.DataError` naming shard and study; with ``"skip"`` it
is left out, logged and recorded in the reader's ``skipped`` list (one record per study, from
DataLoader workers too), so the caller can count and report every loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import ON_ERROR, DataError
from .batching import Batch, BatchConfig, collate
from .codec import decompress_slices
from .shards import RawStudy, ShardInfo, read_shard, shard_infos
from .transforms import Study, TransformConfig, to_study

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


def decode_study(
    raw: RawStudy,
    decode: Callable[[RawStudy], list[torch.Tensor]],
    transforms: TransformConfig,
    train: bool,
    epoch: int,
) -> Study:
    """``raw`` decoded and normalised; any failure but running out of memory becomes a
    :class:`DataError` naming shard and study (picklable, unlike e.g. lz4's errors)."""
    try:
        return to_study(raw, decode(raw), transforms, train, epoch)
    except (MemoryError, torch.OutOfMemoryError, DataError):
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the study named
        name = f"{raw.shard}: study {raw.study_id!r} (key {raw.key!r})"
        message = f"{name}: cannot decode: {type(error).__name__}: {error}"
        raise DataError(message, shard=raw.shard, key=raw.key, study_id=raw.study_id) from None


class RawStudies(IterableDataset):
    """Stored studies of a prepared folder (or list of shards) for this rank and worker.

    Shards are dealt round-robin to the ``world_size × workers`` readers when there are enough,
    else every reader scans all shards and keeps the studies whose position in the index falls
    to it. Training shuffles the shard order and a ``shuffle_buffer`` of studies with seeds from
    ``(seed, epoch, rank, worker)``; call :meth:`set_epoch` each epoch. Damage: see the module
    docstring (``on_error``); ``verify=False`` skips the checksums (for measuring their cost).
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
        verify: bool = True,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.shards: list[ShardInfo] = shard_infos(source)
        self.train, self.shuffle_buffer, self.seed, self.on_error = train, shuffle_buffer, seed, on_error
        self.verify = verify
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.epoch = 0
        self.skipped: list[dict] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def damaged(self, error: DataError) -> None:
        """Raise ``error`` (``on_error="raise"``) or record the study as skipped."""
        if self.on_error == "raise":
            raise error
        log.warning("skipping a damaged study: %s", error)
        self.skipped.append(error.record())

    def _reader_slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _read(self, shards: list[ShardInfo], slot: int, parts: int) -> Iterator[RawStudy]:
        """The studies of ``shards`` at positions ``slot (mod parts)``; damage reported per study
        to the reader that owns its position (so across readers each loss counts once)."""
        offset = 0
        for info in shards:
            position = {key: offset + i for i, key in enumerate(info.keys)} if info.keys is not None else {}

            def on_damage(error: DataError, info=info, position=position) -> None:
                if error.key is None and info.keys is not None:
                    log.warning("%s (the studies it affects are reported one by one)", error)
                elif error.key not in position or position[error.key] % parts == slot:
                    self.damaged(error)

            unlisted = 0
            for raw in read_shard(
                info, on_damage=None if self.on_error == "raise" else on_damage, verify=self.verify
            ):
                where = position.get(raw.key, offset + unlisted)
                unlisted += raw.key not in position
                if where % parts == slot:
                    yield raw
            offset += len(info.keys) if info.keys is not None else unlisted

    def __iter__(self) -> Iterator[RawStudy]:
        self.skipped = []
        slot, parts = self._reader_slot()
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        shards = list(self.shards)
        if self.train:
            shards = [
                shards[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            ]
        studies = (
            self._read(shards[slot::parts], 0, 1) if len(shards) >= parts else self._read(shards, slot, parts)
        )
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


def decoded_studies(
    raws: Iterable[RawStudy],
    transforms: TransformConfig,
    train: bool,
    epoch: int,
    decode: Callable[[RawStudy], list[torch.Tensor]] = decode_cpu,
    on_damage: Callable[[DataError], None] | None = None,
) -> Iterator[Study]:
    """Normalised (in training augmented) studies; a study that cannot be decoded raises a
    :class:`DataError` naming it, or with ``on_damage`` is passed to it and left out."""
    for raw in raws:
        try:
            study = decode_study(raw, decode, transforms, train, epoch)
        except DataError as error:
            if on_damage is None:
                raise
            on_damage(error)
            continue
        yield study


Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]
"""Reports → token tensors (e.g. :class:`~hlip_fast.text.ReportTokenizer`)."""


def token_batches(
    studies: Iterable[Study],
    transforms: TransformConfig,
    batching: BatchConfig,
    tokenize: Tokenize | None = None,
) -> Iterator[Batch]:
    """Studies grouped into token-budget steps and packed on the scans' device, their reports
    tokenised with ``tokenize`` when given (in the DataLoader worker that makes the batch)."""
    pad = (0.0 - transforms.mean) / transforms.std
    for members in batching.budget()(studies):
        batch = collate(members, batching.patch_size, pad, batching.max_tokens)
        if tokenize is not None:
            batch.text = tokenize(batch.texts)
        yield batch


class StudyBatches(IterableDataset):
    """Decoded (in training augmented) studies grouped into :class:`Batch` steps.

    ``decode`` turns a stored study into its integer scans: :func:`decode_cpu` (the CPU reader,
    in DataLoader workers) or a GPU decoder such as :class:`~hlip_fast.data.gpu.NvcompDecoder`
    (iterate in the main process); everything after decoding runs on the scans' device. Studies
    skipped under ``on_error="skip"`` are in :attr:`skipped`. With ``tokenize`` each batch
    carries its reports' tokens (``Batch.text``), made where the batch is made.
    """

    def __init__(
        self,
        raw: RawStudies,
        transforms: TransformConfig | None = None,
        batching: BatchConfig | None = None,
        decode: Callable[[RawStudy], list[torch.Tensor]] = decode_cpu,
        tokenize: Tokenize | None = None,
    ):
        self.raw, self.transforms = raw, transforms or TransformConfig()
        self.batching = batching or BatchConfig()
        self.decode, self.tokenize = decode, tokenize

    @property
    def skipped(self) -> list[dict]:
        return self.raw.skipped

    def set_epoch(self, epoch: int) -> None:
        self.raw.set_epoch(epoch)

    def studies(self) -> Iterator[Study]:
        raw = self.raw
        return decoded_studies(raw, self.transforms, raw.train, raw.epoch, self.decode, on_damage=raw.damaged)

    def __iter__(self) -> Iterator[Batch]:
        return token_batches(self.studies(), self.transforms, self.batching, self.tokenize)


@dataclass
class _Delivery:
    """What a DataLoader worker sends: a batch (or none), the studies it skipped since the last
    delivery, and the error that stopped it (``on_error="raise"``)."""

    batch: Batch | None
    skipped: list[dict] = field(default_factory=list)
    error: dict | None = None

    def pin_memory(self) -> _Delivery:  # called by the DataLoader's pin_memory thread
        return self if self.batch is None else replace(self, batch=self.batch.pin_memory())


class _WorkerStream(IterableDataset):
    def __init__(self, dataset: StudyBatches):
        self.dataset = dataset

    def __iter__(self) -> Iterator[_Delivery]:
        sent = 0
        try:
            for batch in self.dataset:
                skipped = self.dataset.skipped
                yield _Delivery(batch, skipped[sent:])
                sent = len(skipped)
        except DataError as error:
            yield _Delivery(None, self.dataset.skipped[sent:], error.record())
            return
        if len(self.dataset.skipped) > sent:
            yield _Delivery(None, self.dataset.skipped[sent:])


class CheckedLoader:
    """Batches from DataLoader workers with their damage reports intact: a worker's
    :class:`DataError` is raised here with its own message, and the studies workers skipped are
    gathered in :attr:`skipped` as they arrive."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.skipped: list[dict] = []

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = []
        for delivery in self.loader:
            self.skipped += delivery.skipped
            if delivery.error is not None:
                raise DataError.from_record(delivery.error)
            if delivery.batch is not None:
                yield delivery.batch


def cpu_loader(dataset: StudyBatches, num_workers: int = 2, pin_memory: bool = False) -> CheckedLoader:
    """Workers read, decode and batch (``batch_size=None``: steps come whole). Its own generator
    leaves the global torch RNG untouched, so resumed runs replay exactly."""
    loader = DataLoader(
        _WorkerStream(dataset),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator(),
    )
    return CheckedLoader(loader)
