"""Reliability, round 3: header spacings are never made up, a prepare that stores nothing fails,
pool workers do not outlive their parent."""

from __future__ import annotations

import copy
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import examples

from hlip_fast.data.cli import prepare_main
from hlip_fast.data.volumes import read_volume

TESTS = Path(__file__).resolve().parents[1]


def nifti_with_pixdim(path: Path, axis: int, value: float, qform_code: int = 0) -> Path:
    """A valid ``.nii.gz`` whose stored ``pixdim[axis]`` is ``value`` and whose spacing comes from
    pixdim (no sform): nibabel would fix both on save, so the bytes are written after."""
    image = nib.Nifti1Image(
        np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.diag([0.7, 0.7, 2.0, 1])
    )
    image.header.set_sform(None, code=0)
    image.header.set_qform(None, code=qform_code)
    plain = path.with_suffix("")
    nib.save(image, plain)
    raw = bytearray(plain.read_bytes())
    raw[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)  # pixdim: 8 float32 at byte 76
    raw[252:256] = struct.pack("<hh", qform_code, 0)  # qform_code, sform_code (nibabel set both)
    path.write_bytes(gzip.compress(bytes(raw)))
    plain.unlink()
    return path


@pytest.mark.parametrize(("value", "qform_code"), [(0.0, 0), (0.0, 1), (-2.0, 1), (float("nan"), 0)])
def test_a_nifti_slice_spacing_of_zero_negative_or_nan_is_an_error_naming_the_field(
    tmp_path, value, qform_code
):
    path = nifti_with_pixdim(tmp_path / "scan.nii.gz", 3, value, qform_code)
    with pytest.raises(ValueError, match=rf"scan\.nii\.gz: pixdim\[3\] is {value}: not a usable voxel size"):
        read_volume(path)
    assert read_volume(nifti_with_pixdim(tmp_path / "good.nii.gz", 3, 2.0, qform_code)).spacing[0] == 2.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ds: setattr(ds, "PixelSpacing", [0, 0.66]), r"PixelSpacing \(0028,0030\) is 0"),
        (lambda ds: setattr(ds, "PixelSpacing", [0.66, -1]), r"PixelSpacing \(0028,0030\) is -1"),
        (lambda ds: setattr(ds, "SpacingBetweenSlices", 0), r"SpacingBetweenSlices \(0018,0088\) is 0"),
        (
            lambda ds: (delattr(ds, "SpacingBetweenSlices"), setattr(ds, "SliceThickness", -5)),
            "SliceThickness .* is -5",
        ),
        (
            lambda ds: (delattr(ds, "SpacingBetweenSlices"), delattr(ds, "SliceThickness")),
            "one slice without",
        ),
    ],
)
def test_dicom_spacings_are_never_replaced_by_a_default(tmp_path, edit, message):
    ds = copy.deepcopy(examples.ct)
    edit(ds)
    ds.save_as(tmp_path / "slice.dcm")
    with pytest.raises(ValueError, match=rf"slice\.dcm: {message}"):
        read_volume(tmp_path / "slice.dcm")


def test_a_study_with_a_made_up_spacing_is_skipped_and_a_prepare_that_stores_nothing_fails(tmp_path, capsys):
    scan = nifti_with_pixdim(tmp_path / "zero.nii.gz", 3, 0.0)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"study_id": "s0", "scans": [str(scan)], "report": "r."}) + "\n")
    out = tmp_path / "out"
    assert prepare_main([str(manifest), str(out), "--grid", "32", "32", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert f"{out}: no study was stored (1 skipped" in err
    skipped = json.loads((out / "skipped.json").read_text())
    assert "pixdim[3] is 0.0" in json.dumps(skipped)


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="counts processes through /proc (Linux)")
def test_pool_workers_exit_when_their_parent_is_killed(tmp_path):
    """A parent running the prepare pool (2 busy workers) is SIGKILLed: its workers and the
    resource tracker are gone within a few seconds."""
    script = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from helpers import sleep_then_echo\n"
        "from hlip_fast.data.worker_pool import in_order\n"
        "list(in_order(sleep_then_echo, list(range(8)), 2, lambda job, why: None))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(children := _children(parent.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)  # 2 workers and the resource tracker
        assert len(children) >= 3, children
        time.sleep(1)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while (alive := {p for p in children if Path(f"/proc/{p}").exists()}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"{len(alive)} of {len(children)} children outlived their parent"
    finally:
        parent.kill()
        for pid in _children(parent.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fsdp"], "--fsdp shards the model across the processes of a torchrun launch"),
        (
            ["--attn-backend", "fastest"],
            "--attn-backend: unknown attention backend 'fastest'; known: auto, flash",
        ),
        (["--attn-backend", "xformers"], "--attn-backend: attention backend 'xformers' is unavailable here"),
        (["--device", "cuda:7"], "--device 'cuda:7': no CUDA device is available here"),
        (["--device", "tpu"], "--device 'tpu': auto (the GPU when there is one), cpu, cuda or cuda:N"),
    ],
)
def test_flags_the_environment_cannot_serve_are_refused_in_config_checking(monkeypatch, flags, message):
    """Before any model, text tower or batch: load_config itself refuses, naming the flag."""
    from hlip_fast.train.cli import load_config

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="invalid training config") as refused:
        load_config(["--train-data", "nowhere", "--text-model", "tiny", *flags])
    assert message in str(refused.value)


def test_dtype_and_device_are_checked_at_the_encoder_boundary():
    import torch

    from hlip_fast import create_model, pack_studies

    encoder = create_model("vit_tiny_multiscan_h2").eval()
    batch = pack_studies([[torch.randn(16, 32, 32, dtype=torch.float64)]], (4, 8, 8), study_ids=["s7"])
    with pytest.raises(
        ValueError, match=r"study 's7', scan 0: volumes of dtype torch.float64; the model's weights"
    ):
        encoder(batch)
    batch = pack_studies([[torch.randn(16, 32, 32, device="meta")]], (4, 8, 8), study_ids=["s7"])
    with pytest.raises(ValueError, match=r"is on meta, the model on cpu: move it with batch.to\(device\)"):
        encoder(batch)


def test_embedding_a_folder_of_empty_study_folders_names_them(tmp_path):
    from hlip_fast.data.sources import folder_manifest

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path}: none of its 2 study folders holds a scan .*: a, b"):
        folder_manifest(tmp_path)
