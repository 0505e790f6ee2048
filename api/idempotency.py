"""`Idempotency-Key` on POSTs: the same key and body answer the same response and queue nothing new.

The key is claimed (in the job store, SET NX) before the work runs, so two concurrent requests
with one key cannot both queue a job; a different body under a used key is a 409. A replay whose
audio or job has since been deleted (or expired) answers 410 Gone: it neither re-creates it
silently nor points at an id that answers 404.
"""
from __future__ import annotations

import hashlib
from typing import Callable

from .deps import Conflict, Gone, Invalid, Services


def body_hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _still_there(svc: Services, response: dict) -> None:
    if "creation_id" in response:
        kind, id_, exists = "split", response["creation_id"], svc.store.get_job(response["creation_id"])
    elif "audio_id" in response:
        kind, id_, exists = "audio", response["audio_id"], svc.store.get_asset(response["audio_id"])
    else:
        return
    if exists is None:
        why = "deleted" if svc.store.deleted(id_) else "deleted (or expired by the retention policy)"
        raise Gone(f"the {kind} this Idempotency-Key created was {why}; send the request with a new "
                   f"Idempotency-Key to create another", **{"creation_id" if kind == "split" else "audio_id": id_})


def once(svc: Services, user: str, route: str, idem_key: str | None, digest: str, run: Callable[[], dict]) -> dict:
    if not idem_key:
        return run()
    if len(idem_key) > 255:
        raise Invalid("Idempotency-Key is longer than 255 characters", field="Idempotency-Key")
    seen = svc.store.claim_idempotency(user, route, idem_key, digest)
    if seen is not None:
        if seen["hash"] != digest:
            raise Conflict("this Idempotency-Key was used with a different request body", field="Idempotency-Key")
        if seen["response"] is None:
            raise Conflict("a request with this Idempotency-Key is still being processed; retry shortly",
                           field="Idempotency-Key")
        _still_there(svc, seen["response"])
        return seen["response"]
    try:
        response = run()
    except BaseException:
        svc.store.release_idempotency(user, route, idem_key)  # a refused request does not burn the key
        raise
    svc.store.record_idempotent_response(user, route, idem_key, digest, response)
    return response
