"""Text tower: tiny local BERT + WordPiece, pooling, locking, offline errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hlip_fast.text import TextConfig, TextTower


def test_reloads_as_local_model_and_embeds(tiny_text):
    path, reports = tiny_text
    tower = TextTower(TextConfig(path, context_length=32), 16).eval()
    tokens = tower.tokenize(reports[:3])
    assert tokens["input_ids"].shape[0] == 3 and tokens["input_ids"].shape[1] <= 32
    assert "[UNK]" not in tower.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0])
    with torch.no_grad():
        out = tower(tokens)
    assert out.shape == (3, 16) and torch.isfinite(out).all()


def test_mean_pooling_ignores_padding(tiny_text):
    path, reports = tiny_text
    tower = TextTower(TextConfig(path, pooling="mean"), 8).eval()
    short, long = "No mass.", reports[0]
    with torch.no_grad():
        alone = tower(tower.tokenize([short]))
        padded = tower(tower.tokenize([short, long]))[:1]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unlocked", [0, 1])
def test_locking_keeps_layernorms_and_last_layers(tiny_text, unlocked):
    tower = TextTower(TextConfig(tiny_text[0], unlocked_layers=unlocked), 8)
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
        TextTower(TextConfig(str(tmp_path / "no-such-model")), 8)
    with pytest.raises(ValueError, match="pooling"):
        TextConfig("x", pooling="max")


def test_tiny_model_is_deterministic(tiny_text, tmp_path):
    from safetensors.torch import load_file

    from hlip_fast.text import build_tiny_text_model

    path, reports = tiny_text
    again = build_tiny_text_model(tmp_path / "again", reports)
    assert (again / "tokenizer.json").read_text() == (Path(path) / "tokenizer.json").read_text()
    mine, theirs = load_file(again / "model.safetensors"), load_file(Path(path) / "model.safetensors")
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    tower = TextTower(TextConfig(str(again)), 8)
    assert "[UNK]" not in tower.tokenizer.tokenize("Unseenword in a report")  # character fallback


def test_the_prepared_padding_mask_embeds_as_the_2d_mask(tiny_text, monkeypatch):
    """transformers asks a 2D mask on the host whether it pads anything (a sync every forward);
    the tower hands it a prepared 4D mask instead, with the same embeddings."""
    import hlip_fast.text as text

    tower = TextTower(TextConfig(tiny_text[0], context_length=16), 8).eval()
    tokens = tower.tokenize(["no mass.", "a small mass in the left lobe, and a second one in the right."])
    assert tokens["attention_mask"].sum(1).min() < tokens["attention_mask"].shape[1]  # padded
    with torch.no_grad():
        prepared = tower(tokens)
        monkeypatch.setattr(text, "_takes_prepared_masks", lambda: False)
        plain = tower(tokens)
    torch.testing.assert_close(prepared, plain, rtol=1e-6, atol=1e-6)
