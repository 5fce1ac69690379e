"""Shards read through fsspec from a loopback HTTP server (and as ``file://`` URLs and brace
patterns) equal the local copy, also when a connection drops in the middle of a shard; a
connection that keeps dropping is reported study by study, never silently shortened."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from loopback_http import LoopbackServer

from hlip_fast import locations
from hlip_fast.data import PrepareConfig
from hlip_fast.data.batching import BatchConfig
from hlip_fast.data.reader import RawStudies, StudyBatches, cpu_loader
from hlip_fast.data.shards import read_index, shard_infos
from hlip_fast.data.sources import open_studies
from hlip_fast.data.synth import SIZES, synthesize
from hlip_fast.errors import DataError

PATCH = (4, 8, 8)
PATTERN = "shard-{000000..000002}.tar"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    synthesize(root, replace(SIZES["tiny"], num_studies=10, max_scans=3), PrepareConfig(studies_per_shard=4))
    return root


@pytest.fixture
def server(corpus, monkeypatch):
    monkeypatch.setenv("HLIP_FAST_REMOTE_ATTEMPTS", "3")
    monkeypatch.setenv("HLIP_FAST_REMOTE_BACKOFF", "0.01")
    with LoopbackServer(corpus) as running:
        yield running


def stored(source, **kwargs) -> list[tuple[str, str, bytes]]:
    return [(raw.key, raw.study_id, raw.blob) for raw in RawStudies(source, **kwargs)]


@pytest.mark.parametrize(
    "form",
    ["folder URL", "folder URL/", "index URL", "pattern URL", "file URL", "local pattern", "local index"],
)
def test_every_form_of_a_source_reads_what_the_local_copy_holds(corpus, server, form):
    source = {
        "folder URL": server.url().rstrip("/"),
        "folder URL/": server.url(),
        "index URL": server.url("index.json"),
        "pattern URL": server.url(PATTERN),
        "file URL": f"file://{corpus}",
        "local pattern": f"{corpus}/{PATTERN}",
        "local index": str(corpus / "index.json"),
    }[form]
    assert stored(source) == stored(corpus)
    assert [i.keys for i in shard_infos(source)] == [i.keys for i in shard_infos(corpus)]
    local, remote = read_index(corpus), read_index(source)
    assert remote["config"] == local["config"] and remote["num_studies"] == local["num_studies"] == 10
    assert [s["studies"] for s in remote["shards"]] == [s["studies"] for s in local["shards"]]
    assert [r.study_id for r in open_studies(source)] == [r.study_id for r in open_studies(corpus)]


def test_a_single_remote_shard_is_checked_against_its_side_file(corpus, server):
    one = server.url("shard-000001.tar")
    assert stored(one) == stored(corpus / "shard-000001.tar")
    assert shard_infos(one)[0].keys is not None  # from shard-000001.json, fetched beside it


def batches_of(source, workers: int) -> list[tuple]:
    reader = StudyBatches(RawStudies(source, train=True, seed=3), batching=BatchConfig(PATCH, 300))
    return [
        (b.study_ids, b.studies.patches, b.studies.layout.level("scan").cu_seqlens, b.reports)
        for b in cpu_loader(reader, num_workers=workers)
    ]


def test_batches_over_http_equal_the_local_batches_across_a_dropped_connection(corpus, server, monkeypatch):
    monkeypatch.setattr(locations, "READ_BLOCK", 16 << 10)  # many range requests per shard
    server.drops["shard-000001.tar"] = 1
    want, got = batches_of(corpus, 2), batches_of(server.url(PATTERN), 2)
    assert server.dropped and server.dropped[0][0] == "shard-000001.tar"  # it did happen, mid-shard
    assert 0 < server.dropped[0][1] <= (corpus / "shard-000001.tar").stat().st_size // 2
    assert len(want) == len(got) and sum(len(b[0]) for b in got) == 10
    for (ids, patches, cu, reports), (ids2, patches2, cu2, reports2) in zip(want, got):
        assert ids == ids2 and reports == reports2
        assert torch.equal(patches, patches2) and torch.equal(cu, cu2)


def test_a_connection_that_keeps_dropping_is_reported_study_by_study(corpus, server):
    server.drops["shard-000001.tar"] = 10**6
    url = server.url("shard-000001.tar")
    with pytest.raises(DataError, match=r"failed after 3 attempt\(s\)") as caught:
        stored(server.url())
    assert url in str(caught.value)
    reader = RawStudies(server.url(), on_error="skip")
    read = [raw.study_id for raw in reader]
    lost = [s["study_id"] for s in read_index(corpus)["shards"][1]["studies"]]
    assert sorted(r["study_id"] for r in reader.skipped) == sorted(lost) and len(lost) == 4
    assert sorted(read + lost) == sorted(r.study_id for r in RawStudies(corpus))
    assert all(url in r["reason"] for r in reader.skipped)


def test_a_missing_shard_is_named_and_not_retried(corpus, server):
    server.hidden.add("shard-000002.tar")
    with pytest.raises(DataError, match="shard-000002.tar") as caught:
        stored(server.url())
    assert "no such file or object" in str(caught.value)
    asked = [method for method, name, _ in server.requests if name == "shard-000002.tar"]
    assert asked in (["HEAD"], ["HEAD", "GET"])  # fsspec's size request, once: no retries


def test_a_busy_server_is_retried_and_a_closed_one_is_named(corpus, server):
    server.unavailable["index.json"] = 2  # 503 twice, then the index
    assert read_index(server.url()) == read_index(corpus)
    with LoopbackServer(corpus) as gone:
        url = gone.url()
    with pytest.raises(locations.RemoteReadError, match=r"index.json: size request failed after 3 attempt"):
        read_index(url)  # nothing listens there any more: refused, retried, named


def test_a_server_that_ignores_ranges_is_refused_not_misread(server, monkeypatch):
    monkeypatch.setattr(locations, "READ_BLOCK", 16 << 10)
    server.ignore_ranges = True
    with pytest.raises(DataError, match="ignores range requests"):
        stored(server.url())


def test_brace_patterns_and_locations():
    assert locations.expand("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert locations.expand("gs://b/{a,b}/x.tar") == ["gs://b/a/x.tar", "gs://b/b/x.tar"]
    assert locations.join("s3://b/data/", "shard-0.tar") == "s3://b/data/shard-0.tar"
    assert locations.with_suffix("https://h/d.v1/shard-0.tar", ".json") == "https://h/d.v1/shard-0.json"
    assert str(locations.local("file:///tmp/x.tar")) == "/tmp/x.tar" and not locations.is_url("C:\\d")


def test_retry_settings_come_from_the_environment_and_are_checked(monkeypatch):
    monkeypatch.setenv("HLIP_FAST_REMOTE_ATTEMPTS", "2")
    monkeypatch.setenv("HLIP_FAST_REMOTE_BACKOFF", "0")
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(locations.RemoteReadError, match=r"http://x/a.tar: read failed after 2 attempt"):
        locations.retrying("http://x/a.tar", "read", flaky)
    assert len(calls) == 2
    monkeypatch.setenv("HLIP_FAST_REMOTE_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="HLIP_FAST_REMOTE_ATTEMPTS='many'"):
        locations.RetryPolicy()


def test_a_missing_object_store_package_is_named():
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"s3fs \(hlip-fast\[s3\]\)"):
            locations.filesystem("s3://bucket/shards/index.json")
    else:
        pytest.skip("s3fs is installed")


def test_dali_refuses_urls_with_a_way_out(server):
    pytest.importorskip("nvidia.dali", reason="DALI not installed (pip install hlip-fast[dali])")
    from hlip_fast.data.dali import DaliStudies

    with pytest.raises(ValueError, match="local shards only.*--reader cpu or nvcomp"):
        DaliStudies(server.url())
