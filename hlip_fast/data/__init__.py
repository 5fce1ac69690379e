"""Data: raw studies → shards (``prepare``, ``synthesize``), shard readers, token-budget batches."""

from .._lazy import lazy_exports
from .prepare import prepare as prepare  # eager: the function shares its module's name (and needs no torch)

_EXPORTS = {
    "ModalityConfig": ".config",
    "PrepareConfig": ".config",
    "ScanEntry": ".manifest",
    "StudyEntry": ".manifest",
    "read_manifest": ".manifest",
    "RawStudy": ".shards",
    "list_shards": ".shards",
    "read_shard": ".shards",
    "SIZES": ".synth",
    "SynthConfig": ".synth",
    "synthesize": ".synth",
    "write_raw": ".synth",
}
__all__ = sorted([*_EXPORTS, "prepare"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
