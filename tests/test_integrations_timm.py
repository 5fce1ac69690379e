"""timm VisionTransformer-based 3D models made hierarchical in place: timm's own outputs with
every block at the study level, the dense block-diagonal definition at the slice and scan levels,
refusals that leave the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from dense_reference import dense_level_attention
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from hlip_fast.integrations.timm import HierarchicalTimmAttention, hierarchical


class PatchEmbed3D(nn.Module):
    """A 3D patch embedding as HLIP's upstream encoder gives timm (``grid_size``, ``num_patches``)."""

    def __init__(self, img_size, patch_size, in_chans=1, embed_dim=48, bias=True, **_):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.grid_size = tuple(i // p for i, p in zip(img_size, patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, patch_size, patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def vit_3d(**extra) -> VisionTransformer:
    options = dict(img_size=(16, 24, 32), patch_size=(4, 8, 8), embed_dim=48, depth=3, num_heads=4)
    return VisionTransformer(in_chans=1, embed_layer=PatchEmbed3D, num_classes=5, **{**options, **extra})


class ReferenceAttention(nn.Module):
    """A timm Attention's own projections around :func:`dense_level_attention`."""

    def __init__(self, attention: Attention, grid, level: str, slice_axis: int):
        super().__init__()
        self.a, self.grid, self.level, self.slice_axis = attention, grid, level, slice_axis

    def forward(self, x, attn_mask=None, is_causal=False):
        a, (batch, length, _) = self.a, x.shape
        qkv = a.qkv(x).reshape(batch, length, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        out = dense_level_attention(q, k, v, self.grid, self.level, a.scale, self.slice_axis)
        return a.proj_drop(a.proj(a.norm(out.transpose(1, 2).reshape(batch, length, -1))))


def _forward_and_grad(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad


def _assert_close(a, b, tolerance):
    assert ((a - b).abs().max() / b.abs().max()) < tolerance


@pytest.mark.parametrize(
    "extra",
    [{}, {"reg_tokens": 2, "qk_norm": True}, {"class_token": False, "global_pool": "avg", "qkv_bias": False}],
    ids=["class-token", "registers-qk-norm", "no-prefix"],
)
def test_every_block_at_the_study_level_computes_what_timm_does(seed, extra):
    original = vit_3d(**extra).eval()
    keys = list(original.state_dict())
    swapped = hierarchical(copy.deepcopy(original), "study")
    assert list(swapped.state_dict()) == keys
    x = torch.randn(2, 1, 16, 24, 32)
    for got, want in zip(_forward_and_grad(swapped, x), _forward_and_grad(original, x)):
        _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_slice_and_scan_levels_equal_the_dense_definition(seed, slice_axis):
    """A class token and a register (two prefix tokens), q/k norm and the scale norm, fp64."""
    levels = ("slice", "study", "scan")
    original = vit_3d(reg_tokens=1, qk_norm=True, scale_attn_norm=True).double().eval()
    swapped = hierarchical(copy.deepcopy(original), levels, slice_axis=slice_axis)
    reference = copy.deepcopy(original)
    for block, level in zip(reference.blocks, levels):
        block.attn = ReferenceAttention(block.attn, (4, 3, 4), level, slice_axis)
    x = torch.randn(3, 1, 16, 24, 32, dtype=torch.float64)
    for got, want in zip(_forward_and_grad(swapped, x), _forward_and_grad(reference, x)):
        _assert_close(got, want, 1e-10)
    assert [b.attn.level for b in swapped.blocks] == list(levels)
    assert all(isinstance(b.attn, HierarchicalTimmAttention) for b in swapped.blocks)


def test_refusals_name_the_block_and_leave_the_model_as_it_was():
    model = vit_3d()
    model.blocks[2].attn = nn.Identity()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"blocks\.2\.attn: a Identity, not timm's Attention"):
        hierarchical(model, "slice")
    assert [type(m) for m in model.modules()] == before  # nothing half-swapped
    with pytest.raises(ValueError, match="levels has 2 entries; the model has 3 blocks"):
        hierarchical(vit_3d(), ["slice", "study"])
    with pytest.raises(ValueError, match="has 12 blocks; the model has 3"):
        hierarchical(vit_3d(), "vit_base_multiscan_h2_token1176")
    flat = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)
    with pytest.raises(ValueError, match=r"patch size \(8, 8\): hierarchical levels need a 3D patch grid"):
        hierarchical(flat, "slice")
    with pytest.raises(ValueError, match="Linear has no timm blocks"):
        hierarchical(nn.Linear(2, 2), "study")
    swapped = hierarchical(vit_3d(), "scan")
    with pytest.raises(ValueError, match="is hierarchical already"):
        hierarchical(swapped, "slice")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn: an attention mask"):
        swapped.blocks[0].attn(torch.randn(1, 49, 48), attn_mask=torch.ones(1, 49, 49, dtype=torch.bool))
