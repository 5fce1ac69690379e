"""Tar shards in WebDataset layout: one sample per study, members ``<key>.json`` (metadata and
report), ``<key>.lz4`` (all slices, one LZ4 block each) and ``<key>.sizes`` (int32 block sizes).

Written deterministically (fixed mtime/owner, sorted members) and atomically (temporary file,
then rename); read back sample by sample with a clear error naming the shard and study.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXTENSIONS = ("json", "lz4", "sizes")


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
        self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self._add(f"{key}.lz4", blob)
        self._add(f"{key}.sizes", np.asarray(sizes, dtype="<i4").tobytes())

    def close(self) -> None:
        self._tar.close()
        with open(self._tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)


def read_shard(path: str | Path) -> Iterator[RawStudy]:
    """The studies of one shard in stored order; a damaged shard raises naming shard and study."""
    path = Path(path)
    key, members = None, {}
    try:
        with tarfile.open(path, "r") as tar:
            for info in tar:
                name = info.name.rsplit("/", 1)[-1]
                member_key, _, ext = name.partition(".")
                if member_key != key and key is not None:
                    yield _assemble(path, key, members)
                    members = {}
                key = member_key
                members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        after = f" after study key {key!r}" if key else ""
        raise ValueError(f"{path}: corrupt shard{after}: {error}") from error
    if key is not None:
        yield _assemble(path, key, members)


def _assemble(path: Path, key: str, members: dict[str, bytes]) -> RawStudy:
    missing = [ext for ext in EXTENSIONS if ext not in members]
    if missing:
        raise ValueError(f"{path}: study key {key!r} lacks member(s) {missing}")
    try:
        meta = json.loads(members["json"])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: study key {key!r}: unreadable metadata: {error}") from error
    sizes = np.frombuffer(members["sizes"], dtype="<i4")
    depth = sum(scan["shape"][0] for scan in meta["scans"])
    if len(sizes) != depth or int(sizes.sum()) != len(members["lz4"]):
        raise ValueError(f"{path}: study {meta.get('study_id', key)!r}: slice table does not match its data")
    return RawStudy(key, meta, members["lz4"], sizes, str(path))


def list_shards(root: str | Path) -> list[Path]:
    """The shards of a prepared folder (its ``index.json`` order) or of a single ``.tar``."""
    root = Path(root)
    if root.is_file():
        return [root]
    index = root / "index.json"
    if index.exists():
        return [root / shard["path"] for shard in json.loads(index.read_text())["shards"]]
    shards = sorted(root.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{root}: no index.json and no .tar shards")
    return shards
