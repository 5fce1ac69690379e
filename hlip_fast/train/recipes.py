"""Named training setups (``hlip-train --recipe NAME``): HLIP's published settings, and a small
model from scratch that learns on a CPU in minutes. Explicit flags and ``--config`` override
them; ``config.json`` records the recipe with the resolved values."""

from __future__ import annotations

from dataclasses import dataclass, field

from hlip_fast.data.config import HLIP_INPUT_MEAN, HLIP_INPUT_STD

# HLIP's optimisation (open_clip's flags in its CT-RATE command): AdamW lr 1e-5, wd 0.2, 377
# warm-up steps, 20 epochs, mixed precision, gradient checkpointing, a locked pretrained text
# tower; drop path 0.2; its input normalisation.
_HLIP = {
    "embed_dim": 512,
    "lr": 1e-5,
    "wd": 0.2,
    "warmup": 377,
    "epochs": 20,
    "drop_path_rate": 0.2,
    "lock_text": True,
    "vision_pooling": "token",
    "text_pooling": "cls",
    "grad_checkpointing": True,
    "input_mean": HLIP_INPUT_MEAN,
    "input_std": HLIP_INPUT_STD,
}


@dataclass(frozen=True)
class Recipe:
    """``values``: TrainConfig fields; ``needs``: fields the user must still give, and why."""

    summary: str
    values: dict
    needs: dict[str, str] = field(default_factory=dict)


_PRETRAINED_TEXT = "a local folder with a pretrained BERT-family model (HLIP: CXR-BERT or BiomedBERT)"

RECIPES = {
    "hlip-ct-rate": Recipe(
        "HLIP on chest CT (CT-RATE): ViT-B, slice+scan attention, 112x336x336 scans of 2,744 tokens, "
        "16 studies per GPU step",
        {**_HLIP, "model": "vit_base_singlescan_h2_token2744", "max_tokens": 16 * 2744, "max_studies": 16},
        {"text_model": _PRETRAINED_TEXT},
    ),
    "hlip-brain-mri": Recipe(
        "HLIP on brain MRI: ViT-B, scan+study attention, 48x224x224 scans of 1,176 tokens",
        {**_HLIP, "model": "vit_base_multiscan_h2_token1176", "max_tokens": 16384},
        {"text_model": _PRETRAINED_TEXT},
    ),
    "hlip-dual-mri": Recipe(
        "HLIP's dual model on brain MRI (MR-RATE, its 2026-04 command): ViT-B, scan+study attention, "
        "48x224x224 scans of 1,568 tokens, DINO.txt pooling with a register token, no scan-sequence "
        "embedding, up to 6 scans and 32 studies per GPU step; the class token meets a sampled report "
        "sentence, the register the whole report; lr 2e-4, 2,400 warm-up steps, 40 epochs, text unlocked",
        {
            **_HLIP,
            "model": "vit_base_scan_study_dualdinotxt1568",
            "vision_pooling": "dinotxt",
            "embed_dim": 768,
            "lr": 2e-4,
            "warmup": 2400,
            "epochs": 40,
            "lock_text": False,
            "local_loss": True,
            "gather_with_grad": True,
            "max_scans": 6,
            "max_studies": 32,
            "max_tokens": 32 * 6 * 1568,
        },
        {"text_model": _PRETRAINED_TEXT},
    ),
    "scratch-tiny": Recipe(
        "a tiny model from scratch that learns on a CPU in minutes (the demo's settings): a 48-wide "
        "encoder, a 2-layer BERT built from the training reports, warmed up by masked-language "
        "modelling and trained, mean/avg pooling, a higher learning rate",
        {
            "model": "vit_tiny_multiscan_h2",
            "embed_dim": 64,
            "text_model": "tiny",
            "text_mlm_steps": 400,
            "lock_text": False,
            "vision_pooling": "avg",
            "text_pooling": "mean",
            "lr": 2e-3,
            "wd": 0.05,
            "warmup": 20,
            "max_tokens": 16384,
            "max_studies": 32,
            "input_mean": HLIP_INPUT_MEAN,
            "input_std": HLIP_INPUT_STD,
        },
    ),
}


def describe_recipes() -> str:
    """One line per recipe, for ``--help``."""
    return "\n".join(f"  {name}: {recipe.summary}" for name, recipe in RECIPES.items())
