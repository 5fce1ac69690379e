"""A shard's side file (``shard-000000.json`` beside ``shard-000000.tar``), written and read
here only: its studies (id, key, scan shapes, tokens) as the index lists them, the studies and
files skipped while preparing it, the shard's size (checked by a merge), and the fingerprint
that tells a rerun whether the shard is finished; checksummed, verified on every read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..files import read_json, write_json
from ..integrity import verify_checksum, with_checksum
from ..locations import Location, is_url, with_suffix


def side_path(shard: Location) -> Location:
    return with_suffix(shard, ".json")


def side_entry(key: str, meta: dict) -> dict:
    """A stored study as the side file and the index list it, from its ``meta``data."""
    shapes = [scan["shape"] for scan in meta["scans"]]
    return {"study_id": meta["study_id"], "key": key, "shapes": shapes, "tokens": meta["tokens"]}


def write_side(
    shard: Path, fingerprint: str, studies: list[dict], skipped_studies: list[dict], skipped_files: list[dict]
) -> None:
    side = {
        "path": shard.name,
        "bytes": shard.stat().st_size,
        "fingerprint": fingerprint,
        "studies": studies,
        "skipped_studies": skipped_studies,
        "skipped_files": skipped_files,
    }
    write_json(side_path(shard), with_checksum(side))


def read_side(shard: Location) -> dict | None:
    """The shard's verified side file, ``None`` when there is none; a damaged one raises
    (``IntegrityError`` or ``ValueError`` naming it)."""
    side = side_path(shard)
    try:
        payload = read_json(side)
    except FileNotFoundError:  # one request for a remote side file, not an existence check first
        return None
    return verify_checksum(payload, side)


def read_sides(shards: list[Location]) -> list[dict | None]:
    """The side files of ``shards``, fetched a few at a time when they are remote."""
    if not any(is_url(s) for s in shards):
        return [read_side(s) for s in shards]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read_side, shards))
