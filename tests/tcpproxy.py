"""A loopback TCP forwarder a test can stop and start again on the same port: an endpoint that goes down.

`stop()` closes the listening port and every connection through it, so a client meets what it meets
when a server process is gone (connection refused, and its pooled connections reset); `start()`
listens on the same port again and forwards to the same upstream. It stands in front of a server
whose state must outlive the outage (moto's S3 server keeps its buckets in memory only).
"""

from __future__ import annotations

import socket
import threading

from stems.redisboot import free_port


class TcpProxy:
    def __init__(self, upstream_port: int, port: int | None = None, host: str = "127.0.0.1") -> None:
        """Listens on `host` (loopback, or an address a network namespace reaches) and forwards to loopback."""
        self.upstream_port = upstream_port
        self.host = host
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._stopped = threading.Event()
        self._listener = socket.create_server((self.host, self.port))  # SO_REUSEADDR: the same port again
        self._listener.settimeout(0.2)
        threading.Thread(
            target=self._accept, args=(self._listener, self._stopped), daemon=True, name=f"tcpproxy-{self.port}"
        ).start()

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket, stopped: threading.Event) -> None:
        while not stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if stopped.is_set():
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
