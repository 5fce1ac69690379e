"""Token-budget batches: whole studies up to ``max_tokens`` per step, packed into a ``StudyBatch``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..packing import StudyBatch, pack_studies
from .config import DEFAULT_MAX_TOKENS
from .transforms import Study

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One step: packed patches and layout, the reports (and, from a reader given a
    ``tokenize``, their tokens), and labels ``(studies, classes)`` (``-1`` where a study lacks a
    label or it is unknown, ``null``)."""

    studies: StudyBatch
    reports: list[str]
    labels: torch.Tensor
    label_names: tuple[str, ...]
    fill: float
    text: dict[str, torch.Tensor] | None = None
    """The texts tokenised where the batch was made (a reader given a ``tokenize``)."""
    sentences: list[str] | None = None
    """One report sentence per study, when the studies carry them (dual models)."""

    @property
    def texts(self) -> list[str]:
        """What the text tower embeds: the reports, or with sentences each study's sentence then
        its report (``2 × studies`` texts, the order a dual model's features unflatten in)."""
        if self.sentences is None:
            return self.reports
        return [text for pair in zip(self.sentences, self.reports) for text in pair]

    @property
    def study_ids(self) -> tuple[str, ...]:
        return self.studies.study_ids

    def pin_memory(self) -> Batch:
        """The patches in page-locked memory (what a DataLoader's ``pin_memory=True`` calls)."""
        return replace(self, studies=self.studies.pin_memory())


def collate(
    studies: Sequence[Study],
    patch_size: tuple[int, int, int],
    pad_value: float = 0.0,
    max_tokens: int | None = None,
) -> Batch:
    """Pad each scan's depth up to a multiple of the patch depth and pack. Integer scans (a
    reader's, with their intensity maps) are padded with 0, the stored minimum, and stay
    integers until the batch lands; model-input scans are padded with ``pad_value``."""
    pd, ph, pw = patch_size
    mapped = [s.intensity is not None for s in studies]
    if any(mapped) and not all(mapped):
        raise ValueError("collate: some studies carry intensity maps and some do not; give one kind")
    scans = []
    for study in studies:
        padded = []
        for scan in study.scans:
            if scan.shape[1] % ph or scan.shape[2] % pw:
                shape = tuple(scan.shape[1:])
                raise ValueError(f"study {study.study_id}: in-plane {shape} not divisible by {(ph, pw)}")
            extra = -scan.shape[0] % pd
            fill = 0 if study.intensity is not None else pad_value
            padded.append(F.pad(scan, (0, 0, 0, 0, 0, extra), value=fill) if extra else scan)
        scans.append(padded)
    batch = pack_studies(
        scans,
        patch_size,
        study_ids=[s.study_id for s in studies],
        intensity=[s.intensity for s in studies] if all(mapped) else None,
    )
    names = tuple(sorted({name for s in studies for name in s.labels}))
    labels = torch.tensor(
        [[-1 if s.labels.get(n) is None else int(s.labels[n]) for n in names] for s in studies],
        dtype=torch.long,
    ).reshape(len(studies), len(names))
    fill = batch.layout.num_tokens / max_tokens if max_tokens else 1.0
    with_sentences = [s.sentence is not None for s in studies]
    if any(with_sentences) and not all(with_sentences):
        raise ValueError("collate: some studies carry report sentences and some do not; give one kind")
    sentences = [s.sentence for s in studies] if studies and all(with_sentences) else None
    return Batch(batch, [s.report for s in studies], labels, names, fill, sentences=sentences)


@dataclass
class BatchConfig:
    """Token-budget batching: the settings of a :class:`TokenBudget`."""

    patch_size: tuple[int, int, int] = (8, 16, 16)
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_studies: int | None = None
    group_size: int = 64
    oversize: str = "alone"

    def budget(self) -> TokenBudget:
        return TokenBudget(
            self.max_tokens,
            self.patch_size,
            max_studies=self.max_studies,
            group_size=self.group_size,
            oversize=self.oversize,
        )


class TokenBudget:
    """Groups a stream of studies into steps of at most ``max_tokens`` (and ``max_studies``).

    Inside a window of ``group_size`` studies the largest go first into the fullest step that
    still fits them (first-fit decreasing), which keeps steps full; the least-filled step is
    carried into the next window. A study over the budget gets a step of its own
    (``oversize="alone"``) or its scans' depths are cropped to fit (``oversize="crop"``), with
    a warning; no study is dropped. ``fills`` records each step's token fill ratio.
    """

    def __init__(
        self,
        max_tokens: int,
        patch_size: tuple[int, int, int],
        *,
        max_studies: int | None = None,
        group_size: int = 64,
        oversize: str = "alone",
    ):
        if max_tokens < 1 or (max_studies is not None and max_studies < 1):
            raise ValueError(f"max_tokens and max_studies must be positive, got {max_tokens}, {max_studies}")
        if oversize not in ("alone", "crop"):
            raise ValueError(f"oversize must be 'alone' or 'crop', got {oversize!r}")
        self.max_tokens, self.patch_size, self.max_studies = max_tokens, tuple(patch_size), max_studies
        self.group_size, self.oversize = group_size, oversize
        self.fills: list[float] = []

    def _fit(self, study: Study) -> Study:
        tokens = study.tokens(self.patch_size)
        if tokens <= self.max_tokens:
            return study
        if self.oversize == "crop":
            pd = self.patch_size[0]
            factor = self.max_tokens / tokens
            scans = []
            for scan in study.scans:
                depth = max(pd, int(scan.shape[0] * factor) // pd * pd)
                start = (scan.shape[0] - depth) // 2
                scans.append(scan[start : start + depth])
            cropped = replace(study, scans=scans)
            if cropped.tokens(self.patch_size) <= self.max_tokens:
                log.warning(
                    "study %s: %d tokens > budget %d; depth cropped to fit",
                    study.study_id,
                    tokens,
                    self.max_tokens,
                )
                return cropped
        log.warning(
            "study %s: %d tokens > budget %d; it gets a step of its own",
            study.study_id,
            tokens,
            self.max_tokens,
        )
        return study

    def _pack(self, window: list[Study]) -> list[list[Study]]:
        steps: list[tuple[int, list[Study]]] = []
        for study in sorted(window, key=lambda s: -s.tokens(self.patch_size)):
            tokens = study.tokens(self.patch_size)
            fits = [
                i
                for i, (used, members) in enumerate(steps)
                if used + tokens <= self.max_tokens
                and (self.max_studies is None or len(members) < self.max_studies)
            ]
            if fits:
                i = max(fits, key=lambda i: steps[i][0])
                steps[i] = (steps[i][0] + tokens, steps[i][1] + [study])
            else:
                steps.append((tokens, [study]))
        return [members for _, members in sorted(steps, key=lambda step: -step[0])]

    def __call__(self, studies: Iterable[Study]) -> Iterator[list[Study]]:
        window: list[Study] = []
        for study in studies:
            window.append(self._fit(study))
            if len(window) >= self.group_size:
                steps = self._pack(window)
                window = steps.pop() if len(steps) > 1 else []
                yield from self._emit(steps)
        yield from self._emit(self._pack(window) if window else [])

    def _emit(self, steps: list[list[Study]]) -> Iterator[list[Study]]:
        for members in steps:
            self.fills.append(sum(s.tokens(self.patch_size) for s in members) / self.max_tokens)
            yield members

    @property
    def mean_fill(self) -> float:
        return float(np.mean(self.fills)) if self.fills else 0.0
