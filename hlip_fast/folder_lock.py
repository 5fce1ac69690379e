"""An exclusive lock on an output folder, so that two processes never write one run or one
shard folder at the same time. ``flock`` on ``<folder>/.lock``: released by the kernel when the
holder exits, however it exits, so a crash leaves no stale lock."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """``with FolderLock(folder, "hlip-train"):`` or :meth:`acquire` / :meth:`release`."""

    def __init__(self, folder: str | os.PathLike, tool: str):
        self.path, self.tool = Path(folder) / ".lock", tool
        self._handle = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderInUse(
                f"{self.path.parent} is in use by {holder}; wait for it to finish or write elsewhere"
            ) from None
        handle.seek(0)
        handle.truncate()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"{self.tool} (pid {os.getpid()} on {socket.gethostname()}, since {stamp})\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
