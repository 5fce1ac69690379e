"""The tile schedule of the hierarchical attention kernels: which rows each program owns and
which segments' rows it visits, built once per (layout, level) on the host and cached there.

In a segment's own order (its patch rows, then its class row when there are class rows), a work
item takes the same window of every segment ``lo..hi-1``: ``count`` rows starting ``from_end``
rows before the segment's end. Its partners are all rows of those segments: the patch rows
``cu[lo]..cu[hi]``, then the class rows ``N + lo..N + hi``, visited ``block_n`` at a time and
masked by segment id. Every row belongs to exactly one item, so the forward, the query-side
backward and (the relation being symmetric) the key-side backward all run one program per item
and write each row once.

The rule: a segment's rows fill whole ``block_m`` items from its start; what is left, the
segment's tail, shares an item with the tails of neighbouring segments of the same size (which
never visits more score entries than separate items: ``ceil(a + b) <= ceil(a) + ceil(b)``). So
short segments share tiles, long ones keep full tiles, and a class row rides in its segment's
last item, whose key tiles already cover the class column. Items are described, not listed row
by row: building a schedule costs NumPy work per item, not per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODEL_BLOCK_N = 64
"""Key-tile width the work counts assume."""


@dataclass(frozen=True)
class TileSchedule:
    """``items`` ``(items, 4)``: each item's segment range ``lo, hi`` (``hi`` exclusive), and the
    window ``from_end, count`` it takes of each of those segments (``count * (hi - lo)`` rows)."""

    block_m: int
    items: np.ndarray
    cu: np.ndarray
    class_rows: bool
    device_arrays: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def partner_counts(self) -> np.ndarray:
        """Rows each item visits as partners (patch rows of its segments, then class rows)."""
        lo, hi = self.items[:, 0], self.items[:, 1]
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

    def rows(self, item: int) -> np.ndarray:
        """The rows of one item, as the kernels compute them (for tests and inspection)."""
        lo, hi, from_end, count = (int(x) for x in self.items[item])
        segments = np.repeat(np.arange(lo, hi), count)
        lengths = self.cu[segments + 1] - self.cu[segments]
        offsets = lengths + int(self.class_rows) - from_end + np.tile(np.arange(count), hi - lo)
        return np.where(offsets < lengths, self.cu[segments] + offsets, int(self.cu[-1]) + segments)

    def on(self, device):
        """``items`` as a flat int32 tensor on ``device`` (moved once, then cached)."""
        import torch

        key = str(device)
        if key not in self.device_arrays:
            flat = np.ascontiguousarray(self.items.reshape(-1), dtype=np.int32)
            self.device_arrays[key] = torch.from_numpy(flat).to(device)
        return self.device_arrays[key]


def build_schedule(cu: np.ndarray, class_rows: bool, block_m: int) -> TileSchedule:
    """The schedule for segments with patch-row boundaries ``cu`` (host, ``segments + 1``),
    each followed by one class row when ``class_rows``."""
    cu = np.asarray(cu, dtype=np.int64)
    segments = len(cu) - 1
    size = np.diff(cu) + int(class_rows)
    full = size // block_m

    # Whole items: block_m rows of one segment, from its start.
    owner = np.repeat(np.arange(segments), full)
    index = np.arange(len(owner)) - np.repeat(np.cumsum(full) - full, full)
    whole = np.stack([owner, owner + 1, size[owner] - index * block_m, np.full(len(owner), block_m)], axis=1)

    # Tails: runs of neighbouring segments with tails of one size share items, block_m // size each.
    tail = size - full * block_m
    owners = np.flatnonzero(tail)
    tails = tail[owners]
    new_run = np.ones(len(owners), dtype=bool)
    new_run[1:] = (np.diff(owners) != 1) | (np.diff(tails) != 0)
    position = np.arange(len(owners)) - np.flatnonzero(new_run)[np.cumsum(new_run) - 1]
    firsts = np.flatnonzero(new_run | (position % (block_m // np.maximum(tails, 1)) == 0))
    lasts = np.append(firsts[1:], len(owners))[: len(firsts)] - 1  # empty when no segment has a tail
    shared = np.stack([owners[firsts], owners[lasts] + 1, tails[firsts], tails[firsts]], axis=1)
    return TileSchedule(
        block_m=block_m,
        items=np.concatenate([whole, shared]).astype(np.int64).reshape(-1, 4),
        cu=cu,
        class_rows=class_rows,
    )


def layout_schedule(layout, level: str, class_rows: bool, block_m: int) -> TileSchedule:
    """The schedule of ``layout``'s ``level``, built once and kept in the layout's cache."""
    def build() -> TileSchedule:
        cu = np.concatenate([[0], np.cumsum(layout.level(level).seqlens)])
        return build_schedule(cu, class_rows, block_m)

    return layout.cached(("tile_schedule", level, class_rows, block_m), build)


def best_schedule(layout, level: str, class_rows: bool, heights: tuple[int, ...]) -> TileSchedule:
    """Of the schedules with item heights ``heights``, the one that visits the fewest score
    entries (the first on a tie); cached in the layout like each candidate."""
    def build() -> TileSchedule:
        candidates = [layout_schedule(layout, level, class_rows, h) for h in heights]
        return min(candidates, key=lambda schedule: schedule.visited())

    return layout.cached(("best_tile_schedule", level, class_rows, heights), build)
