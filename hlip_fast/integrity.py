"""Checksums of stored bytes: every stored study, shard side file, index, checkpoint and model
folder carries one, and readers verify it.

XXH3 (64-bit, the ``xxhash`` package) hashes at about 15 GB/s on one core, so verifying costs
well under 1% of reading (see ``bench/data.py``); it detects damage, it is not a signature.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import xxhash

from .errors import IntegrityError

ALGORITHM = "xxh3_64"
_CHUNK = 1 << 24


def digest(data: bytes | bytearray | memoryview) -> str:
    """The hex XXH3-64 digest of ``data``."""
    return xxhash.xxh3_64_hexdigest(data)


def file_digest(path: str | os.PathLike) -> str:
    """The digest of a file's bytes, read in chunks (checkpoints can be large)."""
    state = xxhash.xxh3_64()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            state.update(chunk)
    return state.hexdigest()


def canonical(payload) -> bytes:
    """The bytes a JSON payload's checksum is taken over (sorted keys, no spaces)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def with_checksum(payload: dict) -> dict:
    """``payload`` plus a ``checksum`` field over its canonical JSON."""
    return {**payload, "checksum": f"{ALGORITHM}:{digest(canonical(payload))}"}


def verify_checksum(payload: dict, where: str | os.PathLike) -> dict:
    """``payload`` without its ``checksum`` field, after checking it; ``where`` names the file."""
    if not isinstance(payload, dict) or "checksum" not in payload:
        raise IntegrityError(
            f"{where}: no checksum (damaged, or written by an older hlip_fast: prepare it again)"
        )
    body = {k: v for k, v in payload.items() if k != "checksum"}
    if payload["checksum"] != f"{ALGORITHM}:{digest(canonical(body))}":
        raise IntegrityError(f"{where}: checksum mismatch: the file is damaged; restore or rebuild it")
    return body


def verify_file(path: Path, expected: str, size: int | None = None) -> None:
    """Raise :class:`IntegrityError` when ``path``'s size or digest differs from the record."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise IntegrityError(f"{path}: {actual_size} bytes, {size} written: the file is truncated or damaged")
    if file_digest(path) != expected:
        raise IntegrityError(f"{path}: checksum mismatch: the file is damaged")


def first_non_finite(state: object, key: str = "") -> str | None:
    """The key (dotted, through nested dicts and lists) of the first floating-point tensor in
    ``state`` that holds a NaN or an infinity; ``None`` when every one is finite."""
    import torch

    if isinstance(state, torch.Tensor):
        return key if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, Sequence) and not isinstance(state, str | bytes):
        items = enumerate(state)
    else:
        return None
    for name, value in items:
        if (found := first_non_finite(value, f"{key}.{name}" if key else str(name))) is not None:
            return found
    return None


def check_finite(state: object, where: str) -> None:
    """Refuse weights (a state dict, or a checkpoint's nested state) holding NaN or infinity,
    naming the first such key: a model loaded from them would only compute NaN."""
    if (key := first_non_finite(state)) is not None:
        raise IntegrityError(f"{where}: non-finite values (NaN or inf) in {key}; these weights are unusable")
