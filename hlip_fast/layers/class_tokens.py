"""HLIP's class-token copies across attention levels.

At a level, each segment owns one copy of the class token. Moving to a coarser level averages
the copies of the segments it contains; moving to a finer level replicates the parent's copy.
"""

from __future__ import annotations

import torch

from ..layout import LEVELS, Layout


def switch_level(tokens: torch.Tensor, layout: Layout, src: str, dst: str) -> torch.Tensor:
    """Class-token copies ``(segments of src, C)`` → ``(segments of dst, C)``."""
    if src == dst:
        return tokens
    if LEVELS.index(src) < LEVELS.index(dst):
        parent = layout.parent_ids(src, dst)
        counts = layout.child_counts(src, dst)
        summed = tokens.new_zeros(layout.num_segments(dst), tokens.shape[1]).index_add(0, parent, tokens)
        return summed / counts.unsqueeze(1).to(tokens.dtype)
    return tokens[layout.parent_ids(dst, src)]
