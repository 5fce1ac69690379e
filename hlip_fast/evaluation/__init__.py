"""Zero-shot classification and study↔report retrieval, as the HLIP paper evaluates."""

from .metrics import binary_metrics, multiclass_metrics, retrieval_recall
from .prompts import PromptSet, builtin_prompt_sets, load_prompts
from .run import (
    Embeddings,
    embed_batches,
    evaluate,
    evaluate_embeddings,
    reader_config,
    study_batches,
    to_markdown,
)
from .zeroshot import ZeroShotClassifier

__all__ = [
    "Embeddings",
    "PromptSet",
    "ZeroShotClassifier",
    "binary_metrics",
    "builtin_prompt_sets",
    "embed_batches",
    "evaluate",
    "evaluate_embeddings",
    "load_prompts",
    "multiclass_metrics",
    "reader_config",
    "retrieval_recall",
    "study_batches",
    "to_markdown",
]
