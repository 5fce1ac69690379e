"""Pack ragged studies into one token matrix plus its :class:`~hlip_fast.layout.Layout`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .layout import Layout

ScanLike = torch.Tensor | np.ndarray


def to_3tuple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """``value`` as a ``(depth, height, width)`` triple of positive ints."""
    triple = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(triple) != 3 or min(triple) < 1:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    return triple


@dataclass(frozen=True)
class StudyBatch:
    """Packed patches of a batch of ragged studies.

    ``patches`` is ``(num_tokens, in_chans * pd * ph * pw)``: one row per patch, in layout order,
    each patch flattened channel-major as a ``Conv3d`` weight of kernel ``patch_size`` expects.

    A reader's batch may still hold the stored integers, with each scan's intensity map
    ``x -> x * scale + offset`` in ``intensity`` (``(num_scans, 2)`` float32): a quarter of the
    bytes to move, and the map runs where the batch lands (:meth:`to`, :meth:`normalised`).
    """

    patches: torch.Tensor
    layout: Layout
    patch_size: tuple[int, int, int]
    in_chans: int
    study_ids: tuple[str, ...]
    intensity: torch.Tensor | None = None

    @property
    def num_studies(self) -> int:
        return self.layout.num_studies

    def normalised(self, dtype: torch.dtype | None = None) -> StudyBatch:
        """Floating-point patches (``dtype``, default float32): each scan's intensity map applied
        in float32, then cast."""
        if self.intensity is None:
            return self if dtype is None else replace(self, patches=self.patches.to(dtype))
        scale, offset = self.intensity[self.layout.segment_ids("scan")].unsqueeze(-1).unbind(1)
        patches = self.patches.to(torch.float32).mul_(scale).add_(offset)
        return replace(self, patches=patches if dtype is None else patches.to(dtype), intensity=None)

    def pin_memory(self) -> StudyBatch:
        """The patches (and intensity maps) in page-locked memory, for asynchronous copies."""
        intensity = self.intensity
        return replace(
            self,
            patches=self.patches.pin_memory(),
            intensity=None if intensity is None else intensity.pin_memory(),
        )

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> StudyBatch:
        """The batch on ``device``, its patches floating point (``dtype``, default their own or
        float32); integer patches travel as they are and are mapped there."""
        intensity = self.intensity
        moved = replace(
            self,
            patches=self.patches.to(device, non_blocking=non_blocking),
            layout=self.layout.to(device, non_blocking=non_blocking),
            intensity=None if intensity is None else intensity.to(device, non_blocking=non_blocking),
        )
        return moved.normalised(dtype)


def pack_studies(
    studies: Sequence[Sequence[ScanLike]],
    patch_size: int | Sequence[int],
    *,
    slice_depth: int = 1,
    max_num_scans: int | None = None,
    study_ids: Sequence[str] | None = None,
    intensity: Sequence[Sequence[tuple[float, float]]] | None = None,
) -> StudyBatch:
    """Cut ragged studies into patches and pack them without padding.

    Args:
        studies: one entry per study, each a non-empty list of scans shaped ``(D, H, W)`` or
            ``(C, D, H, W)``; every scan keeps its own size, which must be divisible by
            ``patch_size``. All scans share one floating dtype, channel count and device.
        patch_size: patch ``(pd, ph, pw)``, or one int for all three.
        slice_depth: depth-rows of patches per slice segment.
        max_num_scans: if given, the largest number of scans a study may have (the model's
            sequential position table).
        study_ids: names used in error messages and kept on the batch; defaults to indices.
        intensity: for integer scans, each scan's ``(scale, offset)``, one list per study: the
            batch keeps the integers and the map (see :class:`StudyBatch`).

    Returns:
        A :class:`StudyBatch` on the scans' device; its layout is on the same device.
    """
    patch = to_3tuple(patch_size, "patch_size")
    if len(studies) == 0:
        raise ValueError("pack_studies needs at least one study")
    ids = tuple(str(i) for i in range(len(studies))) if study_ids is None else tuple(study_ids)
    if len(ids) != len(studies):
        raise ValueError(f"got {len(ids)} study_ids for {len(studies)} studies")

    volumes, grids, ref = [], [], None
    for study_id, scans in zip(ids, studies):
        if len(scans) == 0:
            raise ValueError(f"study {study_id!r} has no scans")
        if max_num_scans is not None and len(scans) > max_num_scans:
            raise ValueError(
                f"study {study_id!r} has {len(scans)} scans but the positional table allows "
                f"at most {max_num_scans} (max_num_scans)"
            )
        for j, scan in enumerate(scans):
            where = f"study {study_id!r}, scan {j}"
            volume = _as_volume(scan, where, integer=intensity is not None)
            if ref is None:
                ref = volume
            elif (volume.shape[0], volume.dtype, volume.device) != (ref.shape[0], ref.dtype, ref.device):
                raise ValueError(
                    f"{where}: {volume.shape[0]} channels, {volume.dtype} on {volume.device}, but "
                    f"the first scan has {ref.shape[0]} channels, {ref.dtype} on {ref.device}"
                )
            volumes.append(volume)
            grids.append(_patch_grid(volume, patch, where))

    layout = Layout.build(grids, [len(s) for s in studies], slice_depth=slice_depth, device=ref.device)
    maps = None
    if intensity is not None:
        if [len(m) for m in intensity] != [len(s) for s in studies]:
            raise ValueError("intensity needs one (scale, offset) per scan of every study")
        maps = torch.tensor([pair for study in intensity for pair in study], dtype=torch.float32)
        maps = maps.reshape(-1, 2).to(ref.device)
    return StudyBatch(
        patches=_patchify(volumes, grids, patch),
        layout=layout,
        patch_size=patch,
        in_chans=ref.shape[0],
        study_ids=ids,
        intensity=maps,
    )


def _as_volume(scan: ScanLike, where: str, integer: bool) -> torch.Tensor:
    if isinstance(scan, np.ndarray):
        scan = torch.from_numpy(scan)
    if not isinstance(scan, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor or NumPy array, got {type(scan).__name__}")
    if integer and scan.is_floating_point():
        raise ValueError(f"{where}: dtype {scan.dtype}: with intensity= the scans are the stored integers")
    if not integer and not scan.is_floating_point():
        raise ValueError(
            f"{where}: dtype {scan.dtype} is not a floating type; convert intensities first "
            "(e.g. scan.float()), or give each scan's intensity map (intensity=)"
        )
    if scan.dim() == 3:
        scan = scan.unsqueeze(0)
    if scan.dim() != 4:
        raise ValueError(f"{where}: expected shape (D, H, W) or (C, D, H, W), got {tuple(scan.shape)}")
    return scan


def _patch_grid(volume: torch.Tensor, patch: tuple[int, int, int], where: str) -> tuple[int, int, int]:
    size = volume.shape[1:]
    if any(s == 0 or s % p for s, p in zip(size, patch)):
        raise ValueError(
            f"{where}: size (D, H, W) = {tuple(size)} is not a positive multiple of the patch {patch}"
        )
    return tuple(s // p for s, p in zip(size, patch))


def _patchify(
    volumes: list[torch.Tensor], grids: list[tuple[int, int, int]], patch: tuple[int, int, int]
) -> torch.Tensor:
    """Every volume's patches, one row each, written straight into one packed tensor (a strided
    ``copy_`` into place is several times faster than ``permute().reshape()`` and a ``cat``)."""
    (pd, ph, pw), c, ref = patch, volumes[0].shape[0], volumes[0]
    counts = [d * h * w for d, h, w in grids]
    patches = torch.empty(sum(counts), c * pd * ph * pw, dtype=ref.dtype, device=ref.device)
    start = 0
    for volume, (d, h, w), count in zip(volumes, grids, counts):
        source = volume.reshape(c, d, pd, h, ph, w, pw).permute(1, 3, 5, 0, 2, 4, 6)
        patches[start : start + count].view(d, h, w, c, pd, ph, pw).copy_(source)  # autograd: one view
        start += count
    return patches
