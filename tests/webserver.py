"""A loopback HTTP server for tests: serves files and redirects to /from-link, receives webhooks.

Files can be served with a Content-Length or without one (the body then ends when the
connection closes), POSTs are recorded and answered with scripted statuses, so a test
can make a webhook receiver fail twice and then accept. GETs honour `Range: bytes=N-`
(206, or 416 past the end) unless the path is in `ignore_range`, and `cuts` can make a
response stop after some bytes and drop the connection (an interrupted download).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)
    sent: int = 0  # body bytes a GET answered with


class WebServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.unsized: set[str] = set()  # paths served without Content-Length
        self.slow: dict[str, float] = {}  # path -> seconds to wait before each 64 KiB block
        self.redirects: dict[str, str] = {}
        self.answers: dict[str, list[int]] = {}  # POST path -> statuses to answer, in order; 200 after
        self.cuts: dict[str, list[int]] = {}  # GET path -> body bytes to send before dropping the connection, in order
        self.ignore_range: set[str] = set()  # GET paths answered in full (200) whatever the Range header says
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection; an unsized body ends at close

            def log_message(self, *args) -> None:  # quiet
                pass

            def _record(self, body: bytes = b"") -> Hit:
                hit = Hit(
                    self.command, self.path.split("?", 1)[0], {k.lower(): v for k, v in self.headers.items()}, body
                )
                with web.lock:
                    web.hits.append(hit)
                return hit

            def do_GET(self) -> None:
                hit = self._record()
                path = hit.path
                try:
                    if path in web.redirects:
                        self.send_response(302)
                        self.send_header("Location", web.redirects[path])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    data = web.files.get(path)
                    if data is None:
                        self.send_error(404)
                        return
                    start = self._range_start(path, len(data))
                    if start is None:
                        return
                    body = data[start:]
                    with web.lock:
                        script = web.cuts.get(path) or []
                        cut = script.pop(0) if script else len(body)
                    self.send_header("Content-Type", "audio/wav")
                    if path not in web.unsized:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for i in range(0, min(cut, len(body)), 1 << 16):
                        time.sleep(web.slow.get(path, 0.0))
                        chunk = body[i : min(i + (1 << 16), cut)]
                        self.wfile.write(chunk)
                        hit.sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (too large)
                    pass

            def _range_start(self, path: str, size: int) -> int | None:
                """Send the status line for a GET of `size` bytes; where its body starts, None when it has none."""
                m = re.fullmatch(r"bytes=(\d+)-", (self.headers.get("range") or "").strip())
                if not m or path in web.ignore_range:
                    self.send_response(200)
                    return 0
                start = int(m.group(1))
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                return start

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path = self._record(body).path
                with web.lock:
                    script = web.answers.get(path) or []
                    status = script.pop(0) if script else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="webserver", daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def requests(self, method: str, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.method == method and h.path == path]

    def wait_posts(self, path: str, n: int, timeout: float = 60.0) -> list[Hit]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.requests("POST", path)
            if len(got) >= n:
                return got
            time.sleep(0.1)
        raise AssertionError(f"{path}: {len(self.requests('POST', path))} POSTs after {timeout} s, expected {n}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
