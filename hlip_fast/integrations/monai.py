"""MONAI's ViT, UNETR and any tree of MONAI ``TransformerBlock`` s, made hierarchical in place.

    from monai.networks.nets import UNETR
    from hlip_fast.integrations.monai import hierarchical

    model = UNETR(in_channels=1, out_channels=2, img_size=(96, 96, 96))
    hierarchical(model, "vit_base_multiscan_h3_token1176")  # or one level per block

Each block's ``SABlock`` becomes a :class:`HierarchicalSABlock` that holds the same ``qkv`` (or
``to_q``/``to_k``/``to_v``) and ``out_proj`` modules, so ``state_dict()`` keys and values do not
change and a MONAI checkpoint loads before and after. MONAI's token order is row-major over the
patch grid's three axes; ``slice_axis`` names the axis that slice segments cut (MONAI's
``Orientation("RAS")`` puts the axial axis last: ``slice_axis=2``). With every block at the
study level the model computes what MONAI's does. Volumes of any size:
:mod:`hlip_fast.integrations.monai_volumes`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbeddingBlock, SABlock, TransformerBlock

from .packed import LevelAttention, TokenGrid
from .swap import Levels, resolve_levels, swap_all


class HierarchicalSABlock(LevelAttention):
    """A MONAI ``SABlock`` as one level of hierarchical attention: qkv bias, ``include_fc``,
    ``use_combined_linear=False``, ``dim_head`` and ``hidden_input_size`` as the block had them;
    dropout on the attention weights and the output in training only."""

    def __init__(self, block: SABlock, level: str, grid: TokenGrid, backend: str, where: str) -> None:
        super().__init__(level, grid, backend, where)
        if reason := unserved_reason(block):
            raise ValueError(f"{where}: {reason}")
        self.num_heads, self.head_dim, self.scale = block.num_heads, block.dim_head, block.scale
        self.dropout_p = float(block.dropout_rate)
        self.use_combined_linear = block.use_combined_linear
        # In SABlock's order, so that state_dict() lists the keys as before.
        self.out_proj = block.out_proj
        self.qkv, self.to_q, self.to_k, self.to_v = block.qkv, block.to_q, block.to_k, block.to_v
        self.drop_output = block.drop_output

    def project(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (rows.shape[0], self.num_heads, self.head_dim)
        if self.use_combined_linear:  # MONAI's qkv features are (q|k|v, heads, head_dim)
            q, k, v = self.qkv(rows).view(rows.shape[0], 3, *shape[1:]).unbind(1)
            return q, k, v
        return self.to_q(rows).view(shape), self.to_k(rows).view(shape), self.to_v(rows).view(shape)

    def output(self, attended: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.drop_output(self.out_proj(attended))


def unserved_reason(block: SABlock) -> str | None:
    """Why ``block`` cannot run as hierarchical attention (``None``: it can)."""
    if block.save_attn:
        return "save_attn=True is not served (hierarchical attention never forms the attention matrix)"
    if block.rel_positional_embedding is not None:
        return "relative position embeddings (rel_pos_embedding) are not served"
    if block.causal:
        return "causal attention is not served"
    if block.attention_dtype is not None:
        return f"attention_dtype={block.attention_dtype} is not served; cast the model instead"
    return None


def hierarchical(
    model: nn.Module,
    levels: Levels,
    *,
    img_size: tuple[int, int, int] | None = None,
    grid: tuple[int, int, int] | None = None,
    slice_axis: int = 0,
    slice_depth: int = 1,
    backend: str = "auto",
) -> nn.Module:
    """Make every MONAI ``TransformerBlock`` of ``model`` hierarchical, in place; returns ``model``.

    ``levels``: one of ``"slice"``, ``"scan"``, ``"study"`` per block (in module order), one
    level for all, or an HLIP schedule name of the same depth. The patch grid of the tokens is
    read from the model's one ``PatchEmbeddingBlock`` at every call, or given as ``grid`` (a
    tree without one). ``img_size``: the size the model was built for, which packed runs of
    other sizes resample the position embedding from (UNETR records it; a ViT does not).
    Every block is checked before any is changed: a refusal leaves the model as it was."""
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, TransformerBlock)}
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} holds no MONAI TransformerBlock: nothing to make hierarchical"
        )
    names = list(blocks)
    for name, block in blocks.items():
        where = f"{name}.attn"
        if block.with_cross_attention:
            raise ValueError(
                f"{name}: cross-attention is in use (with_cross_attention=True); it is not served"
            )
        if isinstance(block.attn, LevelAttention):
            raise ValueError(f"{where} is hierarchical already; set its .level to change its level")
        if not isinstance(block.attn, SABlock):
            raise ValueError(f"{where}: a {type(block.attn).__name__}, not MONAI's SABlock")
        if reason := unserved_reason(block.attn):
            raise ValueError(f"{where}: {reason}")
    per_block = resolve_levels(levels, names)
    embeddings = [m for m in model.modules() if isinstance(m, PatchEmbeddingBlock)]
    if grid is None and len(embeddings) != 1:
        raise ValueError(
            f"{type(model).__name__} holds {len(embeddings)} MONAI PatchEmbeddingBlocks: "
            "pass grid=(g0, g1, g2), "
            "the patch grid of the tokens its blocks see"
        )
    tokens = TokenGrid(grid=grid, slice_axis=slice_axis, slice_depth=slice_depth)
    if embeddings:
        tokens.base = _base_grid(model, embeddings[0], img_size)
    swap_all(
        model,
        {
            f"{name}.attn": _maker(blocks[name].attn, level, tokens, backend, f"{name}.attn")
            for name, level in zip(names, per_block)
        },
    )
    if grid is None:
        embedding = embeddings[0]
        embedding.register_forward_pre_hook(lambda _, args: tokens.observe(patch_grid(embedding, args[0])))
    return model


def _maker(block: SABlock, level: str, tokens: TokenGrid, backend: str, where: str):
    return lambda: HierarchicalSABlock(block, level, tokens, backend, where)


def patch_size(embedding: PatchEmbeddingBlock) -> tuple[int, ...]:
    """The patch size of a MONAI patch embedding (a convolution's kernel, or the perceptron's)."""
    projection = embedding.patch_embeddings
    if isinstance(projection, nn.Conv3d):
        return tuple(projection.kernel_size)
    if isinstance(projection, nn.Sequential):  # "perceptron": einops Rearrange, then Linear
        lengths = dict(projection[0].axes_lengths)
        return tuple(lengths[f"p{i + 1}"] for i in range(len(lengths)))
    raise ValueError(f"a {type(projection).__name__} patch embedding: not a 3D MONAI patch embedding")


def patch_grid(embedding: PatchEmbeddingBlock, volume: torch.Tensor) -> tuple[int, int, int]:
    """The patch grid MONAI's embedding makes of ``volume`` ``(..., X, Y, Z)``."""
    patch = patch_size(embedding)
    if len(patch) != 3:
        raise ValueError(f"a {len(patch)}D patch embedding: hierarchical levels need a 3D patch grid")
    return tuple(int(s) // p for s, p in zip(volume.shape[-3:], patch))


def _base_grid(model: nn.Module, embedding: PatchEmbeddingBlock, img_size) -> tuple[int, int, int] | None:
    """The grid the position embedding was made for: from ``img_size``, or UNETR's ``feat_size``."""
    if img_size is None:
        feat_size = getattr(model, "feat_size", None)
        return None if feat_size is None else tuple(int(g) for g in feat_size)
    patch = patch_size(embedding)
    base = tuple(int(s) // p for s, p in zip(img_size, patch))
    if len(base) != 3 or base[0] * base[1] * base[2] != embedding.n_patches:
        raise ValueError(
            f"img_size {tuple(img_size)} with patch {patch} gives grid {base}, not the "
            f"{int(embedding.n_patches)} patches of the model's position embedding"
        )
    return base
