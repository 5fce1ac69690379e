"""Decoded integer scans → model input, with HLIP's training-time augmentation.

Random choices are drawn on the host from a generator seeded by (seed, epoch, study id), and
applied with torch ops on whatever device the scans are on: the CPU reader and a GPU reader
give the same tensors for the same study and epoch.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .shards import RawStudy
from .tokens import study_tokens

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class TransformConfig:
    """How stored scans become model input.

    Values map ``[0, max]`` integers to ``[0, 1]``, then ``(x - mean) / std``. Training draws:
    scan order (``shuffle_scans``), at most ``max_scans`` scans, report sentence order
    (``shuffle_sentences``), a random ``crop`` ``(h, w)`` in-plane and ``max_depth`` window
    (centred in evaluation), flips along ``flip_axes`` (0 depth, 1 rows, 2 columns; off by
    default because reports name sides), and intensity ``jitter`` (scale ``1 ± j``, shift ``± j``).
    With ``sentences`` each study also carries one sentence of its report (a seeded draw in
    training, the first in evaluation): what a dual model's first embedding meets.
    """

    mean: float = 0.0
    std: float = 1.0
    shuffle_scans: bool = True
    max_scans: int | None = None
    shuffle_sentences: bool = True
    crop: tuple[int, int] | None = None
    max_depth: int | None = None
    flip_axes: tuple[int, ...] = ()
    jitter: float = 0.0
    seed: int = 0
    sentences: bool = False


def model_transforms(model, *, jitter: float = 0.0, seed: int = 0) -> TransformConfig:
    """How stored scans become ``model``'s input: its intensity normalisation, at most as many
    scans per study as its sequential position table holds; in training, HLIP's shuffled scans
    and report sentences, intensity ``jitter`` and the run's ``seed``."""
    config = model.config
    return TransformConfig(
        mean=config.input_mean,
        std=config.input_std,
        max_scans=config.vision.max_num_scans or None,
        jitter=jitter,
        seed=seed,
        sentences=config.loss == "dual",
    )


@dataclass
class Study:
    """One decoded study on the reader's device: scans ``(D, H, W)``, report, labels.

    A reader's scans are the stored integers (cropped, flipped) with each scan's intensity map
    ``(scale, offset)`` in ``intensity``; they become floats where the batch lands (see
    :class:`~hlip_fast.packing.StudyBatch`). Without ``intensity`` the scans are model input.
    """

    study_id: str
    scans: list[torch.Tensor]
    report: str
    labels: dict = field(default_factory=dict)
    intensity: list[tuple[float, float]] | None = None
    sentence: str | None = None
    """One sentence of the report (with ``TransformConfig.sentences``)."""

    def normalised(self) -> list[torch.Tensor]:
        """The scans as float32 model input (each scan's intensity map applied)."""
        if self.intensity is None:
            return self.scans
        return [s.to(torch.float32).mul_(a).add_(b) for s, (a, b) in zip(self.scans, self.intensity)]

    def tokens(self, patch_size: tuple[int, int, int]) -> int:
        return study_tokens((s.shape for s in self.scans), patch_size)


def study_rng(config: TransformConfig, epoch: int, study_id: str) -> np.random.Generator:
    return np.random.default_rng([config.seed, epoch, zlib.crc32(study_id.encode())])


def _window(size: int, want: int | None, rng: np.random.Generator | None) -> slice:
    if want is None or size <= want:
        return slice(0, size)
    start = int(rng.integers(0, size - want + 1)) if rng is not None else (size - want) // 2
    return slice(start, start + want)


def to_study(
    raw: RawStudy, scans: list[torch.Tensor], config: TransformConfig, train: bool, epoch: int
) -> Study:
    """Crop (and in training augment) the decoded integer ``scans`` of ``raw``, and give each
    scan the intensity map to model input: ``x / max`` (times ``1 ± jitter``, plus ``± jitter``
    in training), then ``(x - mean) / std``, as one ``(scale, offset)``."""
    rng = study_rng(config, epoch, raw.study_id) if train else None
    order = list(range(len(scans)))
    if rng is not None and config.shuffle_scans:
        order = list(rng.permutation(len(scans)))
    if config.max_scans is not None:
        order = order[: config.max_scans]
    top = float(np.iinfo(raw.meta["dtype"]).max)
    out, intensity = [], []
    for i in order:
        scan = scans[i]
        h, w = config.crop or scan.shape[1:]
        window = (
            _window(scan.shape[0], config.max_depth, rng),
            _window(scan.shape[1], h, rng),
            _window(scan.shape[2], w, rng),
        )
        x = scan[window]
        gain, shift = 1.0, 0.0
        if rng is not None:
            dims = [axis for axis in config.flip_axes if rng.random() < 0.5]
            if dims:
                x = torch.flip(x, dims)
            if config.jitter:
                gain = float(rng.uniform(1 - config.jitter, 1 + config.jitter))
                shift = float(rng.uniform(-config.jitter, config.jitter))
        # ((x / top) * gain + shift - mean) / std as one affine map, applied where the batch lands:
        # float32 volumes were most of a CT volume's reading time and 4x the bytes to move.
        out.append(x)
        intensity.append((gain / (top * config.std), (shift - config.mean) / config.std))
    report = raw.meta["report"]
    sentences = _SENTENCE_END.split(report.strip())
    if rng is not None and config.shuffle_sentences:
        report = " ".join(sentences[i] for i in rng.permutation(len(sentences)))
    sentence = None
    if config.sentences:  # drawn last, so that every other draw is as without it
        sentence = sentences[int(rng.integers(len(sentences)))] if rng is not None else sentences[0]
    return Study(raw.study_id, out, report, dict(raw.meta.get("labels", {})), intensity, sentence)
