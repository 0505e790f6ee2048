"""Job webhooks: a signed POST to the job's `callback_url` when it completes or fails.

The body is JSON; `X-Stems-Signature: sha256=<hex>` is HMAC-SHA256 of
`<X-Stems-Timestamp>.<body>` under `STEMS_WEBHOOK_SECRET`, so a receiver can check both
origin and freshness. The URL passes the same SSRF checks as `/from-link`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time

import httpx

from .netfetch import LinkError, check_url, pinned
from .settings import Settings


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def deliver(url: str, payload: dict, settings: Settings) -> int:
    """POST the payload once; returns the HTTP status. Raises LinkError for refused targets.

    Bounded: each network step may wait STEMS_WEBHOOK_TIMEOUT_S at most (10 s at most), the
    answer's body is never read (closing the stream drops the connection, so an endless body
    costs nothing), and the webhook task's soft time limit, the same setting, ends a receiver
    that trickles its headers.
    """
    _, address = check_url(url, settings)
    target, pin = pinned(url, address)  # post to the address we checked, not to a fresh DNS answer
    body = json.dumps(payload, sort_keys=True).encode()
    ts = str(int(time.time()))
    headers = {"content-type": "application/json", "x-stems-timestamp": ts,
               "x-stems-signature": sign(settings.webhook_secret, ts, body), "user-agent": "stems-webhook/1", **pin}
    try:
        with httpx.stream("POST", target, content=body, headers=headers, follow_redirects=False,
                          timeout=httpx.Timeout(min(10.0, settings.webhook_timeout_s))) as r:
            return r.status_code
    except httpx.HTTPError as exc:
        raise ConnectionError(f"webhook delivery failed: {exc.__class__.__name__}") from exc


__all__ = ["deliver", "sign", "verify", "LinkError"]
