"""Zero-shot classifiers: prompt embeddings from the text tower, scored against study embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .metrics import binary_metrics, multiclass_metrics
from .prompts import PromptSet


class ZeroShotClassifier:
    """``weights`` ``(names, options, dim)``: per finding its (negative, positive) embeddings
    (binary), or one group of all classes (multiclass, ``(1, classes, dim)``)."""

    def __init__(self, prompts: PromptSet, weights: torch.Tensor):
        self.prompts, self.weights = prompts, weights

    @classmethod
    @torch.no_grad()
    def build(cls, model, prompts: PromptSet) -> ZeroShotClassifier:
        """Embed every option's prompts with ``model.encode_text`` (one text batch per option)."""

        def option(phrases: tuple[str, ...]) -> torch.Tensor:
            embedded = F.normalize(model.encode_text(prompts.texts(phrases)).float(), dim=-1)
            return F.normalize(embedded.mean(0), dim=-1)

        groups = [torch.stack([option(p) for p in phrases]) for phrases in prompts.options.values()]
        weights = torch.stack(groups) if prompts.protocol == "binary" else torch.cat(groups)[None]
        return cls(prompts, weights)

    def probabilities(self, study_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
        """Binary: ``(studies, findings)`` positive probabilities; multiclass: ``(studies, classes)``."""
        w = self.weights.to(study_features.device)
        logits = float(logit_scale) * torch.einsum("nd,gkd->ngk", study_features.float(), w)
        probs = logits.softmax(-1)
        return probs[..., 1] if self.prompts.protocol == "binary" else probs[:, 0]

    def evaluate(
        self,
        study_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        labels: torch.Tensor,
        label_names: Sequence[str],
        threshold: str = "pair",
    ) -> dict:
        """Metrics against ``labels`` ``(studies, label_names)`` (0/1, -1 unlabelled)."""
        names = list(self.prompts.options)
        if missing := [n for n in names if n not in label_names]:
            raise ValueError(
                f"prompt set {self.prompts.name!r}: the studies have no label(s) {missing}; "
                f"their labels are {list(label_names)}"
            )
        targets = labels[:, [list(label_names).index(n) for n in names]].numpy()
        probs = self.probabilities(study_features, logit_scale).cpu().numpy()
        if self.prompts.protocol == "binary":
            result = binary_metrics(targets, probs, names, threshold)
        else:
            # One class per study: its single positive label; others are left out and counted.
            single = ((targets == 1).sum(1) == 1) & (targets >= 0).all(1)
            result = multiclass_metrics(targets[single].argmax(1), probs[single], names)
            result["left_out"] = int((~single).sum())
        return {"prompts": self.prompts.name, **result}
