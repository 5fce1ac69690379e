"""MONAI's ViT, UNETR and TransformerBlock trees made hierarchical in place: MONAI's own outputs
with every block at the study level, the dense block-diagonal definition at the slice and scan
levels, volumes of any size packed, and refusals that leave the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("einops", reason="MONAI's attention blocks need einops (the monai extra installs it)")
pytest.importorskip("monai", reason="monai is not installed (pip install 'hlip-fast[monai]')")
from dense_reference import dense_level_attention  # noqa: E402
from monai.networks.blocks import SABlock, TransformerBlock  # noqa: E402
from monai.networks.nets import UNETR, ViT  # noqa: E402

from hlip_fast.integrations.monai import HierarchicalSABlock, hierarchical  # noqa: E402
from hlip_fast.integrations.monai_volumes import (  # noqa: E402
    encode_volumes,
    resampled_position_embedding,
    unetr_forward,
)

H3 = ("slice", "scan", "study")
NARROW = dict(hidden_size=48, mlp_dim=96, num_heads=4)
SMALL = dict(**NARROW, num_layers=3)


class ReferenceSA(nn.Module):
    """A MONAI SABlock's own projections around :func:`dense_level_attention`."""

    def __init__(self, block: SABlock, grid, level: str, slice_axis: int, slice_depth: int):
        super().__init__()
        self.block, self.grid, self.level = block, grid, level
        self.slice_axis, self.slice_depth = slice_axis, slice_depth

    def forward(self, x, attn_mask=None):
        b = self.block
        if b.use_combined_linear:
            q, k, v = b.input_rearrange(b.qkv(x))
        else:
            q, k, v = (b.input_rearrange(f(x)) for f in (b.to_q, b.to_k, b.to_v))
        where = (self.grid, self.level, b.scale, self.slice_axis, self.slice_depth)
        out = dense_level_attention(q, k, v, *where)
        return b.drop_output(b.out_proj(b.out_rearrange(out)))


def reference_model(model: nn.Module, grid, levels, slice_axis: int = 0, slice_depth: int = 1) -> nn.Module:
    """A copy of the MONAI ``model`` whose attention is the dense definition at ``levels``."""
    reference = copy.deepcopy(model)
    blocks = [m for m in reference.modules() if isinstance(m, TransformerBlock)]
    for block, level in zip(blocks, levels):
        block.attn = ReferenceSA(block.attn, grid, level, slice_axis, slice_depth)
    return reference


def _forward_and_grad(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad


def _assert_close(a, b, tolerance):
    scale = b.abs().max().clamp_min(1e-30)
    assert ((a - b).abs().max() / scale) < tolerance, float((a - b).abs().max() / scale)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: ViT(in_channels=1, img_size=(32, 48, 64), patch_size=16), (2, 1, 32, 48, 64)),
        (lambda: ViT(in_channels=2, img_size=32, patch_size=16, classification=True), (2, 2, 32, 32, 32)),
    ],
    ids=["vit-noncubic", "vit-classification"],
)
def test_every_block_at_the_study_level_computes_what_monai_does(seed, make, shape):
    """MONAI's defaults (ViT-B: 12 blocks, 768 wide), fp32, forward and the input's gradient."""
    original = make().eval()
    swapped = hierarchical(copy.deepcopy(original), "study")
    x = torch.randn(shape)
    for got, want in zip(_forward_and_grad(swapped, x), _forward_and_grad(original, x)):
        _assert_close(got, want, 1e-5)


def test_unetr_at_the_study_level_computes_what_monai_does(seed):
    """UNETR's defaults at a non-cubic size. Its input gradient is ill-conditioned in fp32: MONAI's
    own two attention paths (einsum, ``use_flash_attention``) differ there by percents. So in
    fp32: the output to 1e-5 and the gradient as close to MONAI's as MONAI's flash path is; in
    fp64, both to 1e-10."""
    original = UNETR(in_channels=1, out_channels=2, img_size=(32, 48, 64)).eval()
    swapped = hierarchical(copy.deepcopy(original), "study")
    flash = copy.deepcopy(original)
    for block in flash.vit.blocks:
        block.attn.use_flash_attention = True
    x = torch.randn(1, 1, 32, 48, 64)
    (out, grad), (want, want_grad) = _forward_and_grad(swapped, x), _forward_and_grad(original, x)
    _assert_close(out, want, 1e-5)
    monai_spread = (_forward_and_grad(flash, x)[1] - want_grad).norm()
    assert (grad - want_grad).norm() <= 2 * monai_spread
    original, swapped = original.double(), swapped.double()
    for got, want in zip(_forward_and_grad(swapped, x.double()), _forward_and_grad(original, x.double())):
        _assert_close(got, want, 1e-10)


def test_state_dict_keys_and_checkpoints_are_unchanged_by_the_swap(seed):
    original = UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), qkv_bias=True)
    checkpoint = copy.deepcopy(original.state_dict())
    swapped = hierarchical(copy.deepcopy(original), "vit_base_multiscan_h3_token1176")
    assert list(swapped.state_dict()) == list(checkpoint)  # the same keys, in the same order
    assert all(torch.equal(swapped.state_dict()[k], v) for k, v in checkpoint.items())
    fresh = hierarchical(UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), qkv_bias=True), H3 * 4)
    fresh.load_state_dict(checkpoint)  # a MONAI checkpoint loads after the swap ...
    UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), qkv_bias=True).load_state_dict(
        fresh.state_dict()
    )  # ... and what the swapped model saves loads into MONAI's


@pytest.mark.parametrize(("slice_axis", "slice_depth"), [(0, 1), (2, 1), (1, 2)])
def test_slice_and_scan_levels_equal_the_dense_definition(seed, slice_axis, slice_depth):
    """A classifying ViT (a class token), fp64, forward and input gradient, with slices cut
    along each axis of MONAI's token order."""
    grid, levels = (4, 3, 5), ("slice", "scan", "slice")
    vit = ViT(in_channels=1, img_size=(16, 24, 40), patch_size=(4, 8, 8), classification=True, **SMALL)
    vit = vit.double().eval()
    swapped = hierarchical(copy.deepcopy(vit), levels, slice_axis=slice_axis, slice_depth=slice_depth)
    reference = reference_model(vit, grid, levels, slice_axis, slice_depth)
    x = torch.randn(2, 1, 16, 24, 40, dtype=torch.float64)
    for got, want in zip(_forward_and_grad(swapped, x), _forward_and_grad(reference, x)):
        _assert_close(got, want, 1e-10)
    assert [m.level for m in swapped.modules() if isinstance(m, HierarchicalSABlock)] == list(levels)


class Tree(nn.Module):
    """A model of MONAI TransformerBlocks without a MONAI patch embedding (grid given)."""

    def __init__(self, blocks):
        super().__init__()
        self.stem = nn.Linear(3, 32)
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        x = self.stem(x)
        for block in self.layers:
            x = block(x)
        return x


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_sablock_options_are_honoured_in_a_tree_of_blocks(seed, backend):
    """qkv bias, include_fc=False, separate q/k/v linears, a head dim of its own."""
    separate = TransformerBlock(32, 64, 4, qkv_bias=True, use_combined_linear=False)
    no_fc = TransformerBlock(32, 64, 4, include_fc=False)
    own_head = TransformerBlock(32, 64, 4)
    own_head.attn = SABlock(32, 4, dim_head=6, qkv_bias=True)
    tree = Tree([separate, no_fc, own_head]).double()
    grid, levels = (2, 3, 4), ("slice", "study", "slice")
    swapped = hierarchical(copy.deepcopy(tree), levels, grid=grid, backend=backend, slice_axis=1)
    reference = reference_model(tree, grid, levels, slice_axis=1)
    x = torch.randn(3, 24, 3, dtype=torch.float64)
    for got, want in zip(_forward_and_grad(swapped, x), _forward_and_grad(reference, x)):
        _assert_close(got, want, 1e-10)


def test_dropout_applies_in_training_only(seed):
    block = TransformerBlock(32, 64, 4, dropout_rate=0.3)
    tree = Tree([block]).double()
    swapped = hierarchical(copy.deepcopy(tree), "slice", grid=(2, 3, 4)).layers[0].attn
    plain = reference_model(tree, (2, 3, 4), ["slice"]).layers[0].attn.eval()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    _assert_close(swapped.eval()(x), plain(x), 1e-10)
    swapped.train()
    draws = torch.stack([swapped(x) for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])  # weights and outputs dropped at random
    # Dropout keeps the mean: 400 draws average to the evaluation output (up to their noise).
    assert ((draws.mean(0) - plain(x)).abs().mean() / plain(x).abs().mean()) < 0.1


def _unserved(kind: str) -> nn.Module:
    blocks = [TransformerBlock(32, 64, 4), TransformerBlock(32, 64, 4)]
    if kind == "save_attn":
        blocks[1] = TransformerBlock(32, 64, 4, save_attn=True)
    elif kind == "causal":
        blocks[1] = TransformerBlock(32, 64, 4, causal=True, sequence_length=24)
    elif kind == "cross-attention":
        blocks[1] = TransformerBlock(32, 64, 4, with_cross_attention=True)
    elif kind == "relative positions":
        blocks[1].attn = SABlock(32, 4, rel_pos_embedding="decomposed", input_size=(2, 3, 4))
    elif kind == "attention_dtype":
        blocks[1].attn = SABlock(32, 4, attention_dtype=torch.float16)
    return Tree(blocks)


@pytest.mark.parametrize(
    ("kind", "levels", "message"),
    [
        ("save_attn", "slice", "layers.1.attn: save_attn=True is not served"),
        ("causal", "slice", "layers.1.attn: causal attention is not served"),
        ("cross-attention", "slice", "layers.1: cross-attention is in use"),
        ("relative positions", "slice", "layers.1.attn: relative position embeddings"),
        ("attention_dtype", "slice", "layers.1.attn: attention_dtype=torch.float16 is not served"),
        ("none", ["slice"], "levels has 1 entries; the model has 2 blocks (layers.0 ... layers.1)"),
        ("none", ["slice", "cube"], "layers.1: unknown level 'cube'"),
        ("none", "vit_base_multiscan_h3_token1176", "has 12 blocks; the model has 2"),
        ("none", "h4", "neither a level"),
    ],
)
def test_refusals_name_the_block_and_leave_the_model_as_it_was(kind, levels, message):
    tree = _unserved(kind)
    before = [type(m) for m in tree.modules()]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        hierarchical(tree, levels, grid=(2, 3, 4))
    assert [type(m) for m in tree.modules()] == before  # nothing half-swapped


def test_a_model_without_transformer_blocks_or_grid_is_refused():
    with pytest.raises(ValueError, match="Linear holds no MONAI TransformerBlock"):
        hierarchical(nn.Linear(2, 2), "study")
    with pytest.raises(ValueError, match="holds 0 MONAI PatchEmbeddingBlocks: pass grid="):
        hierarchical(Tree([TransformerBlock(32, 64, 4)]), "study")
    vit = hierarchical(ViT(in_channels=1, img_size=16, patch_size=8, **SMALL), "study")
    with pytest.raises(ValueError, match="is hierarchical already"):
        hierarchical(vit, "slice")


def _vit(img_size, **extra):
    return ViT(in_channels=1, img_size=img_size, patch_size=(4, 8, 8), classification=True, **SMALL, **extra)


def test_volumes_of_any_size_run_packed_as_each_would_alone(seed):
    """Ragged volumes in one packed batch: each equals a MONAI ViT built for its size with the
    position embedding resampled to it (all levels: the dense definition), hidden states too."""
    vit = _vit((16, 32, 32)).double().eval()
    swapped = hierarchical(copy.deepcopy(vit), H3, img_size=(16, 32, 32))
    shapes = [(1, 16, 32, 32), (1, 24, 16, 40), (1, 8, 40, 24)]
    volumes = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    out = encode_volumes(swapped, volumes)
    assert out.logits.shape == (3, 2)
    for i, volume in enumerate(volumes):
        grid = tuple(s // p for s, p in zip(volume.shape[1:], (4, 8, 8)))
        alone = _vit(tuple(volume.shape[1:])).double().eval()
        weights = vit.state_dict()
        weights["patch_embedding.position_embeddings"] = resampled_position_embedding(vit, (4, 4, 4), grid)[
            None
        ].detach()
        alone.load_state_dict(weights)
        logits, hidden = reference_model(alone, grid, H3)(volume[None])
        _assert_close(out.logits[i], logits[0], 1e-10)
        for got, want in zip(out.hidden_states[i], hidden):
            _assert_close(got, want[0], 1e-10)
        _assert_close(out.tokens[i], alone.norm(hidden[-1])[0], 1e-10)


def test_the_position_embedding_is_resampled_trilinearly_and_kept_at_its_own_grid():
    vit = _vit((16, 32, 32))
    table = vit.patch_embedding.position_embeddings[0]
    assert torch.equal(resampled_position_embedding(vit, (4, 4, 4), (4, 4, 4)), table)
    cube = table.T.reshape(1, -1, 4, 4, 4)
    want = torch.nn.functional.interpolate(cube, size=(8, 2, 4), mode="trilinear", align_corners=False)
    assert torch.equal(resampled_position_embedding(vit, (4, 4, 4), (8, 2, 4)), want.flatten(2)[0].T)


def test_packed_volumes_need_a_hierarchical_vit_and_the_size_its_embedding_was_made_for():
    vit = _vit((16, 32, 32))
    with pytest.raises(ValueError, match="blocks are MONAI's own: call hlip_fast.integrations.monai"):
        encode_volumes(vit, [torch.randn(1, 16, 32, 32)])
    hierarchical(vit, "study")  # no img_size: the model's own grid only
    assert encode_volumes(vit, [torch.randn(1, 16, 32, 32)]).tokens[0].shape == (65, 48)
    with pytest.raises(ValueError, match="volume 0: patch grid .* pass img_size= to hierarchical"):
        encode_volumes(vit, [torch.randn(1, 8, 32, 32)])
    with pytest.raises(ValueError, match=r"volume 1: expected \(channels=1, X, Y, Z\)"):
        encode_volumes(vit, [torch.randn(1, 16, 32, 32), torch.randn(2, 16, 32, 32)])


def test_unetr_runs_at_other_sizes_the_patch_size_divides(seed):
    unetr = UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=8, **NARROW).double()
    swapped = hierarchical(copy.deepcopy(unetr), "study").eval()
    unetr.eval()
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    _assert_close(unetr_forward(swapped, x), unetr(x), 1e-10)  # its own size: UNETR's output
    other = torch.randn(2, 1, 48, 32, 64, dtype=torch.float64)
    built = UNETR(in_channels=1, out_channels=2, img_size=(48, 32, 64), feature_size=8, **NARROW)
    built = built.double().eval()
    weights = unetr.state_dict()
    key = "vit.patch_embedding.position_embeddings"
    weights[key] = resampled_position_embedding(unetr.vit, (2, 2, 2), (3, 2, 4))[None].detach()
    built.load_state_dict(weights)
    assert unetr_forward(swapped, other).shape == (2, 2, 48, 32, 64)
    _assert_close(unetr_forward(swapped, other), built(other), 1e-10)
    with pytest.raises(ValueError, match=r"every axis a multiple of the patch size \(16, 16, 16\)"):
        unetr_forward(swapped, torch.randn(1, 1, 40, 32, 32))
