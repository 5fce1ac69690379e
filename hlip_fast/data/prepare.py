"""``prepare``: a manifest of raw studies → compressed tar shards, an index and a skip report.

Studies go to shards in manifest order (``studies_per_shard`` rows each), so the output is the
same for any worker count. A rerun keeps the shards already finished: a shard is finished when
its ``.tar`` and its checksummed ``.json`` side file exist and the side file's fingerprint (of
the settings and of its studies' manifest rows) is the one this run would write. A folder
prepared from another manifest or with other settings is refused, or with ``rebuild`` the
shards that differ are redone. Every skipped study and file is listed with its reason in
``skipped.json``; a worker process that dies (e.g. killed by the out-of-memory killer) is
noticed, its studies are retried one by one, and a study that kills its worker again is
skipped with that reason; nothing else is lost and nothing waits forever.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..console import Console
from ..errors import IntegrityError
from ..files import read_json, write_json
from ..folder_lock import FolderLock
from ..integrity import canonical, digest, verify_checksum, with_checksum
from .codec import compress_slices
from .config import PrepareConfig
from .manifest import StudyEntry, read_manifest
from .preprocess import preprocess_volume
from .shards import FORMAT, INDEX, PREPARE_CONFIG, ShardWriter, index_of
from .volumes import read_volume

log = logging.getLogger(__name__)


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
    if entry.skip_reason is not None:
        return StudyResult(entry.study_id, None, skipped, entry.skip_reason)
    if entry.report is None:
        return StudyResult(entry.study_id, None, skipped, "missing report")
    if not entry.scans:
        return StudyResult(entry.study_id, None, skipped, "empty study: no scans listed")
    scans, records = [], []
    for scan in entry.scans:
        try:
            modality, modality_config = config.modality(scan.modality or entry.modality)
            volume = read_volume(scan.path, scan.spacing, config.max_voxels)
            if scan.rescale is not None:
                slope, intercept = scan.rescale
                volume.array = volume.array * np.float32(slope) + np.float32(intercept)
            stored, record = preprocess_volume(
                volume, modality_config, config.grid, config.max_value, config.dtype, config.max_voxels
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


def entry_fingerprint(entry: StudyEntry) -> str:
    """The digest of a study's manifest row (id, scan paths and settings, report, labels)."""
    return digest(canonical(asdict(entry)))


class ShardSet:
    """The output folder: which shards are finished, writing one, and the final index/report.

    ``fingerprints`` has one entry per study (its manifest row, or how a synthetic study is
    made); a shard's fingerprint covers the settings and the fingerprints of its studies.
    """

    def __init__(
        self, out_dir: str | Path, config: PrepareConfig, fingerprints: list[str], *, rebuild: bool = False
    ):
        self.root = Path(out_dir)
        self.config, self.fingerprints = config, fingerprints
        self.num_shards = max(1, math.ceil(len(fingerprints) / config.studies_per_shard))
        self.root.mkdir(parents=True, exist_ok=True)
        settings = {"format": FORMAT, "config": config.to_dict()}
        self.settings_digest = digest(canonical(settings))
        wanted = {**settings, "num_studies": len(fingerprints), "studies": digest(canonical(fingerprints))}
        wanted = json.loads(canonical(wanted))  # as JSON gives it back: lists, not tuples
        path = self.root / PREPARE_CONFIG
        if path.exists() and not rebuild:
            previous = verify_checksum(read_json(path), path)
            if canonical(previous) != canonical(wanted):
                raise ValueError(self._difference(previous, wanted))
        write_json(path, with_checksum(wanted))

    def _difference(self, previous: dict, wanted: dict) -> str:
        changed = []
        if previous.get("format") != wanted["format"]:
            changed.append(f"format {previous.get('format')} -> {wanted['format']}")
        old, new = previous.get("config", {}), wanted["config"]
        changed += [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(new) if old.get(k) != new[k]]
        if previous.get("num_studies") != wanted["num_studies"]:
            changed.append(f"{previous.get('num_studies')} studies -> {wanted['num_studies']}")
        elif previous.get("studies") != wanted["studies"]:
            sides = {s: self._side(s) for s in range(self.num_shards)}
            stale = [
                self.shard_path(s).name
                for s, side in sides.items()
                if side is not None and side.get("fingerprint") != self.shard_fingerprint(s)
            ]
            changed.append(f"manifest rows changed (finished shards holding them: {stale[:4] or 'none'})")
        return (
            f"{self.root} was prepared from another manifest or with other settings ({'; '.join(changed)}); "
            "use a new folder, or --rebuild to redo the shards that differ"
        )

    def shard_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:06d}.tar"

    def studies_of(self, shard: int) -> range:
        """Positions (in the manifest) of the studies of ``shard``."""
        per = self.config.studies_per_shard
        return range(shard * per, min((shard + 1) * per, len(self.fingerprints)))

    def shard_fingerprint(self, shard: int) -> str:
        return digest(
            canonical([self.settings_digest, [self.fingerprints[i] for i in self.studies_of(shard)]])
        )

    def _side(self, shard: int) -> dict | None:
        """The shard's verified side file (``None`` when absent or damaged)."""
        side = self.shard_path(shard).with_suffix(".json")
        if not side.is_file():
            return None
        try:
            return verify_checksum(read_json(side), side)
        except (IntegrityError, ValueError) as error:
            log.warning("%s; its shard is prepared again", error)
            return None

    def is_done(self, shard: int) -> bool:
        side = self._side(shard)
        return (
            self.shard_path(shard).is_file()
            and side is not None
            and side.get("fingerprint") == self.shard_fingerprint(shard)
        )

    def write(self, shard: int, results: list[StudyResult]) -> None:
        writer = ShardWriter(self.shard_path(shard))
        studies, skipped_studies, skipped_files = [], [], []
        try:
            for index, result in zip(self.studies_of(shard), results):
                skipped_files += result.skipped_files
                if result.encoded is None:
                    skipped_studies.append({"study_id": result.study_id, "reason": result.reason})
                    continue
                meta, blob, sizes = result.encoded
                key = f"study{index:08d}"
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
            "fingerprint": self.shard_fingerprint(shard),
            "studies": studies,
            "skipped_studies": skipped_studies,
            "skipped_files": skipped_files,
        }
        write_json(self.shard_path(shard).with_suffix(".json"), with_checksum(side))

    def finish(self) -> dict:
        """Write ``index.json`` and ``skipped.json`` from the shards' verified side files (and
        remove shards of an earlier, larger preparation); return the index."""
        sides = []
        for s in range(self.num_shards):
            side = self.shard_path(s).with_suffix(".json")
            sides.append(verify_checksum(read_json(side), side))
        for stale in self.root.glob("shard-*.*"):
            number = re.fullmatch(r"shard-(\d+)\.(tar|json)", stale.name)
            if number and int(number.group(1)) >= self.num_shards:
                stale.unlink()
        shards = [{"path": side["path"], "studies": side["studies"]} for side in sides]
        index = index_of(self.config.to_dict(), shards)
        report = {
            "studies": [item for side in sides for item in side["skipped_studies"]],
            "files": [item for side in sides for item in side["skipped_files"]],
        }
        write_json(self.root / INDEX, with_checksum(index))
        write_json(self.root / "skipped.json", report)
        return index


def _job_name(job) -> str:
    return getattr(job, "study_id", None) or f"study #{job}"


def _in_order(run: Callable, jobs: list, workers: int) -> Iterator[StudyResult]:
    """``run(job)`` for every job, results in job order, on ``workers`` spawned processes (at
    most ``2 × workers`` jobs in flight). When a worker dies, the jobs in flight that had not
    finished are run again, each in a fresh process of its own; one that kills that process too
    becomes a skipped study with the reason. Never waits on a dead process."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(run, jobs)
        return
    context = multiprocessing.get_context("spawn")

    def new_pool(size: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(size, mp_context=context, initializer=_single_thread)

    def isolated(suspects: list[int]) -> None:
        """Run each suspect alone on a one-process pool; a job that kills it is fatal, unless
        a fresh process cannot even run a no-op (then no worker can start: an error)."""
        single = new_pool(1)
        try:
            for j in suspects:
                done: Future = Future()
                try:
                    done.set_result(single.submit(run, jobs[j]).result())
                except BrokenProcessPool:
                    single.shutdown(wait=False, cancel_futures=True)
                    single = new_pool(1)
                    try:
                        single.submit(os.getpid).result()
                    except BrokenProcessPool:
                        raise ChildProcessError(
                            "worker processes die as they start; run with --workers 1 to see the error"
                        ) from None
                    reason = "the process preparing it died twice (killed, e.g. by the out-of-memory killer)"
                    log.error("%s: %s", _job_name(jobs[j]), reason)
                    done.set_result(StudyResult(_job_name(jobs[j]), None, [], reason))
                futures[j] = done
        finally:
            single.shutdown(wait=False, cancel_futures=True)

    pool, futures, submitted = new_pool(workers), {}, 0
    try:
        for i in range(len(jobs)):
            while submitted < min(len(jobs), i + 2 * workers):
                futures[submitted] = pool.submit(run, jobs[submitted])
                submitted += 1
            try:
                result = futures[i].result()
            except BrokenProcessPool:
                log.warning("a worker process died; retrying its studies one by one")
                pool.shutdown(wait=False, cancel_futures=True)
                isolated([j for j, f in futures.items() if not (f.done() and f.exception() is None)])
                pool = new_pool(workers)
                result = futures[i].result()
            del futures[i]
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def write_shards(shard_set: ShardSet, jobs: list, run: Callable, workers: int, console: Console) -> dict:
    """Run ``run(job) -> StudyResult`` over the jobs of unfinished shards (``workers`` processes,
    results in order), write each shard as soon as it is complete, then the index."""
    pending = [s for s in range(shard_set.num_shards) if not shard_set.is_done(s)]
    todo = [(s, i) for s in pending for i in shard_set.studies_of(s)]
    with console.progress(len(todo), "preparing", "studies") as bar:
        batch: list[StudyResult] = []
        for (shard, index), result in zip(todo, _in_order(run, [jobs[i] for _, i in todo], workers)):
            batch.append(result)
            bar.update()
            if index == shard_set.studies_of(shard)[-1]:
                shard_set.write(shard, batch)
                batch = []
    return shard_set.finish()


def build_shards(
    out_dir: str | Path,
    config: PrepareConfig,
    jobs: list,
    fingerprints: list[str],
    run: Callable,
    *,
    workers: int,
    console: Console | None,
    rebuild: bool,
    desc: str,
) -> dict:
    """Shards for ``jobs`` in ``out_dir``, holding the folder's lock against a second writer."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with FolderLock(out_dir, desc):
        shard_set = ShardSet(out_dir, config, fingerprints, rebuild=rebuild)
        return write_shards(shard_set, jobs, run, workers, console or Console.silent())


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
    console: Console | None = None,
    rebuild: bool = False,
) -> dict:
    """Turn the studies of ``manifest`` into shards under ``out_dir``; returns the index
    (a bar or progress lines on ``console``, silent without one).

    Resumable: finished shards are kept. A folder prepared from another manifest or with other
    settings is refused, unless ``rebuild``: then the shards that differ are prepared again.
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
    )
