"""How many patch tokens a study's scans pack into: the one place it is computed (the epoch
plan, the token-budget batcher and the shard index all count with it)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def study_tokens(shapes: Iterable[Sequence[int]], patch_size: Sequence[int]) -> int:
    """Patch tokens of scans of ``(depth, height, width)`` ``shapes``: depth rounded up to the
    patch depth (as the reader pads), height and width rounded down (as the patch grid cuts)."""
    pd, ph, pw = patch_size
    return sum(-(-d // pd) * (h // ph) * (w // pw) for d, h, w in shapes)
