"""The DALI reader (``nvidia-dali-cuda130``, optional): ``fn.readers.webdataset`` reads the same
shards; on a GPU ``fn.experimental.inflate`` decodes each study's LZ4 slices on the device in one
call. With ``device_id=None`` (no GPU) DALI reads and the slices are decoded with ``lz4`` on the
host. Either way the decoded scans go through the same transforms and batching as the CPU reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .batching import Batch
from .reader import BatchConfig, decode_cpu, decoded_studies, token_batches
from .shards import RawStudy, list_shards
from .transforms import ReaderConfig


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
    ):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                "the DALI reader needs `pip install nvidia-dali-cuda130` (hlip-fast[dali])"
            ) from error
        self.shards = [str(p) for p in (source if isinstance(source, list) else list_shards(source))]
        self.device_id, self.train, self.seed, self.rank, self.world_size = (
            device_id,
            train,
            seed,
            rank,
            world_size,
        )
        self.batch_size, self.num_threads, self.shuffle_buffer = batch_size, num_threads, shuffle_buffer
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
            meta, blob, sizes = fn.readers.webdataset(
                paths=self.shards,
                ext=["json", "lz4", "sizes"],
                name="reader",
                shard_id=self.rank,
                num_shards=self.world_size,
                random_shuffle=self.train,
                initial_fill=self.shuffle_buffer,
                pad_last_batch=True,
                missing_component_behavior="error",
            )
            sizes = fn.reinterpret(sizes, dtype=types.INT32)
            if self.device_id is None:
                return meta, blob, sizes
            dali_dtype = types.UINT8 if dtype == "uint8" else types.UINT16
            slices = fn.experimental.inflate(
                blob.gpu(), chunk_sizes=sizes, shape=list(grid), dtype=dali_dtype
            )
            return meta, slices, sizes

        pipe = studies()
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[RawStudy, list[torch.Tensor]]]:
        config = json.loads((Path(self.shards[0]).parent / "prepare_config.json").read_text())["config"]
        pipe = self._pipeline(tuple(config["grid"]), config["dtype"])
        total = pipe.reader_meta("reader")["epoch_size"]
        count = total * (self.rank + 1) // self.world_size - total * self.rank // self.world_size
        seen = 0
        while seen < count:
            meta, data, sizes = pipe.run()
            for i in range(min(len(meta), count - seen)):
                info = json.loads(np.asarray(meta.at(i)).tobytes())
                chunk_sizes = np.asarray(sizes.at(i)).astype(np.int32)
                if self.device_id is None:
                    raw = RawStudy(
                        info["study_id"], info, np.asarray(data.at(i)).tobytes(), chunk_sizes, "dali"
                    )
                    yield raw, decode_cpu(raw)
                else:
                    raw = RawStudy(info["study_id"], info, b"", chunk_sizes, "dali")
                    yield raw, list(torch.split(_to_torch(data[i], self.device_id), raw.depths))
            seen += len(meta)


def dali_batches(
    studies: DaliStudies, reader: ReaderConfig | None = None, batching: BatchConfig | None = None
) -> Iterator[Batch]:
    """The DALI reader's token-budget steps: same transforms and packing as the CPU reader."""
    reader = reader or ReaderConfig()
    decoded = decoded_studies(studies, reader, studies.train, studies.epoch)
    return token_batches(decoded, reader, batching or BatchConfig())


def _to_torch(tensor, device_id: int) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(
        tensor.shape(), dtype=to_torch_type[tensor.dtype], device=torch.device("cuda", device_id)
    )
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out
