"""Which stored objects a tenant may register with POST /from-storage: its own ingestion prefix, or a signed grant.

An ingestion service writes a tenant's objects under `{STEMS_INGEST_PREFIX}{user_id}/...`
(relative to S3_PREFIX). Anything else needs a grant: an HMAC under STEMS_SECRET_KEY that names
the user, the key (or a prefix ending in `/`) and an expiry, minted by the operator with
`stems keys grant`. The API answers 404 for every other key, exactly as for a key that does not
exist, so a tenant cannot learn which objects exist outside what it was given.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time


def user_prefix(ingest_prefix: str, user_id: str) -> str:
    return f"{ingest_prefix}{user_id}/"


def clean_key(key: str) -> str | None:
    """The key without a leading slash; None for keys no ingestion service writes (`..`, empty parts)."""
    key = key.lstrip("/")
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in ("", ".", ".."):
        return None
    return key


def _mac(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), b"stems-ingest-grant." + payload, hashlib.sha256).hexdigest()


def mint_grant(secret: str, user_id: str, key: str, ttl_s: float, now: float | None = None) -> str:
    """A grant letting `user_id` register `key` (or any key under it, when it ends with `/`) for `ttl_s` seconds."""
    expires = int((time.time() if now is None else now) + ttl_s)
    payload = base64.urlsafe_b64encode(json.dumps({"u": user_id, "k": key, "e": expires}, sort_keys=True).encode())
    return f"g1.{payload.decode().rstrip('=')}.{_mac(secret, payload.rstrip(b'='))}"


def grant_allows(secret: str, grant: str, user_id: str, key: str, now: float | None = None) -> bool:
    try:
        version, payload, mac = grant.split(".")
        if version != "g1" or not hmac.compare_digest(_mac(secret, payload.encode()), mac):
            return False
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        return False
    if claims.get("u") != user_id or int(claims.get("e", 0)) < (time.time() if now is None else now):
        return False
    granted = str(claims.get("k", ""))
    return key == granted or (granted.endswith("/") and key.startswith(granted))


def may_register(key: str, user_id: str, ingest_prefix: str, secret: str, grant: str | None) -> bool:
    return key.startswith(user_prefix(ingest_prefix, user_id)) or (
        grant is not None and grant_allows(secret, grant, user_id, key))
