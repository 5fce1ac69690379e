"""Canonical volume → stored integer scan: intensity mapping, resampling, in-plane fit, depth clamp."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .config import ModalityConfig
from .volumes import MAX_VOXELS, Volume, check_voxels

if TYPE_CHECKING:
    import torch


def normalise_intensity(array: np.ndarray, config: ModalityConfig) -> np.ndarray:
    """Map intensities to ``[0, 1]``: CT by its HU window, MRI by percentiles of non-zero voxels."""
    if config.window is not None:
        low, high = config.window
    else:
        foreground = array[array != 0]
        low, high = np.percentile(foreground if foreground.size else array, config.percentiles)
    if high <= low:
        return np.zeros_like(array, dtype=np.float32)
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _target_shape(
    volume: Volume, config: ModalityConfig, grid: tuple[int, int]
) -> tuple[tuple[int, int, int], tuple[float, ...] | None]:
    """Output size of the resampling step and the spacing it gives (``None`` when unknown)."""
    depth, height, width = volume.array.shape
    spacing, target = volume.spacing, config.spacing
    if spacing is not None and target is not None:
        depth = max(1, round(depth * spacing[0] / target[0]))
        if config.fit == "crop":
            height = max(1, round(height * spacing[1] / target[1]))
            width = max(1, round(width * spacing[2] / target[2]))
    if config.fit == "resize":
        height, width = grid
    new_spacing = None
    if spacing is not None:
        shape = volume.array.shape
        new_spacing = tuple(s * n / m for s, n, m in zip(spacing, shape, (depth, height, width)))
    return (depth, height, width), new_spacing


def _centre_fit(array: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Centre-crop or zero-pad ``array`` along ``dim`` to ``size``."""
    have = array.shape[dim]
    if have > size:
        return array.narrow(dim, (have - size) // 2, size)
    if have < size:
        import torch.nn.functional as F

        pad = [0, 0] * (array.dim() - dim - 1) + [(size - have) // 2, size - have - (size - have) // 2]
        return F.pad(array, pad)
    return array


def preprocess_volume(
    volume: Volume,
    config: ModalityConfig,
    grid: tuple[int, int],
    max_value: int,
    dtype: str,
    max_voxels: int = MAX_VOXELS,
) -> tuple[np.ndarray, dict]:
    """The stored scan (``(D, H, W)`` integers, full range = ``[0, 1]``) and its geometry record.
    A resampling that would exceed ``max_voxels`` (an implausible spacing) is refused. (torch is
    imported here, not with the module, so that ``hlip-synth --help`` answers at once.)"""
    import torch
    import torch.nn.functional as F

    shape, spacing = _target_shape(volume, config, grid)
    check_voxels(shape, max_voxels, f"resampling from spacing {volume.spacing} mm to {config.spacing} mm")
    unit = normalise_intensity(volume.array, config)
    tensor = torch.from_numpy(unit)[None, None]
    if tuple(tensor.shape[2:]) != shape:
        tensor = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    tensor = tensor[0, 0]
    if config.fit == "crop":
        tensor = _centre_fit(_centre_fit(tensor, grid[0], 1), grid[1], 2)
    if tensor.shape[0] < config.min_depth:
        raise ValueError(f"only {tensor.shape[0]} slices after resampling; min_depth is {config.min_depth}")
    tensor = _centre_fit(tensor, min(tensor.shape[0], config.max_depth), 0)
    stored = torch.round(tensor.clamp(0, 1) * max_value).numpy().astype(dtype)
    record = {
        "shape": list(stored.shape),
        "spacing": None if spacing is None else [round(float(s), 4) for s in spacing],
        "source_shape": list(volume.array.shape),
        "source_spacing": None if volume.spacing is None else [round(float(s), 4) for s in volume.spacing],
    }
    return np.ascontiguousarray(stored), record
