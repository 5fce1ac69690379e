"""The tile schedule of the hierarchical attention kernels: which rows each program owns and
which segments' rows it visits, built once per (layout, level) on the host and cached there.

In a segment's own order (its patch rows, then its ``class_rows`` class-token rows: the prefix
tokens, 0 or more), a work item takes the same window of every segment ``lo..hi-1``: ``count``
rows starting ``from_end`` rows before the segment's end. Its partners are all rows of those
segments: the patch rows ``cu[lo]..cu[hi]``, then the class rows ``N + lo·P..N + hi·P`` (``P``
per segment), visited ``block_n`` at a time. The
segments of one item all have the same length, so a kernel finds a partner's segment by
arithmetic (``lo + j // length``) and needs no per-token segment ids. Every row belongs to
exactly one item, so the forward, the query-side backward and (the relation being symmetric)
the key-side backward all run one program per item and write each row once.

The rule: a segment's rows fill whole ``block_m`` items from its start; what is left, the
segment's tail, shares an item with the tails of neighbouring segments of the same length
(which never visits more score entries than separate items: ``ceil(a + b) <= ceil(a) +
ceil(b)``). So short segments share tiles, long ones keep full tiles, and a class row rides in
its segment's last item, whose key tiles already cover the class column. The schedules of all
of a layout's levels are computed together, per run of neighbouring segments of one length (a
scan's slices form one run) and then per item: a few dozen NumPy calls, nothing per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np

MODEL_BLOCK_N = 64
"""Key-tile width the work counts assume."""

HEIGHT_SLACK = 0.03
"""How much more work a taller item height may visit and still be preferred: a taller item loads
each key tile once for more rows, and makes fewer programs and a smaller schedule. A rule of
thumb until GPU timings settle it (``bench/gpu_check.sh`` measures the kernels beside the model)."""


@dataclass(frozen=True)
class SegmentRuns:
    """Neighbouring segments of one size, run-length encoded over one or more segmentations
    (parts: a layout's levels) laid end to end: each run's ``first`` segment (counted over all
    parts), its ``count`` of segments and their ``size`` in rows (patch rows, plus the class
    rows). A run never crosses parts; ``part_runs`` and ``part_segments`` (``parts + 1``) give
    where each part's runs and segments start."""

    first: np.ndarray
    count: np.ndarray
    size: np.ndarray
    part_runs: np.ndarray
    part_segments: np.ndarray

    @classmethod
    def of(cls, cus: list[np.ndarray], class_rows: int) -> SegmentRuns:
        """The runs of segmentations with patch-row boundaries ``cus`` (each ``segments + 1``)."""
        if any(len(cu) < 2 for cu in cus):
            raise ValueError("every segmentation needs at least one segment")
        part_segments = np.array([0, *accumulate(len(cu) - 1 for cu in cus)])
        size = np.concatenate([np.diff(cu) for cu in cus]) + int(class_rows)
        change = np.diff(size) != 0
        change[part_segments[1:-1] - 1] = True
        bounds = np.concatenate(([0], np.flatnonzero(change) + 1, [len(size)]))
        first = bounds[:-1]
        return cls(
            first=first,
            count=np.diff(bounds),
            size=size[first],
            part_runs=np.searchsorted(bounds, part_segments),
            part_segments=part_segments,
        )

    def visited(self, heights: tuple[int, ...], block_n: int = MODEL_BLOCK_N) -> np.ndarray:
        """``(heights, parts)``: score entries each part's schedule with each item height would
        visit (equal to :meth:`TileSchedule.visited` of that schedule, without building it)."""
        m = np.asarray(heights, dtype=np.int64)[:, None]
        full, tail = np.divmod(self.size, m)
        per_item = m // np.maximum(tail, 1)
        groups, rest = np.divmod(self.count, per_item)
        whole = self.count * full * _ceil_div(self.size, block_n)
        shared = groups * _ceil_div(per_item * self.size, block_n) + _ceil_div(rest * self.size, block_n)
        tiles = whole + np.where(tail > 0, shared, 0)
        return m * block_n * np.add.reduceat(tiles, self.part_runs[:-1], axis=1)


@dataclass(frozen=True)
class TileSchedule:
    """``items`` ``(items, 4)`` int32 (stored field by field): each item's segment range
    ``lo, hi`` (``hi`` exclusive), and the window ``from_end, count`` it takes of each of those
    segments (``count * (hi - lo)`` rows). ``length_bucket``: the mean segment size in rows
    rounded up to a power of two (at least 16), which keys the kernels' autotuning so that
    short- and long-segment levels tune apart."""

    block_m: int
    items: np.ndarray
    cu: np.ndarray
    class_rows: int
    """Class-token rows per segment (``True``: one)."""
    length_bucket: int
    device_arrays: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def partner_counts(self) -> np.ndarray:
        """Rows each item visits as partners (patch rows of its segments, then class rows)."""
        lo, hi = self.items[:, 0], self.items[:, 1]
        return self.cu[hi] - self.cu[lo] + (hi - lo) * int(self.class_rows)

    def visited(self, block_n: int = MODEL_BLOCK_N, part_m: int = 0) -> int:
        """Score entries the kernels compute: a full ``block_m`` × ``block_n`` tile per step, or,
        for a kernel that runs items in parts of ``part_m`` rows, such a tile per non-empty part."""
        tiles = _ceil_div(self.partner_counts(), block_n)
        if not part_m or part_m >= self.block_m:
            return int(self.block_m * block_n * tiles.sum())
        rows = (self.items[:, 1] - self.items[:, 0]) * self.items[:, 3]
        return int(part_m * block_n * (_ceil_div(rows, part_m) * tiles).sum())

    def useful(self) -> int:
        """Score entries attention needs: ``(L + P)²`` per segment with ``P`` class rows."""
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

    def rows(self, item: int) -> np.ndarray:
        """The rows of one item, as the kernels compute them (for tests and inspection)."""
        lo, hi, from_end, count = (int(x) for x in self.items[item])
        segments = np.repeat(np.arange(lo, hi), count)
        lengths = self.cu[segments + 1] - self.cu[segments]
        offsets = lengths + int(self.class_rows) - from_end + np.tile(np.arange(count), hi - lo)
        copies = int(self.cu[-1]) + segments * int(self.class_rows) + offsets - lengths
        return np.where(offsets < lengths, self.cu[segments] + offsets, copies)

    def partners(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """The partner rows of one item and their segments, as the kernels compute them: patch
        rows ``cu[lo]..cu[hi]`` of segments of one length, then the class rows."""
        lo, hi = (int(x) for x in self.items[item, :2])
        first, patch, per = int(self.cu[lo]), int(self.cu[hi] - self.cu[lo]), int(self.class_rows)
        length = max(patch // (hi - lo), 1)
        j = np.arange(patch + (hi - lo) * per)
        rows = np.where(j < patch, first + j, int(self.cu[-1]) + lo * per + j - patch)
        return rows, np.where(j < patch, lo + j // length, lo + np.maximum(j - patch, 0) // max(per, 1))

    def on(self, device):
        """``items`` field by field, ``(4, items)`` int32 as the kernels read them, on
        ``device`` (moved once, then cached). The field count is marked static, so that a
        compiled graph never takes it for a size that may change."""
        import torch

        key = str(device)
        if key not in self.device_arrays:
            items = torch.from_numpy(np.ascontiguousarray(self.items.T)).to(device)
            torch._dynamo.mark_static(items, 0)
            self.device_arrays[key] = items
        return self.device_arrays[key]


def build_schedule(cu: np.ndarray, class_rows: int, block_m: int) -> TileSchedule:
    """The schedule for segments with patch-row boundaries ``cu`` (host, ``segments + 1``),
    each followed by ``class_rows`` class rows (``True``: one), with items of ``block_m`` rows."""
    return build_schedules([cu], class_rows, (block_m,))[0]


def build_schedules(cus: list[np.ndarray], class_rows: int, heights: tuple[int, ...]) -> list[TileSchedule]:
    """One schedule per segmentation of ``cus``, each with the item height of ``heights`` that
    :func:`pick_heights` chooses. All are built in one pass, so a layout's levels cost the NumPy
    calls of one."""
    cus = [np.asarray(cu, dtype=np.int64) for cu in cus]
    runs = SegmentRuns.of(cus, class_rows)
    part_m = pick_heights(runs.visited(heights), heights)
    # Per item everything is int32: NumPy's large temporaries cost more than the arithmetic on
    # them (fresh pages), so they are kept as small as they can be.
    m = np.repeat(part_m, np.diff(runs.part_runs)).astype(np.int32)
    size, first, count = (a.astype(np.int32) for a in (runs.size, runs.first, runs.count))
    full, tail = np.divmod(size, m)

    # Whole items: m rows of one segment, `full` per segment from its start; the i-th item (over
    # all segments) of a segment whose first item is the s-th takes m rows from `size - (i - s) m`
    # rows before the segment's end.
    segment_full, segment_m = np.repeat(full, count), np.repeat(m, count)
    start = np.repeat(size, count) + (np.cumsum(segment_full, dtype=np.int32) - segment_full) * segment_m
    whole = np.empty((4, int(segment_full.sum())), dtype=np.int32)
    whole[0] = np.repeat(np.arange(len(segment_full), dtype=np.int32), segment_full)
    np.add(whole[0], 1, out=whole[1])
    whole[3] = np.repeat(segment_m, segment_full)
    steps = np.arange(whole.shape[1], dtype=np.int32) * whole[3]
    np.subtract(np.repeat(start, segment_full), steps, out=whole[2])
    # Tails: a run's tails share items, m // tail segments per item.
    per_item = m // np.maximum(tail, 1)
    run, index = _expand(np.where(tail > 0, _ceil_div(count, per_item), 0))
    shared = np.empty((4, len(run)), dtype=np.int32)
    shared[0] = first[run] + index * per_item[run]
    np.minimum(shared[0] + per_item[run], first[run] + count[run], out=shared[1])
    shared[2] = shared[3] = tail[run]

    # Each part's items, stored field by field ((4, items), what the kernels read), seen as
    # (items, 4), with segments counted from the part's first.
    cut_whole = np.searchsorted(whole[0], runs.part_segments).tolist()
    cut_shared = np.searchsorted(run, runs.part_runs).tolist()
    schedules = []
    for p, cu in enumerate(cus):
        own_whole = whole[:, cut_whole[p] : cut_whole[p + 1]]
        items = np.concatenate([own_whole, shared[:, cut_shared[p] : cut_shared[p + 1]]], axis=1)
        items[:2] -= int(runs.part_segments[p])
        mean_size = int(cu[-1]) / (len(cu) - 1) + int(class_rows)
        bucket = max(16, 1 << (math.ceil(mean_size) - 1).bit_length())
        schedules.append(
            TileSchedule(
                block_m=int(part_m[p]), items=items.T, cu=cu, class_rows=class_rows, length_bucket=bucket
            )
        )
    return schedules


def pick_heights(visited: np.ndarray, heights: tuple[int, ...]) -> np.ndarray:
    """Per part, the tallest of ``heights`` whose schedule visits at most ``HEIGHT_SLACK`` more
    score entries than the least-visiting one (``visited``: ``(heights, parts)``)."""
    acceptable = visited <= visited.min(axis=0) * (1 + HEIGHT_SLACK)
    return np.where(acceptable, np.asarray(heights, dtype=np.int64)[:, None], 0).max(axis=0)


def layout_schedule(layout, level: str, class_rows: int, heights: tuple[int, ...]) -> TileSchedule:
    """The schedule of ``layout``'s ``level`` with the item height of ``heights`` that
    :func:`pick_heights` chooses; the schedules of all levels are built together on first use
    and kept in the layout's cache."""
    def build() -> dict[str, TileSchedule]:
        cus = [lv.offsets for lv in layout.levels.values()]
        return dict(zip(layout.levels, build_schedules(cus, class_rows, tuple(heights))))

    return layout.cached(("tile_schedules", int(class_rows), tuple(heights)), build)[level]


def _ceil_div(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    return -(-a // b)


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``counts[i]`` entries of each ``i``: every entry's ``i`` and its index among them."""
    owner = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    return owner, np.arange(len(owner), dtype=np.int32) - (np.cumsum(counts, dtype=np.int32) - counts)[owner]
