"""Patch dropout on packed scans (HLIP trains with timm's PatchDropout at the slice level)."""

from __future__ import annotations

import numpy as np
import torch

from ..layout import Layout


def keep_patches(layout: Layout, prob: float) -> tuple[torch.Tensor, Layout]:
    """The rows to keep, ``k = max(1, round((1 - prob) * h * w))`` random tokens of every
    depth-row of every scan in their original order, and the layout of the kept rows. Every slice
    keeps the same number of tokens, so the result is again a packed batch: its layout has grid
    ``(d, k, 1)`` per scan, same studies and levels. The draws need no data, so they are made
    before the model's device work (and outside its compiled graph)."""
    keep, grids = [], []
    device = layout.device
    for (d, h, w), start in zip(layout.grids.tolist(), layout.scan_offsets[:-1].tolist()):
        rows = h * w
        k = max(1, round((1 - prob) * rows))
        chosen = torch.rand(d, rows, device=device).argsort(dim=1)[:, :k].sort(dim=1).values
        keep.append((chosen + start + rows * torch.arange(d, device=device)[:, None]).reshape(-1))
        grids.append((d, k, 1))
    scans_per_study = np.bincount(layout.scan_study, minlength=layout.num_studies)
    dropped = Layout.build(grids, scans_per_study, slice_depth=layout.slice_depth, device=device)
    return torch.cat(keep), dropped
