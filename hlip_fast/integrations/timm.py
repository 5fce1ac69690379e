"""timm ``VisionTransformer``-based 3D models (HLIP's own upstream encoder among them), made
hierarchical in place.

    from hlip_fast.integrations.timm import hierarchical

    hierarchical(model, "vit_base_multiscan_h2_token1176")  # model.blocks[i].attn swapped

Each block's timm ``Attention`` becomes a :class:`HierarchicalTimmAttention` that holds the
same ``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate`` and ``proj`` modules, so the
``state_dict()`` keys and values do not change. The patch grid is read from the patch
embedding's input at every call (``patch_embed.patch_size`` must be 3D) or given as ``grid``;
the model's prefix tokens (class, registers) follow the rule of
:mod:`hlip_fast.integrations.packed`. With every block at the study level the model computes
what timm's does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

try:
    from timm.layers import Attention
except ImportError:  # timm < 1.0.16 kept it beside the model
    from timm.models.vision_transformer import Attention

from .packed import LevelAttention, TokenGrid
from .swap import Levels, resolve_levels, swap_all


class HierarchicalTimmAttention(LevelAttention):
    """A timm ``Attention`` as one level of hierarchical attention: qkv bias, q/k norm, the scale
    norm, the output gate and both dropouts (attention weights in training only) as it had them."""

    def __init__(self, attention: Attention, level: str, grid: TokenGrid, backend: str, where: str) -> None:
        super().__init__(level, grid, backend, where)
        self.num_heads, self.head_dim, self.scale = attention.num_heads, attention.head_dim, attention.scale
        self.dropout_p = float(attention.attn_drop.p)
        # In timm's order, so that state_dict() lists the keys as before.
        self.qkv, self.q_norm, self.k_norm = attention.qkv, attention.q_norm, attention.k_norm
        self.attn_drop = attention.attn_drop
        self.norm = getattr(attention, "norm", nn.Identity())
        self.gate = getattr(attention, "gate", None)
        self.proj, self.proj_drop = attention.proj, attention.proj_drop

    def project(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(rows).view(rows.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        return self.q_norm(q), self.k_norm(k), v

    def output(self, attended: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        attended = self.norm(attended)
        if self.gate is not None:
            attended = attended * self.gate(rows).sigmoid()
        return self.proj_drop(self.proj(attended))


def hierarchical(
    model: nn.Module,
    levels: Levels,
    *,
    grid: tuple[int, int, int] | None = None,
    slice_axis: int = 0,
    slice_depth: int = 1,
    backend: str = "auto",
) -> nn.Module:
    """Make every timm block attention of ``model`` (``model.blocks[i].attn``) hierarchical, in
    place; returns ``model``. ``levels`` as in :func:`hlip_fast.integrations.monai.hierarchical`;
    ``grid``: the patch grid of the tokens (default: read from ``model.patch_embed``'s input at
    every call). Every block is checked first: a refusal leaves the model as it was."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not len(blocks):
        raise ValueError(
            f"{type(model).__name__} has no timm blocks (model.blocks): nothing to make hierarchical"
        )
    names = [f"blocks.{i}" for i in range(len(blocks))]
    for name, block in zip(names, blocks):
        attention = getattr(block, "attn", None)
        if isinstance(attention, LevelAttention):
            raise ValueError(f"{name}.attn is hierarchical already; set its .level to change its level")
        if type(attention) is not Attention:
            raise ValueError(f"{name}.attn: a {type(attention).__name__}, not timm's Attention: not served")
    per_block = resolve_levels(levels, names)
    embed = getattr(model, "patch_embed", None)
    patch = tuple(getattr(embed, "patch_size", ()))
    if grid is None and len(patch) != 3:
        raise ValueError(
            f"{type(model).__name__}.patch_embed has patch size {patch or None}: hierarchical levels "
            "need a 3D patch grid (pass grid=(d, h, w) if the blocks see one)"
        )
    tokens = TokenGrid(grid=grid, slice_axis=slice_axis, slice_depth=slice_depth)
    swap_all(
        model,
        {
            f"{name}.attn": _maker(block.attn, level, tokens, backend, f"{name}.attn")
            for name, block, level in zip(names, blocks, per_block)
        },
    )
    if grid is None:
        embed.register_forward_pre_hook(
            lambda _, args: tokens.observe(tuple(s // p for s, p in zip(args[0].shape[-3:], patch)))
        )
    return model


def _maker(attention: Attention, level: str, tokens: TokenGrid, backend: str, where: str):
    return lambda: HierarchicalTimmAttention(attention, level, tokens, backend, where)
