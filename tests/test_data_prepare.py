"""prepare / volumes / shards / synth on real file formats and bad inputs."""

from __future__ import annotations

import copy
import csv
import gzip
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import examples

from hlip_fast.data import (
    PrepareConfig,
    ScanEntry,
    StudyEntry,
    list_shards,
    prepare,
    read_manifest,
    read_shard,
)
from hlip_fast.data.cli import prepare_main, synth_main
from hlip_fast.data.codec import compress_slices, decompress_slices
from hlip_fast.data.synth import SIZES, make_study, synth_prepare_config, write_raw
from hlip_fast.data.volumes import read_volume


def no_resample(config: PrepareConfig) -> PrepareConfig:
    return replace(config, modalities={k: replace(m, spacing=None) for k, m in config.modalities.items()})


def stored(root: Path) -> dict[str, tuple[dict, np.ndarray]]:
    out = {}
    for shard in list_shards(root):
        for raw in read_shard(shard):
            out[raw.study_id] = (
                raw.meta,
                decompress_slices(raw.blob, raw.sizes, tuple(raw.meta["grid"]), raw.meta["dtype"]),
            )
    return out


def dicom_series(folder: Path, positions, orientation=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = examples.ct
    for k, z in enumerate(positions):
        ds = copy.deepcopy(base)
        ipp = [float(v) for v in base.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + z]
        if orientation is not None and k == 1:
            ds.ImageOrientationPatient = orientation
        ds.save_as(folder / f"img{(7 * k) % 11:03d}.dcm")  # file names out of position order
    return folder


def test_codec_round_trip(seed):
    rng = np.random.default_rng(seed)
    for dtype in ("uint8", "uint16"):
        volume = rng.integers(0, 200, size=(int(rng.integers(1, 9)), 12, 10)).astype(dtype)
        blob, sizes = compress_slices(volume)
        assert len(sizes) == volume.shape[0] and sizes.sum() == len(blob)
        np.testing.assert_array_equal(decompress_slices(blob, sizes, (12, 10), dtype), volume)
    with pytest.raises(ValueError, match="add up"):
        decompress_slices(blob + b"x", sizes, (12, 10), "uint16")


def test_dicom_series_sorted_rescaled_to_hu(tmp_path):
    folder = dicom_series(tmp_path / "series", [0.0, 5.0, 2.5, 7.5])
    volume = read_volume(folder)
    assert volume.array.shape == (4, 128, 128)
    assert volume.spacing[0] == pytest.approx(2.5)
    hu = examples.ct.pixel_array.astype(np.float32) * float(examples.ct.RescaleSlope) + float(
        examples.ct.RescaleIntercept
    )
    # canonical: rows anterior->posterior, columns patient right->left; the example is axial LPS already
    np.testing.assert_allclose(volume.array[0], hu)
    np.testing.assert_allclose(volume.array[3], hu)


def test_dicom_multiframe_rt_dose():
    volume = read_volume(examples.get_path("rt_dose"))
    assert volume.array.shape == (15, 10, 10)
    assert volume.array.max() == pytest.approx(
        examples.rt_dose.pixel_array.max() * float(examples.rt_dose.DoseGridScaling), rel=1e-5
    )


def test_nifti_reoriented_to_canonical(tmp_path, seed):
    data = np.random.default_rng(seed).random((6, 7, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0])), tmp_path / "ras.nii.gz")
    flipped = np.diag([-1.0, 2.0, 3.0, 1.0])
    flipped[0, 3] = 5.0  # same voxels in space, x axis stored reversed (LAS)
    nib.save(nib.Nifti1Image(data[::-1].copy(), flipped), tmp_path / "las.nii.gz")
    a, b = read_volume(tmp_path / "ras.nii.gz"), read_volume(tmp_path / "las.nii.gz")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.array, data.transpose(2, 1, 0)[:, ::-1, ::-1])
    assert a.spacing == (3.0, 2.0, 1.0)


def test_prepare_real_files_and_bad_inputs(tmp_path):
    good = dicom_series(tmp_path / "good", [0.0, 2.5, 5.0])
    mixed = dicom_series(tmp_path / "mixed", [0.0, 2.5, 5.0], orientation=[0, 1, 0, 0, 0, 1])
    nopixel = copy.deepcopy(examples.ct)
    del nopixel.PixelData
    nopixel.save_as(good / "zz_report.dcm")  # a non-image file inside a good series
    nopixel.save_as(tmp_path / "nopixel.dcm")
    nifti = tmp_path / "t1.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 9)).astype(np.float32) * 500, np.eye(4)),
        nifti,
    )
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(nifti.read_bytes()[: len(gzip.compress(b"x" * 10)) + 200])
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((4, 8, 8), np.nan, dtype=np.float32))
    entries = [
        StudyEntry(
            "ct-ok", [ScanEntry(str(good)), ScanEntry(str(mixed))], "Normal chest.", {"nodule": 0}, "CT"
        ),
        StudyEntry(
            "mr-ok", [ScanEntry(str(nifti), "MR"), ScanEntry(str(truncated), "MR")], "T1.", {"nodule": 1}
        ),
        StudyEntry("no-pixels", [ScanEntry(str(tmp_path / "nopixel.dcm"))], "x", {}),
        StudyEntry("nan", [ScanEntry(str(nan), spacing=(1, 1, 1))], "x", {}),
        StudyEntry("empty", [], "x", {}),
        StudyEntry("no-report", [ScanEntry(str(nifti))], None, {}),
        StudyEntry("missing", [ScanEntry(str(tmp_path / "nowhere.nii.gz"))], "x", {}),
    ]
    config = no_resample(PrepareConfig(grid=(64, 64), studies_per_shard=3))
    index = prepare(entries, tmp_path / "out", config)
    assert index["num_studies"] == 2 and len(index["shards"]) == 3
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    reasons = {item["study_id"]: item["reason"] for item in report["studies"]}
    assert reasons == {
        "no-pixels": "no readable scan",
        "nan": "no readable scan",
        "empty": "empty study: no scans listed",
        "no-report": "missing report",
        "missing": "no readable scan",
    }
    files = {Path(item["file"]).name: item["reason"] for item in report["files"]}
    assert "mixed slice orientations" in files["mixed"]
    assert "without pixel data" in files["zz_report.dcm"] and "without pixel data" in files["nopixel.dcm"]
    assert "non-finite" in files["nan.npy"] and "no such file" in files["nowhere.nii.gz"]
    assert "cut.nii.gz" in files
    studies = stored(tmp_path / "out")
    meta, volume = studies["ct-ok"]
    assert volume.shape == (3, 64, 64) and meta["scans"][0]["modality"] == "CT"
    assert meta["scans"][0]["spacing"][0] == pytest.approx(2.5)
    assert studies["mr-ok"][0]["scans"][0]["shape"] == [9, 64, 64]


def test_prepare_resumes_deterministically(tmp_path):
    config = SIZES["tiny"]
    manifest = write_raw(tmp_path / "raw", replace(config, num_studies=5))
    settings = replace(synth_prepare_config(config), studies_per_shard=2)
    prepare(manifest, tmp_path / "a", settings)
    prepare(manifest, tmp_path / "b", settings, workers=2)
    # .lock names its holder and the second it was taken: not an output
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != ".lock")
    assert [p for p in names if p.endswith(".tar")] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # an unfinished shard (no side file) is redone; finished ones are not touched
    (tmp_path / "a" / "shard-000001.json").unlink()
    (tmp_path / "a" / "shard-000000.tar").write_bytes((tmp_path / "a" / "shard-000000.tar").read_bytes())
    before = (tmp_path / "a" / "shard-000000.tar").stat().st_mtime_ns
    prepare(manifest, tmp_path / "a", settings)
    assert (tmp_path / "a" / "shard-000000.tar").stat().st_mtime_ns == before
    assert (tmp_path / "a" / "shard-000001.tar").read_bytes() == (
        tmp_path / "b" / "shard-000001.tar"
    ).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        prepare(manifest, tmp_path / "a", replace(settings, dtype="uint16"))


def test_synth_raw_route_and_direct_route_give_the_same_studies(tmp_path, capsys):
    # hlip-synth --raw, then the hlip-prepare command it prints, against hlip-synth straight to
    # shards. 90 studies: study 89 of this corpus drew no sentence at all before reports were
    # guaranteed one, and hlip-prepare skipped it ("missing report") while the direct route kept it.
    corpus = ["--size", "tiny", "--modality", "CT", "--grid", "8", "8", "--num-studies", "90", "--quiet"]
    assert synth_main([str(tmp_path / "direct"), *corpus]) == 0
    assert synth_main([str(tmp_path / "raw"), "--raw", *corpus]) == 0
    next_step = capsys.readouterr().out.splitlines()[-1]
    assert next_step.startswith("next: hlip-prepare ")
    command = next_step.removeprefix("next: hlip-prepare ").replace("OUT", str(tmp_path / "prepared"))
    assert prepare_main([*command.split(), "--quiet"]) == 0
    assert json.loads((tmp_path / "prepared" / "skipped.json").read_text())["studies"] == []
    direct, prepared = stored(tmp_path / "direct"), stored(tmp_path / "prepared")
    assert sorted(direct) == sorted(prepared) and len(direct) == 90
    for study_id, (meta, volume) in direct.items():
        np.testing.assert_array_equal(volume, prepared[study_id][1])
        assert meta["report"].strip() and meta["report"] == prepared[study_id][0]["report"]
        assert meta["labels"] == prepared[study_id][0]["labels"]


def test_every_synthetic_report_has_text():
    for modality in ("CT", "MR"):
        config = replace(SIZES["tiny"], modality=modality, grid=(8, 8), num_studies=300)
        assert all(make_study(config, i)[0].report.strip() for i in range(config.num_studies))


def test_synth_is_seeded_and_reports_match_labels(tmp_path):
    config = replace(SIZES["tiny"], num_studies=40)
    a, b = make_study(config, 7), make_study(config, 7)
    assert a[0].report == b[0].report and all(np.array_equal(x.array, y.array) for x, y in zip(a[1], b[1]))
    assert (
        make_study(replace(config, seed=1), 7)[0].report != a[0].report
        or a[0].labels != make_study(replace(config, seed=1), 7)[0].labels
    )
    positives = np.array(
        [[make_study(config, i)[0].labels[n] for n in config.finding_names] for i in range(40)]
    )
    assert 0.2 < positives.mean() < 0.6  # findings are drawn independently with p = 0.4
    entry, volumes = make_study(config, 11)
    for name, present in entry.labels.items():
        if present:
            assert "No " not in entry.report or name not in entry.report.lower()


def test_synth_finding_shows_in_image():
    config = replace(SIZES["tiny"], finding_probability=1.0, noise=0.0)
    with_findings = make_study(config, 0)[1][0].array
    without = make_study(replace(config, finding_probability=0.0), 0)[1][0].array
    assert not np.array_equal(with_findings[: without.shape[0]], without[: with_findings.shape[0]])


def test_manifest_csv_and_cli(tmp_path, capsys):
    assert synth_main([str(tmp_path / "raw"), "--raw", "--num-studies", "3", "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "raw" / "manifest.jsonl").read_text().splitlines()]
    csv_path = tmp_path / "raw" / "manifest.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_id", "scans", "report", "labels", "modality"])
        for row in rows:
            scans = ";".join(s["path"] for s in row["scans"])
            writer.writerow([row["study_id"], scans, row["report"], json.dumps(row["labels"]), "MR"])
    assert [e.labels for e in read_manifest(csv_path)] == [r["labels"] for r in rows]
    assert (
        prepare_main(
            [
                str(csv_path),
                str(tmp_path / "out"),
                "--grid",
                "32",
                "32",
                "--modality",
                "MR",
                "--no-resample",
                "--quiet",
            ]
        )
        == 0
    )
    assert "3 studies" in capsys.readouterr().out
    assert prepare_main([str(tmp_path / "nowhere.txt"), str(tmp_path / "x"), "--quiet"]) == 2
    assert synth_main([str(tmp_path / "syn"), "--num-studies", "2", "--quiet"]) == 0
    assert json.loads((tmp_path / "syn" / "index.json").read_text())["num_studies"] == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-studies", "0"], "num_studies must be >= 1, got 0"),
        (["--finding-scale", "-1"], "finding_scale must be > 0, got -1.0"),
        (["--grid", "0", "8"], "grid sizes must be >= 1, got (0, 8)"),
    ],
)
def test_synth_refuses_bad_settings_by_name(tmp_path, capsys, flags, message):
    assert synth_main([str(tmp_path / "out"), *flags, "--quiet"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
