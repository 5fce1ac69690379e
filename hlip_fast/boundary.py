"""One error boundary for every command-line tool.

An expected failure (bad input, a damaged file, a full disk, a run that had to stop) becomes one
message on stderr that names the file, line or field, and a non-zero exit status; a traceback
is shown only with ``--debug`` (or ``HLIP_FAST_DEBUG=1``). Exit statuses:

====  ==================================================================
0     success
1     an internal error (a bug: please report it with the ``--debug`` output)
2     bad input: arguments, configuration, manifest, data or files
3     a run stopped before its end (divergence, too many damaged studies)
130   interrupted (Ctrl-C)
====  ==================================================================
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable

from .errors import RunStopped
from .folder_lock import FolderInUse

EXIT_INTERNAL, EXIT_INPUT, EXIT_STOPPED, EXIT_INTERRUPTED = 1, 2, 3, 130

_OS_HINTS = {
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere (finished work is kept)",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere (finished work is kept)",
    errno.EACCES: "permission denied: check the file's and its folder's permissions",
    errno.EPERM: "operation not permitted: check the file's and its folder's permissions",
    errno.EROFS: "read-only file system: write elsewhere",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "already exists: remove it or choose another name",
    errno.EISDIR: "is a folder, a file was expected",
    errno.ENOTDIR: "a file stands where a folder was expected",
}


def describe(error: BaseException) -> str:
    """The one message a user sees for ``error``."""
    if isinstance(error, OSError) and (error.errno is not None or error.filename):
        what = _OS_HINTS.get(error.errno, error.strerror or str(error))
        names = [str(n) for n in (error.filename, error.filename2) if n]
        return f"{' -> '.join(names)}: {what}" if names else what
    return str(error)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def command(name: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Wrap a ``main(argv) -> int`` in the error boundary (its parser must call :func:`add_debug_flag`)."""

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            args = sys.argv[1:] if argv is None else argv
            debug = "--debug" in args or os.environ.get("HLIP_FAST_DEBUG", "") not in ("", "0")
            try:
                return main(argv)
            except KeyboardInterrupt:
                print(f"{name}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
            except Exception as error:  # noqa: BLE001 - this is the boundary
                if debug:
                    traceback.print_exc()
                if isinstance(error, RunStopped):
                    status = EXIT_STOPPED
                elif isinstance(error, (ValueError, OSError, FolderInUse)):
                    status = EXIT_INPUT
                else:
                    print(
                        f"{name}: internal error: {type(error).__name__}: {error} "
                        "(rerun with --debug for the traceback, and please report it)",
                        file=sys.stderr,
                    )
                    return EXIT_INTERNAL
                print(f"{name}: {describe(error)}", file=sys.stderr)
                return status

        return run

    return wrap
