"""Canonical volume → stored integer scan: intensity window, resampling, in-plane fit, depth clamp.

The arithmetic is done once, in float32, on as few voxels as possible. The intensity window is
carried back into the file's stored values (so the volume's scaling and the manifest's rescale
cost nothing per voxel), each block of input slices is converted and clipped once, resampled
along the depth (linear, torch's weights) and in-plane (bilinear), and only then mapped to the
stored range and rounded. Flipped axes of the canonical view are resampled unflipped and the
small result flipped. The result equals windowing, then trilinear resampling of the whole
float volume, to within one grey level (``tests/test_prepare_speed.py`` holds it to that).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .config import ModalityConfig
from .volumes import MAX_VOXELS, Volume, check_voxels

if TYPE_CHECKING:
    import torch

BLOCK_VOXELS = 1 << 22
"""Input voxels converted to float32 at a time (16 MB): the only float copy of the volume."""


def intensity_window(volume: Volume, config: ModalityConfig) -> tuple[float, float]:
    """The values mapped to ``0`` and to the top of the stored range: CT's HU window, or MRI's
    percentiles of the non-zero values (computed on the stored values, then scaled)."""
    if config.window is not None:
        return config.window
    array, slope, intercept = volume.array, volume.slope, volume.intercept
    if (slope, intercept) == (1.0, 0.0):
        foreground = array[array != 0]
    else:
        foreground = array[(array * np.float32(slope) + np.float32(intercept)) != 0]
    low_p, high_p = config.percentiles if slope > 0 else config.percentiles[::-1]
    low, high = np.percentile(foreground if foreground.size else array, (low_p, high_p))
    return float(low * slope + intercept), float(high * slope + intercept)


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


def _centre(have: int, size: int, mirrored: bool) -> int:
    """Start of the centred ``size`` window in ``have`` (negative: padding before), taken from the
    other end on an axis that is flipped afterwards, so that flipping commutes with it."""
    before = (have - size) // 2 if have >= size else -((size - have) // 2)
    return have - size - before if mirrored else before


def _fit(array: torch.Tensor, size: int, dim: int, mirrored: bool) -> torch.Tensor:
    """Centre-crop or zero-pad ``array`` along ``dim`` to ``size``."""
    have = array.shape[dim]
    start = _centre(have, size, mirrored)
    if start >= 0:
        return array.narrow(dim, start, size)
    import torch.nn.functional as F

    pad = [0, 0] * (array.dim() - dim - 1) + [-start, size - have + start]
    return F.pad(array, pad)


def _unflipped(array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """``array`` with positive strides (a view) and the axes that view flips."""
    flips = tuple(axis for axis, stride in enumerate(array.strides) if stride < 0)
    return (np.flip(array, flips) if flips else array), flips


def _depth_weights(have: int, want: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output slice: the two input slices and the weight of the second, as torch's linear
    interpolation (``align_corners=False``) computes them."""
    scale = have / want
    source = np.maximum((np.arange(want) + 0.5) * scale - 0.5, 0.0)
    first = np.minimum(np.floor(source).astype(np.int64), have - 1)
    return first, np.minimum(first + 1, have - 1), (source - first).astype(np.float32)


def preprocess_volume(
    volume: Volume,
    config: ModalityConfig,
    grid: tuple[int, int],
    max_value: int,
    dtype: str,
    max_voxels: int = MAX_VOXELS,
) -> tuple[np.ndarray, dict]:
    """The stored scan (``(D, H, W)`` integers, full range = the intensity window) and its
    geometry record. A resampling that would exceed ``max_voxels`` (an implausible spacing) is
    refused. (torch is imported here, not with the module, so that ``hlip-synth --help``
    answers at once.)"""
    shape, spacing = _target_shape(volume, config, grid)
    check_voxels(shape, max_voxels, f"resampling from spacing {volume.spacing} mm to {config.spacing} mm")
    depth = min(shape[0], config.max_depth)
    if depth < config.min_depth:
        raise ValueError(f"only {shape[0]} slices after resampling; min_depth is {config.min_depth}")
    array, flips = _unflipped(volume.array)
    low, high = intensity_window(volume, config)
    out_shape = (depth, *grid) if config.fit == "crop" else (depth, *shape[1:])
    stored = np.zeros(out_shape, dtype=dtype)
    if high > low:
        first = _centre(shape[0], depth, 0 in flips)
        scale = _Scale((low, high), volume.slope, volume.intercept, max_value)
        for at, planes in _resampled(array, scale, shape, range(first, first + depth), config, grid, flips):
            stored[at : at + len(planes)] = planes.numpy()
        if flips:
            stored = np.ascontiguousarray(np.flip(stored, flips))
    record = {
        "shape": list(stored.shape),
        "spacing": None if spacing is None else [round(float(s), 4) for s in spacing],
        "source_shape": list(volume.array.shape),
        "source_spacing": None if volume.spacing is None else [round(float(s), 4) for s in volume.spacing],
    }
    return stored, record


class _Scale:
    """The intensity window in stored values (the clip bounds) and the map from there to the
    stored integer range: the volume's and the manifest's scaling folded into one gain."""

    def __init__(self, window: tuple[float, float], slope: float, intercept: float, max_value: int):
        low, high = window
        self.bounds = sorted(((low - intercept) / slope, (high - intercept) / slope))
        self.gain = slope * max_value / (high - low)
        self.offset = (intercept - low) * max_value / (high - low)
        self.max_value = max_value


def _resampled(
    array: np.ndarray,
    scale: _Scale,
    shape: tuple[int, int, int],
    slices: range,
    config: ModalityConfig,
    grid: tuple[int, int],
    flips: tuple[int, ...],
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(position, planes)``: the output slices ``slices`` (unflipped order) block by block,
    windowed, resampled, fitted in-plane and rounded to the stored range. Every block reuses
    the same buffers: fresh ones would cost a page fault per 4 KB, more than the arithmetic."""
    import torch

    have, plane = array.shape[0], array.shape[1:]
    first, second, weight = _depth_weights(have, shape[0])
    per_block = max(1, BLOCK_VOXELS // (math.prod(plane) * max(1, math.ceil(have / shape[0]))))
    inputs = np.empty((min(have, per_block * math.ceil(have / shape[0]) + 2), *plane), np.float32)
    depth_resampled = torch.empty((per_block, *plane)) if have != shape[0] else None
    resized = torch.empty((per_block, 1, *shape[1:])) if tuple(plane) != tuple(shape[1:]) else None
    low, high = (np.float32(b) for b in scale.bounds)
    for start in range(slices.start, slices.stop, per_block):
        chunk = range(start, min(start + per_block, slices.stop))
        lo, hi = chunk.start, chunk.stop
        if depth_resampled is not None:
            lo, hi = first[chunk.start], second[chunk.stop - 1] + 1
        block = inputs[: hi - lo]
        block[...] = array[lo:hi]  # cast, then clip in float32: twice as fast as a mixed-type clip
        block = torch.from_numpy(np.clip(block, low, high, out=block))
        planes = block
        if depth_resampled is not None:
            planes = depth_resampled[: len(chunk)]
            for j, k in enumerate(chunk):  # one output slice at a time: no gathered copies
                torch.lerp(block[first[k] - lo], block[second[k] - lo], float(weight[k]), out=planes[j])
        if resized is not None:
            torch.ops.aten.upsample_bilinear2d.out(
                planes[:, None], list(shape[1:]), False, out=resized[: len(chunk)]
            )
            planes = resized[: len(chunk), 0]
        planes = planes.mul_(scale.gain).add_(scale.offset).round_().clamp_(0, scale.max_value)
        if config.fit == "crop":
            planes = _fit(_fit(planes, grid[0], 1, 1 in flips), grid[1], 2, 2 in flips)
        yield chunk.start - slices.start, planes
