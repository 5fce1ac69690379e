"""Stored studies from whatever the user points at: prepared shards, a manifest of raw studies,
or a folder with one sub-folder per study (NIfTI files and DICOM series inside). Raw studies
are preprocessed on the fly exactly as ``prepare`` would store them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..locations import local
from .config import PrepareConfig
from .encoding import process_study
from .manifest import ScanEntry, StudyEntry, read_manifest
from .reader import RawStudies
from .shards import RawStudy, ShardInfo, is_prepared, is_url_or_pattern, shard_infos

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def folder_manifest(root: str | Path) -> list[StudyEntry]:
    """One study per sub-folder of ``root`` (sorted): each NIfTI file in it is a scan, each
    sub-folder a DICOM series; loose DICOM files make the study folder itself one series."""
    root = Path(root)
    entries = []
    for study in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        children = sorted(study.iterdir())
        scans = [c for c in children if _is_nifti(c) or (c.is_dir() and not c.name.startswith("."))]
        if any(c.is_file() and c.suffix.lower() == ".dcm" for c in children):
            scans.append(study)
        entries.append(StudyEntry(study.name, [ScanEntry(str(s)) for s in scans], report=""))
    if not entries:
        raise ValueError(f"{root}: no study sub-folders (expected one folder per study)")
    if not any(entry.scans for entry in entries):
        names = [entry.study_id for entry in entries]
        raise ValueError(
            f"{root}: none of its {len(names)} study folders holds a scan (a NIfTI file, a DICOM "
            f"series folder or DICOM files): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
        )
    return entries


def preprocessed(entries: list[StudyEntry], config: PrepareConfig, skipped: list[dict]) -> Iterator[RawStudy]:
    """Raw studies → stored form; studies that fail are appended to ``skipped`` with the reason."""
    for entry in entries:
        result = process_study(entry, config)
        skipped += result.skipped_files
        if result.encoded is None:
            skipped.append({"study_id": entry.study_id, "reason": result.reason})
            continue
        meta, blob, sizes = result.encoded
        yield RawStudy(entry.study_id, meta, blob, sizes, shard=str(entry.scans[0].path))


def _shard_studies(shards: list[ShardInfo], skipped: list[dict], on_error: str) -> Iterator[RawStudy]:
    studies = RawStudies(shards, train=False, rank=0, world_size=1, on_error=on_error)
    yield from studies
    skipped += studies.skipped


@dataclass
class StudySource:
    """The stored studies of a source, and how many it lists (``None`` when it does not say:
    a lone ``.tar`` without its side file); skipped studies are among the ``total``."""

    studies: Iterator[RawStudy]
    total: int | None

    def __iter__(self) -> Iterator[RawStudy]:
        return self.studies


def open_studies(
    source: str | Path,
    config: PrepareConfig | None = None,
    skipped: list[dict] | None = None,
    on_error: str = "raise",
) -> StudySource:
    """Stored studies of ``source``: shards (a prepared folder or its ``index.json``, a ``.tar``,
    a URL or a brace pattern: see :func:`~hlip_fast.data.shards.read_index`), a ``.csv``/``.jsonl``
    manifest, or a folder of study folders (preprocessed with ``config``). Raw studies that cannot
    be read, and damaged stored ones under ``on_error="skip"``, are appended to ``skipped`` with
    the reason."""
    skipped = [] if skipped is None else skipped
    if not is_url_or_pattern(source):
        source = Path(local(source))
        if not source.exists():
            raise FileNotFoundError(f"{source} does not exist")
    if is_url_or_pattern(source) or source.suffix == ".tar" or is_prepared(source):
        infos = shard_infos(source)
        total = None if any(i.keys is None for i in infos) else sum(len(i.keys) for i in infos)
        return StudySource(_shard_studies(infos, skipped, on_error), total)  # the index is read once
    entries = read_manifest(source) if source.is_file() else folder_manifest(source)
    return StudySource(preprocessed(entries, config or PrepareConfig(), skipped), len(entries))
