"""Text tower: tiny local BERT + WordPiece, pooling, locking, offline errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hlip_fast.data.synth import SIZES, make_study
from hlip_fast.text import TextConfig, TextTower, build_tiny_text_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    config = replace(SIZES["tiny"], num_studies=30)
    reports = [make_study(config, i)[0].report for i in range(30)]
    return build_tiny_text_model(tmp_path_factory.mktemp("bert"), reports), reports


def test_reloads_as_local_model_and_embeds(tiny_model):
    path, reports = tiny_model
    tower = TextTower(TextConfig(str(path), embed_dim=16, context_length=32)).eval()
    tokens = tower.tokenize(reports[:3])
    assert tokens["input_ids"].shape[0] == 3 and tokens["input_ids"].shape[1] <= 32
    assert "[UNK]" not in tower.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0])
    with torch.no_grad():
        out = tower(tokens)
    assert out.shape == (3, 16) and torch.isfinite(out).all()


def test_mean_pooling_ignores_padding(tiny_model):
    path, reports = tiny_model
    tower = TextTower(TextConfig(str(path), embed_dim=8, pooling="mean")).eval()
    short, long = "No mass.", reports[0]
    with torch.no_grad():
        alone = tower(tower.tokenize([short]))
        padded = tower(tower.tokenize([short, long]))[:1]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unlocked", [0, 1])
def test_locking_keeps_layernorms_and_last_layers(tiny_model, unlocked):
    tower = TextTower(TextConfig(str(tiny_model[0]), unlocked_layers=unlocked))
    trainable = {name for name, p in tower.named_parameters() if p.requires_grad}
    assert "proj.weight" in trainable
    assert all("LayerNorm" in n or n.startswith("proj") or (unlocked and ".layer.1." in n) for n in trainable)
    assert any(".layer.1.attention.self.query" in n for n in trainable) == bool(unlocked)
    assert any("embeddings.LayerNorm" in n for n in trainable)
    with pytest.raises(ValueError, match="unlocked_layers"):
        tower.lock(5)


def test_missing_model_is_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not available locally"):
        TextTower(TextConfig(str(tmp_path / "no-such-model")))
    with pytest.raises(ValueError, match="pooling"):
        TextConfig("x", pooling="max")
