"""Job webhooks: a signed POST to the job's `callback_url` when it completes or fails.

The body is JSON. `X-Stems-Signature: t=<unix seconds>,v1=<hex>` carries the time of signing
and HMAC-SHA256 of `"<t>.<body>"` under the webhook secret of the API key that created the job
(each key has its own, shown once by `stems keys create`, renewed by `stems keys rotate`). A
receiver checks the HMAC and that `t` is within 5 minutes of its clock (`verify` does both), so
a captured delivery cannot be replayed later. The URL passes the same SSRF checks as `/from-link`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from pipelines.errors import LinkError

from .netfetch import check_url, pinned
from .settings import Settings

TOLERANCE_S = 300
HEADER = "x-stems-signature"


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The `X-Stems-Signature` header value for `body`, signed now (or at `timestamp`)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_mac(secret, t, body)}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = TOLERANCE_S, now: float | None = None) -> bool:
    """True when `header` signs `body` under `secret` and was made within `tolerance_s` of now."""
    try:
        parts = [p.split("=", 1) for p in header.split(",")]
        t = int(next(v for k, v in parts if k.strip() == "t"))
        macs = [v.strip() for k, v in parts if k.strip() == "v1"]
    except (ValueError, StopIteration):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = _mac(secret, t, body)
    return any(hmac.compare_digest(expected, m) for m in macs)


def deliver(url: str, payload: dict[str, Any], secret: str, settings: Settings) -> int:
    """POST the payload once, signed with `secret`; returns the HTTP status. Raises LinkError for refused targets.

    Bounded: each network step may wait STEMS_WEBHOOK_TIMEOUT_S at most (10 s at most), the
    answer's body is never read (closing the stream drops the connection, so an endless body
    costs nothing), and the webhook task's soft time limit, the same setting, ends a receiver
    that trickles its headers.
    """
    _, address = check_url(url, settings)
    target, pin = pinned(url, address)  # post to the address we checked, not to a fresh DNS answer
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"content-type": "application/json", HEADER: sign(secret, body), "user-agent": "stems-webhook/1", **pin}
    try:
        with httpx.stream(
            "POST",
            target,
            content=body,
            headers=headers,
            follow_redirects=False,
            timeout=httpx.Timeout(min(10.0, settings.webhook_timeout_s)),
        ) as r:
            return r.status_code
    except httpx.HTTPError as exc:
        raise ConnectionError(f"webhook delivery failed: {exc.__class__.__name__}") from exc


__all__ = ["deliver", "sign", "verify", "LinkError", "HEADER", "TOLERANCE_S"]
