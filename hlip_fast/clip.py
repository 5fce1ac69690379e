"""The language-image model: HLIP vision encoder + text tower, projections into one space, and
the learnable temperature (plus the bias of the sigmoid loss)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import HLIPVisionEncoder, VisionConfig
from .models.registry import get_config
from .packing import StudyBatch
from .text import TextConfig, TextTower

LOSSES = ("clip", "siglip", "dual")


@dataclass(frozen=True)
class ClipConfig:
    """Everything needed to rebuild an :class:`HLIPModel` (saved as JSON with its weights).

    ``loss``: ``"clip"`` (InfoNCE; temperature starts at 1/0.07), ``"siglip"`` (sigmoid;
    scale starts at 10 and a learnable bias at -10, as in SigLIP) or ``"dual"`` (HLIP's dual
    models: two InfoNCE losses, the class token against a report sentence and the register token
    against the whole report, one temperature; needs a DINO.txt encoder with one register). ``input_mean`` and
    ``input_std`` normalise stored ``[0, 1]`` intensities as the model was trained with.
    """

    vision: VisionConfig
    text: TextConfig
    embed_dim: int = 512
    loss: str = "clip"
    input_mean: float = 0.0
    input_std: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.embed_dim < 1 or self.input_std <= 0:
            raise ValueError(f"need embed_dim >= 1 and input_std > 0, got {self.embed_dim}, {self.input_std}")
        embeddings = self.vision.num_embeddings
        if (self.loss == "dual") != (embeddings == 2) or embeddings > 2:
            raise ValueError(
                f"loss {self.loss!r} with {embeddings} embedding(s) per study (pooling "
                f"{self.vision.pooling!r}, {self.vision.reg_tokens} register token(s)): the dual loss "
                "needs exactly two (pooling 'dinotxt' with reg_tokens=1), the other losses one"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClipConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - fields):
            raise ValueError(f"unknown ClipConfig fields {unknown}; known: {sorted(fields)}")
        return cls(**{**data, "vision": VisionConfig(**data["vision"]), "text": TextConfig(**data["text"])})


class HLIPModel(nn.Module):
    """``encode_study(batch)`` and ``encode_text(texts or tokens)`` give L2-normalised
    ``(n, embed_dim)`` embeddings; ``forward`` returns both with the exponentiated scale.

    A dual model (``loss="dual"``) embeds each study twice: ``forward`` gives ``(n, 2, E)`` study
    and text features (texts interleaved: sentence, report, sentence, report, ...), and
    ``encode_study`` the report-level embedding (the register token's), the one that meets whole
    reports and prompt sets."""

    def __init__(self, config: ClipConfig, vision_device: torch.device | str | None = None) -> None:
        """``vision_device="meta"`` builds the vision side (encoder and projection) without
        memory, for weights that arrive later (FSDP2's sharded start); the text tower loads
        as usual."""
        super().__init__()
        self.config = config
        with torch.device(vision_device) if vision_device is not None else contextlib.nullcontext():
            self.visual = HLIPVisionEncoder(config.vision)
            self.visual_proj = nn.Linear(config.vision.num_features, config.embed_dim, bias=False)
        self.text = TextTower(config.text, config.embed_dim)
        siglip = config.loss == "siglip"
        # Shape (1,), not scalars: FSDP2 shards only parameters with at least one dimension.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0) if siglip else math.log(1 / 0.07)]))
        self.logit_bias = nn.Parameter(torch.tensor([-10.0])) if siglip else None

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.text.tokenize(texts)

    def encode_study(self, batch: StudyBatch | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.visual_proj(self.visual(batch))
        features = features[:, -1] if features.dim() == 3 else features  # dual: the report-level one
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, texts: Sequence[str] | dict[str, torch.Tensor], normalize: bool = True
    ) -> torch.Tensor:
        tokens = texts if isinstance(texts, dict) else self.tokenize(texts)
        device = self.logit_scale.device
        features = self.text({k: v.to(device) for k, v in tokens.items()})
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, batch: StudyBatch, texts: Sequence[str] | dict[str, torch.Tensor]) -> dict:
        """``study_features``, ``text_features`` (normalised), ``logit_scale`` (exp), ``logit_bias``;
        for a dual model both features ``(n, 2, E)`` (see the class docstring)."""
        study = F.normalize(self.visual_proj(self.visual(batch)), dim=-1)
        text = self.encode_text(texts)
        if self.config.loss == "dual":
            text = text.unflatten(0, (-1, 2))
        return {
            "study_features": study,
            "text_features": text,
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }


def create_clip(
    vision: str | VisionConfig,
    text: str | TextConfig,
    *,
    embed_dim: int = 512,
    loss: str = "clip",
    input_mean: float = 0.0,
    input_std: float = 1.0,
    vision_device: torch.device | str | None = None,
    **vision_overrides,
) -> HLIPModel:
    """An :class:`HLIPModel` from a named encoder (see ``list_models``) or a ``VisionConfig``,
    and a local text model folder or a ``TextConfig``; e.g. ``create_clip(
    "vit_base_multiscan_h2_token1176", "/models/BiomedBERT", drop_path_rate=0.2)``.
    ``vision_device="meta"`` builds the vision side without memory (see :class:`HLIPModel`)."""
    if isinstance(vision, str):
        vision = get_config(vision, **vision_overrides)
    elif vision_overrides:
        vision = dataclasses.replace(vision, **vision_overrides)
    text = TextConfig(text) if isinstance(text, str) else text
    return HLIPModel(ClipConfig(vision, text, embed_dim, loss, input_mean, input_std), vision_device)
