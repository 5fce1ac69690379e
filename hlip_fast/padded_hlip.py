"""HLIP's original fixed-shape pipeline, written independently of hlip_fast's packing.

Studies are dense ``(B, n, C, D, H, W)`` tensors (every scan one shape, every study ``n``
scans); levels switch by reshaping the batch, as the original HLIP encoder does. The model is
timm's own ``VisionTransformer`` (no position table, no head, HLIP's two fixed position
parameters added), so its ``state_dict`` has the key names of an original HLIP trunk. It is the
oracle of the equivalence and checkpoint tests and the baseline of ``bench/encoder_cpu.py``.
``OriginalHLIPClip`` wraps it with a text tower in open_clip's ``CustomTextCLIP`` layout.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer


class _DensePatchEmbed3D(nn.Module):
    """Holds the ``Conv3d`` under timm's ``patch_embed.proj`` name; the forward is PaddedHLIP's."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True, **_):
        super().__init__()
        self.num_patches = math.prod(i // p for i, p in zip(img_size, patch_size))
        self.proj = nn.Conv3d(in_chans, embed_dim, patch_size, patch_size, bias=bias)


class _RopeAttention(Attention):
    """timm's attention (same names) with HLIP's 3D axial RoPE on the patch tokens, written the
    way the original encoder writes it: depth, row and column chunks of ``2 * (head_dim // 3 // 2)``
    channels, interleaved pairs, prefix tokens unrotated. ``positions`` ``(B, L, 3)`` is set
    before each call."""

    prefix: int = 1
    positions: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask=None, **_) -> torch.Tensor:  # no mask: none is given
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotated(q), self._rotated(k)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        chunk, p = 2 * (self.head_dim // 3 // 2), self.prefix
        parts, start = [], 0
        for axis in range(3):
            parts.append(_rotate(x[:, :, p:, start : start + chunk], self.positions[..., axis]))
            start += chunk
        patches = torch.cat([*parts, x[:, :, p:, start:]], dim=-1)
        return torch.cat([x[:, :, :p], patches], dim=2)


def _rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(B, heads, L, c)`` by ``pos`` ``(B, L)`` × frequency."""
    half = x.shape[-1] // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = pos[:, None, :, None].double() * omega
    sin, cos = (t.repeat_interleave(2, dim=-1).to(x.dtype) for t in (angles.sin(), angles.cos()))
    turned = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos + turned * sin


class PaddedHLIP(VisionTransformer):
    def __init__(self, cfg) -> None:
        super().__init__(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            reg_tokens=cfg.reg_tokens,
            num_classes=0,
            no_embed_class=True,
            pos_embed="none",
            embed_layer=_DensePatchEmbed3D,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.levels, self.pooling = cfg.levels, cfg.pooling
        if cfg.rope:
            norm = partial(nn.LayerNorm, eps=1e-6)
            for block in self.blocks:
                block.attn = _RopeAttention(
                    cfg.embed_dim,
                    num_heads=cfg.num_heads,
                    qkv_bias=cfg.qkv_bias,
                    qk_norm=cfg.qk_norm,
                    norm_layer=norm,
                )
                block.attn.prefix = self.num_prefix_tokens
        grid = [i // p for i, p in zip(cfg.img_size, cfg.patch_size)]
        # Fixed in HLIP (requires_grad=False) but stored in its checkpoints; random here so that
        # a loader which recomputed them instead of loading them would be caught.
        self.spatial_posemb = nn.Parameter(torch.randn(1, *grid, cfg.embed_dim) * 0.02, requires_grad=False)
        seq = torch.randn(1, cfg.max_num_scans, cfg.embed_dim) * 0.02
        self.sequential_posemb = nn.Parameter(seq, requires_grad=False) if cfg.max_num_scans > 1 else None

    @classmethod
    def from_encoder(cls, encoder) -> PaddedHLIP:
        """The oracle with an hlip_fast encoder's weights (a strict load: the names match timm's)."""
        model = cls(encoder.config)
        model.load_state_dict(encoder.state_dict(), strict=True)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape[:3]
        x = self.patch_embed.proj(x.flatten(0, 1))  # [b*n, C, d, h, w]
        d, h, w = x.shape[2:]
        x = x.permute(0, 2, 3, 4, 1).reshape(b, n, d, h, w, -1)
        pos = self.spatial_posemb
        if tuple(pos.shape[1:4]) != (d, h, w):
            pos = F.interpolate(pos.permute(0, 4, 1, 2, 3), size=(d, h, w), mode="trilinear")
            pos = pos.permute(0, 2, 3, 4, 1)
        pos = pos[:, None]
        if self.sequential_posemb is not None:
            pos = pos + self.sequential_posemb[:, :n, None, None, None, :]
        x = (x + pos).reshape(b, n, d, h * w, -1)

        def to_level(x, level):  # dense [b, n, d, h*w, C] -> [segments, tokens, C]
            per_segment = {
                "slice": (b * n * d, h * w),
                "scan": (b * n, d * h * w),
                "study": (b, n * d * h * w),
            }
            return x.reshape(*per_segment[level], -1)

        def copies(level):
            return {"slice": n * d, "scan": n, "study": 1}[level]

        dd, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack([dd, yy, xx], dim=-1).reshape(1, 1, d, h * w, 3).expand(b, n, -1, -1, -1)
        level, p = self.levels[0], self.num_prefix_tokens
        prefix = self.cls_token if self.reg_token is None else torch.cat([self.cls_token, self.reg_token], 1)
        seg = torch.cat([prefix.expand(to_level(x, level).shape[0], -1, -1), to_level(x, level)], 1)
        for block, nxt in zip(self.blocks, self.levels):
            if nxt != level:
                seg = self._switch(seg, copies(level), copies(nxt), p)
                level = nxt
            if isinstance(block.attn, _RopeAttention):
                block.attn.positions = to_level(grid, level)  # each token's place in its scan
            seg = block(seg)
        seg = self.norm(self._switch(seg, copies(level), 1, p))
        if self.pooling == "token":
            return seg[:, 0]
        mean = seg[:, p:].mean(1)
        if self.pooling == "avg":
            return mean
        pooled = torch.cat([seg[:, :p], mean[:, None].expand(-1, p, -1)], -1)  # DINO.txt
        return pooled[:, 0] if p == 1 else pooled

    @staticmethod
    def _switch(seg: torch.Tensor, src_copies: int, dst_copies: int, p: int = 1) -> torch.Tensor:
        """Re-partition [segments, p + L, C]; prefix tokens averaged (coarser) or repeated (finer)."""
        cls, src = seg[:, :p], seg[:, p:]
        studies = seg.shape[0] // src_copies
        tokens = src.reshape(studies, -1, src.shape[-1])
        if dst_copies < src_copies:
            # Children of one coarse segment are consecutive: [study, dst, children].
            cls = cls.reshape(studies, dst_copies, src_copies // dst_copies, p, -1).mean(2)
        else:
            cls = cls.reshape(studies, src_copies, 1, p, -1).expand(-1, -1, dst_copies // src_copies, -1, -1)
        cls = cls.reshape(studies * dst_copies, p, -1)
        return torch.cat([cls, tokens.reshape(studies * dst_copies, -1, src.shape[-1])], 1)


class OriginalHLIPClip(nn.Module):
    """open_clip's ``CustomTextCLIP`` layout as HLIP saves it: ``visual.trunk`` (the encoder),
    ``visual.head.proj`` (linear, no bias), ``text.transformer`` (a Hugging Face BERT, pooler
    included), ``text.proj`` (linear, no bias), ``logit_scale``; CLS pooling."""

    def __init__(self, cfg, bert: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.visual.trunk = PaddedHLIP(cfg)
        self.visual.head = nn.Module()
        self.visual.head.proj = nn.Linear(cfg.num_features, embed_dim, bias=False)
        self.text = nn.Module()
        self.text.transformer = bert
        self.text.proj = nn.Linear(bert.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual.head.proj(self.visual.trunk(x)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text.proj(hidden[:, 0]), dim=-1)
