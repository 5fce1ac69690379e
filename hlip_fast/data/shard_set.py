"""The output folder of ``prepare`` (and ``synth``): which shards are finished, writing one with
its side file as soon as its studies are encoded, and the final index and skip report.

Studies go to shards in job order (``studies_per_shard`` each), so the output is the same for
any worker count, executor (local processes or a Dask cluster) or partition (``part``: a
contiguous run of the shards, joined later by :func:`~hlip_fast.data.parts.merge`). A shard
is finished when its ``.tar`` and its checksummed side file exist and the side file's
fingerprint (of the settings and of its studies) is the one this run would write. A folder
prepared from other studies or with other settings is refused, or with ``rebuild`` the shards
that differ are redone.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..console import Console
from ..errors import IntegrityError
from ..files import read_json, write_json
from ..folder_lock import FolderLock
from ..integrity import canonical, digest, verify_checksum, with_checksum
from .config import PrepareConfig
from .encoding import StudyResult
from .parts import Part
from .shards import FORMAT, INDEX, PREPARE_CONFIG, ShardWriter, index_of
from .side_files import read_side, side_entry, side_path, write_side
from .worker_pool import in_order

log = logging.getLogger(__name__)


class ShardSet:
    """The output folder: which shards are finished, writing one, and the final index/report.

    ``fingerprints`` has one entry per study (its manifest row, or how a synthetic study is
    made); a shard's fingerprint covers the settings and the fingerprints of its studies.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: PrepareConfig,
        fingerprints: list[str],
        *,
        rebuild: bool = False,
        part: Part | None = None,
    ):
        self.root = Path(out_dir)
        self.config, self.fingerprints = config, fingerprints
        self.num_shards = max(1, math.ceil(len(fingerprints) / config.studies_per_shard))
        self.shards = part.shards(self.num_shards) if part else range(self.num_shards)
        self.root.mkdir(parents=True, exist_ok=True)
        settings = {"format": FORMAT, "config": config.to_dict()}
        self.settings_digest = digest(canonical(settings))
        wanted = {**settings, "num_studies": len(fingerprints), "studies": digest(canonical(fingerprints))}
        if part:
            wanted["part"] = [part.index, part.count]
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
        if previous.get("part") != wanted.get("part"):
            changed.append(f"--part {_part_text(previous)} -> {_part_text(wanted)}")
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
        try:
            return read_side(self.shard_path(shard))
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

    def job(self, shard: int) -> ShardJob:
        """What writing ``shard`` needs, picklable for a worker on another machine."""
        return ShardJob(self.shard_path(shard), self.studies_of(shard).start, self.shard_fingerprint(shard))

    def finish(self) -> dict:
        """Write ``index.json`` and ``skipped.json`` from the shards' verified side files (and
        remove shards of an earlier, larger preparation); return the index."""
        sides = []
        for s in self.shards:
            side = read_side(self.shard_path(s))
            if side is None:
                raise FileNotFoundError(
                    f"{side_path(self.shard_path(s))}: the side file of a finished shard is gone"
                )
            sides.append(side)
        for stale in self.root.glob("shard-*.*"):
            number = re.fullmatch(r"shard-(\d+)\.(tar|json)", stale.name)
            if number and int(number.group(1)) >= self.num_shards:
                stale.unlink()
        return write_index(self.root, self.config.to_dict(), sides)


def write_index(root: Path, config: dict, sides: list[dict]) -> dict:
    """``index.json`` and ``skipped.json`` of ``root`` from its shards' side files, in order."""
    shards = [{"path": side["path"], "studies": side["studies"]} for side in sides]
    index = index_of(config, shards)
    report = {
        "studies": [item for side in sides for item in side["skipped_studies"]],
        "files": [item for side in sides for item in side["skipped_files"]],
    }
    write_json(root / INDEX, with_checksum(index))
    write_json(root / "skipped.json", report)
    return index


def _part_text(settings: dict) -> str:
    part = settings.get("part")
    return f"{part[0]}/{part[1]}" if part else "none"


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its path, the manifest position of its first study, its fingerprint."""

    path: Path
    first: int
    fingerprint: str

    def write(self, results: Iterable[StudyResult]) -> int:
        """Write the shard (via a temporary file, renamed when complete) and its side file from
        the results of its studies, taken one at a time; returns how many there were."""
        writer = ShardWriter(self.path)
        studies, skipped_studies, skipped_files, count = [], [], [], 0
        try:
            for count, result in enumerate(results, 1):
                skipped_files += result.skipped_files
                if result.encoded is None:
                    skipped_studies.append({"study_id": result.study_id, "reason": result.reason})
                    continue
                meta, blob, sizes = result.encoded
                key = f"study{self.first + count - 1:08d}"
                writer.write(key, meta, blob, sizes)
                studies.append(side_entry(key, meta))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        write_side(self.path, self.fingerprint, studies, skipped_studies, skipped_files)
        return count


def _lost(job, reason: str) -> StudyResult:
    """The result of a job whose process died twice: a skipped study with the reason."""
    name = getattr(job, "study_id", None) or f"study #{job}"
    log.error("%s: %s", name, reason)
    return StudyResult(name, None, [], reason)


def write_shards(
    shard_set: ShardSet, jobs: list, run: Callable, workers: int, console: Console, executor=None
) -> dict:
    """Run ``run(job) -> StudyResult`` over the jobs of unfinished shards and write each shard as
    soon as it is complete, then the index: on ``workers`` local processes (results in order),
    or with a Dask ``executor`` (a ``distributed.Client``), one task per shard written by the
    worker that runs it."""
    pending = [s for s in shard_set.shards if not shard_set.is_done(s)]
    todo = [(s, i) for s in pending for i in shard_set.studies_of(s)]
    with console.progress(len(todo), "preparing", "studies") as bar:
        if executor is not None:
            from .dask_executor import run_on_dask

            shard_jobs = [(shard_set.job(s), [jobs[i] for i in shard_set.studies_of(s)]) for s in pending]
            run_on_dask(executor, shard_set.root, shard_jobs, run, _lost, bar.update)
            return shard_set.finish()
        results = iter(in_order(run, [jobs[i] for _, i in todo], workers, _lost))
        for shard in pending:
            studies = itertools.islice(results, len(shard_set.studies_of(shard)))
            shard_set.job(shard).write(_counted(studies, bar))
    return shard_set.finish()


def _counted(results: Iterable[StudyResult], bar) -> Iterator[StudyResult]:
    for result in results:
        bar.update()
        yield result


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
    part: Part | None = None,
    executor=None,
) -> dict:
    """Shards for ``jobs`` in ``out_dir`` (those of ``part`` only, when given), holding the
    folder's lock against a second writer."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with FolderLock(out_dir, desc):
        shard_set = ShardSet(out_dir, config, fingerprints, rebuild=rebuild, part=part)
        return write_shards(shard_set, jobs, run, workers, console or Console.silent(), executor)
