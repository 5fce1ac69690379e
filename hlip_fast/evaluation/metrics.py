"""Zero-shot and retrieval metrics (scikit-learn where it has them), as plain dicts."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score, roc_curve

THRESHOLDS = ("pair", "roc")


def _roc_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold closest to the ROC curve's top-left corner (HLIP's second protocol)."""
    fpr, tpr, thresholds = roc_curve(targets, scores)
    return float(thresholds[np.argmin((1 - tpr) ** 2 + fpr**2)])


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def binary_metrics(
    targets: np.ndarray, scores: np.ndarray, names: Sequence[str], threshold: str = "pair"
) -> dict:
    """Per finding AUC, balanced accuracy and weighted F1, and their macro means.

    ``targets`` ``(studies, findings)`` holds 0/1 (-1: unlabelled, ignored); ``scores`` the
    positive probability. Predictions are ``score > 0.5`` (``threshold="pair"``: the larger of
    the pair) or above the ROC threshold nearest the top-left corner (``"roc"``). A finding with
    one class only among its studies gets ``None`` metrics and a ``note``.
    """
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    per_finding = {}
    for j, name in enumerate(names):
        known = targets[:, j] >= 0
        y, s = targets[known, j].astype(int), scores[known, j]
        row = {"studies": int(known.sum()), "positives": int(y.sum())}
        if len(np.unique(y)) < 2:
            per_finding[name] = {
                **row,
                "auc": None,
                "balanced_accuracy": None,
                "weighted_f1": None,
                "note": "needs positive and negative studies",
            }
            continue
        cut = 0.5 if threshold == "pair" else _roc_threshold(y, s)
        pred = (s > cut) if threshold == "pair" else (s >= cut)
        per_finding[name] = {
            **row,
            "auc": float(roc_auc_score(y, s)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "weighted_f1": float(f1_score(y, pred, average="weighted")),
        }
    rows = list(per_finding.values())
    macro = {k: _mean(rows, k) for k in ("auc", "balanced_accuracy", "weighted_f1")}
    return {"protocol": "binary", "threshold": threshold, "macro": macro, "per_finding": per_finding}


def multiclass_metrics(targets: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> dict:
    """Macro one-vs-rest AUC (over classes present), balanced accuracy and weighted F1."""
    pred = probs.argmax(1)
    present = np.unique(targets)
    auc = None
    if len(present) >= 2:
        if len(names) == 2:
            auc = float(roc_auc_score(targets, probs[:, 1]))
        else:
            # Classes absent from the targets have no AUC; score the present ones, renormalised.
            sub = probs[:, present] / probs[:, present].sum(1, keepdims=True)
            remap = np.searchsorted(present, targets)
            auc = float(
                roc_auc_score(
                    remap, sub[:, 1] if len(present) == 2 else sub, multi_class="ovr", average="macro"
                )
            )
    with warnings.catch_warnings():  # predictions of classes absent from the targets are expected
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(targets, pred))
    return {
        "protocol": "multiclass",
        "macro": {
            "auc": auc,
            "balanced_accuracy": balanced,
            "weighted_f1": float(f1_score(targets, pred, average="weighted")),
        },
        "studies": int(len(targets)),
        "per_class": {name: int((targets == i).sum()) for i, name in enumerate(names)},
    }


def retrieval_recall(study: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k of the matching report among all reports (study→text) and back (text→study);
    row ``i`` of ``study`` and ``text`` are a pair."""
    if study.shape != text.shape:
        raise ValueError(f"need paired embeddings, got {tuple(study.shape)} and {tuple(text.shape)}")
    similarity = study.double() @ text.double().T
    out = {"studies": int(study.shape[0])}
    for direction, sim in (("study_to_text", similarity), ("text_to_study", similarity.T)):
        # Rank of the true pair: how many candidates score strictly higher.
        rank = (sim > sim.diagonal()[:, None]).sum(1)
        out[direction] = {f"R@{k}": float((rank < k).double().mean()) for k in ks}
    return out
