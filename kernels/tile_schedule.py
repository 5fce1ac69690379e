"""The tile schedule of the hierarchical attention kernels: which rows each program owns and
which segments' rows it visits, built once per (layout, level) on the host and cached there.

A work item is at most ``block_m`` rows (patch rows and class-token rows, in any order) of the
consecutive segments ``lo..hi-1``; its partners are all rows of those segments: the patch rows
``cu[lo]..cu[hi]``, then the class rows ``N + lo..N + hi``, visited ``block_n`` at a time and
masked by segment id. Every row belongs to exactly one item, so the forward, the query-side
backward and (the relation being symmetric) the key-side backward all run one program per item
and write each row once.

The rule: a segment's rows (its class row last) fill whole ``block_m`` items; what is left, the
segment's tail, shares an item with the previous segments' tails when that visits no more score
entries than separate items would. So short segments share tiles, long ones keep full tiles, and
a class row rides in its segment's last item, whose key tiles already cover the class column.
No GPU is needed to count the work: :meth:`TileSchedule.visited` is what the kernels execute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MODEL_BLOCK_N = 64
"""Key-tile width the schedule's merge decisions and the work counts assume."""


@dataclass(frozen=True)
class TileSchedule:
    """``starts`` (items + 1) index ``rows`` (every row once, grouped by item); ``segments``
    ``(items, 2)`` holds each item's segment range ``lo, hi`` (``hi`` exclusive)."""

    block_m: int
    rows: np.ndarray
    starts: np.ndarray
    segments: np.ndarray
    cu: np.ndarray
    class_rows: bool
    device_arrays: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.segments)

    def partner_counts(self) -> np.ndarray:
        """Rows each item visits as partners (patch rows of its segments, then class rows)."""
        lo, hi = self.segments[:, 0], self.segments[:, 1]
        return self.cu[hi] - self.cu[lo] + (hi - lo) * int(self.class_rows)

    def visited(self, block_n: int = MODEL_BLOCK_N) -> int:
        """Score entries the kernels compute: a full ``block_m`` × ``block_n`` tile per step."""
        tiles = -(-self.partner_counts() // block_n)
        return int(self.block_m * block_n * tiles.sum())

    def useful(self) -> int:
        """Score entries attention needs: ``(L + 1)²`` per segment with class rows, else ``L²``."""
        lengths = np.diff(self.cu) + int(self.class_rows)
        return int((lengths**2).sum())

    def class_share(self, block_n: int = MODEL_BLOCK_N) -> float:
        """The share of the visited work that the class rows add: this schedule's visited entries
        against those of the same layout scheduled without class rows."""
        if not self.class_rows:
            return 0.0
        visited = self.visited(block_n)
        without = build_schedule(self.cu, False, self.block_m).visited(block_n)
        return (visited - without) / visited if visited else 0.0

    def on(self, device) -> tuple:
        """``(rows, starts, segments)`` as int32 tensors on ``device`` (moved once, then cached)."""
        import torch

        key = str(device)
        if key not in self.device_arrays:
            self.device_arrays[key] = tuple(
                torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)
                for a in (self.rows, self.starts, self.segments.reshape(-1))
            )
        return self.device_arrays[key]


def _item_cost(cu: np.ndarray, lo: int, hi: int, class_rows: bool, block_m: int) -> int:
    partners = int(cu[hi] - cu[lo]) + (hi - lo) * int(class_rows)
    return block_m * MODEL_BLOCK_N * math.ceil(partners / MODEL_BLOCK_N)


def build_schedule(cu: np.ndarray, class_rows: bool, block_m: int) -> TileSchedule:
    """The schedule for segments with patch-row boundaries ``cu`` (host, ``segments + 1``),
    each followed by one class row when ``class_rows``."""
    cu = np.asarray(cu, dtype=np.int64)
    n, segments = int(cu[-1]), len(cu) - 1
    rows: list[np.ndarray] = []
    starts, ranges = [0], []

    def emit(chunk: np.ndarray, lo: int, hi: int) -> None:
        rows.append(chunk)
        starts.append(starts[-1] + len(chunk))
        ranges.append((lo, hi))

    tail: tuple[list[np.ndarray], int, int, int] | None = None  # chunks, size, lo, hi
    for s in range(segments):
        own = np.arange(cu[s], cu[s + 1], dtype=np.int64)
        if class_rows:
            own = np.append(own, n + s)
        full = len(own) // block_m
        for f in range(full):
            emit(own[f * block_m : (f + 1) * block_m], s, s + 1)
        rest = own[full * block_m :]
        if not len(rest):
            continue
        if tail is not None:
            chunks, size, lo, hi = tail
            fits = size + len(rest) <= block_m
            merged = _item_cost(cu, lo, s + 1, class_rows, block_m)
            apart = _item_cost(cu, lo, hi, class_rows, block_m)
            apart += _item_cost(cu, s, s + 1, class_rows, block_m)
            if fits and merged <= apart:
                tail = ([*chunks, rest], size + len(rest), lo, s + 1)
                continue
            emit(np.concatenate(chunks), lo, hi)
        tail = ([rest], len(rest), s, s + 1)
    if tail is not None:
        emit(np.concatenate(tail[0]), tail[2], tail[3])
    return TileSchedule(
        block_m=block_m,
        rows=np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
        starts=np.asarray(starts, dtype=np.int64),
        segments=np.asarray(ranges, dtype=np.int64).reshape(-1, 2),
        cu=cu,
        class_rows=class_rows,
    )


def layout_schedule(layout, level: str, class_rows: bool, block_m: int) -> TileSchedule:
    """The schedule of ``layout``'s ``level``, built once and kept in the layout's cache."""
    key = ("tile_schedule", level, class_rows, block_m)
    if key not in layout.cache:
        seqlens = layout.level(level).seqlens
        cu = np.concatenate([[0], np.cumsum(seqlens)])
        layout.cache[key] = build_schedule(cu, class_rows, block_m)
    return layout.cache[key]


def best_schedule(layout, level: str, class_rows: bool, heights: tuple[int, ...]) -> TileSchedule:
    """Of the schedules with item heights ``heights``, the one that visits the fewest score
    entries (the first on a tie); cached in the layout like each candidate."""
    key = ("best_tile_schedule", level, class_rows, heights)
    if key not in layout.cache:
        candidates = [layout_schedule(layout, level, class_rows, h) for h in heights]
        layout.cache[key] = min(candidates, key=lambda schedule: schedule.visited())
    return layout.cache[key]
