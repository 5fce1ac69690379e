"""Dense ViT token batches as packed rows, and one level of hierarchical attention over them.

A dense 3D ViT holds ``(B, P + G, C)``: ``P`` prefix tokens (a class token, registers), then
the ``G = g0·g1·g2`` patch tokens of one volume, row-major over its patch grid. Packed, the
patch tokens of every volume form one ``(N, C)`` stream in a :class:`~hlip_fast.Layout`'s order
(the grid's ``slice_axis`` first, so that a slice is a run of rows) and the prefix tokens follow,
volume by volume. Each volume is one study of one scan: at the scan and study levels a segment
is the whole volume, at the slice level ``slice_depth`` planes of it.

Prefix tokens follow HLIP's rule for one block: every segment attends to its own copy of its
volume's prefix tokens, and the copies' outputs are averaged back into the one token after the
attention. (HLIP keeps the copies apart from block to block until a level switch; a dense model
has one row per prefix token, so here they meet after every block. At the scan and study levels
there is one copy, and the attention is the plain attention of the volume.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..attention import hier_attention
from ..layers.class_tokens import switch_level
from ..layout import Layout, check_level


@dataclass
class TokenGrid:
    """Where a swapped model's patch tokens sit: the patch grid of the dense tokens the blocks see
    (``grid``: fixed, or set per call by the hook that reads the patch embedding's input), the
    grid axis that slices cut (``slice_axis``) and the planes per slice segment
    (``slice_depth``). ``base``: the grid the model's position embedding was made for, where
    known (the size packed runs resample it from). One instance is shared by a model's blocks."""

    grid: tuple[int, int, int] | None = None
    slice_axis: int = 0
    slice_depth: int = 1
    base: tuple[int, int, int] | None = None
    fixed: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(
                f"slice_axis must be 0, 1 or 2 (an axis of the patch grid), got {self.slice_axis}"
            )
        if self.slice_depth < 1:
            raise ValueError(f"slice_depth must be >= 1, got {self.slice_depth}")
        self.fixed = self.grid is not None

    def observe(self, grid: tuple[int, ...]) -> None:
        """Record the patch grid of the input being embedded (unless the grid was given)."""
        if not self.fixed:
            self.grid = tuple(int(g) for g in grid)

    def layout_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """``grid`` with the slice axis first: the ``(d, h, w)`` a Layout takes."""
        a = self.slice_axis
        return (grid[a], *(g for i, g in enumerate(grid) if i != a))

    def to_layout_order(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``(..., G, C)`` in the model's row-major order → the slice axis first (a view for 0)."""
        if self.slice_axis == 0:
            return tokens
        lead = tokens.shape[:-2]
        cube = tokens.reshape(*lead, *grid, tokens.shape[-1])
        at = len(lead) + self.slice_axis
        return cube.movedim(at, len(lead)).reshape(tokens.shape)

    def to_model_order(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The inverse of :meth:`to_layout_order`."""
        if self.slice_axis == 0:
            return tokens
        lead = tokens.shape[:-2]
        cube = tokens.reshape(*lead, *self.layout_grid(grid), tokens.shape[-1])
        return cube.movedim(len(lead), len(lead) + self.slice_axis).reshape(tokens.shape)

    def layout(self, grids: tuple[tuple[int, int, int], ...], device: torch.device) -> Layout:
        """The layout of volumes of these (model-order) grids, one study each (cached)."""
        return _layout(tuple(self.layout_grid(g) for g in grids), self.slice_depth, str(device))


@functools.lru_cache(maxsize=32)
def _layout(grids: tuple[tuple[int, int, int], ...], slice_depth: int, device: str) -> Layout:
    # A dense model sees one batch shape step after step: its layout (and the plans and schedules
    # cached on it) is built once.
    return Layout.build(grids, [1] * len(grids), slice_depth=slice_depth, device=device)


def level_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    level: str,
    prefix: int,
    *,
    backend: str = "auto",
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention over ``level``'s segments of packed rows ``(N + volumes·prefix, heads, dim)``:
    patch rows in layout order, then each volume's ``prefix`` tokens. Each segment attends to a
    copy of its volume's prefix tokens; the copies' outputs are averaged (see the module)."""
    n = layout.num_tokens
    if prefix == 0:
        return hier_attention(
            q, k, v, layout, level, backend=backend, scale=scale, prefix=1, dropout_p=dropout_p
        )
    heads, dim = q.shape[1:]

    def with_copies(t: torch.Tensor) -> torch.Tensor:
        copies = switch_level(t[n:].reshape(-1, heads * dim), layout, "study", level, prefix)
        return torch.cat([t[:n], copies.view(-1, heads, dim)])

    out = hier_attention(
        with_copies(q), with_copies(k), with_copies(v), layout, level,
        backend=backend, scale=scale, prefix=prefix, dropout_p=dropout_p,
    )  # fmt: skip
    averaged = switch_level(out[n:].reshape(-1, heads * dim), layout, level, "study", prefix)
    return torch.cat([out[:n], averaged.view(-1, heads, dim)])


class LevelAttention(nn.Module):
    """What a swapped attention module does beyond its host's projections: dense calls, as the
    host's blocks make them, become packed rows and one level of :func:`level_attention`.

    Subclasses hold the host module's own submodules under their own names (so ``state_dict``
    keys do not change) and define :meth:`project` (rows → q, k, v) and :meth:`output`
    (attended rows → the module's output)."""

    num_heads: int
    head_dim: int
    scale: float
    dropout_p: float

    def __init__(self, level: str, grid: TokenGrid, backend: str, where: str) -> None:
        super().__init__()
        self.level = check_level(level)
        self.backend = backend
        self.where = where
        self.grid = grid  # shared by the model's blocks (a plain attribute: no state)

    def project(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def output(self, attended: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """A dense call ``(B, P + G, C)`` → ``(B, P + G, C_out)``, as the host module returns it."""
        if attn_mask is not None or is_causal:
            raise ValueError(f"{self.where}: an attention mask or causal attention is not served here")
        grid = self.grid.grid
        if grid is None or x.dim() != 3:
            raise ValueError(
                f"{self.where}: expected dense tokens (batch, tokens, channels) of a known patch grid; "
                f"got shape {tuple(x.shape)}, grid {grid}"
            )
        batch, length, channels = x.shape
        prefix = length - math.prod(grid)
        if prefix < 0:
            raise ValueError(
                f"{self.where}: {length} tokens, fewer than the {math.prod(grid)} of patch grid {grid}"
            )
        layout = self.grid.layout((tuple(grid),) * batch, x.device)
        patches = self.grid.to_layout_order(x[:, prefix:], grid).reshape(-1, channels)
        out = self.forward_packed(torch.cat([patches, x[:, :prefix].reshape(-1, channels)]), layout, prefix)
        n = layout.num_tokens
        patches_out = self.grid.to_model_order(out[:n].view(batch, -1, out.shape[-1]), grid)
        return torch.cat([out[n:].view(batch, prefix, out.shape[-1]), patches_out], dim=1)

    def forward_packed(self, rows: torch.Tensor, layout: Layout, prefix: int) -> torch.Tensor:
        """Packed rows ``(N + volumes·prefix, C)`` → the same rows attended at this level."""
        q, k, v = self.project(rows)
        attended = level_attention(
            q, k, v, layout, self.level, prefix,
            backend=self.backend, scale=self.scale, dropout_p=self.dropout_p if self.training else 0.0,
        )  # fmt: skip
        return self.output(attended.flatten(1), rows)

    def extra_repr(self) -> str:
        heads = f"heads={self.num_heads}, head_dim={self.head_dim}"
        return f"level={self.level!r}, {heads}, backend={self.backend!r}"
