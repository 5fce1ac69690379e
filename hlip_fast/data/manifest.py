"""Manifests of raw studies: CSV or JSONL rows of study id, scans, report, labels, modality."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ScanEntry:
    path: str
    modality: str | None = None
    spacing: tuple[float, float, float] | None = None
    description: str = ""


@dataclass
class StudyEntry:
    study_id: str
    scans: list[ScanEntry]
    report: str | None
    labels: dict = field(default_factory=dict)
    modality: str | None = None


def _scan(item, base: Path, where: str) -> ScanEntry:
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict) or "path" not in item:
        raise ValueError(f"{where}: a scan must be a path or an object with 'path', got {item!r}")
    path = Path(item["path"])
    spacing = item.get("spacing")
    return ScanEntry(
        path=str(path if path.is_absolute() else base / path),
        modality=item.get("modality"),
        spacing=None if spacing is None else tuple(float(s) for s in spacing),
        description=item.get("description", ""),
    )


def _study(row: dict, base: Path, where: str) -> StudyEntry:
    if not row.get("study_id"):
        raise ValueError(f"{where}: row without study_id")
    scans = row.get("scans") or []
    if isinstance(scans, str):
        scans = [s for s in scans.replace("|", ";").split(";") if s.strip()]
    labels = row.get("labels") or {}
    if isinstance(labels, str):
        labels = json.loads(labels) if labels.strip() else {}
    report = row.get("report")
    return StudyEntry(
        study_id=str(row["study_id"]),
        scans=[_scan(s.strip() if isinstance(s, str) else s, base, where) for s in scans],
        report=report if report and str(report).strip() else None,
        labels=labels,
        modality=row.get("modality") or None,
    )


def read_manifest(path: str | Path) -> list[StudyEntry]:
    """Rows of a ``.csv`` (columns study_id, scans separated by ``;``, report, labels as JSON,
    modality) or ``.jsonl`` manifest; relative scan paths are taken from the manifest's folder."""
    path = Path(path)
    base = path.parent
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        rows = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(lines, 1) if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="") as handle:
            rows = [(f"{path}:{n}", row) for n, row in enumerate(csv.DictReader(handle), 2)]
    else:
        raise ValueError(f"{path}: manifest must be .csv or .jsonl")
    studies = [_study(row, base, where) for where, row in rows]
    seen: set[str] = set()
    for study in studies:
        if study.study_id in seen:
            raise ValueError(f"{path}: study id {study.study_id!r} appears twice")
        seen.add(study.study_id)
    return studies


def write_manifest(path: str | Path, studies: list[StudyEntry]) -> None:
    """Write ``studies`` as JSONL (scan paths as given)."""
    with open(path, "w") as handle:
        for study in studies:
            row = {
                "study_id": study.study_id,
                "scans": [
                    {k: v for k, v in vars(scan).items() if v not in (None, "")} for scan in study.scans
                ],
                "report": study.report,
                "labels": study.labels,
                "modality": study.modality,
            }
            handle.write(json.dumps(row) + "\n")
