"""Manifests of raw studies: CSV or JSONL rows of study id, scans, report, labels, modality.

Every row is checked before any work starts, and all bad rows are reported at once, each with
its file, line and field: a study id (text or number); scans as paths or objects with ``path``
and optional ``modality``, ``spacing`` (three plausible voxel sizes in mm, depth first),
``rescale`` (``[slope, intercept]`` from stored values to HU, for files that store raw values)
and ``description``; the report as text (empty or missing: the study is skipped as "missing
report"); labels as an object whose values are ``true``/``false``/``0``/``1`` or ``null``
(unknown).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import problem_list
from ..files import parse_json, read_csv_rows, read_text
from ..locations import Location, join, local, parent
from .volumes import check_spacing


@dataclass
class ScanEntry:
    path: str
    modality: str | None = None
    spacing: tuple[float, float, float] | None = None
    description: str = ""
    rescale: tuple[float, float] | None = None
    """``(slope, intercept)``: voxel values become ``value * slope + intercept`` after reading
    (on top of any scaling the file's own header applies)."""


@dataclass
class StudyEntry:
    study_id: str
    scans: list[ScanEntry]
    report: str | None
    labels: dict = field(default_factory=dict)
    modality: str | None = None
    skip_reason: str | None = None
    """Set by an importer that already knows the study cannot be used (a missing CSV row, no
    volume file): ``prepare`` lists it in ``skipped.json`` with this reason."""


def _text(value, name: str, where: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be text, got {value!r}")
    return value


def _scan(item, base: Location, where: str) -> ScanEntry:
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"].strip():
        raise ValueError(f"{where}: a scan must be a path or an object with 'path', got {item!r}")
    if unknown := sorted(set(item) - {"path", "modality", "spacing", "description", "rescale"}):
        raise ValueError(f"{where}: scan {item['path']!r} has unknown field(s) {unknown}")
    spacing, rescale = item.get("spacing"), item.get("rescale")
    return ScanEntry(
        path=str(join(base, item["path"].strip())),
        modality=_text(item.get("modality"), "a scan's modality", where),
        spacing=None if spacing is None else check_spacing(spacing, f"{where}: scan {item['path']!r}"),
        description=_text(item.get("description", ""), "a scan's description", where) or "",
        rescale=None if rescale is None else check_rescale(rescale, f"{where}: scan {item['path']!r}"),
    )


def check_rescale(value, where: str) -> tuple[float, float]:
    """``(slope, intercept)``: two finite numbers, the slope not zero, or a ``ValueError``."""
    try:
        slope, intercept = (float(v) for v in value)
    except (TypeError, ValueError):
        slope = intercept = math.nan
    if not (math.isfinite(slope) and math.isfinite(intercept) and slope != 0):
        raise ValueError(f"{where}: rescale {value!r} is not [slope, intercept] (finite, slope not 0)")
    return slope, intercept


def _labels(value, where: str) -> dict:
    if isinstance(value, str):
        value = parse_json(value, f"{where}: labels") if value.strip() else {}
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: labels must be an object of finding: 0/1/true/false/null, got {value!r}")
    bad = {k: v for k, v in value.items() if not (v is None or (isinstance(v, (bool, int)) and v in (0, 1)))}
    if bad:
        raise ValueError(
            f"{where}: label value(s) {bad} are not 0/1/true/false (use null for an unknown finding)"
        )
    return {str(k): v for k, v in value.items()}


def _study(row: dict, base: Location, where: str) -> StudyEntry:
    study_id = row.get("study_id")
    if isinstance(study_id, bool) or not isinstance(study_id, (str, int)) or not str(study_id).strip():
        raise ValueError(f"{where}: study_id must be non-empty text or a number, got {study_id!r}")
    scans = row.get("scans") or []
    if isinstance(scans, str):
        scans = [s.strip() for s in scans.replace("|", ";").split(";") if s.strip()]
    if not isinstance(scans, list):
        raise ValueError(f"{where}: scans must be a list (or paths separated by ';'), got {scans!r}")
    report = _text(row.get("report"), "report", where)
    return StudyEntry(
        study_id=str(study_id).strip(),
        scans=[_scan(s, base, where) for s in scans],
        report=report if report and report.strip() else None,
        labels=_labels(row.get("labels"), where),
        modality=_text(row.get("modality"), "modality", where) or None,
    )


def _rows(path: Location) -> list[tuple[str, object]]:
    """``(where, row)`` for every row of a ``.jsonl`` or ``.csv`` manifest (a row that is not
    valid JSON comes as its ``ValueError``)."""
    suffix = PurePosixPath(str(path)).suffix
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as error:
                    rows.append(
                        (f"{path}:{n}", ValueError(f"{path}:{n}:{error.colno}: invalid JSON: {error.msg}"))
                    )
        return rows
    if suffix == ".csv":
        return read_csv_rows(path, {"study_id", "scans"})
    raise ValueError(f"{path}: manifest must be .csv or .jsonl")


def read_manifest(path: str | Path) -> list[StudyEntry]:
    """Rows of a ``.csv`` (columns study_id, scans separated by ``;``, report, labels as JSON,
    modality) or ``.jsonl`` manifest; relative scan paths are taken from the manifest's folder.
    Every bad row is reported (the first 20, with the count) in one ``ValueError``. The manifest
    may be an fsspec URL; its relative scan paths are then URLs beside it."""
    path = local(path)
    studies, problems, seen = [], [], {}
    for where, row in _rows(path):
        try:
            if isinstance(row, ValueError):
                raise row
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            study = _study(row, parent(path), where)
        except ValueError as error:
            problems.append(str(error))
            continue
        if study.study_id in seen:
            problems.append(f"{where}: study id {study.study_id!r} already on {seen[study.study_id]}")
        seen.setdefault(study.study_id, where)
        studies.append(study)
    if problems:
        raise ValueError(problem_list(f"{path}: bad rows, fix them first", problems))
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
