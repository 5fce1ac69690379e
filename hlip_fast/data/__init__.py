"""Data: raw studies → shards (``prepare``, ``synthesize``), shard readers, token-budget batches."""

from .config import ModalityConfig, PrepareConfig
from .manifest import ScanEntry, StudyEntry, read_manifest
from .prepare import prepare
from .shards import RawStudy, list_shards, read_shard
from .synth import SIZES, SynthConfig, synthesize, write_raw

__all__ = [
    "SIZES",
    "ModalityConfig",
    "PrepareConfig",
    "RawStudy",
    "ScanEntry",
    "StudyEntry",
    "SynthConfig",
    "list_shards",
    "prepare",
    "read_manifest",
    "read_shard",
    "synthesize",
    "write_raw",
]
