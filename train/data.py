"""Training batches for one rank and epoch, and how many steps an epoch holds."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from hlip_fast.data.batching import Batch, TokenBudget
from hlip_fast.data.reader import BatchConfig, RawStudies, StudyBatches, cpu_loader
from hlip_fast.data.transforms import ReaderConfig, Study

from .config import TrainConfig
from .distributed import Dist


def reader_config(cfg: TrainConfig, model) -> ReaderConfig:
    """HLIP's training reader: shuffled scans and report sentences, at most as many scans as
    the model's position table, the model's input normalisation, optional intensity jitter."""
    return ReaderConfig(
        mean=model.config.input_mean,
        std=model.config.input_std,
        max_scans=model.config.vision.max_num_scans,
        jitter=cfg.jitter,
        seed=cfg.seed,
    )


def batch_config(cfg: TrainConfig, model) -> BatchConfig:
    return BatchConfig(
        patch_size=model.config.vision.patch_size, max_tokens=cfg.max_tokens, max_studies=cfg.max_studies
    )


def train_loader(cfg: TrainConfig, model, dist: Dist, epoch: int) -> Iterable[Batch]:
    """This rank's token-budget batches of ``epoch`` (CPU workers, or nvCOMP decoding on the GPU)."""
    raw = RawStudies(cfg.train_data, train=True, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    raw.set_epoch(epoch)
    if cfg.reader == "nvcomp":
        from hlip_fast.data.gpu import NvcompDecoder

        return StudyBatches(
            raw, reader_config(cfg, model), batch_config(cfg, model), decode=NvcompDecoder(dist.device)
        )
    dataset = StudyBatches(raw, reader_config(cfg, model), batch_config(cfg, model))
    return cpu_loader(dataset, num_workers=cfg.workers, pin_memory=dist.device.type == "cuda")


def steps_per_epoch(cfg: TrainConfig, model, world_size: int) -> int:
    """Steps per rank and epoch, from the shard index alone: the token-budget packing of every
    study (its first ``max_scans`` scans, as shapes only) split over the ranks. Packing order
    shuffles each epoch, so an epoch may end a step or two earlier or later."""
    index = json.loads((Path(cfg.train_data) / "index.json").read_text())
    batching = batch_config(cfg, model)
    budget = TokenBudget(batching.max_tokens, batching.patch_size, max_studies=batching.max_studies)
    keep = model.config.vision.max_num_scans
    studies = [
        Study(s["study_id"], [torch.empty(shape, device="meta") for shape in s["shapes"][:keep]], "")
        for shard in index["shards"]
        for s in shard["studies"]
    ]
    steps = sum(1 for _ in budget(studies)) / world_size
    return max(1, math.ceil(steps / cfg.accum_freq))
