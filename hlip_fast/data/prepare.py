"""``prepare``: a manifest of raw studies → compressed tar shards, an index and a skip report.

The three parts: each study is encoded on its own (``encoding``), on a crash-tolerant process
pool (``worker_pool``), into the shard set (``shard_set``: resumable, refusing a folder prepared
from another manifest or with other settings unless ``rebuild``). Every skipped study and file
is listed with its reason in ``skipped.json``; a worker process that dies (e.g. killed by the
out-of-memory killer) is noticed, its studies are retried one by one, and a study that kills
its worker again is skipped with that reason; nothing else is lost and nothing waits forever.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..console import Console
from ..integrity import canonical, digest
from .config import PrepareConfig
from .encoding import StudyResult, process_study
from .manifest import StudyEntry, read_manifest
from .nifti import VoxelBuffer
from .parts import Part
from .shard_set import build_shards


def entry_fingerprint(entry: StudyEntry) -> str:
    """The digest of a study's manifest row (id, scan paths and settings, report, labels)."""
    return digest(canonical(asdict(entry)))


class _Process:
    """Picklable ``entry -> StudyResult`` for pool workers; each copy inflates into its own
    reused voxel buffer (studies are processed one after another in a worker)."""

    def __init__(self, config: PrepareConfig):
        self.config = config
        self.buffer = VoxelBuffer()

    def __getstate__(self) -> dict:
        return {"config": self.config}  # the buffer stays behind: a copy starts its own

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    def __call__(self, entry: StudyEntry) -> StudyResult:
        return process_study(entry, self.config, self.buffer)


def prepare(
    manifest: str | Path | list[StudyEntry],
    out_dir: str | Path,
    config: PrepareConfig | None = None,
    *,
    workers: int = 1,
    console: Console | None = None,
    rebuild: bool = False,
    part: Part | None = None,
    executor=None,
) -> dict:
    """Turn the studies of ``manifest`` into shards under ``out_dir``; returns the index
    (a bar or progress lines on ``console``, silent without one).

    ``workers`` local processes, or a Dask cluster: ``executor`` is a ``distributed.Client``
    (see :mod:`~hlip_fast.data.dask_executor`). With ``part``, only that part's shards (see
    :mod:`~hlip_fast.data.parts`). Resumable: finished shards are kept. A folder prepared from
    another manifest or with other settings is refused, unless ``rebuild``: then the shards
    that differ are prepared again.
    """
    config = config or PrepareConfig()
    entries = read_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
    if not entries:
        raise ValueError(f"{manifest}: the manifest lists no studies")
    fingerprints = [entry_fingerprint(e) for e in entries]
    return build_shards(
        out_dir,
        config,
        entries,
        fingerprints,
        _Process(config),
        workers=workers,
        console=console,
        rebuild=rebuild,
        desc="hlip-prepare",
        part=part,
        executor=executor,
    )
