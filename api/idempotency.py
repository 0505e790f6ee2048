"""`Idempotency-Key` on POSTs: the same key and body answer the same response and queue nothing new.

The key is claimed with SET NX before the work runs, so two concurrent requests with one
key cannot both queue a job; a different body under a used key is a 409. Work that writes
its records in one transaction can record the response in it too (`Claim.record`), so a
request whose process dies right after the write still answers its replay; a claim that
never got as far as writing anything is taken over by a replay after `STALE_S`. A replay whose
audio or job has since been deleted (or expired) answers 410 Gone: it neither re-creates it
silently nor points at an id that answers 404.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.errors import Conflict, Gone, Invalid
from stems.jobstore import JobStore

from .deps import Services

TTL_S = 24 * 3600
STALE_S = 600.0  # longer than any request takes between its claim and its first write (a 1 GiB upload's PUT)


def body_hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class Claim:
    """A request's idempotency scope (None without a key) and its body's digest."""

    store: JobStore
    scope: tuple[str, ...] | None
    digest: str

    def record(self, pipe, response: dict) -> None:
        """Record the response in the transaction `pipe` that writes the work it answers for."""
        if self.scope is not None:
            self.store.remember_request(self.scope, self.digest, response, TTL_S, pipe)


def claim_for(svc: Services, user: str, route: str, idem_key: str | None, digest: str) -> Claim:
    if not idem_key:
        return Claim(svc.store, None, digest)
    if len(idem_key) > 255:
        raise Invalid("Idempotency-Key is longer than 255 characters", field="Idempotency-Key")
    return Claim(svc.store, (user, route, hashlib.sha256(idem_key.encode()).hexdigest()), digest)


def _still_there(store: JobStore, response: dict) -> None:
    if "creation_id" in response:
        kind, id_, exists = "split", response["creation_id"], store.get_job(response["creation_id"])
    elif "audio_id" in response:
        kind, id_, exists = "audio", response["audio_id"], store.get_asset(response["audio_id"])
    else:
        return
    if exists is None:
        why = "deleted" if store.deleted(id_) else "deleted (or expired by the retention policy)"
        raise Gone(
            f"the {kind} this Idempotency-Key created was {why}; send the request with a new "
            f"Idempotency-Key to create another",
            **{"creation_id" if kind == "split" else "audio_id": id_},
        )


def run_once(claim: Claim, run: Callable[[], dict]) -> dict:
    if claim.scope is None:
        return run()
    seen = claim.store.claim_request(claim.scope, claim.digest, TTL_S, STALE_S)
    if seen is not None:
        if seen["hash"] != claim.digest:
            raise Conflict("this Idempotency-Key was used with a different request body", field="Idempotency-Key")
        if seen["response"] is None:
            raise Conflict(
                "a request with this Idempotency-Key is still being processed; retry shortly", field="Idempotency-Key"
            )
        _still_there(claim.store, seen["response"])
        return seen["response"]
    try:
        response = run()
    except BaseException:
        claim.store.forget_request(claim.scope)  # a refused request does not burn the key
        raise
    claim.store.remember_request(claim.scope, claim.digest, response, TTL_S)
    return response


def once(svc: Services, user: str, route: str, idem_key: str | None, digest: str, run: Callable[[], dict]) -> dict:
    return run_once(claim_for(svc, user, route, idem_key, digest), run)
