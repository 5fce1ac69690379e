"""HLIPModel, its own checkpoint format, and original HLIP checkpoints (open_clip layout)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertModel

import hlip_fast
from hlip_fast import VisionConfig, create_clip, load_hlip_checkpoint, pack_studies
from hlip_fast.losses import ClipLoss, SigLipLoss
from hlip_fast.padded_hlip import OriginalHLIPClip


def ragged_batch(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [[(8, 32, 32), (12, 16, 24)], [(16, 32, 16)], [(4, 8, 8), (8, 24, 32), (8, 8, 16)]]
    studies = [[torch.randn(s, generator=gen) for s in study] for study in shapes]
    return pack_studies(studies, model.config.vision.patch_size)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_forward_gives_normalised_embeddings_and_trains(tiny_text, loss, seed):
    path, reports = tiny_text
    model = create_clip("vit_tiny_multiscan_h2", path, embed_dim=24, loss=loss)
    out = model(ragged_batch(model, seed), reports[:3])
    assert out["study_features"].shape == out["text_features"].shape == (3, 24)
    for features in (out["study_features"], out["text_features"]):
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    if loss == "clip":
        assert out["logit_bias"] is None and math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
        value = ClipLoss()(out["study_features"], out["text_features"], out["logit_scale"])
    else:
        assert math.isclose(out["logit_scale"].item(), 10.0, rel_tol=1e-5) and out["logit_bias"].item() == -10
        value = SigLipLoss()(
            out["study_features"], out["text_features"], out["logit_scale"], out["logit_bias"]
        )
    value.backward()
    assert model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.text.proj.weight.grad.abs().sum() > 0 and model.logit_scale.grad is not None
    assert model.text.transformer.encoder.layer[0].attention.self.query.weight.grad is None  # locked


def test_own_format_round_trip_needs_no_pickle(tiny_text, tmp_path):
    path, reports = tiny_text
    model = create_clip("vit_tiny_multiscan_h3", path, embed_dim=16, loss="siglip", input_mean=0.4).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-3.5)
    folder = hlip_fast.save_pretrained(model, tmp_path / "run" / "final")
    assert sorted(p.name for p in folder.iterdir()) == [
        "checksums.json",
        "config.json",
        "model.safetensors",
        "text",
    ]
    assert not list(tmp_path.glob("run/.final.*")), "staging folder left behind"
    loaded = hlip_fast.load_pretrained(folder)
    assert loaded.config.input_mean == 0.4 and loaded.config.vision == model.config.vision
    batch = ragged_batch(model)
    with torch.no_grad():
        want, got = model(batch, reports[:3]), loaded(batch, reports[:3])
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not an hlip_fast checkpoint"):
        hlip_fast.load_pretrained(tmp_path)


def original_model(config_name, text_path: str, embed_dim: int = 12, pooler: bool = True):
    """An original-layout HLIP CLIP with random weights everywhere (its posembs included), of a
    config name or a ``VisionConfig``."""
    vision = (
        config_name
        if isinstance(config_name, VisionConfig)
        else hlip_fast.models.registry.get_config(config_name)
    )
    bert = BertModel.from_pretrained(text_path, add_pooling_layer=pooler)
    original = OriginalHLIPClip(vision, bert, embed_dim).eval()
    with torch.no_grad():
        for param in original.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return original, vision


@pytest.mark.parametrize(
    "name, fmt, pooler",
    [
        ("vit_tiny_multiscan_h2", "pt", True),
        ("vit_tiny_multiscan_h3", "safetensors", False),
        ("vit_tiny_singlescan_h2", "pt", False),
        ("vit_tiny_multiscan_h3_dualdinotxt", "safetensors", True),
    ],
)
def test_original_checkpoint_gives_the_original_outputs(tiny_text, tmp_path, name, fmt, pooler, seed):
    path, reports = tiny_text
    original, vision = original_model(name, path, pooler=pooler)
    state = {f"module.{k}": v for k, v in original.state_dict().items()}  # as saved under DDP
    file = tmp_path / f"epoch_3.{fmt}"
    if fmt == "pt":
        torch.save({"epoch": 3, "name": "run", "state_dict": state, "optimizer": {"state": {}}}, file)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, file)

    model = load_hlip_checkpoint(file, name, path)
    assert model.config.embed_dim == 12 and model.config.loss == ("dual" if "dual" in name else "clip")
    assert (model.config.input_mean, model.config.input_std) == (0.449, 0.226)
    scans = 1 if vision.max_num_scans == 1 else 3
    volumes = torch.randn(2, scans, 1, 12, 24, 40)
    tokens = model.tokenize(reports[:4])
    with torch.no_grad():
        want_study = original.encode_image(volumes)
        want_study = want_study[:, -1] if want_study.dim() == 3 else want_study  # dual: the report-level one
        want_text = original.encode_text(tokens["input_ids"], tokens["attention_mask"])
        got_study = model.encode_study(pack_studies([list(v) for v in volumes], vision.patch_size))
        got_text = model.encode_text(tokens)
    torch.testing.assert_close(got_study, want_study, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_text, want_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logit_scale, original.logit_scale.reshape(1))  # (1,): FSDP2-shardable


LATER_HLIP = [
    "vit_base_slice_scan_dualdinotxt2744",
    "ablate_seqposemb_vit_base_multiscan_h2_dinotxt1568",
    "vit_large_slice_scan_study_dualdinotxt1568",
]


@pytest.mark.parametrize("name", LATER_HLIP)
def test_later_hlip_checkpoints_load_and_give_the_original_outputs(tiny_text, tmp_path, name, seed):
    """Upstream-shaped state dicts of the later configs (at width 48: the names and the shapes
    that follow from the config, random weights) load and give the original model's outputs."""
    path, _ = tiny_text
    full = hlip_fast.models.registry.get_config(name)
    small = tuple(2 * p for p in full.patch_size)
    vision = dataclasses.replace(full, embed_dim=48, num_heads=2, mlp_ratio=2.0, img_size=small)
    original, _ = original_model(vision, path)
    state = original.state_dict()
    assert ("visual.trunk.reg_token" in state) == bool(full.reg_tokens)
    assert state["visual.head.proj.weight"].shape == (12, vision.num_features)
    torch.save({"state_dict": state}, tmp_path / "ckpt.pt")
    model = load_hlip_checkpoint(tmp_path / "ckpt.pt", vision, path)
    volumes = torch.randn(2, 1 if full.max_num_scans == 1 else 3, 1, 2 * full.patch_size[0], *small[1:])
    with torch.no_grad():
        want = original.encode_image(volumes)
        got = model.encode_study(pack_studies([list(v) for v in volumes], vision.patch_size))
    assert want.shape == ((2, 12) if full.reg_tokens == 0 else (2, 2, 12))
    want = want[:, -1] if full.reg_tokens else want  # a dual model's study embedding: the report-level one
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    other = dataclasses.replace(vision, reg_tokens=1 - full.reg_tokens)
    with pytest.raises(ValueError, match=r"first mismatch visual\.reg_token"):
        load_hlip_checkpoint(tmp_path / "ckpt.pt", other, path)


def test_unknown_layouts_are_refused_by_name(tiny_text, tmp_path):
    path, _ = tiny_text
    original, _ = original_model("vit_tiny_multiscan_h2", path)
    state = original.state_dict()
    with pytest.raises(ValueError, match=r"visual\.trunk\.head\.weight"):
        hlip_fast.convert_hlip_state_dict({**state, "visual.trunk.head.weight": torch.zeros(2, 48)})
    with pytest.raises(ValueError, match="no visual.trunk.blocks"):
        hlip_fast.convert_hlip_state_dict({"logit_scale": torch.zeros(())})
    file = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state}, file)
    with pytest.raises(ValueError, match=r"spatial_posemb: \(1, 4, 4, 4, 48\) vs \(1, 2, 4, 4, 48\)"):
        load_hlip_checkpoint(
            file, hlip_fast.models.registry.get_config("vit_tiny_multiscan_h2", img_size=(8, 32, 32)), path
        )


class NotAWeight:
    pass


def test_pt_files_are_read_weights_only(tiny_text, tmp_path):
    path, _ = tiny_text
    original, _ = original_model("vit_tiny_multiscan_h2", path)
    file = tmp_path / "pickled.pt"
    torch.save({"state_dict": original.state_dict(), "extra": NotAWeight()}, file)
    with pytest.raises(ValueError, match="weights-only"):
        load_hlip_checkpoint(file, "vit_tiny_multiscan_h2", path)


def test_non_finite_weights_are_refused_naming_the_first_key(tiny_text, tmp_path):
    """An original checkpoint or an hlip_fast folder with one NaN tensor: no model, the key named."""
    path, _ = tiny_text
    original, _ = original_model("vit_tiny_multiscan_h2", path)
    state = original.state_dict()
    key = next(k for k in state if k.startswith("visual.") and k.endswith("attn.qkv.weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save({"state_dict": state}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in visual\.blocks\.0\.attn\.qkv"):
        load_hlip_checkpoint(tmp_path / "nan.pt", "vit_tiny_multiscan_h2", path)
    model = create_clip("vit_tiny_multiscan_h2", path, embed_dim=16)
    with torch.no_grad():
        model.visual_proj.weight[0, 0] = float("inf")
    folder = hlip_fast.save_pretrained(model, tmp_path / "inf")
    with pytest.raises(ValueError, match="model.safetensors: non-finite values .* in visual_proj.weight"):
        hlip_fast.load_pretrained(folder)
