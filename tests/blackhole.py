"""Loopback TCP servers that misbehave on purpose: one accepts connections and never answers (a hung
broker), one answers HTTP as slowly or as endlessly as asked (a hostile webhook receiver)."""

from __future__ import annotations

import socket
import threading
import time


class Server:
    """Accepts on 127.0.0.1:<port>; each connection is handed to `serve(conn)` in a thread."""

    def __init__(self, serve) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.closed = threading.Event()
        self._serve = serve
        threading.Thread(target=self._accept, daemon=True, name="blackhole").start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self._serve(conn, self.closed)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def silent(conn: socket.socket, closed: threading.Event) -> None:
    """Read whatever comes and never answer."""
    conn.settimeout(0.5)
    while not closed.is_set():
        try:
            if not conn.recv(1 << 16):
                return
        except TimeoutError:
            continue


def trickle_headers(conn: socket.socket, closed: threading.Event) -> None:
    """Answer a request with one header byte a second, forever."""
    conn.recv(1 << 16)
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100_000:
        if closed.wait(1.0):
            return
        conn.sendall(bytes([byte]))


def endless_body(conn: socket.socket, closed: threading.Event) -> None:
    """Answer 200 at once, then a body that never ends."""
    conn.recv(1 << 16)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    block = b"x" * 65536
    t0 = time.monotonic()
    while not closed.is_set() and time.monotonic() - t0 < 120:
        conn.sendall(block)
