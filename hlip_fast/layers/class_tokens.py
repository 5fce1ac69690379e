"""HLIP's class-token copies across attention levels.

At a level, each segment owns one copy of the class token. Moving to a coarser level averages
the copies of the segments it contains; moving to a finer level replicates the parent's copy.
The copies ride behind the patch rows; :func:`switch_rows` switches them there.
"""

from __future__ import annotations

import torch

from ..layout import LEVELS, Layout


def plan_switch(layout: Layout, src: str, dst: str) -> None:
    """Build (and cache on ``layout``) the index tensors that :func:`switch_level` reads."""
    if LEVELS.index(src) < LEVELS.index(dst):
        layout.parent_ids(src, dst), layout.child_counts(src, dst)
    elif src != dst:
        layout.parent_ids(dst, src)


def switch_level(tokens: torch.Tensor, layout: Layout, src: str, dst: str) -> torch.Tensor:
    """Class-token copies ``(segments of src, C)`` → ``(segments of dst, C)``."""
    if src == dst:
        return tokens
    if LEVELS.index(src) < LEVELS.index(dst):
        parent = layout.parent_ids(src, dst)
        counts = layout.child_counts(src, dst)
        # scatter_add, not index_add: its backward keeps no copy of ``tokens``, which
        # switch_rows then overwrites in place.
        summed = tokens.new_zeros(layout.num_segments(dst), tokens.shape[1])
        summed = summed.scatter_add(0, parent[:, None].expand_as(tokens), tokens)
        return summed / counts.unsqueeze(1).to(tokens.dtype)
    return tokens[layout.parent_ids(dst, src)]


def switch_rows(rows: torch.Tensor, layout: Layout, src: str, dst: str) -> torch.Tensor:
    """Packed rows (patch tokens, then ``src``'s class-token copies) → the same patch rows followed
    by ``dst``'s copies.

    Going coarser there are fewer copies: their values overwrite the first of the old ones in
    place and the rows are cut to length (a view), so the patch rows are neither copied nor
    rewritten; ``rows`` must be a tensor nothing else reads afterwards (a block's output). Going
    finer the rows grow, which takes one copy of them.
    """
    num_tokens = layout.num_tokens
    cls = switch_level(rows[num_tokens:], layout, src, dst)
    if LEVELS.index(src) < LEVELS.index(dst):
        rows = rows[: num_tokens + layout.num_segments(dst)]
        rows[num_tokens:] = cls
        return rows
    return torch.cat([rows[:num_tokens], cls])
