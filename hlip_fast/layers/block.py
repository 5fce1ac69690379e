"""A pre-norm transformer block whose attention runs at one hierarchy level."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import LayerScale, Mlp

from ..layout import Layout
from .attention import HierarchicalAttention
from .rope import RotaryTables


class SegmentDropPath(nn.Module):
    """Stochastic depth per segment of the current level, class-token copy included (each spare
    row is a segment of its own).

    HLIP's dense batches put one segment per batch row, so timm's per-sample ``DropPath`` drops
    whole segments; this does the same on packed rows.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, layout: Layout, level: str, prefix: int = 1) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        copies_of = layout.class_rows_level(level, x.shape[0], prefix)
        ids = layout.segment_ids(level, copies_of or False, prefix)
        segments = layout.num_segments(level) + x.shape[0] - layout.num_rows(level, bool(copies_of), prefix)
        keep = x.new_empty(segments).bernoulli_(keep_prob).div_(keep_prob)
        return x * keep[ids].unsqueeze(1)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class HierarchicalBlock(nn.Module):
    """timm's ViT ``Block`` (same parameter names) with attention restricted to a level."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = HierarchicalAttention(
            dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=norm_layer
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = SegmentDropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = SegmentDropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        layout: Layout,
        level: str,
        backend: str | None = None,
        prefix: int = 1,
        rope: RotaryTables | None = None,
    ) -> torch.Tensor:
        """``backend``: the attention backend of this call (default: ``attn.backend``);
        ``prefix``: class-token copies per segment (see :func:`hlip_fast.hier_attention`);
        ``rope``: 3D rotary tables of the patch tokens, or none."""
        attended = self.attn(self.norm1(x), layout, level, backend, prefix, rope)
        x = x + self.drop_path1(self.ls1(attended), layout, level, prefix)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))), layout, level, prefix)
