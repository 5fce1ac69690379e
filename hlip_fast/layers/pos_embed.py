"""HLIP's positional embeddings: a fixed 3D sin-cos spatial table and a 1D per-scan table."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(len(positions), dim)``: sines then cosines at frequencies ``10000 ** (-i / (dim/2))``."""
    if dim % 2:
        raise ValueError(f"a sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def axis_channels(dim: int) -> tuple[int, int, int]:
    """Channels of width, height and depth in a 3D table: a third each (HLIP's split) when
    ``dim`` is a multiple of 6, else even shares as equal as can be, the wider ones first
    (ViT-L's 1024: 342, 342, 340; its checkpoints carry their own table)."""
    if dim % 2:
        raise ValueError(f"a 3D sin-cos embedding needs an even dimension, got {dim}")
    pairs, extra = divmod(dim // 2, 3)
    return tuple(2 * (pairs + (axis < extra)) for axis in range(3))


def sincos_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """``(d, h, w, dim)`` table: sin-cos of width, height and depth side by side (see
    :func:`axis_channels` for the split)."""
    d, h, w = grid
    zz, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    parts = [sincos_1d(axis.reshape(-1), c) for axis, c in zip((xx, yy, zz), axis_channels(dim))]
    return torch.cat(parts, dim=1).reshape(d, h, w, dim)


def resample_3d(table: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Resample a ``(d, h, w, C)`` table trilinearly to ``grid`` (as HLIP does)."""
    if tuple(table.shape[:3]) == tuple(grid):
        return table
    compute = torch.promote_types(table.dtype, torch.float32)  # never interpolate in half
    resampled = F.interpolate(
        table.permute(3, 0, 1, 2).unsqueeze(0).to(compute), size=tuple(grid), mode="trilinear"
    )
    return resampled.squeeze(0).permute(1, 2, 3, 0).to(table.dtype)
