"""The kernels' tile schedule: every (query, key) pair of the same segment exactly once and no
other pair, on random ragged layouts (one-token segments and segments longer than any tile
included), with partner segments found the kernels' way (arithmetic, no per-token ids); cached
per layout and level; work counts that the kernels' rule implies."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hlip_fast import Layout
from hlip_fast.kernels.tile_schedule import SegmentRuns, build_schedule, build_schedules, layout_schedule

lengths = st.lists(st.one_of(st.integers(1, 3), st.integers(1, 300)), min_size=1, max_size=12)


def covered_pairs(schedule) -> np.ndarray:
    """How often each (row, partner) pair is visited and kept by the segment mask."""
    cu = schedule.cu
    n, segments = int(cu[-1]), len(cu) - 1
    rows = n + segments * int(schedule.class_rows)
    copies = np.repeat(np.arange(segments), int(schedule.class_rows))  # segment by segment
    segment_of = np.concatenate([np.repeat(np.arange(segments), np.diff(cu)), copies])
    counts = np.zeros((rows, rows), dtype=np.int16)
    for item in range(schedule.num_items):
        own = schedule.rows(item)
        partners, partner_segments = schedule.partners(item)
        assert len(own) <= schedule.block_m and len(set(partners)) == len(partners)
        assert np.array_equal(partner_segments, segment_of[partners])  # the kernels' arithmetic holds
        keep = segment_of[own][:, None] == partner_segments[None, :]
        np.add.at(counts, (np.repeat(own, len(partners)), np.tile(partners, len(own))), keep.ravel())
    return counts, segment_of


@settings(max_examples=60, deadline=None)
@given(lengths=lengths, class_rows=st.integers(0, 3), block_m=st.sampled_from([16, 64, 128]))
def test_every_same_segment_pair_exactly_once(lengths, class_rows, block_m):
    cu = np.concatenate([[0], np.cumsum(lengths)])
    schedule = build_schedule(cu, class_rows, block_m)
    rows = np.concatenate([schedule.rows(i) for i in range(schedule.num_items)])
    assert sorted(rows.tolist()) == list(range(len(rows)))  # every row in exactly one item
    counts, segment_of = covered_pairs(schedule)
    same = segment_of[:, None] == segment_of[None, :]
    assert (counts[same] == 1).all() and (counts[~same] == 0).all()
    assert schedule.useful() == int(same.sum())
    assert schedule.visited() >= schedule.useful()
    # Items run in parts of half their height: a tile per part that holds a row.
    part, block_n = max(block_m // 2, 1), 64
    tiles = -(-schedule.partner_counts() // block_n)
    held = np.array([len(schedule.rows(i)) for i in range(schedule.num_items)])
    expected = int((-(-held // part) * part * block_n * tiles).sum())
    assert schedule.visited(block_n, part_m=part) == expected
    assert schedule.useful() <= expected <= schedule.visited(block_n)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(lengths, min_size=1, max_size=3), class_rows=st.booleans())
def test_levels_built_together_equal_each_alone_with_the_height_picked(parts, class_rows):
    """The closed form that picks the item height counts what the built schedule visits, and
    building several segmentations (a layout's levels) in one pass changes no schedule."""
    cus = [np.concatenate([[0], np.cumsum(part)]) for part in parts]
    heights = (16, 64, 128)
    expected = np.array([[build_schedule(cu, class_rows, m).visited() for cu in cus] for m in heights])
    assert np.array_equal(SegmentRuns.of(cus, class_rows).visited(heights), expected)
    for cu, together, visited in zip(cus, build_schedules(cus, class_rows, heights), expected.T):
        near_least = [m for m, v in zip(heights, visited) if v <= 1.03 * visited.min()]
        alone = build_schedule(cu, class_rows, max(near_least))  # the tallest within 3% of the least
        assert together.block_m == alone.block_m and np.array_equal(together.items, alone.items)
        assert together.length_bucket == alone.length_bucket


def test_long_segments_keep_full_tiles_and_short_ones_share():
    long = build_schedule(np.array([0, 300]), True, 64)  # 301 rows: 4 full items and a tail of 45
    assert [len(long.rows(i)) for i in range(long.num_items)] == [64, 64, 64, 64, 45]
    assert long.rows(4)[-1] == 300  # the class row rides in its segment's last item
    short = build_schedule(np.arange(0, 5 * 10 + 1, 10), True, 64)  # 5 segments of 10 + class row
    assert short.num_items == 1 and short.items[0, :2].tolist() == [0, 5]
    exact = build_schedule(np.array([0, 16, 32]), False, 16)  # whole items only, no tail anywhere
    assert exact.items.tolist() == [[0, 1, 16, 16], [1, 2, 16, 16]]


def test_class_rows_add_little_work_at_hlip_levels():
    slices = np.arange(0, 32 * 14 * 196 + 1, 196)  # chest CT slice level: 196-token segments
    for block_m in (64, 128):
        assert build_schedule(slices, True, block_m).class_share() <= 0.03


def test_schedules_are_cached_on_the_layout_with_the_height_picked():
    layout = Layout.build([(2, 3, 4), (1, 2, 2)], [2])
    first = layout_schedule(layout, "scan", True, (16,))
    assert layout_schedule(layout, "scan", True, (16,)) is first
    assert layout_schedule(layout, "scan", False, (16,)) is not first
    assert first.cu.tolist() == [0, 24, 28] and first.length_bucket == 16
    chest_ct = Layout.build([(14, 14, 14)] * 4, [1] * 4)
    # 197-row slices: 64-row items visit 6% less than 128-row ones, so 64 it is.
    slices = layout_schedule(chest_ct, "slice", True, (64, 128))
    assert slices.block_m == 64 and slices.length_bucket == 256
    assert slices.visited() < build_schedule(slices.cu, True, 128).visited() / 1.03
    # 2,745-row studies: 128-row items visit under 3% more, and are preferred.
    studies = layout_schedule(chest_ct, "study", True, (64, 128))
    assert studies.block_m == 128 and studies.length_bucket == 4096
    assert studies.visited() <= build_schedule(studies.cu, True, 64).visited() * 1.03


def test_hlip_slice_level_beats_segment_aligned_tiles():
    # 16 chest CTs at the slice level (196-token segments, each with its class row): the schedule
    # the backend picks visits less than FlashAttention varlen's segment-aligned 128x64 tiles
    # and wastes less than 40% (bench/tile_model.py counts every HLIP level the same way).
    cu = np.arange(0, 16 * 14 * 196 + 1, 196)
    visited = min(build_schedule(cu, True, m).visited() for m in (64, 128))
    useful = build_schedule(cu, True, 64).useful()
    varlen = len(cu[1:]) * 256 * 256  # 197 rows and keys: 2 row tiles of 128, 4 key tiles of 64
    assert useful / visited >= 0.6 and visited < varlen
