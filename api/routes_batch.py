"""Batches of splits: up to 100 create-stems bodies in one call, each answered as a single call would be.

Items run in order through the same code as `/create-stems`, so the active-job quota and the
output budgets count every item before it (an item past the quota gets the 429 a single call
would). One Idempotency-Key covers the batch: a replay answers the recorded batch; each item
also carries a key derived from it, so a batch whose process died half-way queues, when sent
again (once its claim is stale, `api/idempotency.py`), only the items it had not queued yet.
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Header
from pydantic import ValidationError

from pipelines.errors import StemsError

from .deps import CallerKey, Svc, User
from .idempotency import body_hash, claim_for, run_once
from .routes_stems import create_stems
from .schemas import BatchQueued, CreateStems, CreateStemsBatch

router = APIRouter(tags=["stems"])


def _error(status: int, code: str, detail, **fields) -> dict:
    return {"status": "error", "http_status": status, "code": code, "detail": detail, **fields}


@router.post(
    "/create-stems/batch",
    response_model=BatchQueued,
    response_model_exclude_unset=False,
    summary="Queue up to 100 stem splits in one call",
    responses={
        409: {"description": "the Idempotency-Key was used with another batch, or is in use"},
        422: {"description": "not a list of 1 to 100 items (each item's own errors are in `items`)"},
    },
)
def create_stems_batch(
    body: CreateStemsBatch,
    svc: Svc,
    user: User,
    key_id: CallerKey,
    idempotency_key: str | None = Header(None),
) -> dict:
    def item_key(i: int) -> str | None:
        if not idempotency_key:
            return None
        return f"batch:{hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]}:{i}"

    def one(i: int, raw: dict) -> dict:
        try:
            request = CreateStems.model_validate(raw)
        except ValidationError as exc:
            errors = [{**e, "loc": ["body", *e["loc"]]} for e in exc.errors(include_url=False, include_context=False)]
            return _error(422, "invalid_request", errors)
        try:
            return create_stems(request, svc, user, key_id, item_key(i))
        except StemsError as exc:
            return _error(exc.http_status, **{"detail": exc.message, **exc.to_dict()})

    def run() -> dict:
        return {"items": [one(i, raw) for i, raw in enumerate(body.items)]}

    claim = claim_for(svc, user, "create-stems/batch", idempotency_key, body_hash(body.model_dump_json()))
    return run_once(claim, run)
