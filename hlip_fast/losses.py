"""Contrastive losses across ranks with open_clip's semantics: CLIP InfoNCE and SigLIP.

With ``world_size`` ranks each holding ``n`` pairs, the mean over ranks of each rank's loss
equals the single-process loss on all ``world_size * n`` pairs, and (with gradients through
the gather, DDP averaging the rest) so do the gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn  # all_gather with gradients (not imported by torch.distributed itself)
import torch.nn.functional as F
from torch import nn


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All ranks' ``features`` concatenated in rank order. Without ``with_grad`` only this
    rank's slice carries gradient (open_clip's default), so the loss must then be the full one."""
    rank, world_size = _distributed()
    if world_size == 1:
        return features
    if with_grad:
        return torch.cat(torch.distributed.nn.functional.all_gather(features), dim=0)
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach())
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


class ClipLoss(nn.Module):
    """InfoNCE over image↔text pairs: ``local_loss`` scores this rank's rows against all
    columns (labels offset by rank); ``gather_with_grad`` sends gradients through the gather."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False):
        super().__init__()
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: None = None
    ) -> torch.Tensor:
        if logit_bias is not None:
            raise ValueError("the CLIP loss takes no logit_bias (that is the SigLIP loss's)")
        rank, world_size = _distributed()
        all_image = gather_features(image, self.gather_with_grad)
        all_text = gather_features(text, self.gather_with_grad)
        if self.local_loss:
            per_image, per_text = logit_scale * image @ all_text.T, logit_scale * text @ all_image.T
            labels = torch.arange(image.shape[0], device=image.device) + image.shape[0] * rank
        else:
            per_image = logit_scale * all_image @ all_text.T
            per_text = per_image.T
            labels = torch.arange(all_image.shape[0], device=image.device)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP): every image–text pair is a binary decision, positives on the
    diagonal. Across ranks this rank's images meet all ranks' texts (gathered with gradient)."""

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
    ) -> torch.Tensor:
        rank, _ = _distributed()
        all_text = gather_features(text, with_grad=True)
        logits = logit_scale * image @ all_text.T + logit_bias
        n = image.shape[0]
        labels = -torch.ones_like(logits)
        labels[:, rank * n : (rank + 1) * n] += 2 * torch.eye(n, device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(labels * logits).sum() / n


class DualClipLoss(nn.Module):
    """HLIP's dual loss: ``image`` and ``text`` are ``(n, 2, E)``; the first study embedding
    against its report sentence and the second against its whole report, two CLIP losses with
    one temperature, weighted 0.5 each. Across ranks as :class:`ClipLoss`."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False):
        super().__init__()
        self.clip = ClipLoss(local_loss, gather_with_grad)

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: None = None
    ) -> torch.Tensor:
        if image.dim() != 3 or image.shape[1] != 2 or text.shape != image.shape:
            raise ValueError(
                f"the dual loss takes (n, 2, E) study and text features, got {tuple(image.shape)} "
                f"and {tuple(text.shape)}"
            )
        sentence = self.clip(image[:, 0], text[:, 0], logit_scale, logit_bias)
        report = self.clip(image[:, 1], text[:, 1], logit_scale, logit_bias)
        return 0.5 * sentence + 0.5 * report


def build_loss(kind: str, *, local_loss: bool = False, gather_with_grad: bool = False) -> nn.Module:
    """The loss of a model whose ``ClipConfig.loss`` is ``kind``; each is called as
    ``loss(image, text, logit_scale, logit_bias)`` (``logit_bias`` ``None`` but for SigLIP).
    ``local_loss`` and ``gather_with_grad`` are the CLIP and dual losses' (SigLIP always gathers
    with gradients and scores its own rows)."""
    if kind == "siglip":
        return SigLipLoss()
    if kind == "clip":
        return ClipLoss(local_loss, gather_with_grad)
    if kind == "dual":
        return DualClipLoss(local_loss, gather_with_grad)
    raise ValueError(f"unknown loss {kind!r}; expected 'clip', 'siglip' or 'dual'")
