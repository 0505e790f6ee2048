"""One key per purpose, derived from STEMS_SECRET_KEY, so that no value a tenant can hold verifies anything else.

The server secret itself signs nothing. Each use gets HMAC-SHA256(server secret, "stems/<purpose>/v1"):
/from-storage grants, and the webhooks of API keys made before keys had their own secret (one value
per key, so even those tenants cannot verify or forge each other's deliveries, nor mint a grant).
A new purpose is a new label here, never the server secret or another purpose's key.
"""

from __future__ import annotations

import hashlib
import hmac

INGEST_GRANT = "ingest-grant"
LEGACY_WEBHOOK = "legacy-webhook"


def derive(server_secret: str, purpose: str) -> str:
    """The key of `purpose` (hex): without the server secret, one purpose's key tells nothing of another's."""
    return hmac.new(server_secret.encode(), f"stems/{purpose}/v1".encode(), hashlib.sha256).hexdigest()


def legacy_webhook_secret(server_secret: str, key_id: str | None) -> str:
    """What signs the webhooks of a key without a secret of its own (or of a job older than key ids)."""
    return derive(server_secret, LEGACY_WEBHOOK if key_id is None else f"{LEGACY_WEBHOOK}/{key_id}")
