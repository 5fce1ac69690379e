"""prepare under bad manifests, absurd files, dying workers, an edited manifest and a full disk."""

from __future__ import annotations

import copy
import gzip
import json
import re
import tracemalloc
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import DiesOn
from pydicom import examples

from hlip_fast.data import PrepareConfig, ScanEntry, StudyEntry, prepare
from hlip_fast.data.cli import prepare_main, synth_main
from hlip_fast.data.reader import RawStudies
from hlip_fast.data.shard_set import build_shards
from hlip_fast.data.synth import SIZES, _SynthStudy, synth_prepare_config, write_raw
from hlip_fast.data.volumes import read_volume
from hlip_fast.folder_lock import FolderLock

TINY = replace(SIZES["tiny"], num_studies=5, max_scans=2)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A tiny raw corpus: NIfTI files and ``manifest.jsonl``."""
    return write_raw(tmp_path_factory.mktemp("raw"), TINY)


def tars(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


def rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def write_rows(path: Path, items: list) -> Path:
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in items) + "\n")
    return path


def test_bad_manifest_rows_are_all_named_before_any_work(raw, tmp_path, capsys):
    good = rows(raw)
    scan = str(raw.parent / good[0]["scans"][0]["path"])
    bad = [
        good[0],
        {**good[1], "labels": {"mass": "yes"}},
        {**good[2], "labels": {"mass": -1}},
        {**good[3], "scans": [{"path": scan, "spacing": [0, 1, 1]}]},
        {**good[4], "scans": [{"path": scan, "spacing": [1e5, 1, 1]}]},
        {"study_id": "neg", "scans": [{"path": scan, "spacing": [-2, 1, 1]}], "report": "x"},
        {"study_id": "num-report", "scans": [scan], "report": 42},
        {"study_id": ["a"], "scans": [scan], "report": "x"},
        '{"study_id": "broken", ',
        {**good[0]},
    ]
    manifest = write_rows(tmp_path / "bad.jsonl", bad)
    assert prepare_main([str(manifest), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: bad rows, fix them first (9 problems)" in err and "Traceback" not in err
    for line, fragment in [
        (2, "not 0/1/true/false"),
        (3, "use null for an unknown finding"),
        (4, "spacing [0, 1, 1] is not three finite voxel sizes"),
        (5, "spacing [100000.0, 1, 1]"),
        (6, "spacing [-2, 1, 1]"),
        (7, "report must be text, got 42"),
        (8, "study_id must be non-empty text or a number"),
        (9, "invalid JSON"),
        (10, "already on"),
    ]:
        assert f"bad.jsonl:{line}" in err and fragment in err, (line, fragment, err)
    assert not (tmp_path / "out" / "index.json").exists()


def test_non_utf8_and_csv_errors_name_the_line(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"study_id,scans,report\na,x.nii,fine\nb,y.nii,caf\xe9\n")
    assert prepare_main([str(manifest), str(tmp_path / "out"), "--quiet"]) == 2
    assert "m.csv:3:12: not UTF-8 text (byte 0xe9)" in capsys.readouterr().err
    manifest.write_text("id,files\na,x.nii\n")
    assert prepare_main([str(manifest), str(tmp_path / "out"), "--quiet"]) == 2
    assert "m.csv:1: missing column(s) ['scans', 'study_id']" in capsys.readouterr().err


def nifti_header(shape, dtype=np.float32) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms((1.0,) * len(shape))
    return header.binaryblock + b"\0" * 4


def test_header_sizes_are_checked_before_allocation(tmp_path):
    small_gz = tmp_path / "liar.nii.gz"
    small_gz.write_bytes(gzip.compress(nifti_header((1024, 1024, 1024))))  # 4 GiB declared
    assert small_gz.stat().st_size < 120
    plain = tmp_path / "cut.nii"
    plain.write_bytes(nifti_header((64, 64, 64)) + b"\0" * 100)
    npy = tmp_path / "cut.npy"
    with open(npy, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (90, 90, 90)}
        )
    half = tmp_path / "half.nii.gz"
    half.write_bytes(gzip.compress(nifti_header((512, 512, 512))))  # under the cap, over what 90 bytes hold
    tracemalloc.start()
    try:
        for path, message in [
            (small_gz, "over the cap of 536,870,912"),
            (half, "truncated or damaged: its header declares shape (512, 512, 512)"),
            (plain, "truncated or damaged"),
            (npy, "truncated: its header declares 2,916,000 bytes"),
        ]:
            with pytest.raises(ValueError, match=re.escape(message)) as caught:
                read_volume(path)
            assert str(path) in str(caught.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB allocated before refusing"


def test_absurd_spacing_and_missing_pixel_spacing_are_named(tmp_path):
    ds = copy.deepcopy(examples.ct)
    del ds.PixelSpacing
    ds.save_as(tmp_path / "nospacing.dcm")
    volume = np.zeros((10, 32, 32), dtype=np.float32)
    np.save(tmp_path / "thin.npy", volume)
    entries = [
        StudyEntry("dicom", [ScanEntry(str(tmp_path / "nospacing.dcm"))], "r.", {}, "CT"),
        StudyEntry(
            "coarse", [ScanEntry(str(tmp_path / "thin.npy"), spacing=(60.0, 1.0, 1.0))], "r.", {}, "CT"
        ),
    ]
    config = PrepareConfig(grid=(32, 32), max_voxels=100_000)
    prepare(entries, tmp_path / "out", config)
    files = {
        Path(f["file"]).name: f["reason"]
        for f in json.loads((tmp_path / "out" / "skipped.json").read_text())["files"]
    }
    assert "DICOM without PixelSpacing (0028,0030)" in files["nospacing.dcm"]
    assert "resampling from spacing (60.0, 1.0, 1.0) mm to (3.0, 1.0, 1.0) mm" in files["thin.npy"]
    assert "shape (200, 32, 32) is 204,800 voxels" in files["thin.npy"]


def synth_jobs(config):
    settings = replace(synth_prepare_config(config), studies_per_shard=2)
    fingerprints = [f"study-{i}" for i in range(config.num_studies)]
    return settings, list(range(config.num_studies)), fingerprints, _SynthStudy(config, settings)


def test_a_killed_worker_is_retried_and_a_fatal_study_is_skipped(tmp_path):
    settings, jobs, prints, run = synth_jobs(TINY)
    common = {"workers": 2, "console": None, "rebuild": False, "desc": "test"}
    build_shards(tmp_path / "clean", settings, jobs, prints, run, **{**common, "workers": 1})
    once = DiesOn(run, target=3, marker=tmp_path / "died-once")
    build_shards(tmp_path / "once", settings, jobs, prints, once, **common)
    assert (tmp_path / "died-once").exists() and tars(tmp_path / "once") == tars(tmp_path / "clean")
    build_shards(tmp_path / "always", settings, jobs, prints, DiesOn(run, target=3), **common)
    report = json.loads((tmp_path / "always" / "skipped.json").read_text())
    assert [s["study_id"] for s in report["studies"]] == ["study #3"]
    assert "died twice" in report["studies"][0]["reason"]
    assert len(list(RawStudies(tmp_path / "always"))) == TINY.num_studies - 1


def test_an_edited_manifest_is_refused_or_rebuilt_shard_by_shard(raw, tmp_path):
    settings = replace(synth_prepare_config(TINY), studies_per_shard=2)
    out = tmp_path / "out"
    prepare(raw, out, settings)
    edited = rows(raw)
    edited[2]["report"] = "An edited report."
    manifest = write_rows(raw.parent / "edited.jsonl", edited)
    before = {name: (out / name).stat().st_mtime_ns for name in tars(out)}
    with pytest.raises(
        ValueError, match=r"another manifest .*manifest rows changed .*shard-000001.tar.*--rebuild"
    ):
        prepare(manifest, out, settings)
    with pytest.raises(ValueError, match=r"grid: \[32, 32\] -> \[16, 16\]"):
        prepare(raw, out, replace(settings, grid=(16, 16)))
    prepare(manifest, out, settings, rebuild=True)
    after = {name: (out / name).stat().st_mtime_ns for name in tars(out)}
    assert [n for n in before if before[n] != after[n]] == ["shard-000001.tar"]
    prepare(manifest, tmp_path / "fresh", settings)
    assert tars(out) == tars(tmp_path / "fresh")
    assert {r.study_id: r.meta["report"] for r in RawStudies(out)}[
        edited[2]["study_id"]
    ] == "An edited report."


def test_a_full_disk_stops_with_a_message_and_loses_nothing_done(small_disk, tmp_path, capsys):
    out = small_disk.mount(300_000) / "shards"
    args = [str(out), "--num-studies", "12", "--studies-per-shard", "4", "--quiet"]
    assert synth_main(args) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and str(out) in err and "Traceback" not in err
    done = sorted(out.glob("*.tar"))
    assert done and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    for shard in done:
        assert len(list(RawStudies(shard))) == 4  # finished shards are whole and verified
    small_disk.resize(20_000_000)
    assert synth_main(args) == 0
    assert synth_main([str(tmp_path / "clean"), *args[1:]]) == 0
    assert tars(out) == tars(tmp_path / "clean")


def test_a_second_writer_is_refused(raw, tmp_path, capsys):
    with FolderLock(tmp_path / "out", "another hlip-prepare"):
        assert prepare_main([str(raw), str(tmp_path / "out"), "--grid", "32", "32", "--quiet"]) == 2
    assert "is in use by another hlip-prepare (pid" in capsys.readouterr().err
