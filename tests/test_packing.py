"""pack_studies: patch order, agreement with Conv3d, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hlip_fast import pack_studies
from hlip_fast.layers import PatchEmbed3D


def test_patches_match_conv3d_per_scan(rng):
    patch = (2, 3, 4)
    studies = [
        [
            torch.randn(
                2, 2 * int(rng.integers(1, 4)), 3 * int(rng.integers(1, 4)), 4 * int(rng.integers(1, 4))
            )
            for _ in range(int(rng.integers(1, 4)))
        ]
        for _ in range(3)
    ]
    batch = pack_studies(studies, patch)
    embed = PatchEmbed3D(patch, in_chans=2, embed_dim=5)
    tokens = embed(batch.patches)
    layout, scan = batch.layout, 0
    for study in studies:
        for volume in study:
            expected = F.conv3d(volume[None], embed.proj.weight, embed.proj.bias, stride=patch)
            expected = expected[0].permute(1, 2, 3, 0).reshape(-1, 5)  # (d, h, w) row-major
            a, b = layout.scan_offsets[scan], layout.scan_offsets[scan + 1]
            torch.testing.assert_close(tokens[a:b], expected, rtol=1e-5, atol=1e-5)
            assert tuple(layout.grids[scan]) == tuple(s // p for s, p in zip(volume.shape[1:], patch))
            scan += 1
    assert batch.in_chans == 2 and batch.patch_size == patch
    assert batch.study_ids == ("0", "1", "2")


def test_accepts_numpy_and_3d_scans():
    batch = pack_studies([[np.zeros((4, 4, 4), np.float32)]], 2, study_ids=["ct-1"])
    assert batch.patches.shape == (8, 8) and batch.in_chans == 1
    assert batch.study_ids == ("ct-1",)


def test_to_moves_patches_and_layout():
    batch = pack_studies([[torch.zeros(2, 2, 2)]], 1).to("meta", dtype=torch.float16)
    assert batch.patches.device.type == "meta" and batch.patches.dtype == torch.float16
    assert batch.layout.device.type == "meta"


@pytest.mark.parametrize(
    "studies, kwargs, message",
    [
        ([], {}, "at least one study"),
        ([[torch.zeros(4, 4, 4)], []], {"study_ids": ["a", "b"]}, "study 'b' has no scans"),
        ([[torch.zeros(4, 4, 5)]], {"study_ids": ["s7"]}, r"study 's7', scan 0: size .* \(4, 4, 5\)"),
        ([[torch.zeros(0, 4, 4)]], {}, "not a positive multiple"),
        ([[torch.zeros(4, 4, 4, dtype=torch.int16)]], {}, "int16 is not a floating type"),
        ([[torch.zeros(4, 4, 4, dtype=torch.bool)]], {}, "not a floating type"),
        ([[torch.zeros(4, 4)]], {}, r"expected shape \(D, H, W\)"),
        ([[[[0.0]]]], {}, "expected a tensor or NumPy array"),
        ([[torch.zeros(4, 4, 4)] * 3], {"max_num_scans": 2}, "3 scans .* at most 2"),
        ([[torch.zeros(4, 4, 4), torch.zeros(2, 4, 4, 4)]], {}, "scan 1: 2 channels"),
        ([[torch.zeros(4, 4, 4)], [torch.zeros(4, 4, 4).double()]], {}, "study '1', scan 0: .*float64"),
        ([[torch.zeros(4, 4, 4)]], {"study_ids": ["a", "b"]}, "2 study_ids for 1 studies"),
        ([[torch.zeros(4, 4, 4)]], {"slice_depth": 0}, "slice_depth"),
    ],
)
def test_bad_input_gets_a_clear_error(studies, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pack_studies(studies, 2, **kwargs)


@pytest.mark.parametrize("patch", [0, (2, 2), (2, -1, 2)])
def test_bad_patch_size(patch):
    with pytest.raises(ValueError, match="patch_size"):
        pack_studies([[torch.zeros(4, 4, 4)]], patch)
