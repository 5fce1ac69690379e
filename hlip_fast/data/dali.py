"""The DALI reader (``nvidia-dali-cuda130``, optional): ``fn.readers.webdataset`` reads the same
shards; on a GPU ``fn.experimental.inflate`` decodes each study's LZ4 slices on the device in one
call. With ``device_id=None`` (no GPU) DALI reads and the slices are decoded with ``lz4`` on the
host. Either way every study's checksums are verified on the host (a damaged one raises a
:class:`~hlip_fast.errors.DataError` naming it, or with ``on_error="skip"`` is left out and
recorded in ``skipped``, as the CPU reader does), the number of studies read must be the number
the index lists, and the decoded scans go through the same transforms and batching as the CPU
reader.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import ON_ERROR, DataError
from ..locations import is_url
from .batching import Batch, BatchConfig
from .reader import Tokenize, decode_cpu, decode_study, token_batches
from .shards import RawStudy, assemble_study, prepare_config, shard_infos
from .transforms import TransformConfig


class DaliStudies:
    """Stored studies and their decoded integer scans, read by a DALI pipeline.

    Samples are split into ``world_size`` contiguous ranges (DALI's sharding); training
    shuffles with DALI's reader buffer, seeded by ``seed + epoch``.
    """

    def __init__(
        self,
        source: str | Path | list,
        *,
        device_id: int | None = None,
        train: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 8,
        num_threads: int = 2,
        shuffle_buffer: int = 256,
        on_error: str = "raise",
    ):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                "the DALI reader needs `pip install nvidia-dali-cuda130` (hlip-fast[dali])"
            ) from error
        infos = shard_infos(source)
        if remote := [info.path for info in infos if is_url(info.path)]:
            raise ValueError(
                f"{remote[0]}: the DALI reader reads local shards only (DALI's webdataset reader opens "
                "files by path); use --reader cpu or nvcomp for URLs, or copy the shards to a local disk"
            )
        self.shards = [str(info.path) for info in infos]
        self.listed_ids = {  # (shard, key) -> the study id the index lists there
            (str(info.path), key): study_id
            for info in infos
            if info.keys is not None
            for key, study_id in zip(info.keys, info.study_ids)
        }
        listed = [len(info.keys) for info in infos if info.keys is not None]
        self.listed = sum(listed) if len(listed) == len(infos) else None
        self.device_id, self.train, self.seed, self.rank, self.world_size = (
            device_id,
            train,
            seed,
            rank,
            world_size,
        )
        self.batch_size, self.num_threads, self.shuffle_buffer = batch_size, num_threads, shuffle_buffer
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[dict] = []
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pipeline(self, grid: tuple[int, int], dtype: str):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=self.seed + self.epoch,
        )
        def studies():
            meta, blob, sizes, sums = fn.readers.webdataset(
                paths=self.shards,
                ext=["json", "lz4", "sizes", "sum"],
                name="reader",
                shard_id=self.rank,
                num_shards=self.world_size,
                random_shuffle=self.train,
                initial_fill=self.shuffle_buffer,
                pad_last_batch=True,
                missing_component_behavior="error",
            )
            if self.device_id is None:
                return meta, blob, sizes, sums
            dali_dtype = types.UINT8 if dtype == "uint8" else types.UINT16
            chunk_sizes = fn.reinterpret(sizes, dtype=types.INT32)
            slices = fn.experimental.inflate(
                blob.gpu(), chunk_sizes=chunk_sizes, shape=list(grid), dtype=dali_dtype
            )
            return meta, blob, sizes, sums, slices

        pipe = studies()
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[RawStudy, list[torch.Tensor] | None]]:
        """``(stored study, its scans decoded on the GPU)``, or ``(study, None)`` without a GPU."""
        config = prepare_config(self.shards[0])
        running = {"pipe": self._pipeline(tuple(config["grid"]), config["dtype"])}
        try:
            yield from self._read(running)
        finally:
            # DALI's threads live as long as its pipeline. Only `running` holds it, so it goes
            # now, not whenever a traceback that holds these frames does: a fork while the
            # threads run (a DataLoader starting its workers) can deadlock the child.
            running.clear()

    def _read(self, running: dict) -> Iterator[tuple[RawStudy, list[torch.Tensor] | None]]:
        total = running["pipe"].reader_meta("reader")["epoch_size"]
        if self.listed is not None and total != self.listed:
            raise DataError(
                f"DALI finds {total} studies in {len(self.shards)} shard(s), the index lists {self.listed}: "
                "a shard is damaged (read it with the CPU reader to find which)",
                shard=self.shards[0],
            )
        count = total * (self.rank + 1) // self.world_size - total * self.rank // self.world_size
        seen = 0
        while seen < count:
            meta, blob, sizes, sums, *gpu = running["pipe"].run()
            for i in range(min(len(meta), count - seen)):
                members = {
                    ext: np.asarray(out.at(i)).tobytes()
                    for ext, out in (("json", meta), ("lz4", blob), ("sizes", sizes), ("sum", sums))
                }
                shard, _, member = meta[i].source_info().rpartition(":")  # "shard.tar:offset:key.json"
                path, key = shard.rpartition(":")[0], member.partition(".")[0]
                try:
                    raw = assemble_study(path, key, members, listed_as=self.listed_ids.get((path, key)))
                except DataError as error:
                    if self.on_error == "raise":
                        raise
                    self.skipped.append(error.record())
                    continue
                scans = (
                    None if not gpu else list(torch.split(_to_torch(gpu[0][i], self.device_id), raw.depths))
                )
                yield raw, scans
            seen += len(meta)


class DaliBatches:
    """The DALI reader's token-budget steps: same transforms, packing and tokenisation as the CPU
    reader; the studies left out as damaged (``on_error="skip"``) are in :attr:`skipped`."""

    def __init__(
        self,
        studies: DaliStudies,
        transforms: TransformConfig | None = None,
        batching: BatchConfig | None = None,
        tokenize: Tokenize | None = None,
    ):
        self.studies, self.transforms = studies, transforms or TransformConfig()
        self.batching, self.tokenize = batching or BatchConfig(), tokenize

    @property
    def skipped(self) -> list[dict]:
        return self.studies.skipped

    def __iter__(self) -> Iterator[Batch]:
        studies, transforms = self.studies, self.transforms
        decoded = (
            decode_study(
                raw,
                decode_cpu if scans is None else lambda _, s=scans: s,
                transforms,
                studies.train,
                studies.epoch,
            )
            for raw, scans in studies
        )
        return token_batches(decoded, transforms, self.batching, self.tokenize)


def _to_torch(tensor, device_id: int) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(
        tensor.shape(), dtype=to_torch_type[tensor.dtype], device=torch.device("cuda", device_id)
    )
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out
