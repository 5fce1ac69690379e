"""The packing of a batch of ragged studies: which tokens form each slice, scan and study segment.

Tokens are packed study by study, scan by scan, slice-group by slice-group, then row-major over
the in-plane patch grid. Because the order is the same at every level, each level is just a
different set of segment boundaries over the same tokens. A :class:`Layout` is built once per
batch on the host (NumPy) and moved to the device once; every block of the model shares it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")
LEVELS: tuple[str, ...] = ("slice", "scan", "study")
"""Attention levels, from finest to coarsest. Segments nest: slice ⊂ scan ⊂ study."""


def check_level(level: str) -> str:
    """Return ``level`` if it names an attention level, else raise a ``ValueError``."""
    if level not in LEVELS:
        raise ValueError(f"unknown attention level {level!r}; expected one of {LEVELS}")
    return level


@dataclass(frozen=True)
class LevelLayout:
    """Segments of one level.

    ``cu_seqlens`` (int32, segments + 1) lives on the layout's device; ``seqlens`` and
    ``offsets`` (the same boundaries, int64) stay on the host so that planning code never syncs.
    Nothing here is per token: per-token segment ids are made on the device when a backend asks
    (:meth:`Layout.segment_ids`).
    """

    cu_seqlens: torch.Tensor
    seqlens: np.ndarray
    offsets: np.ndarray
    max_seqlen: int
    num_segments: int

    @property
    def starts(self) -> np.ndarray:
        """Host offsets of the first token of each segment."""
        return self.offsets[:-1]


@dataclass(frozen=True)
class Layout:
    """Segment structure of a packed batch at the slice, scan and study levels.

    Host arrays (NumPy): ``grids`` ``(num_scans, 3)`` patch grid ``(d, h, w)`` per scan,
    ``scan_study`` study index per scan (``scan_offsets`` and ``scan_tokens`` come from the scan
    level).
    Plain ints (``num_tokens``, each level's ``num_segments``) keep ``torch.compile`` from
    treating sizes as data. Device tensors: per level :class:`LevelLayout`; ``scan_study_index`` and
    ``scan_position`` (index of each scan within its study) as int64 for embedding look-ups.
    What derives from those (segment ids, parents, child counts, backends' plans and tile
    schedules) is made on first use and kept in ``cache``.
    """

    grids: np.ndarray
    scan_study: np.ndarray
    slice_depth: int
    levels: dict[str, LevelLayout]
    scan_study_index: torch.Tensor
    scan_position: torch.Tensor
    num_tokens: int
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    """Per-layout memo (segment ids, parents, bucket plans, block masks, tile schedules): built
    on first use, reused by every block of a step."""

    @classmethod
    def build(
        cls,
        grids: Sequence[Sequence[int]] | np.ndarray,
        scans_per_study: Sequence[int],
        *,
        slice_depth: int = 1,
        device: torch.device | str = "cpu",
    ) -> Layout:
        """Build the layout from each scan's patch grid and each study's number of scans.

        A slice segment is ``slice_depth`` adjacent depth-rows of one scan (the last group of a
        scan may be thinner when its depth is not a multiple of ``slice_depth``).
        """
        grids = _grid_array(grids)
        scans_per_study = np.asarray(scans_per_study, dtype=np.int64)
        if slice_depth < 1:
            raise ValueError(f"slice_depth must be >= 1, got {slice_depth}")
        if len(scans_per_study) == 0:
            raise ValueError("a layout needs at least one study")
        if (scans_per_study < 1).any():
            empty = np.flatnonzero(scans_per_study < 1).tolist()
            raise ValueError(f"studies {empty} have no scans")
        if scans_per_study.sum() != len(grids):
            raise ValueError(
                f"scans_per_study adds up to {scans_per_study.sum()} but {len(grids)} grids were given"
            )
        if (grids < 1).any():
            raise ValueError(f"every patch grid needs positive sizes, got {grids.tolist()}")

        num_studies = len(scans_per_study)
        scan_study = np.repeat(np.arange(num_studies), scans_per_study)
        scan_tokens = grids.prod(axis=1)
        study_offsets = np.concatenate([[0], np.cumsum(scans_per_study)])
        scan_position = np.arange(len(grids)) - study_offsets[scan_study]

        # Slice groups: ceil(d / slice_depth) per scan; the last may hold fewer depth-rows.
        groups = -(-grids[:, 0] // slice_depth)
        in_plane = grids[:, 1] * grids[:, 2]
        slice_seqlens = np.repeat(slice_depth * in_plane, groups)
        slice_seqlens[np.cumsum(groups) - 1] = (grids[:, 0] - (groups - 1) * slice_depth) * in_plane
        study_seqlens = np.add.reduceat(scan_tokens, study_offsets[:-1])
        seqlens = {"slice": slice_seqlens, "scan": scan_tokens, "study": study_seqlens}

        device = torch.device(device)
        levels = {name: _level_layout(seqlens[name], device) for name in LEVELS}
        return cls(
            grids=grids,
            scan_study=scan_study,
            slice_depth=slice_depth,
            levels=levels,
            scan_study_index=torch.from_numpy(scan_study).to(device),
            scan_position=torch.from_numpy(scan_position).to(device),
            num_tokens=int(levels["scan"].offsets[-1]),
        )

    @property
    def device(self) -> torch.device:
        return self.scan_position.device

    @property
    def num_scans(self) -> int:
        return len(self.grids)

    @property
    def num_studies(self) -> int:
        return self.levels["study"].num_segments

    @property
    def scan_offsets(self) -> np.ndarray:
        """Host token offsets of the scans, ``num_scans + 1`` (the scan level's boundaries)."""
        return self.levels["scan"].offsets

    @property
    def scan_tokens(self) -> np.ndarray:
        """Host number of tokens in each scan."""
        return self.levels["scan"].seqlens

    def level(self, level: str) -> LevelLayout:
        """The segments of ``level`` (``"slice"``, ``"scan"`` or ``"study"``)."""
        return self.levels[check_level(level)]

    def num_segments(self, level: str) -> int:
        return self.level(level).num_segments

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Layout:
        """This layout with its tensors on ``device`` (itself when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        levels = {
            name: LevelLayout(
                cu_seqlens=move(lv.cu_seqlens),
                seqlens=lv.seqlens,
                offsets=lv.offsets,
                max_seqlen=lv.max_seqlen,
                num_segments=lv.num_segments,
            )
            for name, lv in self.levels.items()
        }
        return Layout(
            grids=self.grids,
            scan_study=self.scan_study,
            slice_depth=self.slice_depth,
            levels=levels,
            scan_study_index=move(self.scan_study_index),
            scan_position=move(self.scan_position),
            num_tokens=self.num_tokens,
        )

    def cached(self, key: tuple, build: Callable[[], T]) -> T:
        """``build()``, once per ``key`` for this layout: the one place where backends and kernels
        keep what they derive from a layout (plans, masks, schedules), so every block of a step
        shares it and it goes away with the layout."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def class_rows_level(self, level: str, rows: int, prefix: int = 1) -> str | None:
        """The level whose segments number the class-token copies of a ``level`` tensor with
        ``rows`` rows (``None``: it has none), or a ``ValueError``.

        Such a tensor holds the patch tokens, then optionally class-token copies: ``prefix``
        (the prefix tokens: class token and registers) per segment of ``level``, or per segment
        of a finer level, segment by segment (segment ``s``'s copies are rows ``N + s·prefix``
        onwards). In the latter case the rows past ``level``'s copies are *spare*: each is a
        segment of its own, one row long, so that a model can keep the copies of its finest level
        in place while it attends coarser (a level switch then never moves the patch rows).
        """
        tokens = self.num_tokens
        # Branches only: traced with symbolic sizes, they give a plain answer (and guards) that
        # backends can use in their cache keys.
        if rows == tokens:
            return None
        finer = LEVELS[: LEVELS.index(check_level(level)) + 1]
        for copies_of in reversed(finer):
            if rows == tokens + prefix * self.num_segments(copies_of):
                return copies_of
        counts = ", ".join(f"{tokens + prefix * self.num_segments(lv)} ({lv})" for lv in finer)
        raise ValueError(
            f"a {level} tensor has {rows} rows; the layout has {tokens} tokens, so expected {tokens} "
            f"(no class tokens) or the tokens plus {prefix} class-token cop{'y' if prefix == 1 else 'ies'} "
            f"per segment of {level} or a finer level: {counts}"
        )

    def num_rows(self, level: str, class_tokens: bool | str = False, prefix: int = 1) -> int:
        """Rows of a ``level`` tensor: the patch tokens, plus with ``class_tokens`` ``prefix``
        class-token copies per segment of ``level`` (``True``) or of the finer level it names."""
        copies_of = _copies_level(level, class_tokens)
        return self.num_tokens + (prefix * self.num_segments(copies_of) if copies_of else 0)

    def segment_ids(self, level: str, class_tokens: bool | str = False, prefix: int = 1) -> torch.Tensor:
        """Segment id (int32) of every row of a level's packed tensor, made on the layout's
        device from ``cu_seqlens`` (no host work per token) and cached.

        Rows are the patch tokens, then, with ``class_tokens``, ``prefix`` class-token copies per
        segment; when ``class_tokens`` names a finer level, as many copies as it has segments:
        those past ``level``'s are spare rows, each a segment of its own (ids from
        ``level``'s segment count on; see :meth:`class_rows_level`).
        """
        copies_of = _copies_level(level, class_tokens)

        def build() -> torch.Tensor:
            if copies_of and LEVELS.index(check_level(copies_of)) > LEVELS.index(level):
                raise ValueError(f"class-token copies of {copies_of} are coarser than the level {level}")
            lv = self.level(level)
            spare = prefix * (self.num_segments(copies_of or level) - lv.num_segments)
            segments = torch.arange(lv.num_segments + spare, dtype=torch.int32, device=self.device)
            ids = torch.repeat_interleave(
                segments[: lv.num_segments], lv.cu_seqlens.diff(), output_size=self.num_tokens
            )
            if not copies_of:
                return ids
            copies = segments[: lv.num_segments].repeat_interleave(prefix)
            return torch.cat([ids, copies, segments[lv.num_segments :]])

        return self.cached(("segment_ids", level, copies_of, prefix), build)

    def parent_ids(self, fine: str, coarse: str) -> torch.Tensor:
        """For each segment of level ``fine``, the index (int64) of the ``coarse`` segment that
        holds it; made on the layout's device from ``cu_seqlens`` and cached."""

        def build() -> torch.Tensor:
            starts = self.level(fine).cu_seqlens[:-1]
            return torch.searchsorted(self.level(coarse).cu_seqlens[1:], starts, right=True)

        return self.cached(("parent_ids", fine, coarse), build)

    def child_counts(self, fine: str, coarse: str) -> torch.Tensor:
        """For each segment of level ``coarse``, how many ``fine`` segments it holds (int64);
        made on the layout's device from ``cu_seqlens`` and cached."""

        def build() -> torch.Tensor:
            starts = self.level(fine).cu_seqlens[:-1]
            return torch.searchsorted(starts, self.level(coarse).cu_seqlens).diff()

        return self.cached(("child_counts", fine, coarse), build)

    def describe(self) -> dict[str, dict[str, float]]:
        """Per-level segment statistics: count, min, median, mean and max length."""
        stats = {}
        for name, lv in self.levels.items():
            s = lv.seqlens
            stats[name] = {
                "segments": int(len(s)),
                "min": int(s.min()),
                "median": float(np.median(s)),
                "mean": float(s.mean()),
                "max": int(s.max()),
            }
        return stats


def _copies_level(level: str, class_tokens: bool | str) -> str | None:
    """The level whose segments number the class-token copies: ``level`` for ``True``, the level
    ``class_tokens`` names, or ``None`` for ``False``."""
    return level if class_tokens is True else class_tokens or None


def _grid_array(grids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """``(scans, 3)`` int64 from an array or a sequence of ``(d, h, w)`` (read flat through
    ``np.fromiter``: half the time of ``np.asarray`` on a list of tuples, which a step pays)."""
    if isinstance(grids, np.ndarray):
        return grids.astype(np.int64, copy=False).reshape(-1, 3)
    bad = next((i for i, grid in enumerate(grids) if len(grid) != 3), None)
    if bad is not None:
        raise ValueError(f"scan {bad}: a patch grid is 3 sizes (d, h, w), got {tuple(grids[bad])}")
    return np.fromiter(chain.from_iterable(grids), dtype=np.int64, count=3 * len(grids)).reshape(-1, 3)


def _level_layout(seqlens: np.ndarray, device: torch.device) -> LevelLayout:
    offsets = np.zeros(len(seqlens) + 1, dtype=np.int64)
    np.cumsum(seqlens, out=offsets[1:])
    return LevelLayout(
        cu_seqlens=torch.from_numpy(offsets.astype(np.int32)).to(device),
        seqlens=seqlens,
        offsets=offsets,
        max_seqlen=int(seqlens.max()),
        num_segments=len(seqlens),
    )
