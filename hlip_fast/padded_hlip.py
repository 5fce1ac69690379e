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
from timm.models.vision_transformer import VisionTransformer


class _DensePatchEmbed3D(nn.Module):
    """Holds the ``Conv3d`` under timm's ``patch_embed.proj`` name; the forward is PaddedHLIP's."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True, **_):
        super().__init__()
        self.num_patches = math.prod(i // p for i, p in zip(img_size, patch_size))
        self.proj = nn.Conv3d(in_chans, embed_dim, patch_size, patch_size, bias=bias)


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
            num_classes=0,
            no_embed_class=True,
            pos_embed="none",
            embed_layer=_DensePatchEmbed3D,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.levels = cfg.levels
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

        level = self.levels[0]
        seg = torch.cat([self.cls_token.expand(to_level(x, level).shape[0], -1, -1), to_level(x, level)], 1)
        for block, nxt in zip(self.blocks, self.levels):
            if nxt != level:
                seg = self._switch(seg, copies(level), copies(nxt))
                level = nxt
            seg = block(seg)
        seg = self._switch(seg, copies(level), 1)
        return self.norm(seg)[:, 0]

    @staticmethod
    def _switch(seg: torch.Tensor, src_copies: int, dst_copies: int) -> torch.Tensor:
        """Re-partition [segments, 1 + L, C]; class tokens averaged (coarser) or repeated (finer)."""
        cls, src = seg[:, :1], seg[:, 1:]
        studies = seg.shape[0] // src_copies
        tokens = src.reshape(studies, -1, src.shape[-1])
        if dst_copies < src_copies:
            # Children of one coarse segment are consecutive: [study, dst, children].
            cls = cls.reshape(studies, dst_copies, src_copies // dst_copies, -1).mean(2)
        else:
            cls = cls.reshape(studies, src_copies, 1, -1).expand(-1, -1, dst_copies // src_copies, -1)
        cls = cls.reshape(studies * dst_copies, 1, -1)
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
        self.visual.head.proj = nn.Linear(cfg.embed_dim, embed_dim, bias=False)
        self.text = nn.Module()
        self.text.transformer = bert
        self.text.proj = nn.Linear(bert.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual.head.proj(self.visual.trunk(x)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text.proj(hidden[:, 0]), dim=-1)
