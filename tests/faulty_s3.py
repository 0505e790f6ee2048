"""An HTTP proxy in front of the S3 server that fails on command: 5xx answers or stalls.

`POST /__fault?count=N&mode=500|stall` makes the next N requests fail that way, and
`mode=deny-delete` the next N DeleteObjects calls answer 200 with every key refused
(`AccessDenied` in the per-key `Errors`, as S3 does for a key a policy or lock protects); other
requests are forwarded unchanged. `slow(match, seconds)` delays every PUT whose path holds `match`
(a window in which a drill can kill a node mid-upload); `hold(match, method)` keeps each such
request waiting, unanswered, until `release()` drops it (a node killed with that call in flight:
it never reached storage), or, with `forward=True`, sends it on (a node stopped at that call, a
deterministic point for a drill to act at, which then goes on). It stands between the service and moto's server, so
the service talks real S3 over HTTP and meets real failures.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class FaultyS3:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.fail_next = 0
        self.mode = "500"
        self.failed = 0
        self.lock = threading.Lock()
        self.slow_match, self.slow_s = "", 0.0
        self.hold_match, self.hold_method, self.held, self.hold_forward = "", "", 0, False
        self.released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _take_fault(self, batch_delete: bool) -> str | None:
                with proxy.lock:
                    if proxy.fail_next > 0 and (proxy.mode != "deny-delete" or batch_delete):
                        proxy.fail_next -= 1
                        proxy.failed += 1
                        return proxy.mode
                return None

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                if parts.path == "/__fault":
                    q = parse_qs(parts.query)
                    with proxy.lock:
                        proxy.fail_next = int(q.get("count", ["1"])[0])
                        proxy.mode = q.get("mode", ["500"])[0]
                    return self._reply(204, b"", {})
                batch_delete = self.command == "POST" and "delete" in parse_qs(parts.query, keep_blank_values=True)
                fault = self._take_fault(batch_delete)
                if proxy.hold_match and self.command == proxy.hold_method and proxy.hold_match in self.path:
                    with proxy.lock:
                        proxy.held += 1
                    proxy.released.wait()
                    if not proxy.hold_forward:
                        self.close_connection = True  # dropped: the caller is gone, storage never sees it
                        return
                if proxy.slow_match and self.command == "PUT" and proxy.slow_match in self.path:
                    time.sleep(proxy.slow_s)
                if fault == "deny-delete":
                    keys = [k.decode() for k in re.findall(rb"<Key>(.*?)</Key>", body)]
                    refused = "".join(
                        f"<Error><Key>{k}</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                        for k in keys
                    )
                    return self._reply(
                        200,
                        f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult>{refused}</DeleteResult>'.encode(),
                        {"content-type": "application/xml"},
                    )
                if fault == "stall":
                    time.sleep(3)
                    self.close_connection = True
                    return
                if fault == "500":
                    return self._reply(
                        500,
                        b"<Error><Code>InternalError</Code><Message>injected</Message></Error>",
                        {"content-type": "application/xml"},
                    )
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = {
                    k: v
                    for k, v in resp.getheaders()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length")
                }
                conn.close()
                self._reply(
                    resp.status, data, out, head=self.command == "HEAD", length=resp.getheader("content-length")
                )

            def _reply(
                self, status: int, data: bytes, headers: dict, head: bool = False, length: str | None = None
            ) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", length if head and length else str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # clients dropping stalled calls is expected
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, count: int, mode: str = "500") -> None:
        with self.lock:
            self.fail_next, self.mode = count, mode

    def slow(self, match: str, seconds: float) -> None:
        self.slow_match, self.slow_s = match, seconds

    def hold(self, match: str, method: str, forward: bool = False) -> None:
        self.released.clear()
        self.hold_match, self.hold_method, self.held, self.hold_forward = match, method, 0, forward

    def wait_held(self, timeout: float, alive=lambda: True) -> None:
        """Until a request is held (while `alive()` says the run that should make it can still come)."""
        deadline = time.monotonic() + timeout
        while not self.held:
            assert time.monotonic() < deadline, f"no {self.hold_method} of {self.hold_match!r} came"
            assert alive(), f"the run ended before its {self.hold_method} of {self.hold_match!r}"
            time.sleep(0.02)

    def release(self) -> None:
        self.hold_match = ""
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
