"""Where shards live: local paths, URLs of any fsspec protocol (``s3://``, ``gs://``,
``http(s)://``, ``file://``) and WebDataset brace patterns (``shard-{000000..000127}.tar``).

Remote files are read as streams of byte ranges, never downloaded whole first. Each range is
fetched with its length checked (a dropped connection cannot shorten it silently) and transient
errors (connection resets, timeouts, server errors, short reads) are retried with exponential
back-off; after the last attempt a :class:`RemoteReadError` names the URL, the byte range and the
cause, and the reader's error policy takes over. A missing file or a refused permission is not
retried. Retries are tuned by ``HLIP_FAST_REMOTE_ATTEMPTS`` (default 6) and
``HLIP_FAST_REMOTE_BACKOFF`` (seconds before the second attempt, doubled each time; default 0.5).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from braceexpand import braceexpand

log = logging.getLogger(__name__)

Location = str | Path
"""A local path, or a URL (``str``) that fsspec can open."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
READ_BLOCK = 8 << 20
"""Bytes fetched per range request when reading small members (larger members come in one range)."""
_EXTRAS = {"s3": "s3fs (hlip-fast[s3])", "gs": "gcsfs (hlip-fast[gcs])", "gcs": "gcsfs (hlip-fast[gcs])"}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
T = TypeVar("T")


def is_url(location: Location) -> bool:
    return isinstance(location, str) and _URL.match(location) is not None


def local(location: Location) -> Location:
    """A local path as a ``Path`` (``file://`` URLs too, read with ``open``); other URLs unchanged."""
    if isinstance(location, str) and location.startswith("file://"):
        return Path(location.removeprefix("file://"))
    return Path(location) if not is_url(location) else location


def expand(pattern: str) -> list[str]:
    """A WebDataset brace pattern's names in order (``a-{00..02}.tar`` → three names)."""
    return list(braceexpand(pattern))


def has_pattern(location: Location) -> bool:
    return isinstance(location, str) and "{" in location


def join(base: Location, name: str) -> Location:
    """``name`` relative to the folder ``base`` (unchanged when it is absolute or a URL)."""
    if is_url(name) or Path(name).is_absolute():
        return local(name)
    return f"{base.rstrip('/')}/{name}" if is_url(base) else Path(base) / name


def parent(location: Location) -> Location:
    return location.rsplit("/", 1)[0] if is_url(location) else Path(location).parent


def with_suffix(location: Location, suffix: str) -> Location:
    if not is_url(location):
        return Path(location).with_suffix(suffix)
    stem, dot, _ = location.rpartition(".")
    return f"{stem}{suffix}" if dot and "/" not in location[len(stem) :] else location + suffix


def _env_number(name: str, default: float, kind: type) -> float:
    value = os.environ.get(name, "")
    try:
        number = kind(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a {kind.__name__}") from None
    if number < (1 if kind is int else 0):
        raise ValueError(f"{name}={value!r} is out of range")
    return number


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a remote read is tried (defaults from the environment)."""

    attempts: int = field(default_factory=lambda: _env_number("HLIP_FAST_REMOTE_ATTEMPTS", 6, int))
    backoff: float = field(default_factory=lambda: _env_number("HLIP_FAST_REMOTE_BACKOFF", 0.5, float))
    max_delay: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.backoff * 2**attempt, self.max_delay)


class RemoteReadError(OSError):
    """A remote read that still failed after every attempt (an ``OSError``: readers treat it as
    an unreadable shard and apply their error policy)."""


class ShortRead(OSError):
    """Fewer bytes than asked for arrived (a connection ended early): retried."""


class RangesNotSupported(OSError):
    """The server answered a range request with more bytes than asked for: not retried."""


def _is_transient(error: BaseException) -> bool:
    """Connection errors, timeouts, short reads and HTTP 408/429/5xx: worth another attempt."""
    if isinstance(error, (*_PERMANENT, RangesNotSupported)):
        return False
    try:
        import aiohttp  # fsspec's HTTP client: dropped connections and bad statuses
    except ImportError:
        aiohttp = None
    if aiohttp is not None and isinstance(error, aiohttp.ClientResponseError):
        return error.status in (408, 429) or error.status >= 500
    return isinstance(error, OSError) or (aiohttp is not None and isinstance(error, aiohttp.ClientError))


def retrying(url: str, what: str, call: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """``call()``, retried on transient errors; a :class:`RemoteReadError` naming ``url`` and
    ``what`` after the last attempt. Missing files, refused permissions, other HTTP client errors
    and servers without range support fail at once."""
    policy = policy or RetryPolicy()
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - sorted into transient and permanent here
            # fsspec's HTTP size request reports any failure, a refused connection too, as a
            # missing file: its cause tells which
            cause = error.__cause__ if isinstance(error, FileNotFoundError) and error.__cause__ else error
            if not _is_transient(cause):
                if isinstance(error, FileNotFoundError):
                    raise FileNotFoundError(errno.ENOENT, "no such file or object", url) from error
                raise
            last = cause
        if attempt + 1 < policy.attempts:
            delay = policy.delay(attempt)
            log.warning(
                "%s: %s failed (%s: %s); retrying in %.1f s", url, what, type(last).__name__, last, delay
            )
            time.sleep(delay)
    raise RemoteReadError(
        f"{url}: {what} failed after {policy.attempts} attempt(s): {type(last).__name__}: {last}"
    ) from last


def filesystem(url: str):
    """``(fsspec filesystem, path)`` for ``url``; a missing optional package is named."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options = {}
    if protocol in ("http", "https"):
        import aiohttp

        # a stalled server must not hang the reader: bounded connect and read waits, no total cap
        options["client_kwargs"] = {
            "timeout": aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
        }
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        extra = _EXTRAS.get(protocol, "the fsspec implementation it names")
        raise RuntimeError(f"{url}: reading {protocol}:// needs {extra}: {error}") from None


class RemoteFile(io.RawIOBase):
    """A remote file as a seekable binary stream: each read is one checked, retried range request."""

    def __init__(self, url: str, policy: RetryPolicy | None = None):
        self.url, self.policy = url, policy or RetryPolicy()
        self._fs, self._path = filesystem(url)
        size = retrying(url, "size request", lambda: self._fs.size(self._path), self.policy)
        if size is None:
            raise RemoteReadError(f"{url}: the server does not say the file's size (no Content-Length)")
        self.size, self._position = int(size), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.url}: seek to a negative position")
        self._position = base + offset
        return self._position

    def _fetch(self, start: int, end: int) -> bytes:
        data = self._fs.cat_file(self._path, start=start, end=end)
        if len(data) < end - start:
            raise ShortRead(f"bytes {start}-{end}: {len(data)} of {end - start} bytes arrived")
        if len(data) > end - start:
            raise RangesNotSupported(
                f"{self.url}: asked for bytes {start}-{end}, got {len(data)} bytes: the server ignores "
                "range requests, so shards cannot be streamed from it"
            )
        return data

    def readinto(self, buffer) -> int:
        start = self._position
        end = min(start + len(buffer), self.size)
        if end <= start:
            return 0
        data = retrying(
            self.url, f"read of bytes {start}-{end}", lambda: self._fetch(start, end), self.policy
        )
        memoryview(buffer)[: end - start] = data
        self._position = end
        return end - start


def open_binary(location: Location) -> BinaryIO:
    """``location`` opened for reading bytes: a local file, or a buffered :class:`RemoteFile`."""
    location = local(location)
    if is_url(location):
        return io.BufferedReader(RemoteFile(location), buffer_size=READ_BLOCK)
    return open(location, "rb")  # noqa: SIM115 - the caller closes it


def read_bytes(location: Location) -> bytes:
    """The whole (small) file at ``location``."""
    with open_binary(location) as handle:
        return handle.read()
