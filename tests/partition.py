"""A worker node behind a network link a drill can cut: its own network namespace where the machine allows one.

`NetnsLink` puts the worker in a network namespace of its own, joined to the host by a veth pair;
on the host side, forwarders bound to the veth's address carry its connections to Redis, storage
and the broker (which listen on loopback). `cut()` takes the host's end of the link down: packets
are dropped, so the worker's open connections hang and new ones time out, as in a real partition;
`heal()` brings it up again. Where namespaces cannot be made (no root, no `ip`), `ProxyLink` stands
in: the same forwarders on loopback, stopped and started (connections refused and reset instead).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from urllib.parse import urlsplit, urlunsplit

from tests.tcpproxy import TcpProxy


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _through(url: str, proxy: TcpProxy) -> str:
    """`url` with its host and port replaced by the forwarder's."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth + '@' if auth else ''}{proxy.host}:{proxy.port}"))


class _Link:
    kind = ""

    def __init__(self, host: str, urls: dict[str, str]) -> None:
        """`urls`: env name -> the service URL the worker reaches through the link."""
        self.proxies = {name: TcpProxy(urlsplit(url).port, host=host) for name, url in urls.items()}
        self.env = {name: _through(url, self.proxies[name]) for name, url in urls.items()}

    def argv(self, argv: list[str]) -> list[str]:
        return argv

    def close(self) -> None:
        for p in self.proxies.values():
            p.stop()


class ProxyLink(_Link):
    kind = "proxies"

    def __init__(self, urls: dict[str, str]) -> None:
        super().__init__("127.0.0.1", urls)

    def cut(self) -> None:
        for p in self.proxies.values():
            p.stop()

    def heal(self) -> None:
        for p in self.proxies.values():
            p.start()


class NetnsLink(_Link):
    kind = "network namespace"

    @staticmethod
    def unavailable() -> str | None:
        if os.geteuid() != 0 or not shutil.which("ip"):
            return "network namespaces need root and iproute2"
        probe = f"stp{uuid.uuid4().hex[:8]}"
        try:
            _ip("netns", "add", probe)
            _ip("netns", "del", probe)
        except (subprocess.CalledProcessError, OSError) as exc:
            return f"cannot make a network namespace here: {exc}"
        return None

    def __init__(self, urls: dict[str, str]) -> None:
        tag = uuid.uuid4().hex[:8]
        self.ns, self.host_if, peer = f"st{tag}", f"vh{tag}", f"vn{tag}"
        net = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.host_ip, ns_ip = f"{net}.1", f"{net}.2"
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", self.ns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        for args in (
            ("addr", "add", f"{ns_ip}/30", "dev", peer),
            ("link", "set", peer, "up"),
            ("link", "set", "lo", "up"),
        ):
            _ip("netns", "exec", self.ns, "ip", *args)
        super().__init__(self.host_ip, urls)

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def close(self) -> None:
        super().close()
        for args in (("link", "del", self.host_if), ("netns", "del", self.ns)):
            try:
                _ip(*args)
            except (subprocess.CalledProcessError, OSError):
                pass


def make_link(urls: dict[str, str]) -> _Link:
    return ProxyLink(urls) if NetnsLink.unavailable() else NetnsLink(urls)
