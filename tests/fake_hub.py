"""A Hugging Face hub on 127.0.0.1 for the downloader tests, answering the way the real one does.

``HEAD/GET /<repo>/resolve/<revision>/<path>`` of an LFS file answers 302 with ``X-Repo-Commit``,
``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and a ``Location`` on a second server, the "CDN",
which serves the bytes with ``Range`` support. Unknown files get 404 with ``X-Error-Code:
EntryNotFound``. ``/direct/<name>`` serves plain downloads (like a GitHub release asset).
Knobs: ``advertise`` (another sha256 or size than the served bytes), ``drop_after`` (close the
connection after n bytes of the next GET of a blob), ``down`` (the CDN answers 503),
``down_after_drop`` (the CDN goes down right after such a drop), ``stall_after`` (pause for some
seconds after n bytes of the next GET of a blob).
Every request is logged as ``(server, method, path, range, authorization)``.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # "<repo>/<path>" and "direct/<name>" -> bytes
        self.advertise: dict[str, dict] = {}  # key -> {"sha256": ..., "size": ...} told instead of the truth
        self.drop_after: dict[str, int] = {}  # blob sha256 -> bytes to send before dropping, once
        self.stall_after: dict[str, tuple[int, float]] = {}  # blob sha256 -> (bytes, seconds), once
        self.down = self.down_after_drop = False
        self.log: list[tuple[str, str, str, str | None, str | None]] = []
        self.hub = self._serve("hub", self._hub_answer)
        self.cdn = self._serve("cdn", self._cdn_answer)
        self.url = f"http://127.0.0.1:{self.hub.server_port}"

    def add(self, key: str, content: bytes) -> str:
        self.files[key] = content
        return hashlib.sha256(content).hexdigest()

    def requests(self, server: str, method: str | None = None) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == server and method in (None, entry[1])]

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    # --------------------------------------------------------------------------------------

    def _serve(self, name: str, answer) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.log.append((name, "HEAD", self.path, None, self.headers.get("authorization")))
                answer(self, body=False)

            def do_GET(self):
                hub.log.append((name, "GET", self.path, self.headers.get("Range"), self.headers.get("authorization")))
                answer(self, body=True)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def _hub_answer(self, handler, body: bool) -> None:
        match = re.fullmatch(r"/(.+?/.+?)/resolve/[^/]+/(.+)", handler.path.split("?")[0])
        if handler.path.startswith("/direct/"):
            return self._send_blob(handler, self.files.get(handler.path[1:]), body)
        key = f"{match.group(1)}/{match.group(2)}" if match else None
        if key not in self.files:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("X-Error-Message", "Entry not found")
            handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        content = self.files[key]
        truth = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
        told = {**truth, **self.advertise.get(key, {})}
        handler.send_response(302)
        handler.send_header("Location", f"http://127.0.0.1:{self.cdn.server_port}/blobs/{truth['sha256']}")
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("X-Linked-Etag", f'"{told["sha256"]}"')
        handler.send_header("X-Linked-Size", str(told["size"]))
        handler.send_header("ETag", f'"{told["sha256"]}"')
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _cdn_answer(self, handler, body: bool) -> None:
        if self.down:
            handler.send_response(503)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        blobs = {hashlib.sha256(content).hexdigest(): content for content in self.files.values()}
        self._send_blob(handler, blobs.get(handler.path.rsplit("/", 1)[-1]), body)

    def _send_blob(self, handler, content: bytes | None, body: bool) -> None:
        if content is None:
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if ranged:
            start = int(ranged.group(1))
        handler.send_response(206 if ranged else 200)
        handler.send_header("Content-Length", str(len(content) - start))
        if ranged:
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        if not body:
            return
        sha = hashlib.sha256(content).hexdigest()
        drop = self.drop_after.pop(sha, None)
        if drop is not None:
            handler.wfile.write(content[start:drop])
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            self.down = self.down_after_drop
            return
        stall = self.stall_after.pop(sha, None)
        if stall is not None:
            handler.wfile.write(content[start:stall[0]])
            handler.wfile.flush()
            time.sleep(stall[1])
            start = stall[0]
        handler.wfile.write(content[start:])
