"""CT-RATE as published, read into manifest entries for ``prepare`` (``hlip-prepare --source
ct-rate ROOT --split train|valid OUT``).

The layout read as it is:

- volumes: ``{split}/{split}_{patient}/{split}_{patient}_{study}/{split}_{patient}_{study}_{recon}.nii.gz``
  (the split folder may also be ``{split}_fixed``), storing raw values;
- ``metadata/{split}_metadata.csv``: ``VolumeName``, ``RescaleSlope``, ``RescaleIntercept`` (raw
  value → HU), ``XYSpacing`` (text such as ``"[0.75, 0.75]"``, rows then columns) and
  ``ZSpacing``, in mm;
- ``radiology_text_reports/{split}_reports.csv``: ``VolumeName``, ``Findings_EN``,
  ``Impressions_EN`` (the training report is the findings, then the impression, as HLIP uses);
- ``multi_abnormality_labels/{split}_predicted_labels.csv``: ``VolumeName`` and 18 finding
  columns of 0/1, whose names are the ``ct_rate`` prompt set's findings.

The root may be an fsspec URL (``s3://``, ``gs://``, ``https://``): the CSV files are found by
their names and the volumes from the CSV rows (object stores need not list folders), each
read with the retries of the shard reader.

File names differ between releases (``valid_`` or ``validation_``; labels with or without
``_predicted``), so each CSV is found by pattern and the ones used are reported. A volume
missing from any CSV, a row without its volume, a bad value and an unexpected file name become
skipped studies with their reason, listed in ``skipped.json``; unreadable volumes are skipped
by ``prepare`` like any other file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..files import read_csv_rows
from ..locations import Location, filesystem, is_url, join, local, retrying
from .manifest import ScanEntry, StudyEntry, check_rescale
from .volumes import check_spacing

SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation")}
"""The prefixes each split's folder and CSV files go by across CT-RATE releases."""
VOLUME_NAME = re.compile(r"(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<study>[a-z]+)_(?P<recon>\d+)\.nii\.gz")
RECONS = ("each", "all")
"""``each``: one study per reconstruction (HLIP's chest-CT recipe); ``all``: one study per CT
session, its reconstructions as scans (report and labels from its first reconstruction)."""


@dataclass
class CtRate:
    """CT-RATE's studies of one split as manifest entries (unusable ones carry their
    ``skip_reason``), and the CSV files and volume folder they came from."""

    entries: list[StudyEntry]
    files: dict[str, Path]

    def describe(self) -> str:
        used = ", ".join(f"{kind} {path}" for kind, path in self.files.items())
        usable = sum(entry.skip_reason is None for entry in self.entries)
        return f"CT-RATE: {usable} usable of {len(self.entries)} studies; read {used}"


@dataclass
class _Volume:
    """One reconstruction: its file (``None``: a CSV row without a volume) and its rows."""

    name: str
    path: Location | None
    rows: dict[str, tuple[str, dict]]


def read_ct_rate(root: Location, split: str, recons: str = "each") -> CtRate:
    """The ``split`` (``train`` or ``valid``) of the CT-RATE release at ``root`` (a folder or a URL)."""
    root = local(root)
    if split not in SPLIT_NAMES:
        raise ValueError(f"CT-RATE split must be one of {sorted(SPLIT_NAMES)}, got {split!r}")
    if recons not in RECONS:
        raise ValueError(f"--recons must be one of {RECONS}, got {recons!r}")
    if not is_url(root) and not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected CT-RATE's root)")
    prefixes = SPLIT_NAMES[split]
    files = {
        "metadata": _find_csv(join(root, "metadata"), prefixes, ("metadata",)),
        "reports": _find_csv(join(root, "radiology_text_reports"), prefixes, ("reports",)),
        "labels": _find_csv(join(root, "multi_abnormality_labels"), prefixes, ("predicted_labels", "labels")),
    }
    rows = {kind: list(_csv_rows(files[kind])) for kind in ("metadata", "reports", "labels")}
    volumes: dict[str, _Volume] = {}
    odd_names = []
    if is_url(root):
        listed = [name for kind in rows for name, _, _ in rows[kind]]
        volume_dir = _find_remote_split_folder(root, prefixes, listed)
        for name in listed:
            match = VOLUME_NAME.fullmatch(name)
            if match and name not in volumes:
                patient = f"{match['split']}_{match['patient']}"
                volumes[name] = _Volume(name, f"{volume_dir}/{patient}/{patient}_{match['study']}/{name}", {})
    else:
        volume_dir = _find_split_folder(root, prefixes)
        for path in sorted(volume_dir.glob("*/*/*.nii.gz")):
            if VOLUME_NAME.fullmatch(path.name):
                volumes[path.name] = _Volume(path.name, path, {})
            else:
                odd_names.append(path)
    files["volumes"] = volume_dir
    for kind, found in rows.items():
        for name, where, row in found:
            volume = volumes.setdefault(name, _Volume(name, None, {}))
            volume.rows.setdefault(kind, (where, row))

    entries = [_entry(group, recons) for group in _studies(volumes.values(), recons)]
    for path in odd_names:
        entries.append(StudyEntry(path.name, [], None, skip_reason=f"{path}: not a CT-RATE volume name"))
    if not entries:
        raise ValueError(f"{volume_dir}: no CT-RATE volumes and no CSV rows")
    return CtRate(entries, files)


def _exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retrying(url, "existence check", lambda: fs.exists(path))


def _find_remote_split_folder(root: str, prefixes: tuple[str, ...], names: list[str]) -> str:
    """The split folder under a URL root that holds the first volume the CSV files name."""
    names = [n for n in names if VOLUME_NAME.fullmatch(n)]
    if not names:
        raise ValueError(f"{root}: the CSV files name no CT-RATE volume")
    match = VOLUME_NAME.fullmatch(names[0])
    patient = f"{match['split']}_{match['patient']}"
    looked = [name for prefix in prefixes for name in (prefix, f"{prefix}_fixed")]
    for folder in looked:
        if _exists(f"{root.rstrip('/')}/{folder}/{patient}/{patient}_{match['study']}/{names[0]}"):
            return f"{root.rstrip('/')}/{folder}"
    raise FileNotFoundError(f"{root}: {names[0]} is in none of the split folders {looked}")


def _find_csv(folder: Location, prefixes: tuple[str, ...], kinds: tuple[str, ...]) -> Location:
    """The one CSV in ``folder`` named ``{prefix}_{kind}.csv`` (first kind that matches); under
    a URL, the first such name that exists."""
    wanted = [f"{prefix}_{kind}.csv" for kind in kinds for prefix in prefixes]
    if is_url(folder):
        for name in wanted:
            if _exists(join(folder, name)):
                return join(folder, name)
        raise FileNotFoundError(f"{folder}: none of {wanted}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (CT-RATE's layout has it)")
    for kind in kinds:
        pattern = re.compile(rf"({'|'.join(prefixes)})_{kind}\.csv", re.IGNORECASE)
        found = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))
        if len(found) > 1:
            raise ValueError(f"{folder}: several {kind} files for this split: {[p.name for p in found]}")
        if found:
            return found[0]
    raise FileNotFoundError(f"{folder}: none of {wanted}")


def _find_split_folder(root: Path, prefixes: tuple[str, ...]) -> Path:
    for name in (name for prefix in prefixes for name in (prefix, f"{prefix}_fixed")):
        if (root / name).is_dir():
            return root / name
    looked = [*prefixes, *(f"{prefix}_fixed" for prefix in prefixes)]
    raise FileNotFoundError(f"{root}: no volume folder for this split (looked for {looked})")


def _csv_rows(path: Location) -> Iterable[tuple[str, str, dict]]:
    """``(volume name, "file:line", row)`` for every row of a CT-RATE CSV."""
    for where, row in read_csv_rows(path, {"VolumeName"}):
        if name := (row.get("VolumeName") or "").strip():
            yield (name if name.endswith(".nii.gz") else f"{name}.nii.gz"), where, row


def _studies(volumes: Iterable[_Volume], recons: str) -> list[list[_Volume]]:
    """Volumes grouped into studies, in name order (reconstructions by number)."""

    def key(volume: _Volume) -> tuple:
        match = VOLUME_NAME.fullmatch(volume.name)
        if match is None:
            return (volume.name, "", 0)
        return (match["split"], int(match["patient"]), match["study"], int(match["recon"]))

    ordered = sorted(volumes, key=key)
    if recons == "each":
        return [[volume] for volume in ordered]
    groups: dict[tuple, list[_Volume]] = {}
    for volume in ordered:
        groups.setdefault(key(volume)[:3], []).append(volume)
    return list(groups.values())


def _entry(group: list[_Volume], recons: str) -> StudyEntry:
    """One study from its reconstructions; the first problem found becomes its skip reason."""
    first = group[0]
    study_id = first.name.removesuffix(".nii.gz")
    if recons == "all":
        study_id = study_id.rsplit("_", 1)[0]
    try:
        scans = [_scan(volume) for volume in group]
        report = _report(*_row(first, "reports"))
        labels = _labels(*_row(first, "labels"))
    except ValueError as problem:
        return StudyEntry(study_id, [], None, skip_reason=str(problem))
    return StudyEntry(study_id, scans, report, labels, modality="CT")


def _row(volume: _Volume, kind: str) -> tuple[str, dict]:
    if volume.path is None:
        raise ValueError(f"{volume.name}: listed in the CSV files but no volume file")
    if kind not in volume.rows:
        raise ValueError(f"{volume.path}: no row in the {kind} CSV")
    return volume.rows[kind]


def _scan(volume: _Volume) -> ScanEntry:
    """The scan of one reconstruction: HU rescale and spacing ``(z, rows, columns)``."""
    where, row = _row(volume, "metadata")
    try:
        xy = json.loads(row.get("XYSpacing") or "")
        spacing = (float(row.get("ZSpacing") or "nan"), *(float(v) for v in xy))
    except (ValueError, TypeError):
        given = f"XYSpacing {row.get('XYSpacing')!r} / ZSpacing {row.get('ZSpacing')!r}"
        raise ValueError(f"{where}: {given} are not spacings in mm") from None
    rescale = (row.get("RescaleSlope"), row.get("RescaleIntercept"))
    recon = VOLUME_NAME.fullmatch(volume.name)["recon"]
    return ScanEntry(
        path=str(volume.path),
        modality="CT",
        spacing=check_spacing(spacing, where),
        rescale=check_rescale(rescale, f"{where}: RescaleSlope/RescaleIntercept"),
        description=f"reconstruction {recon}",
    )


def _report(where: str, row: dict) -> str:
    """Findings, then impression; CT-RATE writes a missing part as an empty cell."""
    parts = [(row.get(column) or "").strip() for column in ("Findings_EN", "Impressions_EN")]
    parts = [p for p in parts if p and p.lower() != "nan"]
    if not parts:
        raise ValueError(f"{where}: empty Findings_EN and Impressions_EN")
    return " ".join(parts)


def _labels(where: str, row: dict) -> dict[str, int]:
    labels = {}
    for column, value in row.items():
        if column in (None, "VolumeName") or column.startswith("Unnamed"):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if number not in (0.0, 1.0):
            raise ValueError(f"{where}: label {column!r} is {value!r}, not 0 or 1")
        labels[column.strip()] = int(number)
    if not labels:
        raise ValueError(f"{where}: no finding columns")
    return labels
