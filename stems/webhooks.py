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
    """POST the payload once; returns the HTTP status. Raises LinkError for refused targets."""
    _, address = check_url(url, settings)
    target, pin = pinned(url, address)  # post to the address we checked, not to a fresh DNS answer
    body = json.dumps(payload, sort_keys=True).encode()
    ts = str(int(time.time()))
    headers = {"content-type": "application/json", "x-stems-timestamp": ts,
               "x-stems-signature": sign(settings.webhook_secret, ts, body), "user-agent": "stems-webhook/1", **pin}
    try:
        r = httpx.post(target, content=body, headers=headers, timeout=10.0, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"webhook delivery failed: {exc.__class__.__name__}") from exc
    return r.status_code


__all__ = ["deliver", "sign", "verify", "LinkError"]
