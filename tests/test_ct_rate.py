"""The CT-RATE importer on a miniature release with CT-RATE's folder and file names, CSV columns
and raw-value encoding: HU, spacing, reports and labels end to end through ``hlip-prepare``, the
reconstruction modes, the release-to-release name differences, and what is skipped and why."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_data_prepare import stored

from hlip_fast.data.cli import prepare_main
from hlip_fast.data.config import HLIP_CT_WINDOW
from hlip_fast.data.ct_rate import read_ct_rate
from hlip_fast.evaluation.prompts import load_prompts

FINDINGS = list(load_prompts("ct_rate").options)
SLICES, SIDE = 8, 12  # raw volumes of 12 x 12 x 8 voxels, 1.5 mm apart in depth


def hu_to_stored(hu: float) -> int:
    low, high = HLIP_CT_WINDOW
    return round(min(max((hu - low) / (high - low), 0.0), 1.0) * 255)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_volume(path: Path, raw_value: int) -> None:
    """A CT-RATE-like volume: raw stored values (int16), no header scaling, a 1 mm header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((SIDE, SIDE, SLICES), raw_value, dtype=np.int16), np.eye(4)), path)


# name: (raw value, slope, intercept); HU = raw * slope + intercept
VOLUMES = {
    "valid_1_a_1": (1000, 0.5, -1024.0),  # -524 HU
    "valid_1_a_2": (1500, 1.0, -1024.0),  # 476 HU: above the window, stored as 255
    "valid_2_a_1": (924, 1.0, -1024.0),  # -100 HU
    "valid_3_a_1": (1000, 1.0, -1024.0),  # no report row
    "valid_4_a_1": (1000, 1.0, -1024.0),  # a label of 2
    "valid_6_a_1": None,  # not a NIfTI file
}


def ct_rate_release(
    root: Path, split: str = "valid", *, validation_prefix: bool = True, predicted: bool = True
) -> Path:
    """A miniature CT-RATE split as a release lays it out (the validation split's CSVs named
    ``validation_*`` or ``valid_*``; labels with or without ``_predicted``)."""
    specs = {name.replace("valid", split, 1): spec for name, spec in VOLUMES.items()}
    for name, spec in specs.items():
        patient, study = name.split("_")[1:3]
        path = root / split / f"{split}_{patient}" / f"{split}_{patient}_{study}" / f"{name}.nii.gz"
        if spec is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not a volume")
        else:
            write_volume(path, spec[0])
    write_volume(root / split / f"{split}_7" / f"{split}_7_a" / "notes.nii.gz", 0)
    names = [*specs, f"{split}_5_a_1"]  # *_5_a_1: rows, but no volume file
    prefix = "validation" if split == "valid" and validation_prefix else split
    write_csv(
        root / "metadata" / f"{prefix}_metadata.csv",
        ["VolumeName", "Manufacturer", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"],
        [
            [f"{n}.nii.gz", "ACME", *(specs.get(n) or (0, 1.0, -1024.0))[1:], "[0.75, 0.75]", 1.5]
            for n in names
        ],
    )
    write_csv(
        root / "radiology_text_reports" / f"{prefix}_reports.csv",
        ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
        [
            [f"{n}.nii.gz", "Cough.", "Non-contrast.", f"Findings of {n}.", f"Impression of {n}."]
            for n in names
            if not n.endswith("_3_a_1")
        ],
    )
    labels = f"{split}_predicted_labels.csv" if predicted else f"{split}_labels.csv"
    write_csv(
        root / "multi_abnormality_labels" / labels,
        ["VolumeName", *FINDINGS],
        [
            [f"{n}.nii.gz", *(2 if n.endswith("_4_a_1") and i == 0 else (i + len(n)) % 2 for i in range(18))]
            for n in names
        ],
    )
    return root


def test_prepare_ct_rate_gives_hu_spacing_reports_and_labels(tmp_path, capsys):
    root = ct_rate_release(tmp_path / "CT-RATE")
    out = tmp_path / "shards"
    command = [str(root), str(out), "--source", "ct-rate", "--split", "valid", "--grid", "16", "16"]
    assert prepare_main([*command, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for used in ("validation_metadata.csv", "validation_reports.csv", "valid_predicted_labels.csv"):
        assert used in printed  # the files found by pattern are named

    studies = stored(out)
    assert sorted(studies) == ["valid_1_a_1", "valid_1_a_2", "valid_2_a_1"]
    for name, (meta, voxels) in studies.items():
        raw, slope, intercept = VOLUMES[name]
        assert (voxels == hu_to_stored(raw * slope + intercept)).all(), name
        (scan,) = meta["scans"]
        assert scan["source_spacing"] == [1.5, 0.75, 0.75]  # from the metadata CSV, not the header
        assert scan["shape"] == [SLICES * 1.5 / 3, 16, 16]  # resampled to HLIP's 3 mm
        assert scan["modality"] == "CT" and scan["description"] == "reconstruction " + name[-1]
        assert meta["report"] == f"Findings of {name}. Impression of {name}."
        assert meta["labels"] == {finding: (i + len(name)) % 2 for i, finding in enumerate(FINDINGS)}

    skipped = json.loads((out / "skipped.json").read_text())
    reasons = {item["study_id"]: item["reason"] for item in skipped["studies"]}
    assert "no row in the reports CSV" in reasons["valid_3_a_1"]
    assert "label 'Medical material' is '2'" in reasons["valid_4_a_1"]
    assert "no volume file" in reasons["valid_5_a_1"]
    assert reasons["valid_6_a_1"] == "no readable scan"
    assert "not a CT-RATE volume name" in reasons["notes.nii.gz"]
    assert [item["study_id"] for item in skipped["files"]] == ["valid_6_a_1"]


def test_reconstructions_as_one_study_and_release_name_variants(tmp_path):
    root = ct_rate_release(tmp_path / "CT-RATE", validation_prefix=False, predicted=False)
    source = read_ct_rate(root, "valid", recons="all")
    assert source.files["metadata"].name == "valid_metadata.csv"
    assert source.files["labels"].name == "valid_labels.csv"
    by_id = {entry.study_id: entry for entry in source.entries}
    session = by_id["valid_1_a"]
    assert [scan.description for scan in session.scans] == ["reconstruction 1", "reconstruction 2"]
    assert [scan.rescale for scan in session.scans] == [(0.5, -1024.0), (1.0, -1024.0)]
    assert session.report == "Findings of valid_1_a_1. Impression of valid_1_a_1."
    assert session.skip_reason is None and by_id["valid_3_a"].skip_reason is not None
    assert "usable of" in source.describe()


def test_bad_releases_and_flags_are_refused_with_the_reason(tmp_path, capsys):
    root = ct_rate_release(tmp_path / "CT-RATE")
    (root / "radiology_text_reports" / "validation_reports.csv").rename(
        root / "radiology_text_reports" / "reports.csv"
    )
    with pytest.raises(FileNotFoundError, match=r"radiology_text_reports: none of \['valid_reports.csv'"):
        read_ct_rate(root, "valid")
    with pytest.raises(ValueError, match="split must be one of"):
        read_ct_rate(root, "test")
    out = str(tmp_path / "out")
    for flags, message in (
        (["--source", "ct-rate"], "needs --split"),
        (["--split", "valid"], "apply to --source ct-rate only"),
    ):
        with pytest.raises(SystemExit) as exit:
            prepare_main([str(root), out, *flags, "--quiet"])
        assert exit.value.code == 2 and message in capsys.readouterr().err
    assert prepare_main([str(root), out, "--source", "ct-rate", "--split", "valid", "--quiet"]) == 2
    assert "none of" in capsys.readouterr().err
