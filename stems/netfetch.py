"""Fetch a user-given URL without letting it reach our own network (no SSRF).

Only http and https; the URL is parsed once by `parse_link` (the API's schemas call it too, so
a malformed URL is a 422 naming its field before any handler runs); every address the host
resolves to must be public (global, and not private, loopback, link-local, site-local, cloud
metadata, multicast or reserved, also when embedded in an IPv6 address), checked again at every
redirect; plain-http requests go to the checked address itself, so a DNS answer that
changes between check and connect cannot redirect them. Size and time are limited.
Hosts in `STEMS_LINK_ALLOW_HOSTS` skip the address check (tests, internal mirrors).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import httpx

from pipelines.errors import LinkError, TooLarge

from .settings import Settings

NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address
MAX_URL = 4096
CONTROL = {chr(c) for c in range(0x21)} | {"\x7f"}  # controls and blanks: no valid URL holds them unescaped


def _public(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # a scoped IPv6 address ("fe80::1%eth0") is judged by its address
    if isinstance(addr, ipaddress.IPv6Address):
        # an IPv4 address inside an IPv6 one (mapped, 6to4, Teredo, NAT64) is judged as that IPv4 address
        nat64 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) if addr in NAT64 else None
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None) or nat64
        if embedded is not None and not _public(str(embedded)):
            return False
        if addr.is_site_local:  # fec0::/10: deprecated, yet routed inside some networks, and is_global says True
            return False
        if addr.ipv4_mapped:  # judged as its IPv4 address below (an IPv4 address has no is_site_local)
            return _public(str(addr.ipv4_mapped))
    # is_global alone misses some ranges on some Python versions: the explicit checks hold on every one
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_unspecified
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_link_local
    )


def parse_link(url: str) -> SplitResult:
    """The parts of an http(s) link with a host, or LinkError saying what is wrong with it; never ValueError."""
    if len(url) > MAX_URL:
        raise LinkError(f"the link is longer than {MAX_URL} characters")
    if any(ch in CONTROL for ch in url):
        raise LinkError("the link holds a blank or a control character (percent-encode it)", url=url[:200])
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range or not a number
        host = parts.hostname
    except ValueError as exc:  # "[" without "]", a bracketed host that is no IP address, a bad port
        raise LinkError(f"the link is malformed: {exc}", url=url[:200]) from None
    if parts.scheme not in ("http", "https"):
        raise LinkError("only http and https links are accepted", url=url[:200])
    if not host:
        raise LinkError("the link has no host", url=url[:200])
    if parts.username is not None or parts.password is not None:
        raise LinkError("links with credentials are not accepted", url=url[:200])
    if port == 0:
        raise LinkError("the link's port is 0", url=url[:200])
    try:
        ascii_host = host.encode("idna")  # an internationalised name is looked up as its IDNA (punycode) form
    except UnicodeError:
        raise LinkError(f"the link's host {host!r} is not a valid host name", url=url[:200]) from None
    if len(ascii_host) > 253:
        raise LinkError("the link's host name is longer than 253 characters", url=url[:200])
    return parts


def pinned(url: str, address: str) -> tuple[str, dict[str, str]]:
    """(target, headers) that send a plain-http request to the checked `address`, not to a fresh DNS answer.

    https keeps the host name (certificate checks need it); a DNS answer that changes
    between check and connect can only move it to another host with a valid certificate.
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        return url, {}
    host = f"[{address}]" if ":" in address else address
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), {"host": parts.netloc}


def check_url(url: str, settings: Settings) -> tuple[str, str]:
    """(url, address to connect to) or LinkError; resolves the host once."""
    parts = parse_link(url)  # also every redirect's Location, which no schema saw
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:  # ValueError: a name the resolver refuses outright
        raise LinkError(f"cannot resolve host {host!r}", url=url) from exc
    addresses = sorted({str(i[4][0]) for i in infos})
    if host not in settings.link_allow_hosts:
        bad = [a for a in addresses if not _public(a)]
        if bad:
            raise LinkError(f"host {host!r} resolves to a non-public address", url=url)
    return url, addresses[0]


def fetch_url(url: str, dest: Path, settings: Settings, max_redirects: int = 5) -> int:
    """Download `url` into `dest`; returns the size. Raises LinkError / TooLarge."""
    deadline = time.monotonic() + settings.link_timeout_s
    for _ in range(max_redirects + 1):
        url, address = check_url(url, settings)
        target, pin = pinned(url, address)  # connect to the address we checked
        headers = {"user-agent": "stems-import/1", **pin}
        try:
            with httpx.stream(
                "GET",
                target,
                headers=headers,
                follow_redirects=False,
                timeout=httpx.Timeout(min(30.0, settings.link_timeout_s)),
            ) as resp:
                if resp.is_redirect:
                    url = urljoin(url, resp.headers.get("location", ""))
                    continue
                if resp.status_code >= 400:
                    raise LinkError(f"the link answered HTTP {resp.status_code}", url=url, status=resp.status_code)
                declared = int(resp.headers.get("content-length") or 0)
                if declared > settings.max_upload_bytes:
                    raise TooLarge(f"the linked file is {declared} bytes; the maximum is {settings.max_upload_bytes}")
                n = 0
                with open(dest, "wb") as f:
                    for block in resp.iter_bytes(1 << 20):
                        n += len(block)
                        if n > settings.max_upload_bytes:
                            raise TooLarge(f"the linked file is over the maximum of {settings.max_upload_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise LinkError(f"the download took longer than {settings.link_timeout_s:.0f} s", url=url)
                        f.write(block)
                return n
        except httpx.HTTPError as exc:
            raise LinkError(f"could not fetch the link: {exc.__class__.__name__}", url=url) from exc
    raise LinkError(f"more than {max_redirects} redirects", url=url)
