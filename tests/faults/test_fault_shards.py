"""Damaged shards and indexes: every byte flip and truncation is either harmless or reported
naming the shard, and in skip mode every study is either read intact or counted as skipped."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import lz4.block
import numpy as np
import pytest
from damage import copy_corpus, flip, truncate

from hlip_fast.data.batching import BatchConfig
from hlip_fast.data.reader import RawStudies, StudyBatches, cpu_loader
from hlip_fast.data.shards import ShardWriter, read_index, read_shard
from hlip_fast.errors import DataError, IntegrityError
from hlip_fast.integrity import with_checksum

VICTIM = "shard-000001.tar"


def pristine(root: Path) -> dict[str, tuple]:
    return {r.key: (r.meta, r.blob, r.sizes.tobytes()) for r in RawStudies(root)}


def all_keys(root: Path) -> set[str]:
    return {s["key"] for shard in read_index(root)["shards"] for s in shard["studies"]}


def check_outcome(root: Path, original: dict[str, tuple]) -> str:
    """Read ``root`` in both modes; assert nothing is lost silently; say what happened."""
    try:
        got = pristine(root)
    except DataError as error:
        assert VICTIM in str(error), error
        raised = True
    else:
        assert got == original, "a damaged shard was read without an error"
        raised = False
    reader = RawStudies(root, on_error="skip")
    read = {r.key: (r.meta, r.blob, r.sizes.tobytes()) for r in reader}
    assert all(read[k] == original[k] for k in read), "a study was read with damaged content"
    skipped = {r["key"] for r in reader.skipped}
    assert set(read) | skipped == all_keys(root), "a study was lost without being counted"
    assert not set(read) & skipped
    assert all(VICTIM in r["reason"] and r["study_id"] for r in reader.skipped)
    assert raised or not skipped  # a loss always raises in raise mode (a raise without one: stray bytes)
    return "skipped" if skipped else "raised" if raised else "harmless"


def offsets(path: Path, rng: np.random.Generator) -> list[int]:
    """Bytes to damage: in every member's header and data, padding, and the end-of-archive blocks."""
    picks = []
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    for member in members:
        picks.append(member.offset + int(rng.integers(0, 512)))
        if member.size:
            picks.append(member.offset_data + int(rng.integers(0, member.size)))
    last = members[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    picks += [
        end + int(rng.integers(0, 1024)),
        members[0].offset_data + members[0].size,
    ]  # end marker, padding
    return sorted(set(picks))


def test_every_byte_flip_is_reported_or_harmless(shards, tmp_path, rng):
    original = pristine(shards)
    root = copy_corpus(shards, tmp_path / "c")
    victim = root / VICTIM
    clean = victim.read_bytes()
    outcomes = []
    for offset in offsets(victim, rng):
        victim.write_bytes(clean)
        flip(victim, offset, int(rng.integers(1, 256)))
        outcomes.append(check_outcome(root, original))
    # header and data flips lose a study; padding flips are harmless; end-marker flips raise
    assert {"skipped", "harmless"} <= set(outcomes) and outcomes.count("skipped") >= len(outcomes) // 2


def archive_end(path: Path) -> int:
    """Where the last member's data ends (tar's end-of-archive marker, two zero blocks, follows)."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def test_truncations_are_reported(shards, tmp_path, rng):
    original = pristine(shards)
    root = copy_corpus(shards, tmp_path / "c")
    victim = root / VICTIM
    clean = victim.read_bytes()
    marker_end = archive_end(victim) + 1024
    cuts = {0, 100, marker_end - 1} | {int(c) for c in rng.integers(1, marker_end, 8)}
    for cut in sorted(cuts):
        victim.write_bytes(clean)
        truncate(victim, cut)
        assert check_outcome(root, original) in ("skipped", "raised"), cut
    victim.write_bytes(clean)
    truncate(victim, marker_end)  # only tar's record padding after the end marker is gone
    assert check_outcome(root, original) == "harmless"


def test_a_flip_in_a_tar_header_no_longer_drops_the_rest_of_the_shard(shards, tmp_path):
    """The reported case: a flipped header byte used to end the shard silently (9 of 12 read)."""
    root = copy_corpus(shards, tmp_path / "c")
    with tarfile.open(root / VICTIM) as tar:
        second_study = [m for m in tar.getmembers() if m.name.endswith(".json")][1]
    flip(root / VICTIM, second_study.offset + 10)
    with pytest.raises(DataError, match=f"{VICTIM}: damaged tar header"):
        list(RawStudies(root))
    reader = RawStudies(root, on_error="skip")
    assert len(list(reader)) == 11 and [r["key"] for r in reader.skipped] == [second_study.name[:-5]]


@pytest.mark.parametrize("member", ["json", "lz4", "sizes"])
def test_a_flip_in_a_study_member_names_the_study_and_member(shards, tmp_path, member):
    root = copy_corpus(shards, tmp_path / "c")
    with tarfile.open(root / VICTIM) as tar:
        target = next(m for m in tar.getmembers() if m.name.endswith(f".{member}"))
    flip(root / VICTIM, target.offset_data + target.size // 2)
    key = target.name.partition(".")[0]
    study_id = next(
        s["study_id"] for sh in read_index(root)["shards"] for s in sh["studies"] if s["key"] == key
    )
    with pytest.raises(DataError, match=rf"{VICTIM}: study '{study_id}' \(key '{key}'\): checksum mismatch"):
        list(RawStudies(root))


def test_index_damage_and_disagreement(shards, tmp_path):
    root = copy_corpus(shards, tmp_path / "c")
    index_path = root / "index.json"
    clean = index_path.read_bytes()
    digit = clean.index(b'"tokens"') + 10
    while clean[digit + 1 : digit + 2].isdigit():
        digit += 1
    flip(index_path, digit, 0x01)  # the last digit of a token count: still valid JSON
    with pytest.raises(IntegrityError, match="index.json: checksum mismatch"):
        RawStudies(root)
    index_path.write_bytes(clean)
    index = read_index(root)
    # an index that leaves out a shard (its checksum recomputed: stale, not damaged)
    stale = {**index, "shards": index["shards"][:2]}
    index_path.write_text(json.dumps(with_checksum(stale)))
    with pytest.raises(DataError, match=r"shard-000002.tar is not listed in .*index.json"):
        RawStudies(root)
    index_path.write_bytes(clean)
    (root / "shard-000002.tar").unlink()
    with pytest.raises(
        DataError, match=r"index.json lists shard-000002.tar, but .*shard-000002.tar does not exist"
    ):
        RawStudies(root)


def test_a_single_shard_is_checked_against_its_side_file(shards, tmp_path):
    root = copy_corpus(shards, tmp_path / "c")
    side = root / VICTIM.replace(".tar", ".json")
    flip(side, side.read_bytes().index(b"study0000"), 0x02)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        RawStudies(root / VICTIM)


def batch_ids(batches) -> list[str]:
    return [s for b in batches for s in b.study_ids]


BATCHING = BatchConfig((4, 8, 8), 300)


def check_skip_and_raise(shards, tmp_path, loader_of) -> tuple[Path, str]:
    """One study of a copy of the corpus damaged in its slice data: ``loader_of(root, on_error)``
    leaves it out and records it with ``skip``, and raises its ``DataError`` with ``raise``
    (returned: the damaged corpus and the error's message)."""
    root = copy_corpus(shards, tmp_path / "c")
    with tarfile.open(root / VICTIM) as tar:
        lz4 = next(m for m in tar.getmembers() if m.name.endswith(".lz4"))
    flip(root / VICTIM, lz4.offset_data + 7)
    everything = [s["study_id"] for sh in read_index(root)["shards"] for s in sh["studies"]]
    loader = loader_of(root, "skip")
    read = batch_ids(loader)
    (record,) = loader.skipped
    assert sorted(read + [record["study_id"]]) == sorted(everything) and VICTIM in record["reason"]
    with pytest.raises(DataError) as caught:
        batch_ids(loader_of(root, "raise"))
    assert str(caught.value) == record["reason"]
    return root, str(caught.value)


def test_dataloader_workers_report_skips_and_errors_intact(shards, tmp_path):
    def loader_of(root, on_error):
        return cpu_loader(StudyBatches(RawStudies(root, on_error=on_error), batching=BATCHING), num_workers=2)

    assert "Traceback" not in check_skip_and_raise(shards, tmp_path, loader_of)[1]


def test_dali_reader_skips_or_names_a_damaged_study(shards, tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI not installed (pip install hlip-fast[dali])")
    from hlip_fast.data.dali import DaliBatches, DaliStudies

    def loader_of(root, on_error):
        return DaliBatches(DaliStudies(root, batch_size=3, on_error=on_error), batching=BATCHING)

    root, _ = check_skip_and_raise(shards, tmp_path, loader_of)
    threads = len(os.listdir("/proc/self/task"))
    try:
        list(DaliStudies(root, batch_size=3))
    except DataError as error:
        kept = error  # its traceback holds the reader's frames
    # DALI's threads ended with the error: a fork now (a DataLoader's workers) cannot deadlock.
    assert len(os.listdir("/proc/self/task")) == threads and VICTIM in str(kept)


def study_meta(study_id: str, depth: int) -> dict:
    """Metadata of a hand-made study: one scan of ``depth`` 8×8 uint8 slices."""
    scans = [{"shape": [depth, 8, 8]}]
    return {
        "study_id": study_id,
        "report": "r.",
        "labels": {},
        "dtype": "uint8",
        "grid": [8, 8],
        "scans": scans,
    }


def test_undecodable_slices_are_named_not_an_unpicklable_lz4_error(tmp_path):
    """Checksums intact but the LZ4 data invalid (a writer bug): named in the worker, both modes."""
    writer = ShardWriter(tmp_path / "bad.tar")
    writer.write("study00000000", study_meta("s0", depth=2), b"\xff" * 10, np.array([5, 5]))
    writer.close()
    batching = BatchConfig((1, 8, 8), 300)
    with pytest.raises(
        DataError, match=r"bad.tar: study 's0' \(key 'study00000000'\): cannot decode: LZ4BlockError"
    ):
        batch_ids(
            cpu_loader(StudyBatches(RawStudies(tmp_path / "bad.tar"), batching=batching), num_workers=1)
        )
    loader = cpu_loader(StudyBatches(RawStudies(tmp_path / "bad.tar", on_error="skip"), batching=batching), 1)
    assert batch_ids(loader) == [] and [r["study_id"] for r in loader.skipped] == ["s0"]


def test_a_study_key_stored_twice_is_reported_once_and_read_once(tmp_path):
    writer = ShardWriter(tmp_path / "dup.tar")
    blob = lz4.block.compress(bytes(64), store_size=False)
    for key in ("a", "b", "a"):
        writer.write(key, study_meta(key, depth=1), blob, np.array([len(blob)]))
    writer.close()
    errors: list[DataError] = []
    assert [r.key for r in read_shard(tmp_path / "dup.tar", on_damage=errors.append)] == ["a", "b"]
    assert [str(e) for e in errors] == [f"{tmp_path / 'dup.tar'}: study key 'a' stored twice"]
