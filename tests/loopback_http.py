"""A file server on 127.0.0.1 for remote-shard tests: HTTP/1.1 with byte ranges, run in a thread,
that can cut connections off in the middle of a response and records every request."""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as object stores: a cut connection is noticed mid-pool
    server: _Server

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def do_GET(self) -> None:
        self._respond(body=True)

    def _respond(self, body: bool) -> None:
        owner = self.server.owner
        name = unquote(urlsplit(self.path).path).lstrip("/")
        owner.requests.append((self.command, name, self.headers.get("Range")))
        path = owner.root / name
        if not path.is_file() or name in owner.hidden:
            self.send_error(404)
            return
        if owner.unavailable.get(name, 0) > 0:
            owner.unavailable[name] -= 1
            self.send_error(503)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data), 200
        asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if asked and not owner.ignore_ranges:
            start = int(asked[1])
            end = min(int(asked[2]) + 1, len(data)) if asked[2] else len(data)
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        chunk = data[start:end]
        if owner.drops.get(name, 0) > 0 and start <= len(data) // 2 < end:
            owner.drops[name] -= 1
            owner.dropped.append((name, start, end))
            self.wfile.write(chunk[: len(chunk) // 2])  # promised all of it, sends half, hangs up
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: LoopbackServer


class LoopbackServer:
    """Serves ``root`` at :meth:`url`. ``drops[name] = n`` cuts off, halfway, the next ``n``
    responses that carry the middle byte of ``name``; ``hidden`` names answer 404;
    ``unavailable[name] = n`` answers the next ``n`` requests for ``name`` with 503;
    ``ignore_ranges`` answers every GET in full."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.drops: dict[str, int] = {}
        self.dropped: list[tuple[str, int, int]] = []
        self.hidden: set[str] = set()
        self.unavailable: dict[str, int] = {}
        self.ignore_ranges = False
        self.requests: list[tuple[str, str, str | None]] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"

    def gets(self, name: str) -> int:
        return sum(1 for method, asked, _ in self.requests if method == "GET" and asked == name)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
