"""Pack ragged studies into one token matrix plus its :class:`~hlip_fast.layout.Layout`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    """

    patches: torch.Tensor
    layout: Layout
    patch_size: tuple[int, int, int]
    in_chans: int
    study_ids: tuple[str, ...]

    @property
    def num_studies(self) -> int:
        return self.layout.num_studies

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> StudyBatch:
        """The batch with patches (optionally cast to ``dtype``) and layout on ``device``."""
        return StudyBatch(
            patches=self.patches.to(device=device, dtype=dtype, non_blocking=non_blocking),
            layout=self.layout.to(device, non_blocking=non_blocking),
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            study_ids=self.study_ids,
        )


def pack_studies(
    studies: Sequence[Sequence[ScanLike]],
    patch_size: int | Sequence[int],
    *,
    slice_depth: int = 1,
    max_num_scans: int | None = None,
    study_ids: Sequence[str] | None = None,
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

    Returns:
        A :class:`StudyBatch` on the scans' device; its layout is on the same device.
    """
    patch = to_3tuple(patch_size, "patch_size")
    if len(studies) == 0:
        raise ValueError("pack_studies needs at least one study")
    ids = tuple(str(i) for i in range(len(studies))) if study_ids is None else tuple(study_ids)
    if len(ids) != len(studies):
        raise ValueError(f"got {len(ids)} study_ids for {len(studies)} studies")

    rows, grids, ref = [], [], None
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
            volume = _as_volume(scan, where)
            if ref is None:
                ref = volume
            elif (volume.shape[0], volume.dtype, volume.device) != (ref.shape[0], ref.dtype, ref.device):
                raise ValueError(
                    f"{where}: {volume.shape[0]} channels, {volume.dtype} on {volume.device}, but "
                    f"the first scan has {ref.shape[0]} channels, {ref.dtype} on {ref.device}"
                )
            patches, grid = _patchify(volume, patch, where)
            rows.append(patches)
            grids.append(grid)

    layout = Layout.build(grids, [len(s) for s in studies], slice_depth=slice_depth, device=ref.device)
    return StudyBatch(
        patches=torch.cat(rows), layout=layout, patch_size=patch, in_chans=ref.shape[0], study_ids=ids
    )


def _as_volume(scan: ScanLike, where: str) -> torch.Tensor:
    if isinstance(scan, np.ndarray):
        scan = torch.from_numpy(scan)
    if not isinstance(scan, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor or NumPy array, got {type(scan).__name__}")
    if not scan.is_floating_point():
        raise ValueError(
            f"{where}: dtype {scan.dtype} is not a floating type; convert intensities first "
            "(e.g. scan.float())"
        )
    if scan.dim() == 3:
        scan = scan.unsqueeze(0)
    if scan.dim() != 4:
        raise ValueError(f"{where}: expected shape (D, H, W) or (C, D, H, W), got {tuple(scan.shape)}")
    return scan


def _patchify(
    volume: torch.Tensor, patch: tuple[int, int, int], where: str
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    c, *size = volume.shape
    if any(s == 0 or s % p for s, p in zip(size, patch)):
        raise ValueError(
            f"{where}: size (D, H, W) = {tuple(size)} is not a positive multiple of the patch {patch}"
        )
    (d, h, w), (pd, ph, pw) = (s // p for s, p in zip(size, patch)), patch
    patches = (
        volume.reshape(c, d, pd, h, ph, w, pw)
        .permute(1, 3, 5, 0, 2, 4, 6)
        .reshape(d * h * w, c * pd * ph * pw)
    )
    return patches, (d, h, w)
