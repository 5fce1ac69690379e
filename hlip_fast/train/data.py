"""Training batches for one rank and epoch, and the epoch plan: how many steps an epoch holds and
whether these data and settings can train at all (checked before any work starts)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hlip_fast.data.batching import Batch, BatchConfig
from hlip_fast.data.reader import RawStudies, StudyBatches, cpu_loader
from hlip_fast.data.shards import read_index
from hlip_fast.data.transforms import Study, TransformConfig, model_transforms

from .config import TrainConfig
from .distributed import Dist


def batch_config(cfg: TrainConfig, patch_size: tuple[int, int, int]) -> BatchConfig:
    return BatchConfig(patch_size=tuple(patch_size), max_tokens=cfg.max_tokens, max_studies=cfg.max_studies)


def train_transforms(cfg: TrainConfig, model) -> TransformConfig:
    """HLIP's training transforms for ``model`` with this run's jitter and seed."""
    return model_transforms(model, jitter=cfg.jitter, seed=cfg.seed)


READER_DESCRIPTIONS = {
    "cpu": "{workers} DataLoader worker(s) per rank",
    "nvcomp": "nvCOMP decoding on the GPU",
    "dali": "DALI, {threads} thread(s) per rank",
}


def reader_description(cfg: TrainConfig) -> str:
    """How this run reads its batches, in words."""
    return READER_DESCRIPTIONS[cfg.reader].format(workers=cfg.workers, threads=max(1, cfg.workers))


def train_loader(cfg: TrainConfig, model, dist: Dist, epoch: int) -> Iterable[Batch]:
    """This rank's token-budget batches of ``epoch``, their reports already tokenised: CPU
    decoding in DataLoader workers, nvCOMP decoding on the GPU, or DALI (inflating on the GPU
    when the run is on CUDA); the studies skipped as damaged (``--on-error skip``) collect in
    its ``skipped`` list."""
    batching = batch_config(cfg, model.config.vision.patch_size)
    transforms, tokenize = train_transforms(cfg, model), model.text.report_tokenizer()
    if cfg.reader == "dali":
        from hlip_fast.data.dali import DaliBatches, DaliStudies

        device_id = None  # DALI decodes on the host
        if dist.device.type == "cuda":  # DALI wants an index; a bare "cuda" is the current device
            device_id = torch.cuda.current_device() if dist.device.index is None else dist.device.index
        studies = DaliStudies(
            cfg.train_data,
            device_id=device_id,
            train=True,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            num_threads=max(1, cfg.workers),
            on_error=cfg.on_error,
        )
        studies.set_epoch(epoch)
        return DaliBatches(studies, transforms, batching, tokenize)
    raw = RawStudies(
        cfg.train_data,
        train=True,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        on_error=cfg.on_error,
    )
    raw.set_epoch(epoch)
    if cfg.reader == "nvcomp":
        from hlip_fast.data.gpu import NvcompDecoder

        return StudyBatches(raw, transforms, batching, NvcompDecoder(dist.device), tokenize)
    dataset = StudyBatches(raw, transforms, batching, tokenize=tokenize)
    return cpu_loader(dataset, num_workers=cfg.workers, pin_memory=dist.device.type == "cuda")


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch of ``train_data`` holds, from its index alone (shapes, no pixels)."""

    studies: int
    batches: int
    smallest: tuple[str, int]
    grid: tuple[int, int]

    def describe(self, dist: Dist, accum_freq: int, total_steps: int) -> str:
        return (
            f"{self.studies} training studies, about {self.steps_per_rank(dist.world_size, accum_freq)} "
            f"steps per epoch and rank; {total_steps} steps on {dist.world_size} rank(s), {dist.device}"
        )

    def steps_per_rank(self, world_size: int, accum_freq: int) -> int:
        """Steps per rank and epoch. Packing order shuffles each epoch, so an epoch may end a step
        or two earlier or later."""
        return max(1, math.ceil(self.batches / world_size / accum_freq))


def total_steps(cfg: TrainConfig, plan: EpochPlan, world_size: int) -> int:
    """The run's length in steps: ``steps``, or ``epochs`` times an epoch's steps per rank."""
    return cfg.steps or cfg.epochs * plan.steps_per_rank(world_size, cfg.accum_freq)


def plan_epoch(cfg: TrainConfig, patch_size: tuple[int, int, int], max_scans: int | None) -> EpochPlan:
    """The token-budget packing of every study of the index (its first ``max_scans`` scans, or
    all with ``None``)."""
    index = read_index(cfg.train_data)
    batching = batch_config(cfg, patch_size)
    studies = [
        Study(s["study_id"], [torch.empty(shape, device="meta") for shape in s["shapes"][:max_scans]], "")
        for shard in index["shards"]
        for s in shard["studies"]
    ]
    tokens = [s.tokens(batching.patch_size) for s in studies]
    batches = sum(1 for _ in batching.budget()(studies))
    smallest = min(zip(tokens, (s.study_id for s in studies)), default=(0, ""))
    return EpochPlan(
        studies=len(studies),
        batches=batches,
        smallest=(smallest[1], smallest[0]),
        grid=tuple(index["config"]["grid"]),
    )


def plan_problems(
    cfg: TrainConfig, plan: EpochPlan, patch_size: tuple[int, int, int], world_size: int
) -> list[str]:
    """Why these data and settings could never make a useful step (empty when they can)."""
    if plan.studies == 0:
        return [f"train_data {cfg.train_data!r} holds no studies"]
    problems = []
    if plan.grid[0] % patch_size[1] or plan.grid[1] % patch_size[2]:
        problems.append(
            f"train_data's in-plane grid {plan.grid} is not divisible by the model's patch "
            f"{tuple(patch_size[1:])}: prepare it with a grid that is"
        )
    study, tokens = plan.smallest
    if tokens > cfg.max_tokens:
        problems.append(
            f"max_tokens {cfg.max_tokens} is smaller than every study (the smallest, {study!r}, has {tokens} "
            "tokens): every step would hold one study and learn nothing; raise --max-tokens"
        )
    per_rank = max(1, plan.batches // world_size)  # each rank packs its own studies
    if plan.studies < world_size:
        problems.append(f"{world_size} ranks but train_data holds {plan.studies} studies: use fewer ranks")
    elif per_rank < cfg.accum_freq:
        problems.append(
            f"accum_freq {cfg.accum_freq} needs that many batches per step on each rank, but an epoch "
            f"holds only {per_rank} per rank ({plan.studies} studies, --max-tokens {cfg.max_tokens}): "
            "lower --accum-freq"
        )
    per_step = plan.studies / per_rank * cfg.accum_freq
    if not problems and per_step < 2:
        problems.append(
            f"a step would hold about {per_step:.1f} studies; the contrastive loss needs at least 2 "
            "(with 1 it is 0 and nothing is learned): raise --max-tokens or --max-studies, or --accum-freq"
        )
    steps = total_steps(cfg, plan, world_size)
    if cfg.warmup > steps:
        problems.append(
            f"warmup {cfg.warmup} is longer than the run ({steps} steps): the learning rate would never "
            f"reach --lr {cfg.lr:g}; lower --warmup (e.g. {max(1, steps // 20)}) or run longer"
        )
    return problems


def training_reports(cfg: TrainConfig) -> list[str]:
    """Every training study's report, read from the shards (the tiny text model's vocabulary
    and masked-language-model warm-up come from them)."""
    return [
        raw.meta["report"] for raw in RawStudies(cfg.train_data, rank=0, world_size=1, on_error=cfg.on_error)
    ]
