"""The model's layers against timm's and against direct definitions."""

from __future__ import annotations

import pytest
import torch
from helpers import random_layout
from timm.layers import Attention

from hlip_fast import HierarchicalAttention, Layout
from hlip_fast.layers import SegmentDropPath, resample_3d, sincos_3d, switch_level, switch_rows


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_loads_timm_weights_and_matches_on_one_segment(qk_norm, seed):
    timm_attn = Attention(24, num_heads=3, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm)
    ours = HierarchicalAttention(24, num_heads=3, qkv_bias=True, qk_norm=qk_norm)
    ours.load_state_dict(timm_attn.state_dict(), strict=True)
    layout = Layout.build([(2, 3, 2)], [1])
    x = torch.randn(layout.num_tokens, 24)
    for level in ("slice", "scan", "study"):
        if layout.num_segments(level) == 1:
            torch.testing.assert_close(ours(x, layout, level), timm_attn(x[None])[0])


def test_attention_with_class_rows_matches_timm_per_segment(seed):
    timm_attn = Attention(24, num_heads=2, qkv_bias=True)
    ours = HierarchicalAttention(24, num_heads=2, qkv_bias=True)
    ours.load_state_dict(timm_attn.state_dict())
    layout = Layout.build([(2, 2, 2), (1, 1, 3)], [1, 1])
    level, n = "study", layout.num_tokens
    x = torch.randn(n + 2, 24)
    out = ours(x, layout, level)
    for s, (a, b) in enumerate([(0, 8), (8, 11)]):
        seq = torch.cat([x[n + s : n + s + 1], x[a:b]])[None]
        expected = timm_attn(seq)[0]
        torch.testing.assert_close(out[n + s], expected[0])
        torch.testing.assert_close(out[a:b], expected[1:])


def test_switch_level_averages_and_replicates(rng):
    layout = random_layout(rng, max_studies=3, max_scans=3)
    levels = ("slice", "scan", "study")
    for i, fine in enumerate(levels):
        for coarse in levels[i + 1 :]:
            tokens = torch.randn(layout.num_segments(fine), 5, dtype=torch.float64)
            up = switch_level(tokens, layout, fine, coarse)
            fine_lv, coarse_ids = layout.level(fine), layout.segment_ids(coarse)
            owner = coarse_ids[fine_lv.cu_seqlens[:-1].long()]
            for c in range(layout.num_segments(coarse)):
                torch.testing.assert_close(up[c], tokens[owner == c].mean(0))
            down = switch_level(up, layout, coarse, fine)
            torch.testing.assert_close(down, up[owner])
            torch.testing.assert_close(switch_level(down, layout, fine, coarse), up)
    same = torch.randn(layout.num_segments("scan"), 5)
    assert switch_level(same, layout, "scan", "scan") is same


def test_switch_level_gradcheck():
    layout = Layout.build([(2, 1, 1), (3, 1, 1), (1, 1, 1)], [2, 1])
    tokens = torch.randn(layout.num_segments("slice"), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: switch_level(t, layout, "slice", "study"), (tokens,))
    coarse = torch.randn(layout.num_segments("study"), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: switch_level(t, layout, "study", "slice"), (coarse,))


def test_segment_drop_path_drops_whole_segments(rng):
    layout = random_layout(rng, max_studies=4, max_scans=3)
    drop = SegmentDropPath(0.5).train()
    rows = layout.num_tokens + layout.num_segments("slice")  # spare rows at coarser levels
    for level in ("slice", "scan", "study"):
        out = drop(torch.ones(rows, 3), layout, level)
        ids = layout.segment_ids(level, class_tokens="slice")
        assert ids.numel() == rows
        for s in range(layout.num_segments("slice")):
            values = out[ids == s].unique()
            assert values.numel() == 1 and values.item() in (0.0, 2.0)
    x = torch.randn(layout.num_tokens, 3)
    assert drop.eval()(x, layout, "scan") is x


def test_sincos_3d_and_resampling():
    table = sincos_3d((3, 4, 5), 12)
    assert table.shape == (3, 4, 5, 12)
    # Width, height, depth thirds: each varies along its own axis only.
    assert torch.equal(table[0, 0, :, :4], table[2, 3, :, :4])
    assert torch.equal(table[0, :, 0, 4:8], table[1, :, 4, 4:8])
    assert torch.equal(table[:, 0, 0, 8:], table[:, 3, 4, 8:])
    assert resample_3d(table, (3, 4, 5)) is table
    assert resample_3d(table, (6, 2, 5)).shape == (6, 2, 5, 12)
    # ViT-L's 1024 channels: even shares, 342/342/340, each varying along its own axis only.
    large = sincos_3d((2, 3, 4), 1024)
    assert torch.equal(large[0, 0, :, :342], large[1, 2, :, :342])
    assert torch.equal(large[0, :, 0, 342:684], large[1, :, 3, 342:684])
    assert torch.equal(large[:, 0, 0, 684:], large[:, 2, 3, 684:])
    assert not torch.equal(large[0, 0, 0, 684:], large[1, 0, 0, 684:])
    with pytest.raises(ValueError, match="even dimension"):
        sincos_3d((1, 1, 1), 9)


@pytest.mark.parametrize("prob", [0.0, 0.3, 0.75])
def test_keep_patches_keeps_k_per_slice_in_order(rng, prob):
    from hlip_fast.layers import keep_patches

    layout = random_layout(rng, max_side=5)
    x = torch.arange(layout.num_tokens, dtype=torch.float64)[:, None]
    rows, dropped = keep_patches(layout, prob)
    kept = x[rows]
    ids = kept[:, 0].long()
    assert dropped.num_studies == layout.num_studies and dropped.slice_depth == layout.slice_depth
    for scan, ((d, h, w), start) in enumerate(zip(layout.grids.tolist(), layout.scan_offsets[:-1].tolist())):
        k = max(1, round((1 - prob) * h * w))
        assert tuple(dropped.grids[scan]) == (d, k, 1)
        mine = ids[dropped.scan_offsets[scan] : dropped.scan_offsets[scan + 1]].reshape(d, k) - start
        assert (mine.diff(dim=1) > 0).all(), "kept tokens leave their order"
        rows = mine // (h * w)
        assert (rows == torch.arange(d)[:, None]).all(), "a kept token left its slice"
    if prob == 0.0:
        assert torch.equal(kept, x)


def test_switch_rows_rewrites_only_the_class_rows_in_place(rng):
    """Rows with room for the slice level's copies: a switch either way returns the tensor it was
    given, with the patch rows untouched and the copies equal to ``switch_level``'s; gradients
    equal those of switching the copies and concatenating."""
    layout = random_layout(rng, max_studies=3, max_scans=3)
    n, capacity = layout.num_tokens, layout.num_segments("slice")
    pairs = [("slice", "scan"), ("scan", "study"), ("slice", "study"), ("study", "slice"), ("scan", "slice")]
    for src, dst in pairs:
        rows = torch.randn(n + capacity, 4, dtype=torch.float64, requires_grad=True)
        copies = n + layout.num_segments(dst)
        weights = torch.randn(copies, 4, dtype=torch.float64)
        src_copies = rows[n : n + layout.num_segments(src)]
        expected = torch.cat([rows[:n], switch_level(src_copies, layout, src, dst)])
        (expected * weights).sum().backward()
        want_grad, rows.grad = rows.grad, None
        block_output = rows * 1.0  # switch_rows writes in place into a block's output
        patch_rows = block_output[:n].clone()
        got = switch_rows(block_output, layout, src, dst)
        assert got is block_output, (src, dst)
        assert torch.equal(got[:n], patch_rows)
        torch.testing.assert_close(got[:copies], expected)
        (got[:copies] * weights).sum().backward()
        torch.testing.assert_close(rows.grad, want_grad)
    two_slices = Layout.build([(2, 1, 1)], [1])
    with pytest.raises(ValueError, match="rows hold 1 class-token copies; slice needs 2"):
        switch_rows(torch.zeros(3, 4), two_slices, "study", "slice")
