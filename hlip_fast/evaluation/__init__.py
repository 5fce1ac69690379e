"""Zero-shot classification and study↔report retrieval, as the HLIP paper evaluates."""

from .._lazy import lazy_exports

_EXPORTS = {
    "binary_metrics": ".metrics",
    "multiclass_metrics": ".metrics",
    "retrieval_recall": ".metrics",
    "PromptSet": ".prompts",
    "builtin_prompt_sets": ".prompts",
    "load_prompts": ".prompts",
    "Embeddings": ".run",
    "embed_batches": ".run",
    "evaluate": ".run",
    "evaluate_embeddings": ".run",
    "study_batches": ".run",
    "to_markdown": ".run",
    "ZeroShotClassifier": ".zeroshot",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
