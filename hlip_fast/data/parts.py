"""Preparing an archive in parts, for array jobs without a scheduler: ``hlip-prepare ... --part
I/K`` prepares the I-th of K contiguous runs of the shards (the same shards, names and bytes a
whole run writes), and ``hlip-prepare merge OUT PART_DIRS...`` checks the parts and joins them
into one folder whose index and skip report are those of a whole run.

A merge refuses parts prepared from another manifest or with other settings, parts that
overlap or leave a gap, and unfinished parts, each naming the folder; it never changes a part.
Shards are hard-linked into ``OUT`` where the file system allows it, else copied.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..console import Console
from ..files import read_json, write_json
from ..folder_lock import FolderLock
from ..integrity import canonical, verify_checksum, with_checksum
from .shards import INDEX, PREPARE_CONFIG
from .side_files import read_side, side_path

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Part:
    """The ``index``-th (1-based) of ``count`` contiguous runs of a preparation's shards."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        """``"I/K"`` with ``1 <= I <= K``, or a ``ValueError`` naming ``--part``."""
        match = _SPEC.fullmatch(text)
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise ValueError(f"--part {text!r}: expected I/K with 1 <= I <= K (e.g. --part 3/8)")
        return cls(int(match[1]), int(match[2]))

    def shards(self, num_shards: int) -> range:
        """This part's shards: the same split for every part of a run (some may be empty)."""
        return range((self.index - 1) * num_shards // self.count, self.index * num_shards // self.count)


def _settings(folder: Path) -> dict:
    path = folder / PREPARE_CONFIG
    if not path.is_file():
        raise ValueError(f"{folder}: not a prepared folder (no {PREPARE_CONFIG})")
    return verify_checksum(read_json(path), path)


def _finished_sides(folder: Path, shards: range) -> list[dict]:
    """The verified side files of ``shards`` in ``folder``, or a ``ValueError`` naming what is missing."""
    if not (folder / INDEX).is_file():
        raise ValueError(f"{folder}: this part has not finished (no {INDEX}); run its hlip-prepare again")
    sides = []
    for shard in shards:
        path = folder / f"shard-{shard:06d}.tar"
        side = read_side(path) if path.is_file() else None
        if side is None:
            raise ValueError(f"{folder}: {path.name} or its side file is missing; run this part again")
        if side.get("bytes") is not None and path.stat().st_size != side["bytes"]:
            raise ValueError(f"{path}: {path.stat().st_size:,} bytes, its side file says {side['bytes']:,}")
        sides.append(side)
    return sides


def _place(source: Path, target: Path) -> None:
    """``target`` holds the bytes of ``source``: a hard link where possible, else a copy."""
    if target.exists() and os.path.samefile(source, target):
        return
    temporary = target.with_name(target.name + ".tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def merge(out_dir: str | Path, part_dirs: list[str | Path], console: Console | None = None) -> dict:
    """Join the finished parts in ``part_dirs`` into ``out_dir``; returns the merged index."""
    from .shard_set import write_index

    out, folders = Path(out_dir), [Path(p) for p in part_dirs]
    if not folders:
        raise ValueError("merge needs the part folders to join")
    settings = [(folder, _settings(folder)) for folder in folders]
    first, first_settings = settings[0]
    whole = {k: v for k, v in first_settings.items() if k not in ("part", "checksum")}
    owner: dict[int, Path] = {}
    for folder, found in settings:
        if "part" not in found:
            raise ValueError(f"{folder}: prepared whole, not with --part; there is nothing to merge it with")
        same = {k: v for k, v in found.items() if k not in ("part", "checksum")}
        if canonical(same) != canonical(whole):
            raise ValueError(
                f"{folder}: prepared from another manifest or with other settings than {first}; "
                "parts of one archive must come from one manifest and one set of flags"
            )
        index, count = found["part"]
        if count != first_settings["part"][1]:
            theirs = first_settings["part"][1]
            raise ValueError(f"{folder}: part {index}/{count}, but {first} is a part of /{theirs}")
        if index in owner:
            raise ValueError(f"{folder} and {owner[index]} overlap: both hold part {index}/{count}")
        owner[index] = folder
    count = first_settings["part"][1]
    if missing := sorted(set(range(1, count + 1)) - set(owner)):
        raise ValueError(f"parts {', '.join(f'{i}/{count}' for i in missing)} are missing from the merge")
    per_shard = whole["config"]["studies_per_shard"]
    num_shards = max(1, -(-whole["num_studies"] // per_shard))
    sides = []
    for index in range(1, count + 1):
        sides += _finished_sides(owner[index], Part(index, count).shards(num_shards))
    console = console or Console.silent()
    with FolderLock(out, "hlip-prepare merge"):
        if (out / PREPARE_CONFIG).exists() and canonical(_settings(out)) != canonical(with_checksum(whole)):
            raise ValueError(f"{out}: already holds another preparation; merge into a new folder")
        with console.progress(num_shards, "merging", "shards") as bar:
            for index in range(1, count + 1):
                for shard in Part(index, count).shards(num_shards):
                    name = f"shard-{shard:06d}.tar"
                    _place(owner[index] / name, out / name)
                    _place(side_path(owner[index] / name), side_path(out / name))
                    bar.update()
        write_json(out / PREPARE_CONFIG, with_checksum(whole))
        return write_index(out, whole["config"], sides)
