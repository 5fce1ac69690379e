"""Layout invariants on random ragged batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_layout
from hypothesis import given, settings
from hypothesis import strategies as st

from hlip_fast import LEVELS, Layout

grid = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))
studies = st.lists(st.lists(grid, min_size=1, max_size=4), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(studies=studies, slice_depth=st.integers(1, 4))
def test_layout_invariants(studies, slice_depth):
    grids = [g for s in studies for g in s]
    layout = Layout.build(grids, [len(s) for s in studies], slice_depth=slice_depth)
    tokens = [d * h * w for d, h, w in grids]
    n = sum(tokens)
    assert layout.num_tokens == n
    assert layout.num_scans == len(grids) and layout.num_studies == len(studies)
    for name in LEVELS:
        lv = layout.level(name)
        cu = lv.cu_seqlens
        assert cu.dtype == torch.int32 and layout.segment_ids(name).dtype == torch.int32
        assert cu[0] == 0 and cu[-1] == n and len(cu) == lv.num_segments + 1
        assert (cu.diff() > 0).all()
        assert lv.max_seqlen == int(cu.diff().max())
        assert np.array_equal(cu.diff().numpy(), lv.seqlens)
        expected_ids = torch.repeat_interleave(torch.arange(lv.num_segments), cu.diff().long())
        assert torch.equal(layout.segment_ids(name).long(), expected_ids)
        assert np.array_equal(lv.offsets, cu.numpy()) and lv.offsets.dtype == np.int64
    # Scan and study segments are the scans and the studies.
    assert layout.level("scan").seqlens.tolist() == tokens
    per_study = [sum(d * h * w for d, h, w in s) for s in studies]
    assert layout.level("study").seqlens.tolist() == per_study
    # Slice segments: ceil(d / slice_depth) groups of depth-rows per scan, in order.
    expected_slices = []
    for d, h, w in grids:
        for start in range(0, d, slice_depth):
            expected_slices.append(min(slice_depth, d - start) * h * w)
    assert layout.level("slice").seqlens.tolist() == expected_slices
    # Nesting: every fine segment lies inside one coarse segment, which is its parent.
    for i, fine in enumerate(LEVELS):
        for coarse in LEVELS[i + 1 :]:
            fine_lv, coarse_ids = layout.level(fine), layout.segment_ids(coarse)
            parent = layout.parent_ids(fine, coarse)
            for s, (a, b) in enumerate(zip(fine_lv.cu_seqlens[:-1], fine_lv.cu_seqlens[1:])):
                assert (coarse_ids[a:b] == parent[s]).all()
            counts = torch.bincount(parent, minlength=layout.num_segments(coarse))
            assert torch.equal(layout.child_counts(fine, coarse), counts)
    # Scan positions count scans within each study.
    expected_pos = [j for s in studies for j in range(len(s))]
    assert layout.scan_position.tolist() == expected_pos


def test_segment_ids_append_class_copies(rng):
    layout = random_layout(rng)
    for level in LEVELS:
        ids = layout.segment_ids(level, class_tokens=True)
        s = layout.num_segments(level)
        assert ids[layout.num_tokens :].tolist() == list(range(s))
        assert torch.equal(ids[: layout.num_tokens], layout.segment_ids(level))
        assert layout.segment_ids(level) is layout.segment_ids(level, False)  # made once, cached


def test_num_rows_and_class_rows_level_agree(rng):
    """``num_rows`` counts the rows that ``class_rows_level`` reads back as as many copies (the
    level it names may be a coarser one with as many segments), and ``segment_ids`` has one id
    per row."""
    layout = random_layout(rng)
    for level in LEVELS:
        finer = LEVELS[: LEVELS.index(level) + 1]
        for class_tokens, copies_of in [(False, None), (True, level), *((f, f) for f in finer)]:
            rows = layout.num_rows(level, class_tokens)
            assert rows == layout.num_tokens + (layout.num_segments(copies_of) if copies_of else 0)
            read_back = layout.class_rows_level(level, rows)  # the coarsest level with that many
            assert (read_back is None) == (copies_of is None)
            if copies_of:
                assert layout.num_segments(read_back) == layout.num_segments(copies_of)
            assert layout.segment_ids(level, class_tokens).numel() == rows


def test_to_moves_every_tensor_once():
    layout = Layout.build([(2, 2, 2), (1, 3, 1)], [1, 1])
    assert layout.to("cpu") is layout
    moved = layout.to("meta")
    assert moved.device.type == "meta"
    assert all(lv.cu_seqlens.device.type == "meta" for lv in moved.levels.values())
    assert moved.scan_study_index.device.type == moved.scan_position.device.type == "meta"
    assert moved.parent_ids("slice", "study").device.type == "meta"  # derived where the layout is
    assert moved.level("scan").seqlens.tolist() == [8, 3]  # host copies stay usable


def test_describe_reports_segment_statistics():
    stats = Layout.build([(2, 2, 2), (1, 3, 1)], [2]).describe()
    assert stats["scan"] == {"segments": 2, "min": 3, "median": 5.5, "mean": 5.5, "max": 8}
    assert stats["study"]["segments"] == 1 and stats["slice"]["segments"] == 3


@pytest.mark.parametrize(
    "grids, scans, kwargs, message",
    [
        ([(1, 1, 1)], [], {}, "at least one study"),
        ([(1, 1, 1)], [1, 0], {}, "have no scans"),
        ([(1, 1, 1)], [2], {}, "adds up to 2"),
        ([(0, 1, 1)], [1], {}, "positive sizes"),
        ([(1, 1, 1)], [1], {"slice_depth": 0}, "slice_depth"),
    ],
)
def test_build_rejects_bad_structure(grids, scans, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Layout.build(grids, scans, **kwargs)


def test_unknown_level_is_named():
    layout = Layout.build([(1, 1, 1)], [1])
    with pytest.raises(ValueError, match="unknown attention level 'series'"):
        layout.level("series")
