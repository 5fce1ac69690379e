"""HLIP's original fixed-shape pipeline, written independently of hlip_fast's packing.

Studies are dense ``(B, n, C, D, H, W)`` tensors (every scan one shape, every study ``n``
scans); levels switch by reshaping the batch, exactly as the original HLIP encoder does, and the
blocks are timm's own ``Block``. It is the oracle of the equivalence tests and the baseline of
``bench/encoder_cpu.py``. ``PaddedHLIP.from_encoder`` copies an hlip_fast encoder's weights
(a strict ``load_state_dict`` per block, which also proves the parameter names match timm).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block


class PaddedHLIP(nn.Module):
    def __init__(self, encoder) -> None:
        super().__init__()
        cfg = encoder.config
        self.levels = cfg.levels
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("spatial_posemb", encoder.spatial_posemb.clone())
        seq = encoder.sequential_posemb
        self.register_buffer("sequential_posemb", None if seq is None else seq.clone())
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_layer=norm)
            for _ in range(cfg.depth)
        )
        self.norm = norm(cfg.embed_dim)

    @classmethod
    def from_encoder(cls, encoder) -> PaddedHLIP:
        model = cls(encoder)
        model.proj.load_state_dict(encoder.patch_embed.proj.state_dict())
        model.cls_token.data.copy_(encoder.cls_token.data)
        for mine, theirs in zip(model.blocks, encoder.blocks):
            mine.load_state_dict(theirs.state_dict(), strict=True)
        model.norm.load_state_dict(encoder.norm.state_dict())
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape[:3]
        x = self.proj(x.flatten(0, 1))  # [b*n, C, d, h, w]
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
