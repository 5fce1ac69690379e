"""The drop-in hierarchical attention module."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..attention import hier_attention
from ..layout import Layout
from .rope import RotaryTables


class HierarchicalAttention(nn.Module):
    """Multi-head self-attention restricted to the segments of one level.

    Parameters are named as in timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``),
    so its ``state_dict`` loads here unchanged. ``forward(x, layout, level)`` takes packed rows
    ``(num_tokens [+ prefix × segments], dim)``: patch tokens, optionally followed by ``prefix``
    class-token copies per segment of ``level`` (see :func:`hlip_fast.hier_attention`). Attention
    dropout is not offered; ``backend`` picks the attention implementation (``"auto"`` by default; a call's
    ``backend`` argument, a name :func:`hlip_fast.attention.plan_attention` returned, overrides it).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        layout: Layout,
        level: str,
        backend: str | None = None,
        prefix: int = 1,
        rope: RotaryTables | None = None,
    ) -> torch.Tensor:
        """``rope``: the patch tokens' 3D rotary tables (see :mod:`~hlip_fast.layers.rope`)."""
        rows, dim = x.shape
        q, k, v = self.qkv(x).reshape(rows, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope.rotate(q), rope.rotate(k)
        backend = backend or self.backend
        # Every argument given: dynamo cannot lift keyword defaults inside a checkpointed block.
        out = hier_attention(
            q, k, v, layout, level, backend=backend, scale=self.scale, prefix=prefix, dropout_p=0.0
        )
        return self.proj_drop(self.proj(out.reshape(rows, dim)))
