"""Which stored objects a tenant may register with POST /from-storage: its own ingestion prefix, or a signed grant.

An ingestion service writes a tenant's objects under `{STEMS_INGEST_PREFIX}{user_id}/...`
(relative to S3_PREFIX). Anything else needs a grant: an HMAC under the grant key (derived from
STEMS_SECRET_KEY for this purpose only, `stems/purpose_keys.py`) that names the user, the key (or a
prefix ending in `/`), when it was minted and when it expires, minted by the operator with
`stems keys grant`. STEMS_GRANT_MAX_TTL_S bounds a grant where it is used, not only where it is
minted. The API answers 404 for every other key, exactly as for a key that does not exist, so a
tenant cannot learn which objects exist outside what it was given.

A registered object stays where the ingestion service wrote it, so it can be rewritten after its
import probed it; `check_original` lets a worker refuse an original that is no longer what was imported.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

from pipelines.errors import OriginalChanged

from .purpose_keys import INGEST_GRANT, derive


def user_prefix(ingest_prefix: str, user_id: str) -> str:
    return f"{ingest_prefix}{user_id}/"


def clean_key(key: str) -> str | None:
    """The key without a leading slash; None for keys no ingestion service writes (`..`, empty parts)."""
    key = key.lstrip("/")
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in ("", ".", ".."):
        return None
    return key


CLOCK_SKEW_S = 60  # a grant minted on a machine whose clock runs a little ahead is still good


def _mac(secret: str, payload: bytes) -> str:
    return hmac.new(derive(secret, INGEST_GRANT).encode(), b"g2." + payload, hashlib.sha256).hexdigest()


def mint_grant(secret: str, user_id: str, key: str, ttl_s: float, now: float | None = None) -> str:
    """A grant letting `user_id` register `key` (or any key under it, when it ends with `/`) for `ttl_s` seconds.

    `secret` is the server secret; the grant is signed with the grant key derived from it."""
    issued = int(time.time() if now is None else now)
    claims = {"u": user_id, "k": key, "i": issued, "e": int(issued + ttl_s)}
    payload = base64.urlsafe_b64encode(json.dumps(claims, sort_keys=True).encode()).rstrip(b"=")
    return f"g2.{payload.decode()}.{_mac(secret, payload)}"


def grant_allows(secret: str, grant: str, user_id: str, key: str, max_ttl_s: float, now: float | None = None) -> bool:
    """Whether `grant` lets `user_id` register `key` now: signed by our grant key, for this user and key, minted
    no later than now and valid for at most `max_ttl_s` (STEMS_GRANT_MAX_TTL_S) from then, not yet expired."""
    now = time.time() if now is None else now
    try:
        version, payload, mac = grant.split(".")
        if version != "g2" or not hmac.compare_digest(_mac(secret, payload.encode()), mac):
            return False
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        issued, expires = int(claims["i"]), int(claims["e"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    if claims.get("u") != user_id or expires < now or issued > now + CLOCK_SKEW_S or expires - issued > max_ttl_s:
        return False
    granted = str(claims.get("k", ""))
    return key == granted or (granted.endswith("/") and key.startswith(granted))


def may_register(key: str, user_id: str, ingest_prefix: str, secret: str, grant: str | None, max_ttl_s: float) -> bool:
    return key.startswith(user_prefix(ingest_prefix, user_id)) or (
        grant is not None and grant_allows(secret, grant, user_id, key, max_ttl_s)
    )


def check_original(path: Path, size: int | None, sha256: str | None) -> None:
    """Raise OriginalChanged unless the file at `path` has the size and sha256 its import recorded.

    The size is compared first, so a rewritten object of another size costs no hashing."""
    if size is None or sha256 is None:
        return  # imported before sizes and hashes were recorded
    found = path.stat().st_size
    if found != size:
        raise OriginalChanged(
            f"the stored original is {found} bytes; it was {size} bytes when imported (it was "
            f"rewritten since): register the new object to split it",
            size=found,
            imported_size=size,
        )
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise OriginalChanged(
            "the stored original's sha256 differs from the one recorded at its import (it was "
            "rewritten since): register the new object to split it",
            sha256=digest.hexdigest(),
            imported_sha256=sha256,
        )
