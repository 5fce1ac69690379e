"""A hierarchical MONAI ViT on volumes of any size, packed: no padding, no crop to ``img_size``.

    from hlip_fast.integrations.monai_volumes import encode_volumes

    out = encode_volumes(vit, [torch.randn(1, 64, 96, 128), torch.randn(1, 96, 96, 96)])
    out.tokens[0], out.hidden_states[0][3]  # volume 0: final tokens, block 3's output

Each volume is embedded by the ViT's own patch embedding, gets the model's position embedding
resampled to its patch grid (trilinear, ``align_corners=False``, as timm resamples 2D
position embeddings for other image sizes; unchanged at the model's own grid), and all volumes
run through the blocks as one packed batch. :func:`unetr_forward` runs a UNETR so at a size
other than its ``img_size``, when the patch size divides every axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import UNETR, ViT

from .monai import HierarchicalSABlock, patch_grid, patch_size
from .packed import TokenGrid


@dataclass
class VolumeOutputs:
    """Per volume, what MONAI's ViT returns for a batch of one, in MONAI's token order (prefix
    tokens first): ``tokens`` after the final norm, ``hidden_states`` each block's output,
    and ``logits`` ``(volumes, classes)`` when the ViT classifies."""

    tokens: list[torch.Tensor]
    hidden_states: list[list[torch.Tensor]]
    logits: torch.Tensor | None = None


def _token_grid(vit: ViT) -> TokenGrid:
    attention = [block.attn for block in vit.blocks]
    if not all(isinstance(a, HierarchicalSABlock) for a in attention):
        raise ValueError(
            "the ViT's blocks are MONAI's own: call hlip_fast.integrations.monai.hierarchical(vit, levels) "
            'first (levels="study" computes what MONAI does)'
        )
    return attention[0].grid


def resampled_position_embedding(
    vit: ViT, base: tuple[int, int, int], grid: tuple[int, int, int]
) -> torch.Tensor:
    """The ViT's position embedding ``(G, C)`` for patch grid ``grid`` (made for ``base``)."""
    table = vit.patch_embedding.position_embeddings[0]
    if tuple(grid) == tuple(base):
        return table
    cube = table.T.reshape(1, table.shape[1], *base)
    return F.interpolate(cube, size=tuple(grid), mode="trilinear", align_corners=False).flatten(2)[0].T


def _embed(vit: ViT, volume: torch.Tensor, where: str, base) -> tuple[torch.Tensor, tuple[int, int, int]]:
    embedding = vit.patch_embedding
    patch = patch_size(embedding)
    projection = embedding.patch_embeddings
    channels = projection.in_channels if isinstance(projection, nn.Conv3d) else None
    if volume.dim() != 4 or (channels is not None and volume.shape[0] != channels):
        raise ValueError(f"{where}: expected (channels={channels}, X, Y, Z), got shape {tuple(volume.shape)}")
    grid = patch_grid(embedding, volume)
    if min(grid) < 1 or (
        embedding.proj_type == "perceptron" and any(s % p for s, p in zip(volume.shape[1:], patch))
    ):
        raise ValueError(f"{where}: shape {tuple(volume.shape[1:])} does not hold whole patches of {patch}")
    tokens = projection(volume[None])
    tokens = tokens.flatten(2).transpose(1, 2)[0] if embedding.proj_type == "conv" else tokens[0]
    if base is None:  # as MONAI does: the table as it is, where it has one row per patch
        if math.prod(grid) != embedding.n_patches:
            raise ValueError(
                f"{where}: patch grid {grid} is not the model's, and the model does not record the grid "
                "its position embedding was made for: pass img_size= to hierarchical()"
            )
        base = grid
    return embedding.dropout(tokens + resampled_position_embedding(vit, base, grid)), grid


def encode_volumes(vit: ViT, volumes: Sequence[torch.Tensor], *, hidden_states: bool = True) -> VolumeOutputs:
    """Run a hierarchical MONAI ``ViT`` on ``volumes`` ``(channels, X, Y, Z)`` of any sizes,
    packed into one batch; ``hidden_states=False`` keeps only the final tokens."""
    if not volumes:
        raise ValueError("no volumes to encode")
    tokens = _token_grid(vit)
    embedded = [_embed(vit, v, f"volume {i}", tokens.base) for i, v in enumerate(volumes)]
    grids = tuple(grid for _, grid in embedded)
    layout = tokens.layout(grids, embedded[0][0].device)
    patches = [tokens.to_layout_order(t, g) for t, g in embedded]
    prefix = vit.cls_token.shape[1] if hasattr(vit, "cls_token") else 0
    if prefix:  # the class token of every volume, after the patch rows
        patches.append(vit.cls_token[0].repeat(len(volumes), 1))
    x = torch.cat(patches)
    states = []
    for block in vit.blocks:
        x = x + block.attn.forward_packed(block.norm1(x), layout, prefix)
        x = x + block.mlp(block.norm2(x))
        if hidden_states:
            states.append(_per_volume(x, grids, prefix, tokens))
    x = vit.norm(x)
    out = _per_volume(x, grids, prefix, tokens)
    logits = None
    if hasattr(vit, "classification_head"):
        logits = vit.classification_head(torch.stack([t[0] for t in out]))
    by_volume = [list(per) for per in zip(*states)] if hidden_states else [[] for _ in volumes]
    return VolumeOutputs(tokens=out, hidden_states=by_volume, logits=logits)


def _per_volume(x: torch.Tensor, grids, prefix: int, tokens: TokenGrid) -> list[torch.Tensor]:
    """Packed rows → per volume ``(prefix + G, C)`` in MONAI's order."""
    sizes = [math.prod(g) for g in grids]
    n = sum(sizes)
    heads = x[n:].view(len(grids), prefix, x.shape[-1])
    return [
        torch.cat([heads[i], tokens.to_model_order(part, grid)])
        for i, (part, grid) in enumerate(zip(x[:n].split(sizes), grids))
    ]


def unetr_forward(unetr: UNETR, x: torch.Tensor) -> torch.Tensor:
    """A hierarchical ``UNETR`` on a batch ``(B, C, X, Y, Z)`` of any size the patch size divides
    (its decoder joins skips at 1/16, 1/8, ... of the input): what ``unetr(x)`` computes, with
    the position embedding resampled to the batch's grid. MONAI 1.x UNETR wiring: hidden states
    3, 6 and 9 and the last feed the decoder."""
    patch = tuple(unetr.patch_size)
    if x.dim() != 5 or any(s % p for s, p in zip(x.shape[2:], patch)):
        raise ValueError(
            f"UNETR needs (B, C, X, Y, Z) with every axis a multiple of the patch size {patch}; "
            f"got {tuple(x.shape)}"
        )
    grid = tuple(s // p for s, p in zip(x.shape[2:], patch))
    out = encode_volumes(unetr.vit, list(x))

    def features(states: list[torch.Tensor]) -> torch.Tensor:  # (B, G, C) → (B, C, *grid)
        return torch.stack(states).view(len(states), *grid, -1).permute(0, 4, 1, 2, 3).contiguous()

    hidden = [[h[i] for h in out.hidden_states] for i in range(len(unetr.vit.blocks))]
    enc1 = unetr.encoder1(x)
    enc2 = unetr.encoder2(features(hidden[3]))
    enc3 = unetr.encoder3(features(hidden[6]))
    enc4 = unetr.encoder4(features(hidden[9]))
    dec3 = unetr.decoder5(features(out.tokens), enc4)
    dec2 = unetr.decoder4(dec3, enc3)
    dec1 = unetr.decoder3(dec2, enc2)
    return unetr.out(unetr.decoder2(dec1, enc1))
