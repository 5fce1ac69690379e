"""Embed studies (and their reports) in batches, then score zero-shot and retrieval."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..console import Console
from ..data.batching import Batch, BatchConfig
from ..data.config import DEFAULT_MAX_TOKENS
from ..data.reader import token_batches
from ..data.transforms import Study, model_transforms
from .metrics import retrieval_recall
from .prompts import PromptSet
from .zeroshot import ZeroShotClassifier


@dataclass
class Embeddings:
    """Normalised study (and report) embeddings in input order, with labels ``(studies, names)``."""

    study_ids: list[str]
    study: torch.Tensor
    text: torch.Tensor | None
    labels: torch.Tensor
    label_names: tuple[str, ...]


def study_batches(model, studies: Iterable[Study], max_tokens: int = DEFAULT_MAX_TOKENS) -> Iterator[Batch]:
    """Decoded studies (any iterable, e.g. ``StudyBatches.studies()``) as token-budget batches
    cut with ``model``'s patch size."""
    batching = BatchConfig(patch_size=model.config.vision.patch_size, max_tokens=max_tokens)
    return token_batches(studies, model_transforms(model), batching)


def _merge_labels(
    batches: list[tuple[torch.Tensor, tuple[str, ...]]],
) -> tuple[torch.Tensor, tuple[str, ...]]:
    names = tuple(sorted({n for _, batch_names in batches for n in batch_names}))
    rows = []
    for labels, batch_names in batches:
        full = torch.full((labels.shape[0], len(names)), -1, dtype=torch.long)
        for j, name in enumerate(batch_names):
            full[:, names.index(name)] = labels[:, j]
        rows.append(full)
    return (torch.cat(rows) if rows else torch.zeros(0, 0, dtype=torch.long)), names


@torch.no_grad()
def embed_batches(
    model,
    batches: Iterable[Batch],
    *,
    device: str | torch.device = "cpu",
    with_text: bool = True,
    autocast_dtype: torch.dtype | None = None,
    console: Console | None = None,
    total: int | None = None,
) -> Embeddings:
    """Run ``model`` (an :class:`~hlip_fast.HLIPModel`) over ``batches`` in eval mode; progress
    in studies (of ``total``, when known) on ``console``."""
    model.eval()
    ids, studies, texts, labels = [], [], [], []
    bar = (console or Console.silent()).progress(total, "embed", "studies")
    for batch in batches:
        with torch.autocast(
            torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            studies.append(model.encode_study(batch.studies.to(device)).float().cpu())
            if with_text:
                texts.append(model.encode_text(batch.reports).float().cpu())
        ids += list(batch.study_ids)
        labels.append((batch.labels, batch.label_names))
        bar.update(len(batch.study_ids))
    bar.close()
    if not ids:
        raise ValueError("no studies to embed")
    label_table, names = _merge_labels(labels)
    return Embeddings(ids, torch.cat(studies), torch.cat(texts) if with_text else None, label_table, names)


def evaluate_embeddings(
    embeddings: Embeddings,
    classifiers: Sequence[ZeroShotClassifier],
    logit_scale: float,
    *,
    threshold: str = "pair",
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """``{"studies", "retrieval", "zeroshot": {prompt set: metrics}}``."""
    results = {"studies": len(embeddings.study_ids), "zeroshot": {}}
    if embeddings.text is not None:
        results["retrieval"] = retrieval_recall(embeddings.study, embeddings.text, ks)
    for classifier in classifiers:
        results["zeroshot"][classifier.prompts.name] = classifier.evaluate(
            embeddings.study, logit_scale, embeddings.labels, embeddings.label_names, threshold
        )
    return results


def evaluate(model, batches: Iterable[Batch], prompt_sets: Sequence[PromptSet], **embed_kwargs) -> dict:
    """Embed ``batches`` (any iterable of :class:`~hlip_fast.data.batching.Batch`) and score them."""
    classifiers = [ZeroShotClassifier.build(model, p) for p in prompt_sets]
    embeddings = embed_batches(model, batches, **embed_kwargs)
    return evaluate_embeddings(embeddings, classifiers, model.logit_scale.exp().item())


def _cell(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _row(label: str, metrics: dict, studies: int) -> str:
    values = " | ".join(_cell(metrics[k]) for k in ("auc", "balanced_accuracy", "weighted_f1"))
    return f"| {label} | {values} | {studies} |"


def to_markdown(results: dict) -> str:
    """The results as Markdown tables: retrieval, then each prompt set (macro, then per finding)."""
    lines = [f"Studies: {results['studies']}", ""]
    if "retrieval" in results:
        r = results["retrieval"]
        ks = list(r["study_to_text"])
        lines += ["| retrieval | " + " | ".join(ks) + " |", "| --- |" + " ---: |" * len(ks)]
        for direction in ("study_to_text", "text_to_study"):
            lines.append(
                f"| {direction.replace('_', ' ')} | " + " | ".join(_cell(r[direction][k]) for k in ks) + " |"
            )
        lines.append("")
    for name, z in results["zeroshot"].items():
        header = f"| zero-shot `{name}` ({z['protocol']}) | AUC | balanced acc. | weighted F1 | studies |"
        lines += [header, "| --- | ---: | ---: | ---: | ---: |"]
        findings = z.get("per_finding", {})
        count = z.get("studies", max((f["studies"] for f in findings.values()), default=0))
        lines.append(_row("**macro**", z["macro"], count))
        lines += [_row(f"{n} ({f['positives']} pos.)", f, f["studies"]) for n, f in findings.items()]
        lines.append("")
    return "\n".join(lines)
