"""A loopback HTTP server for streaming tests and the stream benchmark: it serves a directory of
shards as a plain URL and as a Hugging Face dataset repo (the two endpoints huggingface_hub and
gptlab use: GET /api/datasets/OWNER/NAME/tree/REV[/DIR] and GET /datasets/OWNER/NAME/resolve/REV/PATH),
with range requests, a bandwidth limit, and injected faults."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TREE = re.compile(r"^/api/datasets/([^/]+)/([^/]+)/tree/([^/]+)(?:/(.*))?$")
RESOLVE = re.compile(r"^/datasets/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")


class ShardServer:
    """serve(root) on 127.0.0.1. Knobs (change them at any time):
    rate: bytes per second per response (None: as fast as possible);
    faults: {file name: "404" | "truncate" | "corrupt" | "stall"}, applied to the next `fault_count[name]`
    requests of that file (missing count: every request);
    requests: the paths asked for, in order.
    port: 0 for any free one; a stopped server's port brings it back at the same URL."""

    def __init__(self, root: Path, repo: str = "owner/shards", port: int = 0) -> None:
        self.root, self.repo = Path(root), repo
        self.rate: float | None = None
        self.faults: dict[str, str] = {}
        self.fault_count: dict[str, int] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        """The server dies: new connections are refused."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def _fault(self, name: str) -> str | None:
        with self.lock:
            kind = self.faults.get(name)
            if kind is None:
                return None
            left = self.fault_count.get(name)
            if left is not None:
                if left <= 0:
                    return None
                self.fault_count[name] = left - 1
            return kind

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        with self.lock:
            self.requests.append(path)
        m = TREE.match(path)
        if m:
            return self._tree(h, m)
        m = RESOLVE.match(path)
        rel = m.group(4) if m and f"{m.group(1)}/{m.group(2)}" == self.repo else path.lstrip("/")
        file = (self.root / rel).resolve()
        if not file.is_file() or self.root.resolve() not in file.parents:
            return self._send_error(h, 404)
        self._file(h, file)

    def _send_error(self, h, code: int) -> None:
        h.send_response(code)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _tree(self, h, m) -> None:
        if f"{m.group(1)}/{m.group(2)}" != self.repo:
            h.send_response(404)
            body = json.dumps({"error": "Repository not found"}).encode()
            h.send_header("Content-Type", "application/json")
            h.send_header("X-Error-Code", "RepoNotFound")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        sub = (m.group(4) or "").strip("/")
        d = self.root / sub
        items = []
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            rel = f"{sub}/{p.name}" if sub else p.name
            if p.is_dir():
                items.append({"type": "directory", "path": rel, "oid": "0" * 40, "size": 0})
            else:
                items.append({"type": "file", "path": rel, "oid": "0" * 40, "size": p.stat().st_size})
        body = json.dumps(items).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _file(self, h, file: Path) -> None:
        data = file.read_bytes()
        fault = self._fault(file.name)
        if fault == "404":
            return self._send_error(h, 404)
        lo, hi = 0, len(data)
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
        if rng:
            lo, hi = int(rng.group(1)), min(len(data), int(rng.group(2)) + 1 if rng.group(2) else len(data))
        body = data[lo:hi]
        if fault == "corrupt" and len(body) > 2000:
            body = body[:1500] + bytes([body[1500] ^ 0xFF]) + body[1501:]
        h.send_response(206 if rng else 200)
        h.send_header("Content-Length", str(len(body)))
        if rng:
            h.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
        h.end_headers()
        if fault == "truncate":
            body = body[: len(body) // 2]  # then the connection closes: a short read
        if fault == "stall":
            time.sleep(60)  # sends headers, then nothing: the client's timeout must fire
        self._write(h, body)

    def _write(self, h, body: bytes) -> None:
        chunk = 1 << 14
        t0 = time.perf_counter()
        try:
            for i in range(0, len(body), chunk):
                h.wfile.write(body[i: i + chunk])
                if self.rate:
                    ahead = (i + chunk) / self.rate - (time.perf_counter() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            pass
