"""One study, from its files to what a shard stores: read each scan (NIfTI or DICOM), reorient,
resample, window or normalise, cast to the stored integers, then compress the slices. Pure:
files in, an encoded study (or why it was skipped) out; it never raises for bad input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .codec import compress_slices
from .config import PrepareConfig
from .manifest import StudyEntry
from .nifti import VoxelBuffer
from .preprocess import preprocess_volume
from .tokens import study_tokens
from .volumes import open_volume


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


def process_study(entry: StudyEntry, config: PrepareConfig, buffer: VoxelBuffer | None = None) -> StudyResult:
    """Read, preprocess and encode one study; never raises for bad input (it records why).
    NIfTI voxels are inflated into ``buffer`` when given (reused from study to study)."""
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
            volume = open_volume(scan.path, scan.spacing, config.max_voxels, buffer)
            if scan.rescale is not None:
                volume.rescaled(*scan.rescale)
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
