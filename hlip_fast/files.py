"""Reading and writing the small text files users and runs keep (manifests, configs, indexes):
errors name the file, line and column; writes are atomic and name the file when the disk is full."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from .locations import read_bytes


def decode_text(data: bytes, where: str | os.PathLike) -> str:
    """UTF-8 text of ``data``; otherwise a ``ValueError`` naming the line and byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{where}:{line}:{column}: not UTF-8 text (byte 0x{data[error.start]:02x}); save it as UTF-8"
        ) from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, local or at a URL (a BOM is dropped)."""
    return decode_text(read_bytes(path), path).removeprefix("\ufeff")


def read_csv_rows(path: str | os.PathLike, required: set[str]) -> list[tuple[str, dict]]:
    """``("file:line", row)`` for every row of a CSV file with a header; a missing ``required``
    column or unreadable CSV is a ``ValueError`` naming the file and line."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if missing := required - set(reader.fieldnames or ()):
        raise ValueError(f"{path}:1: missing column(s) {sorted(missing)} (columns: {reader.fieldnames})")
    try:
        return [(f"{path}:{reader.line_num}", row) for row in reader]
    except csv.Error as error:
        raise ValueError(f"{path}:{reader.line_num}: unreadable CSV: {error}") from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose error names ``where``, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None


def read_json(path: str | os.PathLike) -> Any:
    return parse_json(read_text(path), str(path))


def read_config_file(path: str | os.PathLike) -> Any:
    """A ``.json`` file, or YAML for any other suffix; syntax errors name file, line and column."""
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".json":
        return parse_json(text, str(path))
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{where}: invalid YAML: {problem}") from None


def os_error_at(error: OSError, path: str | os.PathLike) -> OSError:
    """``error`` again, naming ``path`` (a write to a full disk raises one that names no file)."""
    return OSError(error.errno, error.strerror, str(path))


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (fsync, rename): the
    file is whole or absent. A failed write (full disk) removes the temporary file and raises an
    ``OSError`` naming ``path``."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:  # unlike mkstemp's 0600, the umask's permissions
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise os_error_at(error, path) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """``payload`` as indented JSON, atomically."""
    atomic_write(path, json.dumps(payload, indent=1, sort_keys=True))
