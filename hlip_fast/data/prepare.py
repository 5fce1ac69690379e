"""``prepare``: a manifest of raw studies → compressed tar shards, an index and a skip report.

Studies go to shards in manifest order (``studies_per_shard`` rows each), so the output is the
same for any worker count, and a rerun skips the shards already finished (a shard is finished
when its ``.tar`` and its ``.json`` side file exist). Every skipped study and file is listed with
its reason in ``skipped.json``; nothing else is lost.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .codec import compress_slices
from .config import PrepareConfig
from .manifest import StudyEntry, read_manifest
from .preprocess import preprocess_volume
from .shards import ShardWriter
from .volumes import read_volume

FORMAT = "hlip_fast.shards/1"


def study_tokens(depths_shapes: Iterable[list[int]], patch_size: tuple[int, int, int]) -> int:
    """Patch tokens of a study's scans (depth rounded up to the patch depth, as the reader pads)."""
    pd, ph, pw = patch_size
    return sum(math.ceil(d / pd) * (h // ph) * (w // pw) for d, h, w in depths_shapes)


def encode_study(
    study_id: str,
    scans: list[np.ndarray],
    records: list[dict],
    report: str,
    labels: dict,
    config: PrepareConfig,
) -> tuple[dict, bytes, np.ndarray]:
    """Metadata, compressed slices and slice sizes of one study whose scans are in stored form."""
    for scan in scans:
        if tuple(scan.shape[1:]) != tuple(config.grid) or scan.dtype != np.dtype(config.dtype):
            raise ValueError(
                f"study {study_id}: scan {scan.shape} {scan.dtype} is not on the {config.grid} "
                f"{config.dtype} grid"
            )
    blob, sizes = compress_slices(np.concatenate(scans)) if scans else (b"", np.zeros(0, np.int32))
    meta = {
        "study_id": study_id,
        "report": report,
        "labels": labels,
        "dtype": config.dtype,
        "grid": list(config.grid),
        "scans": records,
        "tokens": study_tokens((r["shape"] for r in records), config.patch_size),
    }
    return meta, blob, sizes


@dataclass
class StudyResult:
    """What a worker returns for one study: the encoded study, or why it was skipped."""

    study_id: str
    encoded: tuple[dict, bytes, np.ndarray] | None
    skipped_files: list[dict]
    reason: str | None = None


def process_study(entry: StudyEntry, config: PrepareConfig) -> StudyResult:
    """Read, preprocess and encode one study; never raises for bad input (it records why)."""
    skipped: list[dict] = []
    if entry.report is None:
        return StudyResult(entry.study_id, None, skipped, "missing report")
    if not entry.scans:
        return StudyResult(entry.study_id, None, skipped, "empty study: no scans listed")
    scans, records = [], []
    for scan in entry.scans:
        try:
            modality, modality_config = config.modality(scan.modality or entry.modality)
            volume = read_volume(scan.path, scan.spacing)
            stored, record = preprocess_volume(
                volume, modality_config, config.grid, config.max_value, config.dtype
            )
        except Exception as error:  # noqa: BLE001 - any failure of one file is recorded, not fatal
            skipped.append(
                {"study_id": entry.study_id, "file": scan.path, "reason": f"{type(error).__name__}: {error}"}
            )
            continue
        skipped += [{"study_id": entry.study_id, "file": f, "reason": r} for f, r in volume.skipped_files]
        record.update(modality=modality, description=scan.description or volume.description, source=scan.path)
        scans.append(stored)
        records.append(record)
    if not scans:
        return StudyResult(entry.study_id, None, skipped, "no readable scan")
    encoded = encode_study(entry.study_id, scans, records, entry.report, entry.labels, config)
    return StudyResult(entry.study_id, encoded, skipped)


class ShardSet:
    """The output folder: which shards are finished, writing one, and the final index/report."""

    def __init__(self, out_dir: str | Path, config: PrepareConfig, num_studies: int):
        self.root = Path(out_dir)
        self.config = config
        self.num_shards = max(1, math.ceil(num_studies / config.studies_per_shard))
        self.root.mkdir(parents=True, exist_ok=True)
        settings = self.root / "prepare_config.json"
        wanted = {"format": FORMAT, "config": config.to_dict(), "num_studies": num_studies}
        if settings.exists() and json.loads(settings.read_text()) != json.loads(json.dumps(wanted)):
            raise ValueError(f"{self.root} holds shards prepared with other settings; use a new folder")
        _atomic_write(settings, wanted)

    def shard_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:06d}.tar"

    def is_done(self, shard: int) -> bool:
        return self.shard_path(shard).exists() and self.shard_path(shard).with_suffix(".json").exists()

    def write(self, shard: int, results: list[StudyResult], first_index: int) -> None:
        writer = ShardWriter(self.shard_path(shard))
        studies, skipped_studies, skipped_files = [], [], []
        try:
            for offset, result in enumerate(results):
                skipped_files += result.skipped_files
                if result.encoded is None:
                    skipped_studies.append({"study_id": result.study_id, "reason": result.reason})
                    continue
                meta, blob, sizes = result.encoded
                key = f"study{first_index + offset:08d}"
                writer.write(key, meta, blob, sizes)
                shapes = [scan["shape"] for scan in meta["scans"]]
                studies.append(
                    {"study_id": result.study_id, "key": key, "shapes": shapes, "tokens": meta["tokens"]}
                )
        except BaseException:
            writer.abort()
            raise
        writer.close()
        side = {
            "path": self.shard_path(shard).name,
            "studies": studies,
            "skipped_studies": skipped_studies,
            "skipped_files": skipped_files,
        }
        _atomic_write(self.shard_path(shard).with_suffix(".json"), side)

    def finish(self) -> dict:
        """Write ``index.json`` and ``skipped.json`` from the shards' side files; return the index."""
        sides = [
            json.loads(self.shard_path(s).with_suffix(".json").read_text()) for s in range(self.num_shards)
        ]
        shards = [{"path": side["path"], "studies": side["studies"]} for side in sides]
        index = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "shards": shards,
            "num_studies": sum(len(s["studies"]) for s in shards),
            "num_scans": sum(len(st["shapes"]) for s in shards for st in s["studies"]),
            "num_tokens": sum(st["tokens"] for s in shards for st in s["studies"]),
        }
        report = {
            "studies": [item for side in sides for item in side["skipped_studies"]],
            "files": [item for side in sides for item in side["skipped_files"]],
        }
        _atomic_write(self.root / "index.json", index)
        _atomic_write(self.root / "skipped.json", report)
        return index


def _atomic_write(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_shards(
    shard_set: ShardSet, jobs: list, run: Callable, workers: int, progress: bool, desc: str
) -> dict:
    """Run ``run(job) -> StudyResult`` over the jobs of unfinished shards (``workers`` processes,
    results in order), write each shard as soon as it is complete, then the index."""
    from tqdm.auto import tqdm

    per = shard_set.config.studies_per_shard
    pending = [s for s in range(shard_set.num_shards) if not shard_set.is_done(s)]
    todo = [(s, i) for s in pending for i in range(s * per, min((s + 1) * per, len(jobs)))]
    bar = tqdm(total=len(todo), desc=desc, unit="study", disable=not progress)
    results: Iterator[StudyResult]
    pool = None
    if workers > 1 and len(todo) > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_single_thread)
        results = pool.imap(run, [jobs[i] for _, i in todo])
    else:
        results = map(run, [jobs[i] for _, i in todo])
    try:
        batch: list[StudyResult] = []
        for (shard, index), result in zip(todo, results):
            batch.append(result)
            bar.update()
            if index == min((shard + 1) * per, len(jobs)) - 1:
                shard_set.write(shard, batch, shard * per)
                batch = []
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return shard_set.finish()


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


class _Process:
    """Picklable ``entry -> StudyResult`` for pool workers."""

    def __init__(self, config: PrepareConfig):
        self.config = config

    def __call__(self, entry: StudyEntry) -> StudyResult:
        return process_study(entry, self.config)


def prepare(
    manifest: str | Path | list[StudyEntry],
    out_dir: str | Path,
    config: PrepareConfig | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Turn the studies of ``manifest`` into shards under ``out_dir``; returns the index.

    Resumable: finished shards are kept; a folder prepared with other settings is refused.
    """
    config = config or PrepareConfig()
    entries = read_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
    if not entries:
        raise ValueError(f"{manifest}: the manifest lists no studies")
    shard_set = ShardSet(out_dir, config, len(entries))
    return write_shards(shard_set, entries, _Process(config), workers, progress, "prepare")
