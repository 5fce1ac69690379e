"""The lean distributed trainer (console script ``hlip-train``)."""

from hlip_fast._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": ".config",
    "load_config": ".cli",
    "RECIPES": ".recipes",
    "Trainer": ".trainer",
    "TrainingStopped": ".health",
    "main": ".cli",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
