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


def sincos_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """``(d, h, w, dim)`` table; a third of the channels each for width, height and depth."""
    if dim % 6:
        raise ValueError(f"a 3D sin-cos embedding needs a dimension divisible by 6, got {dim}")
    d, h, w = grid
    zz, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    parts = [sincos_1d(axis.reshape(-1), dim // 3) for axis in (xx, yy, zz)]
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
