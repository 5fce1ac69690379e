"""The packed encoder against HLIP's padded pipeline, per-study independence, configs."""

from __future__ import annotations

import pytest
import timm
import torch

import hlip_fast
from hlip_fast import HLIPVisionEncoder, VisionConfig, create_model, list_models, pack_studies
from hlip_fast.padded_hlip import PaddedHLIP

TINY = [
    "vit_tiny_singlescan_h2",
    "vit_tiny_multiscan_h2",
    "vit_tiny_multiscan_h3",
    "vit_tiny_multiscan_h3_dualdinotxt",
]
SCHEDULES = [None, ("study", "slice", "scan"), ("scan", "study", "slice")]
HLIP_NAMES = [
    "vit_base_singlescan_h2_token2744",
    "vit_base_multiscan_h2_token588",
    "vit_base_multiscan_h2_token1176",
    "vit_base_multiscan_h3_token1176",
]


def uniform_studies(model, studies, shape):
    scans = 1 if model.config.max_num_scans == 1 else 3
    return torch.randn(studies, scans, 1, *shape)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("levels", SCHEDULES)
@pytest.mark.parametrize("shape", [(16, 32, 32), (12, 24, 40)])
def test_packed_encoder_matches_padded_hlip(name, levels, shape, seed):
    overrides = {} if levels is None else {"levels": levels}
    model = create_model(name, **overrides).eval()
    padded = PaddedHLIP.from_encoder(model).eval()
    volumes = uniform_studies(model, 2, shape)
    batch = pack_studies([list(study) for study in volumes], model.config.patch_size)
    out = model(batch)
    expected = padded(volumes)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Gradients agree too (in float64, where a tight tolerance means something).
    model.double(), padded.double()
    model(batch.to("cpu", torch.float64)).square().sum().backward()
    padded(volumes.double()).square().sum().backward()
    pairs = [
        (model.patch_embed.proj.weight.grad, padded.patch_embed.proj.weight.grad),
        (model.cls_token.grad, padded.cls_token.grad),
        (model.blocks[0].attn.qkv.weight.grad, padded.blocks[0].attn.qkv.weight.grad),
        (model.blocks[-1].mlp.fc2.weight.grad, padded.blocks[-1].mlp.fc2.weight.grad),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


LATER_HLIP = [n for n in list_models() if "dinotxt" in n or "1568" in n or n.startswith("vit_large")]
LATER_HLIP = sorted(set(LATER_HLIP + ["vit_base_slice_scan_token2744", "vit_base_scan_study_token1176"]))
LATER_HLIP.remove("vit_tiny_multiscan_h3_dualdinotxt")


@pytest.mark.parametrize("name", LATER_HLIP)
def test_later_hlip_configs_match_padded_hlip(name, seed):
    """HLIP's later configs (their schedules, patching, pooling, register token, scan-sequence
    table or none) at width 48 against the padded oracle, forward and gradients, float64."""
    config = hlip_fast.models.registry.get_config(name)
    small = tuple(2 * p for p in config.patch_size)
    model = create_model(name, embed_dim=48, num_heads=2, mlp_ratio=2.0, img_size=small).double().eval()
    padded = PaddedHLIP.from_encoder(model).double().eval()
    volumes = uniform_studies(model, 2, (3 * config.patch_size[0], *small[1:])).double()
    batch = pack_studies([list(study) for study in volumes], model.config.patch_size).to("cpu", torch.float64)
    out, expected = model(batch), padded(volumes)
    prefix = 1 + config.reg_tokens
    width = 96 if config.pooling == "dinotxt" else 48
    assert out.shape == ((2, width) if prefix == 1 else (2, prefix, width))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    expected.square().sum().backward()
    tokens = [model.cls_token] + ([model.reg_token] if config.reg_tokens else [])
    for got, want in zip(tokens, [padded.cls_token] + ([padded.reg_token] if config.reg_tokens else [])):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.blocks[-1].attn.qkv.weight.grad, padded.blocks[-1].attn.qkv.weight.grad)


def test_later_hlip_configs_have_upstreams_shapes():
    get = hlip_fast.models.registry.get_config
    large = get("vit_large_slice_scan_study_dualdinotxt1568")
    assert (large.depth, large.embed_dim, large.num_heads, large.num_features) == (24, 1024, 16, 2048)
    assert [i for i, level in enumerate(large.levels) if level == "study"] == [5, 11, 17, 23]
    assert [i for i, level in enumerate(large.levels) if level == "scan"] == [4, 10, 16, 22]
    assert large.num_prefix_tokens == 2 and large.max_num_scans == 0
    base = get("vit_base_slice_scan_study_dualdinotxt1568")
    assert base.levels == ("slice", "scan", "study") * 4 and base.patch_size == (6, 16, 16)
    assert get("vit_base_multiscan_h2_token1568").grid_size == (8, 14, 14)  # 1568 tokens
    assert get("ablate_seqposemb_vit_base_multiscan_h2_dinotxt1568").max_num_scans == 0
    assert get("vit_base_multiscan_h2_dinotxt1568").max_num_scans == 40
    with pytest.raises(ValueError, match="exactly one level"):
        hlip_fast.models.registry.schedule(3, scan=(0, 1), study=(1, 2))


@pytest.mark.parametrize("levels", [("scan", "study"), ("study", "slice"), ("slice", "scan")])
def test_rope_with_an_unrotated_rest_matches_padded_hlip(levels, seed):
    """Head dim 64: three rotated chunks of 20 and 4 channels left as they are, at every level."""
    model = (
        create_model("vit_tiny_multiscan_h3_dualdinotxt", rope=True, embed_dim=128, depth=2, levels=levels)
        .double()
        .eval()
    )
    assert model.blocks[0].attn.head_dim == 64
    padded = PaddedHLIP.from_encoder(model).double().eval()
    volumes = torch.randn(2, 2, 1, 12, 24, 32, dtype=torch.float64)
    batch = pack_studies([list(study) for study in volumes], model.config.patch_size).to("cpu", torch.float64)
    torch.testing.assert_close(model(batch), padded(volumes), rtol=1e-10, atol=1e-10)
    plain = create_model("vit_tiny_multiscan_h3_dualdinotxt", embed_dim=128, depth=2, levels=levels).double()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain.eval()(batch), model(batch))  # the rotation does something


def test_rope_under_patch_dropout_rotates_the_kept_tokens_by_their_own_positions(seed, monkeypatch):
    from hlip_fast.layers import token_positions
    from hlip_fast.models import encoder

    seen = {}
    original_keep, original_tables = encoder.keep_patches, encoder.RotaryTables.of
    monkeypatch.setattr(encoder, "keep_patches", lambda *a: seen.setdefault("keep", original_keep(*a)))
    monkeypatch.setattr(
        encoder.RotaryTables,
        "of",
        lambda positions, dim: seen.setdefault("tables", original_tables(positions, dim)),
    )
    model = create_model("vit_tiny_multiscan_h3", rope=True, patch_dropout=0.5).train()
    batch = pack_studies(ragged_studies(), model.config.patch_size)
    model(batch)
    keep, _ = seen["keep"]
    want = original_tables(token_positions(batch.layout)[keep], model.blocks[0].attn.head_dim)
    assert torch.equal(seen["tables"].cos, want.cos) and len(keep) < batch.layout.num_tokens
    with pytest.raises(ValueError, match="3D RoPE needs a head dim of at least 6"):
        VisionConfig(embed_dim=8, num_heads=2, depth=1, levels=("scan",), rope=True)


def ragged_studies():
    return [
        [torch.randn(16, 32, 32), torch.randn(8, 16, 24)],
        [torch.randn(4, 40, 8)],
        [torch.randn(12, 24, 32), torch.randn(4, 8, 8), torch.randn(20, 32, 16)],
    ]


RAGGED = [
    ("vit_tiny_multiscan_h2", {}),
    ("vit_tiny_multiscan_h3", {}),
    ("vit_tiny_multiscan_h3_dualdinotxt", {}),
]
RAGGED += [("vit_tiny_multiscan_h3_dualdinotxt", {"rope": True})]


@pytest.mark.parametrize("name, overrides", RAGGED)
@pytest.mark.parametrize("backend", ["sdpa", "reference", "flex"])
def test_each_study_in_a_ragged_batch_equals_the_study_alone(name, overrides, backend, seed):
    model = create_model(name, **overrides).eval()
    model.set_attention_backend(backend)
    studies = ragged_studies()
    with torch.no_grad():
        together = model(pack_studies(studies, model.config.patch_size))
        for i, study in enumerate(studies):
            alone = model(pack_studies([study], model.config.patch_size))
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_slice_depth_groups_rows(seed):
    model = create_model("vit_tiny_multiscan_h3").eval()
    studies = ragged_studies()
    thin = pack_studies(studies, model.config.patch_size)
    thick = pack_studies(studies, model.config.patch_size, slice_depth=2)
    assert thick.layout.num_segments("slice") < thin.layout.num_segments("slice")
    with torch.no_grad():
        assert not torch.allclose(model(thin), model(thick))


def test_grad_checkpointing_changes_nothing(seed):
    model = create_model("vit_tiny_multiscan_h3", drop_path_rate=0.0)
    batch = pack_studies(ragged_studies(), model.config.patch_size)
    torch.manual_seed(seed)  # training mode draws scan positions
    model(batch).square().sum().backward()  # (a LayerNorm's output sums to its bias)
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(seed)
    model(batch).square().sum().backward()
    for got, want in zip([p.grad for p in model.parameters()], plain):
        torch.testing.assert_close(got, want)


def test_training_mode_draws_distinct_scan_positions(seed):
    model = create_model("vit_tiny_multiscan_h2").train()
    layout = pack_studies(ragged_studies(), model.config.patch_size).layout
    model.eval()
    spatial = model.position_embedding(layout) - model.sequential_posemb[
        0, layout.scan_position
    ].repeat_interleave(torch.from_numpy(layout.scan_tokens), dim=0)
    model.train()
    drawn = model.position_embedding(layout) - spatial
    table = model.sequential_posemb[0]
    starts = layout.scan_offsets[:-1]
    picks = [int((table - drawn[a]).abs().sum(1).argmin()) for a in starts]
    for i, a in enumerate(starts):
        torch.testing.assert_close(drawn[a], table[picks[i]], rtol=1e-5, atol=1e-5)
    for study in range(layout.num_studies):
        mine = [p for p, s in zip(picks, layout.scan_study) if s == study]
        assert len(set(mine)) == len(mine)


def test_drop_path_only_in_training(seed):
    model = create_model("vit_tiny_multiscan_h3", drop_path_rate=0.5)
    batch = pack_studies(ragged_studies(), model.config.patch_size)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), model(batch))
    model.train()
    torch.manual_seed(0)
    a = model(batch)
    torch.manual_seed(1)
    b = model(batch)
    assert not torch.allclose(a, b)


def test_avg_pooling_is_the_mean_of_each_study_tokens(seed):
    model = create_model("vit_tiny_multiscan_h3", pooling="avg").eval()
    batch = pack_studies(ragged_studies(), model.config.patch_size)
    tokens, cls = model.forward_features(batch)
    assert tokens.shape == (batch.layout.num_tokens, 48) and cls.shape == (3, 1, 48)
    pooled = model(batch)
    cu = batch.layout.level("study").cu_seqlens.tolist()
    for s in range(3):
        torch.testing.assert_close(pooled[s], tokens[cu[s] : cu[s + 1]].mean(0))


def test_encoder_refuses_mismatched_batches():
    model = create_model("vit_tiny_multiscan_h2")
    with pytest.raises(ValueError, match="expects patch"):
        model(pack_studies([[torch.zeros(8, 8, 8)]], 2))
    too_many = pack_studies([[torch.zeros(4, 8, 8)] * 9], (4, 8, 8), study_ids=["big"])
    with pytest.raises(ValueError, match="study 'big' has 9 scans.*at most 8"):
        model(too_many)


def test_hlip_configs_are_registered_with_their_shapes():
    assert set(HLIP_NAMES) <= set(list_models())
    with torch.device("meta"):
        single = create_model("vit_base_singlescan_h2_token2744")
        multi = create_model("vit_base_multiscan_h3_token1176")
    assert single.spatial_posemb.shape == (1, 14, 14, 14, 768) and single.sequential_posemb is None
    assert multi.spatial_posemb.shape == (1, 6, 14, 14, 768)
    assert multi.sequential_posemb.shape == (1, 40, 768)
    assert multi.config.levels == ("slice", "scan", "study") * 4
    params = sum(p.numel() for n, p in multi.named_parameters())
    assert 85e6 < params < 87e6  # ViT-B/16-sized trunk


def test_timm_registry_builds_our_encoder():
    model = timm.create_model("vit_tiny_multiscan_h3", drop_path_rate=0.1)
    assert isinstance(model, HLIPVisionEncoder) and model.config.drop_path_rate == 0.1
    with pytest.raises(ValueError, match="fetches no weights"):
        timm.create_model("vit_tiny_multiscan_h3", pretrained=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=2, levels=("scan",)), "1 entries for depth 2"),
        (dict(depth=1, levels=("series",)), "unknown levels"),
        (dict(depth=1, levels=("scan",), embed_dim=63, num_heads=3), "must be even"),
        (dict(depth=1, levels=("scan",), embed_dim=48, num_heads=5), "num_heads 5"),
        (dict(depth=1, levels=("scan",), img_size=(10, 32, 32), patch_size=(4, 8, 8)), "img_size"),
        (dict(depth=1, levels=("scan",), pooling="max"), "pooling"),
        (dict(depth=1, levels=("scan",), max_num_scans=-1), "max_num_scans"),
        (dict(depth=1, levels=("scan",), reg_tokens=-1), "reg_tokens"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig(**kwargs)


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'vit_huge'"):
        create_model("vit_huge")
    with pytest.raises(ValueError, match=r"unknown VisionConfig fields \['width'\]"):
        create_model("vit_tiny_multiscan_h2", width=3)


def test_public_api():
    for name in [
        "pack_studies",
        "hier_attention",
        "HierarchicalAttention",
        "VisionConfig",
        "HLIPVisionEncoder",
        "create_model",
        "list_models",
        "StudyBatch",
        "Layout",
    ]:
        assert hasattr(hlip_fast, name)


def test_patch_dropout_only_in_training(seed):
    model = create_model("vit_tiny_multiscan_h3", patch_dropout=0.5)
    batch = pack_studies(ragged_studies(), model.config.patch_size)
    tokens, cls = model.train().forward_features(batch)
    assert tokens.shape[0] < batch.layout.num_tokens and cls.shape[0] == 3
    model(batch).square().sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    reference = create_model("vit_tiny_multiscan_h3")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch), reference.eval()(batch))
    with pytest.raises(ValueError, match="patch_dropout"):
        VisionConfig(patch_dropout=1.0)


@pytest.mark.parametrize("name", ["vit_tiny_singlescan_h2", "vit_tiny_multiscan_h2"])
def test_hlips_dense_input_is_a_drop_in(name, seed):
    """``model(x)`` on HLIP's ``(B, N, C, D, H, W)`` (or ``(B, C, D, H, W)``) tensor equals the
    packed path, also through ``timm.create_model``; a wrong shape names the expected ones."""
    model = timm.create_model(name).eval()
    assert isinstance(model, HLIPVisionEncoder)
    dense = uniform_studies(model, 3, (16, 32, 32)).requires_grad_()
    packed = pack_studies([list(study) for study in dense], model.config.patch_size)
    with torch.no_grad():
        assert torch.equal(model(dense), model(packed))
        tokens, cls = model.forward_features(dense)
        want_tokens, want_cls = model.forward_features(packed)
        assert torch.equal(tokens, want_tokens) and torch.equal(cls, want_cls)
        if model.config.max_num_scans == 1:
            assert torch.equal(model(dense[:, 0]), model(packed))  # (B, C, D, H, W): one scan a study
    model(dense).square().sum().backward()  # gradients reach HLIP's input
    assert dense.grad is not None and dense.grad.abs().sum() > 0
    for wrong, problem in [(dense[0, 0], "shape"), (dense.repeat(1, 1, 2, 1, 1, 1), "C = 1 channels")]:
        with pytest.raises(ValueError, match=rf"\(B, N, C, D, H, W\).*{problem}"):
            model(wrong)
