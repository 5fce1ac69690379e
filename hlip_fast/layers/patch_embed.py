"""3D patch embedding over packed ragged scans."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchEmbed3D(nn.Module):
    """Embed packed patches with one matrix multiply for the whole batch.

    The weight is a ``Conv3d`` with kernel = stride = ``patch_size`` (so HLIP checkpoints load as
    they are); since patches never overlap, the convolution is a linear map of each flattened
    patch, applied here to all patches of all scans at once.
    """

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_chans = in_chans
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(num_tokens, in_chans * pd * ph * pw)`` patches → ``(num_tokens, embed_dim)``."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
