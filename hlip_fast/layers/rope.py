"""3D axial rotary position embedding (RoPE) on packed rows, as HLIP's RoPE encoder applies it.

Each patch token's position is its (depth, row, column) in its own scan's patch grid: the kept
tokens' positions under patch dropout, the same numbering at every level (a study-level block
sees each scan's own positions). The head dim is split into three even chunks of
``2 * (head_dim // 3 // 2)`` channels (20, 20, 20 of 64) rotated by depth, row and column in
that order; the channels left over (4 of 64) and the prefix tokens are not rotated. Within a
chunk of ``c`` channels, pair ``(2i, 2i + 1)`` turns by ``position × 10000 ** (-2i / c)``
(interleaved pairs, as V-JEPA 2 and HLIP rotate). The rotation is applied to the packed q and k
before attention, so every backend serves it and nothing is padded.

Differences from upstream, stated because they can change outputs: upstream computes the
angles in the activations' dtype (bfloat16 under autocast), here in float64 and rotates in
float32 or wider; upstream
numbers tokens within their slice when the first block is slice-level (every depth 0), here the
depth is always the token's depth in its scan (no published config starts at slice level).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layout import Layout

ROPE_BASE = 10000.0


def rope_chunk(head_dim: int) -> int:
    """Channels rotated per axis, or a ``ValueError`` for a head dim the split cannot serve."""
    chunk = 2 * (head_dim // 3 // 2)
    if chunk < 2:
        raise ValueError(
            f"3D RoPE needs a head dim of at least 6 (three even chunks of 2 or more), got {head_dim}"
        )
    return chunk


def token_positions(layout: Layout) -> torch.Tensor:
    """``(tokens, 3)`` int64 (depth, row, column) of every token in its scan's patch grid, in
    packed order (index it with patch dropout's kept rows)."""
    parts = []
    for d, h, w in layout.grids.tolist():
        index = np.arange(d * h * w)
        parts.append(np.stack([index // (h * w), index // w % h, index % w], axis=1))
    return torch.from_numpy(np.concatenate(parts)).to(layout.device)


@dataclass(frozen=True)
class RotaryTables:
    """Per patch token, the cosines and sines of its ``3 × chunk / 2`` rotation angles (float64:
    a few numbers per token, exact for float64 models)."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def of(cls, positions: torch.Tensor, head_dim: int) -> RotaryTables:
        half = rope_chunk(head_dim) // 2
        omega = ROPE_BASE ** (-torch.arange(half, dtype=torch.float64, device=positions.device) / half)
        angles = (positions.to(torch.float64)[:, :, None] * omega).flatten(1)  # depth, row, column
        return cls(angles.cos(), angles.sin())

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(rows, heads, head_dim)``: its first ``tokens`` rows (the patch tokens)
        rotated, the prefix rows after them and the channels past the three chunks unchanged."""
        tokens, rotated = self.cos.shape[0], 2 * self.cos.shape[1]
        compute = torch.promote_types(x.dtype, torch.float32)
        even, odd = x[:tokens, :, :rotated].unflatten(-1, (-1, 2)).to(compute).unbind(-1)
        cos, sin = self.cos[:, None].to(compute), self.sin[:, None].to(compute)
        turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
        head = torch.cat([turned.to(x.dtype), x[:tokens, :, rotated:]], dim=-1)
        return torch.cat([head, x[tokens:]])
