"""The definition the integrations are held to: block-diagonal attention over a dense ViT's own
token order, written from scratch with masks (no layouts, no packing)."""

from __future__ import annotations

import itertools
import math

import torch


def segment_of_tokens(
    grid: tuple[int, int, int], level: str, slice_axis: int, slice_depth: int
) -> torch.Tensor:
    """Per patch token, in row-major order over ``grid``: its segment at ``level`` in one volume."""
    coords = torch.tensor(list(itertools.product(*(range(g) for g in grid))))
    if level == "slice":
        return coords[:, slice_axis] // slice_depth
    return torch.zeros(len(coords), dtype=torch.long)


def dense_level_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    level: str,
    scale: float,
    slice_axis: int = 0,
    slice_depth: int = 1,
) -> torch.Tensor:
    """``q, k, v`` ``(B, heads, P + G, dim)``, the P prefix tokens first. A patch token attends to
    the prefix tokens and the patch tokens of its segment; a prefix token's output is the mean,
    over the segments, of its attention to the prefix tokens and that segment."""
    prefix = q.shape[2] - math.prod(grid)
    segment = segment_of_tokens(grid, level, slice_axis, slice_depth)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    same = segment[:, None] == segment[None, :]
    allowed = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)
    allowed[prefix:, prefix:] = same
    out = torch.einsum("bhqk,bhkd->bhqd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    if prefix:
        heads = []
        for s in segment.unique():
            keys = torch.cat([torch.ones(prefix, dtype=torch.bool), segment == s])
            weights = scores[:, :, :prefix].masked_fill(~keys, float("-inf")).softmax(-1)
            heads.append(torch.einsum("bhqk,bhkd->bhqd", weights, v))
        out = torch.cat([torch.stack(heads).mean(0), out[:, :, prefix:]], dim=2)
    return out
