"""Tar shards in WebDataset layout: one sample per study, members ``<key>.json`` (metadata and
report), ``<key>.lz4`` (all slices, one LZ4 block each), ``<key>.sizes`` (int32 block sizes) and
``<key>.sum`` (the checksum of each of the other three).

Written deterministically (fixed mtime/owner, sorted members) and atomically (temporary file,
then rename). Read back sample by sample, and nothing is lost silently: every member's checksum
is verified, a damaged tar header is noticed (the members after it are resynchronised, not
dropped), the shard must end with tar's end-of-archive marker, and the study keys read must be
the ones its index lists. Each damage is a :class:`~hlip_fast.errors.DataError` naming shard
and study: raised, or handed to the caller's ``on_damage`` (skip and count).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, IntegrityError
from ..files import os_error_at, read_json
from ..integrity import digest, verify_checksum
from ..locations import (
    Location,
    expand,
    has_pattern,
    is_url,
    join,
    local,
    open_binary,
    parent,
)
from .side_files import read_sides, side_path

FORMAT = "hlip_fast.shards/2"
MEMBERS = ("json", "lz4", "sizes")  # the study's data; ``sum`` holds their checksums
_BLOCK = 512
_END_OF_ARCHIVE = 2 * _BLOCK


@dataclass
class RawStudy:
    """One study as stored: metadata, the compressed slices, and where it came from."""

    key: str
    meta: dict
    blob: bytes
    sizes: np.ndarray
    shard: str

    @property
    def study_id(self) -> str:
        return self.meta["study_id"]

    @property
    def depths(self) -> list[int]:
        return [scan["shape"][0] for scan in self.meta["scans"]]


def member_checksums(meta_bytes: bytes, blob: bytes, sizes_bytes: bytes) -> bytes:
    """The ``<key>.sum`` member: each data member's digest, as JSON."""
    sums = {"json": digest(meta_bytes), "lz4": digest(blob), "sizes": digest(sizes_bytes)}
    return json.dumps(sums, sort_keys=True).encode()


class ShardWriter:
    """Writes one shard to ``path`` (via ``path.tmp``, renamed on :meth:`close`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed by close/abort)

    def _add(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        self._tar.addfile(info, io.BytesIO(payload))

    def write(self, key: str, meta: dict, blob: bytes, sizes: np.ndarray) -> None:
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        sizes_bytes = np.asarray(sizes, dtype="<i4").tobytes()
        try:
            self._add(f"{key}.json", meta_bytes)
            self._add(f"{key}.lz4", blob)
            self._add(f"{key}.sizes", sizes_bytes)
            self._add(f"{key}.sum", member_checksums(meta_bytes, blob, sizes_bytes))
        except OSError as error:  # a full disk: name the shard
            raise os_error_at(error, self.path) from error

    def close(self) -> None:
        try:
            self._tar.close()
            with open(self._tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        except OSError as error:
            self.abort()
            raise os_error_at(error, self.path) from error
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # the disk is full: the temporary file goes anyway
            self._tar.close()
        self._tmp.unlink(missing_ok=True)


# --- what a shard should hold ------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    """A shard (local path or URL) and the study keys it must hold, in order (``None``: not
    known, no index or side file)."""

    path: Location
    keys: tuple[str, ...] | None = None
    study_ids: tuple[str, ...] | None = None


INDEX = "index.json"
"""The file that makes a folder a prepared shard folder: its shards and studies, checksummed."""
SHARD_SOURCES = (
    "a prepared folder or its index.json, a URL of either (s3://, gs://, http(s)://, file://), or a "
    "brace pattern of .tar shards, local or remote (shards/shard-{000000..000127}.tar)"
)
"""What readers accept, for help texts."""
PREPARE_CONFIG = "prepare_config.json"
"""Beside the shards: the settings they were prepared with (grid, dtype, ...), checksummed."""


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a local prepared shard folder (holds an ``index.json``) or its index."""
    path = Path(path)
    return (path / INDEX).is_file() or (path.name == INDEX and path.is_file())


def is_url_or_pattern(source: Location) -> bool:
    """Whether ``source`` names shards by URL or brace pattern (checked when read, not before)."""
    return is_url(source) or has_pattern(source)


def _resolve(source: Location | list) -> tuple[Location | None, list]:
    """``(index location, [])`` for a prepared folder, its ``index.json`` or a URL of either;
    ``(None, shards)`` for shards named one by one: a list, a brace pattern, a ``.tar``, or a
    local folder of ``.tar`` files without an index."""
    if isinstance(source, (list, tuple)):
        return None, [s if isinstance(s, ShardInfo) else local(s) for s in source]
    if has_pattern(source):
        return None, [local(name) for name in expand(str(source))]
    source = local(source)
    if is_url(source):
        if source.endswith(".tar"):
            return None, [source]
        return (source if source.endswith(".json") else join(source, INDEX)), []
    if source.is_file():
        return (source, []) if source.suffix == ".json" else (None, [source])
    if is_prepared(source):
        return source / INDEX, []
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist")
    shards = sorted(source.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{source}: no {INDEX} and no .tar shards")
    return None, shards


def _verified_index(location: Location) -> dict:
    index = verify_checksum(read_json(location), location)
    if index.get("format") != FORMAT:
        raise IntegrityError(
            f"{location}: format {index.get('format')!r}, expected {FORMAT!r}; prepare it again"
        )
    return index


def index_of(config: dict, shards: list[dict]) -> dict:
    """An index: the preparation settings and each shard's ``path`` and ``studies``."""
    return {
        "format": FORMAT,
        "config": config,
        "shards": shards,
        "num_studies": sum(len(s["studies"]) for s in shards),
        "num_scans": sum(len(st["shapes"]) for s in shards for st in s["studies"]),
        "num_tokens": sum(st["tokens"] for s in shards for st in s["studies"]),
    }


def prepare_config(shard: Location) -> dict:
    """The settings ``shard`` was prepared with (``prepare_config.json`` beside it), verified."""
    location = join(parent(shard), PREPARE_CONFIG)
    return verify_checksum(read_json(location), location)["config"]


def read_index(source: Location | list) -> dict:
    """The index of ``source``, verified: a prepared folder or its ``index.json`` (local or URL);
    for shards named one by one (a list, a brace pattern), the equivalent index made from their
    side files and the ``prepare_config.json`` beside the first. The one place an index is read."""
    index_at, shards = _resolve(source)
    if index_at is not None:
        return _verified_index(index_at)
    shards = [s.path if isinstance(s, ShardInfo) else s for s in shards]
    entries = []
    for shard, side in zip(shards, read_sides(shards)):
        if side is None:
            raise FileNotFoundError(
                f"{shard}: no side file {side_path(shard)} (written by hlip-prepare): name the "
                f"folder or its {INDEX} instead"
            )
        entries.append({"path": str(shard), "studies": side["studies"]})
    return index_of(prepare_config(shards[0]), entries)


def _info(path: Location, studies: list[dict]) -> ShardInfo:
    return ShardInfo(path, tuple(s["key"] for s in studies), tuple(s["study_id"] for s in studies))


def shard_infos(source: Location | list) -> list[ShardInfo]:
    """The shards of ``source`` (see :func:`read_index` for what it may be; a ``.tar`` or a local
    folder of them without an index also do) with the keys each must hold where an index or side
    file says. A local index must agree with the ``.tar`` files beside it; remote shards are
    checked as they are read."""
    index_at, shards = _resolve(source)
    if index_at is None:
        named = [s for s in shards if not isinstance(s, ShardInfo)]
        found = iter(
            [_info(s, side["studies"]) if side else ShardInfo(s) for s, side in zip(named, read_sides(named))]
        )
        return [s if isinstance(s, ShardInfo) else next(found) for s in shards]
    root = parent(index_at)
    infos = [
        _info(join(root, shard["path"]), shard["studies"]) for shard in _verified_index(index_at)["shards"]
    ]
    if is_url(index_at):
        return infos
    for info in infos:
        if not Path(info.path).is_file():
            raise DataError(
                f"{index_at} lists {Path(info.path).name}, but {info.path} does not exist", shard=info.path
            )
    listed = {Path(info.path).name for info in infos}
    if extra := sorted(p.name for p in root.glob("*.tar") if p.name not in listed):
        raise DataError(
            f"{root / extra[0]} is not listed in {index_at} ({len(extra)} such shard(s)): the index is "
            "stale or the shard does not belong here; re-run hlip-prepare on this folder to rebuild it",
            shard=root / extra[0],
        )
    return infos


def list_shards(root: Location) -> list[Location]:
    """The shards of a prepared folder (its ``index.json`` order), a pattern or a single ``.tar``."""
    return [info.path for info in shard_infos(root)]


# --- reading ----------------------------------------------------------------------------


def assemble_study(
    path: str | Path, key: str, members: dict[str, bytes], verify: bool = True, listed_as: str | None = None
) -> RawStudy:
    """The study of ``key`` from its tar members (``json``, ``lz4``, ``sizes``, ``sum``), its
    checksums and slice table checked; a :class:`DataError` naming shard and study otherwise
    (``listed_as``: the study id the index gives the key, for naming it when its metadata is damaged)."""

    def damaged(reason: str, study_id: str | None = listed_as) -> DataError:
        name = f"study {study_id!r} (key {key!r})" if study_id else f"study key {key!r}"
        return DataError(f"{path}: {name}: {reason}", shard=path, key=key, study_id=study_id)

    if missing := [ext for ext in (*MEMBERS, "sum") if ext not in members]:
        raise damaged(f"member(s) {missing} missing (a damaged tar header, or not written by hlip_fast)")
    if verify:
        try:
            sums = json.loads(members["sum"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise damaged(f"unreadable checksum member: {error}") from None
        what = {"json": "metadata and report", "lz4": "slice data", "sizes": "slice table"}
        for ext in MEMBERS:
            if sums.get(ext) != digest(members[ext]):
                raise damaged(f"checksum mismatch in its {what[ext]} ({key}.{ext}): the shard is damaged")
    try:
        meta = json.loads(members["json"])
        depth = sum(scan["shape"][0] for scan in meta["scans"])
        study_id = meta["study_id"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as error:
        raise damaged(f"unreadable metadata: {type(error).__name__}: {error}") from None
    sizes = np.frombuffer(members["sizes"], dtype="<i4")
    if len(sizes) != depth or int(sizes.sum()) != len(members["lz4"]):
        raise damaged("slice table does not match its data", study_id)
    if listed_as is not None and study_id != listed_as:
        raise damaged(f"holds study {study_id!r}; the index lists {listed_as!r} under this key")
    return RawStudy(key, meta, members["lz4"], sizes, str(path))


def read_shard(
    shard: Location | ShardInfo,
    *,
    on_damage: Callable[[DataError], None] | None = None,
    verify: bool = True,
) -> Iterator[RawStudy]:
    """The studies of one shard in stored order.

    Every damage is a :class:`DataError` naming shard and study: raised when ``on_damage`` is
    ``None``, else passed to it and reading goes on with the next intact study. With the keys
    the shard must hold (a :class:`ShardInfo` from the index), every study that could not be
    read is reported by key, so a caller can count exactly what was lost. ``verify=False``
    skips the checksums (for measuring their cost), not the structural checks.
    """
    info = shard if isinstance(shard, ShardInfo) else ShardInfo(local(shard))
    path = info.path

    def report(error: DataError) -> None:
        if on_damage is None:
            raise error
        on_damage(error)

    listed = dict(zip(info.keys, info.study_ids or info.keys)) if info.keys is not None else None
    read: set[str] = set()
    key, members, end = None, {}, 0

    def finish_study() -> Iterator[RawStudy]:
        if key in read:  # a second copy of a key, reported where it began
            return
        read.add(key)
        if listed is not None and key not in listed:
            report(DataError(f"{path}: study key {key!r} is not in the index", shard=path, key=key))
            return
        try:
            yield assemble_study(path, key, members, verify, listed[key] if listed is not None else None)
        except DataError as error:
            report(error)

    def after() -> str:
        return f" after study key {key!r}" if key else " at its start"

    try:
        with open_binary(path) as handle, tarfile.open(fileobj=handle, mode="r:", ignore_zeros=True) as tar:
            for member in tar:
                if member.offset != end:
                    report(
                        DataError(f"{path}: damaged tar header at byte {end}{after()}", shard=path, key=None)
                    )
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if not member.isfile():
                    report(DataError(f"{path}: unexpected tar member {member.name!r}{after()}", shard=path))
                    continue
                member_key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                if member_key != key:
                    if key is not None:
                        yield from finish_study()
                        members = {}
                    if member_key in read:
                        message = f"{path}: study key {member_key!r} stored twice"
                        report(DataError(message, shard=path, key=member_key))
                key = member_key
                members[ext] = tar.extractfile(member).read()
            if key is not None:
                yield from finish_study()
            handle.seek(end)
            tail = handle.read()
            if tail.strip(b"\0") or len(tail) < _END_OF_ARCHIVE:
                problem = (
                    "unexpected bytes after the last study"
                    if tail.strip(b"\0")
                    else "no end-of-archive marker"
                )
                report(DataError(f"{path}: {problem} (truncated or damaged){after()}", shard=path))
    except (tarfile.TarError, OSError, EOFError) as error:
        report(DataError(f"{path}: unreadable shard{after()}: {error}", shard=path))
    if listed is not None:
        for lost, study_id in listed.items():
            if lost not in read:
                message = f"{path}: study {study_id!r} (key {lost!r}) is in the index but not in the shard"
                report(DataError(message, shard=path, key=lost, study_id=study_id))
