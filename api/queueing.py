"""Queueing work from the API: the record and the message it is owed written in one transaction, then sent.

If the broker refuses, the work is undone and the request answers 503 with Retry-After:
nothing is left half-made (no record, no quota slot, no object of ours, the Idempotency-Key
free for the retry). If the API dies between the write and the send, the outbox entry falls
due after STEMS_ENQUEUE_GRACE_S and a worker's reaper sends the message.
"""
from __future__ import annotations

import logging
import time

from stems.models import AudioAsset, Job, Stem
from workers.celery_app import broker_queue
from workers.messages import TASKS, send_split

from .deps import Services, Unavailable
from .idempotency import Claim

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5


def _refused(what: str, exc: Exception) -> Unavailable:
    log.warning("the broker refused %s: %s: %s", what, exc.__class__.__name__, exc)
    return Unavailable("the job queue is unavailable, so nothing was queued; try again shortly",
                       retry_after=RETRY_AFTER_S)


def queue_job(svc: Services, job: Job, stems: list[Stem], claim: Claim, response: dict) -> None:
    """Write the job, its stems, its owed message and the idempotent response together; then send the message."""
    score = 0

    def also(pipe) -> None:
        nonlocal score
        score = svc.store.owe("split", job.id, time.time() + svc.settings.enqueue_grace_s, pipe)
        claim.record(pipe, response)

    svc.store.create_job(job, stems, also)
    try:
        send_split(svc.celery, svc.settings, job)
    except Exception as exc:  # whatever the broker's client raises: never a 500, never a job without a message
        svc.store.delete_job_records(job, tombstone=False)
        raise _refused(f"job {job.id}", exc) from None
    # kept, due again after STEMS_RESEND_QUEUED_S: a job whose message the broker lost is sent again
    svc.store.settle("split", job.id, score, again_at=time.time() + svc.settings.resend_queued_s)


def queue_import(svc: Services, asset: AudioAsset) -> None:
    """Write the asset with its owed import message, then send it; undo both (and our object) if the broker refuses."""
    score = svc.store.owe("import", asset.id, time.time() + svc.settings.enqueue_grace_s)
    svc.store.put_asset(asset)
    try:
        svc.celery.send_task(TASKS["import"], args=[asset.id], queue=broker_queue("cpu", svc.settings))
    except Exception as exc:
        svc.store.delete_asset(asset.id)
        svc.store.settle("import", asset.id)
        if asset.origin == "upload":  # a link has no object yet; an ingested object is not ours
            svc.storage.delete(asset.object_key)
        raise _refused(f"the import of {asset.id}", exc) from None
    svc.store.settle("import", asset.id, score)
