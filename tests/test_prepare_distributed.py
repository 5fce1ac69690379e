"""Preparing across machines: ``--part I/K`` with ``merge``, and a Dask cluster (a LocalCluster of
processes on loopback), each giving the same bytes as one local process."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import helpers
import pytest
from helpers import DiesOn

from hlip_fast.data import prepare
from hlip_fast.data.cli import prepare_main
from hlip_fast.data.parts import Part, merge
from hlip_fast.data.shard_set import build_shards
from hlip_fast.data.synth import SIZES, _SynthStudy, synth_prepare_config, write_raw

SMALL = replace(SIZES["tiny"], num_studies=7, max_scans=2)


def synth_jobs(config=SMALL, per_shard: int = 2):
    settings = replace(synth_prepare_config(config), studies_per_shard=per_shard)
    fingerprints = [f"study-{i}" for i in range(config.num_studies)]
    return settings, list(range(config.num_studies)), fingerprints, _SynthStudy(config, settings)


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every file a preparation leaves that a reader uses (not the lock)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.suffix in (".tar", ".json")}


def build(root: Path, **options) -> dict:
    settings, jobs, prints, run = synth_jobs()
    common = {"workers": 1, "console": None, "rebuild": False, "desc": "test"}
    return build_shards(root, settings, jobs, prints, options.pop("run", run), **{**common, **options})


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("whole")
    build(root)
    return root


def test_part_specs_split_the_shards_contiguously_and_bad_ones_are_refused():
    assert [list(Part(i, 3).shards(4)) for i in (1, 2, 3)] == [[0], [1], [2, 3]]
    assert [len(Part(i, 5).shards(2)) for i in range(1, 6)] == [0, 0, 1, 0, 1]
    assert sum((list(Part(i, 7).shards(100)) for i in range(1, 8)), []) == list(range(100))
    for bad in ("3/2", "0/2", "2", "a/b", "-1/2"):
        with pytest.raises(ValueError, match=rf"--part '{bad}'"):
            Part.parse(bad)


def test_parts_merged_are_the_bytes_of_a_whole_run(whole, tmp_path):
    parts = [tmp_path / f"part{i}" for i in (1, 2, 3)]
    for i, folder in enumerate(parts, 1):
        index = build(folder, part=Part(i, 3))
        assert len(index["shards"]) == len(Part(i, 3).shards(4))
    merged = merge(tmp_path / "merged", list(reversed(parts)))
    assert merged["num_studies"] == SMALL.num_studies
    assert folder_bytes(tmp_path / "merged") == folder_bytes(whole)
    assert all(json.loads((p / "prepare_config.json").read_text())["part"][1] == 3 for p in parts)


def test_bad_merges_are_refused_naming_the_folder(whole, tmp_path):
    parts = {i: tmp_path / f"part{i}" for i in (1, 2)}
    for i, folder in parts.items():
        build(folder, part=Part(i, 2))
    other = tmp_path / "other-grid"
    settings, jobs, prints, run = synth_jobs()
    build_shards(
        other, replace(settings, grid=(16, 16)), jobs, prints, run,
        workers=1, console=None, rebuild=False, desc="test", part=Part(2, 2),
    )  # fmt: skip
    cases = {
        "overlap": ([parts[1], parts[1], parts[2]], rf"{parts[1]} and {parts[1]} overlap"),
        "settings": ([parts[1], other], rf"{other}: prepared from another manifest or with other settings"),
        "missing": ([parts[1]], r"parts 2/2 are missing"),
        "whole": ([parts[1], whole], rf"{whole}: prepared whole"),
    }
    for name, (folders, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            merge(tmp_path / f"out-{name}", folders)
        assert not (tmp_path / f"out-{name}" / "index.json").exists()
    (parts[2] / "index.json").unlink()
    with pytest.raises(ValueError, match=rf"{parts[2]}: this part has not finished"):
        merge(tmp_path / "out-unfinished", list(parts.values()))
    build(parts[2], part=Part(2, 2))  # resumes: the shards are kept, the index is written again
    assert folder_bytes(merge(tmp_path / "out", list(parts.values())) and tmp_path / "out") == folder_bytes(
        whole
    )
    with pytest.raises(ValueError, match=r"--part 2/2 -> 1/2"):
        build(parts[2], part=Part(1, 2))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return write_raw(tmp_path_factory.mktemp("raw"), replace(SMALL, num_studies=4))


def test_cli_parts_then_merge_equal_one_run(raw, tmp_path, capsys):
    flags = ["--grid", "32", "32", "--modality", "MR", "--no-resample", "--studies-per-shard", "1", "--quiet"]
    assert prepare_main([str(raw), str(tmp_path / "one"), *flags]) == 0
    for i in (1, 2):
        assert prepare_main([str(raw), str(tmp_path / f"p{i}"), *flags, "--part", f"{i}/2"]) == 0
    assert (
        prepare_main(["merge", str(tmp_path / "all"), str(tmp_path / "p1"), str(tmp_path / "p2"), "--quiet"])
        == 0
    )
    assert folder_bytes(tmp_path / "all") == folder_bytes(tmp_path / "one")
    assert "4 studies" in capsys.readouterr().out
    for bad in (["--part", "3/2"], ["--scheduler", "tcp://127.0.0.1:1"]):
        with pytest.raises(SystemExit) as stop:
            prepare_main([str(raw), str(tmp_path / "bad"), *flags, *bad])
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--part '3/2': expected I/K" in err and "--scheduler needs --executor dask" in err
    assert not (tmp_path / "bad").exists()


# --- Dask -----------------------------------------------------------------------------------

distributed = pytest.importorskip("distributed", reason="the dask extra (hlip-fast[dask]) is not installed")


@pytest.fixture(scope="module")
def client():
    import cloudpickle
    import dask

    for module in (sys.modules[__name__], helpers):  # workers cannot import tests/
        cloudpickle.register_pickle_by_value(module)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
        )
        with cluster, distributed.Client(cluster) as client:
            yield client


def test_dask_gives_the_bytes_of_one_local_process(whole, client, tmp_path):
    build(tmp_path / "dask", executor=client)
    assert folder_bytes(tmp_path / "dask") == folder_bytes(whole)


def test_dask_retries_a_killed_worker_and_skips_a_study_that_always_kills(whole, client, tmp_path):
    settings, jobs, prints, run = synth_jobs()
    once = DiesOn(run, target=3, marker=tmp_path / "died-once")
    build(tmp_path / "once", executor=client, run=once)
    assert (tmp_path / "died-once").exists()
    assert folder_bytes(tmp_path / "once") == folder_bytes(whole)
    assert not list((tmp_path / "once").glob("*.tmp"))
    index = build(tmp_path / "always", executor=client, run=DiesOn(run, target=3, marker=None))
    report = json.loads((tmp_path / "always" / "skipped.json").read_text())
    assert [s["study_id"] for s in report["studies"]] == ["study #3"]
    assert "died each time" in report["studies"][0]["reason"]
    assert index["num_studies"] == SMALL.num_studies - 1


def test_dask_cli_on_a_scheduler_and_an_unreachable_one(raw, client, tmp_path, capsys, monkeypatch):
    flags = ["--grid", "32", "32", "--modality", "MR", "--no-resample", "--studies-per-shard", "1"]
    assert prepare_main([str(raw), str(tmp_path / "one"), *flags, "--quiet"]) == 0
    address = client.scheduler.address
    command = [str(raw), str(tmp_path / "dask"), *flags, "--no-progress", "--executor", "dask"]
    assert prepare_main([*command, "--scheduler", address]) == 0
    assert folder_bytes(tmp_path / "dask") == folder_bytes(tmp_path / "one")
    lines = capsys.readouterr().out
    assert "preparing: 4/4 studies" in lines and "studies/s" in lines
    from hlip_fast.data import dask_executor

    monkeypatch.setattr(dask_executor, "CONNECT_TIMEOUT_S", 2)
    assert prepare_main([*command, "--scheduler", "tcp://127.0.0.1:9"]) != 0
    err = capsys.readouterr().err
    assert "--scheduler tcp://127.0.0.1:9: no Dask scheduler answered within 2 s" in err
    assert len(err.strip().splitlines()) == 1


def test_prepare_api_takes_a_client(raw, client, tmp_path):
    settings = replace(synth_prepare_config(SMALL), studies_per_shard=3)
    index = prepare(raw, tmp_path / "api", settings, executor=client)
    assert index == prepare(raw, tmp_path / "local", settings)
