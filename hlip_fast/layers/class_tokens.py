"""HLIP's class-token copies across attention levels.

At a level, each segment owns one copy of the prefix tokens (the class token, then any register
tokens: ``prefix`` rows, segment by segment). Moving to a coarser level averages the copies of
the segments it contains, token by token; moving to a finer level replicates the parent's copy.
The copies ride behind the patch rows; :func:`switch_rows` switches them there, in place.
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


def switch_level(tokens: torch.Tensor, layout: Layout, src: str, dst: str, prefix: int = 1) -> torch.Tensor:
    """Class-token copies ``(prefix × segments of src, C)`` → ``(prefix × segments of dst, C)``."""
    if src == dst:
        return tokens
    if prefix > 1:  # a segment's copies side by side: one row per segment
        width = tokens.shape[1]
        return switch_level(tokens.reshape(-1, prefix * width), layout, src, dst).reshape(-1, width)
    if LEVELS.index(src) < LEVELS.index(dst):
        parent = layout.parent_ids(src, dst)
        counts = layout.child_counts(src, dst)
        # scatter_add, not index_add: its backward keeps no copy of ``tokens``, which
        # switch_rows then overwrites in place.
        summed = tokens.new_zeros(layout.num_segments(dst), tokens.shape[1])
        summed = summed.scatter_add(0, parent[:, None].expand_as(tokens), tokens)
        return summed / counts.unsqueeze(1).to(tokens.dtype)
    return tokens[layout.parent_ids(dst, src)]


def switch_rows(rows: torch.Tensor, layout: Layout, src: str, dst: str, prefix: int = 1) -> torch.Tensor:
    """Packed rows (patch tokens, then ``src``'s class-token copies, then spare rows) → the same
    tensor with ``dst``'s copies written over the head of the copies, in place.

    ``rows`` holds one copy per segment of the finest level it visits (the rest are spare rows,
    see :meth:`Layout.class_rows_level`), so a switch in either direction rewrites only copies:
    the patch rows are neither copied nor rewritten. ``rows`` must be a tensor nothing else reads
    afterwards (a block's output). ``prefix``: copies per segment.
    """
    num_tokens, capacity = layout.num_tokens, rows.shape[0] - layout.num_tokens
    needed = prefix * layout.num_segments(dst)
    if capacity < needed:
        raise ValueError(
            f"rows hold {capacity} class-token copies; {dst} needs {needed}: "
            f"give the rows {prefix} per segment of the finest level they visit"
        )
    held = rows[num_tokens : num_tokens + prefix * layout.num_segments(src)]
    rows[num_tokens : num_tokens + needed] = switch_level(held, layout, src, dst, prefix)
    return rows
