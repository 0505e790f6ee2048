"""`Idempotency-Key` on POSTs: the same key and body answer the same response and queue nothing new.

The key is claimed with SET NX before the work runs, so two concurrent requests with one
key cannot both queue a job; a different body under a used key is a 409.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable

from .deps import Conflict, Invalid, Services

TTL_S = 24 * 3600


def body_hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def once(svc: Services, user: str, route: str, idem_key: str | None, digest: str, run: Callable[[], dict]) -> dict:
    if not idem_key:
        return run()
    if len(idem_key) > 255:
        raise Invalid("Idempotency-Key is longer than 255 characters", field="Idempotency-Key")
    key = svc.store.k("idem", user, route, hashlib.sha256(idem_key.encode()).hexdigest())
    claim = json.dumps({"hash": digest, "response": None})
    if not svc.store.r.set(key, claim, nx=True, ex=TTL_S):
        seen = json.loads(svc.store.r.get(key) or claim)
        if seen["hash"] != digest:
            raise Conflict("this Idempotency-Key was used with a different request body", field="Idempotency-Key")
        if seen["response"] is None:
            raise Conflict("a request with this Idempotency-Key is still being processed; retry shortly",
                           field="Idempotency-Key")
        return seen["response"]
    try:
        response = run()
    except BaseException:
        svc.store.r.delete(key)  # a refused request does not burn the key
        raise
    svc.store.r.set(key, json.dumps({"hash": digest, "response": response}), ex=TTL_S)
    return response
