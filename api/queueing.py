"""Queueing work from the API: the record and the message it is owed written in one transaction, then sent.

If the broker refuses, the work is undone and the request answers 503 `broker_unavailable` with
Retry-After: nothing is left half-made (no record, no quota slot, no object of ours, the
Idempotency-Key free for the retry). If the API dies between the write and the send, the outbox
entry falls due after STEMS_ENQUEUE_GRACE_S and a worker's reaper sends the message.
"""

from __future__ import annotations

import logging
import time

from pipelines.errors import BrokerUnavailable, DependencyUnavailable
from stems.models import AudioAsset, Job, Stem
from workers.messages import publish, send_split

from .deps import Services
from .idempotency import Claim

log = logging.getLogger(__name__)


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
    except BrokerUnavailable as exc:  # never a 500, never a job without a message
        log.warning("nothing queued for job %s: %s", job.id, exc.line())
        svc.store.delete_job_records(job, tombstone=False)
        raise
    # kept, due again after STEMS_RESEND_QUEUED_S: a job whose message the broker lost is sent again
    svc.store.settle("split", job.id, score, again_at=time.time() + svc.settings.resend_queued_s)


def queue_import(svc: Services, asset: AudioAsset) -> None:
    """Write the asset with its owed import message in one transaction, then send the message; if either fails,
    undo what was written, and our uploaded object with it."""
    score = 0

    def owe(pipe) -> None:
        nonlocal score
        score = svc.store.owe("import", asset.id, time.time() + svc.settings.enqueue_grace_s, pipe)

    try:
        svc.store.put_asset(asset, owe)
    except DependencyUnavailable:  # nothing written
        _drop_upload(svc, asset)
        raise
    try:
        publish(svc.celery, svc.settings, "import", asset.id, "cpu")
    except BrokerUnavailable as exc:
        log.warning("nothing kept of the import of %s: %s", asset.id, exc.line())
        try:
            svc.store.delete_asset_record(asset, tombstone=False)  # the asset and its owed entry, together
        except DependencyUnavailable as also:  # Redis went too: the entry stays, and a worker imports it later
            log.warning("the import of %s stays owed: %s", asset.id, also.line())
            raise exc from None
        _drop_upload(svc, asset)
        raise
    svc.store.settle("import", asset.id, score)


def _drop_upload(svc: Services, asset: AudioAsset) -> None:
    if asset.origin != "upload":  # a link has no object yet; an ingested object is not ours
        return
    try:
        svc.storage.delete(asset.object_key)
    except DependencyUnavailable as exc:
        log.warning("the upload of %s stays in storage without its record: %s", asset.id, exc.line())
