"""Celery tasks: thin, idempotent, JSON ids in; the work lives in importer / splitter.

Every task is bounded: a time limit (soft, then a hard kill after STEMS_TIME_LIMIT_GRACE_S;
a split's limits come with its message, they follow the audio's length) and a try count in
our job store, so a task that kills its worker is not delivered forever. Errors that retrying
can fix (storage 5xx or timeouts, Redis connection loss) are tried again after a jittered
exponential backoff (`workers/retry.py`); everything else fails at once with its reason.
"""

from __future__ import annotations

import logging
import time

from celery.exceptions import SoftTimeLimitExceeded

from pipelines.errors import LinkError
from stems.models import JobStatus
from stems.purpose_keys import legacy_webhook_secret
from stems.settings import get_settings
from stems.webhooks import deliver

# worker start-up hooks: the model report, production refusals, the reaper and shutdown hand-back, the retention sweep
from . import heartbeat, preflight, reaper, retention  # noqa: F401
from .celery_app import app
from .context import context, store_context
from .delivery import run_delivery
from .importer import run_import
from .mastering import run_master
from .messages import run_then_flush
from .retry import backoff
from .splitter import run_split

log = logging.getLogger(__name__)

_s = get_settings()
WEBHOOK_HARD_S = _s.webhook_timeout_s + 10.0


@app.task(
    name="stems.import_audio",
    soft_time_limit=_s.import_time_limit_s,
    time_limit=_s.import_time_limit_s + _s.time_limit_grace_s,
)
def import_audio_task(audio_id: str) -> None:
    run_import(audio_id, store_context())


@app.task(name="stems.split", bind=True)
def split_task(self, job_id: str) -> None:
    """A job's split: the whole of it, or its separation stage when its encodes run on the CPU queue."""
    run_then_flush(run_split, job_id, context(), app, self.request.hostname)


@app.task(name="stems.deliver", bind=True)
def deliver_task(self, job_id: str) -> None:
    """A separated job's delivery stage: WAVs, HQ encodes and peaks, uploaded; the job completed."""
    run_then_flush(run_delivery, job_id, context(), app, self.request.hostname)


@app.task(name="stems.master_audio", bind=True)
def master_task(self, mastering_id: str) -> None:
    """Master an audio, stem or upscaled copy (its limits come with its message, as a split's do)."""
    run_master(mastering_id, store_context(), self.request.hostname)


@app.task(name="stems.webhook", soft_time_limit=_s.webhook_timeout_s, time_limit=WEBHOOK_HARD_S)
def webhook_task(job_id: str) -> None:
    """Tell the job's callback_url how it ended; tried again with backoff, at most STEMS_WEBHOOK_ATTEMPTS times."""
    ctx = store_context()
    s, store = ctx.settings, ctx.store
    job = store.get_job(job_id)
    if job is None or not job.callback_url or job.status not in (JobStatus.complete, JobStatus.failed):
        store.settle("webhook", job_id)
        return
    tries = store.count_try("webhook", job_id)
    if tries > s.webhook_attempts:  # this delivery's earlier tries killed their worker
        log.warning("webhook for job %s gave up after %d attempts", job_id, tries - 1)
        store.settle("webhook", job_id)
        return
    # should this worker die mid-delivery, the webhook is owed again once its time limit has passed
    store.owe("webhook", job_id, time.time() + WEBHOOK_HARD_S + s.enqueue_grace_s)
    secret = _signing_secret(job, ctx)
    if secret is None:
        log.warning("webhook for job %s not sent: its API key %s was revoked", job_id, job.key_id)
        store.settle("webhook", job_id)
        return
    payload = {
        "creation_id": job.id,
        "status": job.status.value,
        "preset": job.preset,
        "audio_id": job.audio_id,
        "error": job.error,
        "stem_ids": job.stem_ids,
        "upscaled_ids": job.upscaled_ids,
    }
    try:
        status = deliver(job.callback_url, payload, secret, s)
    except LinkError:  # the URL became unsafe (or never was): never tried again
        store.settle("webhook", job_id)
        return
    except (ConnectionError, SoftTimeLimitExceeded):
        status = 0
    if 200 <= status < 300:
        store.settle("webhook", job_id)
    elif tries >= s.webhook_attempts:
        log.warning("webhook for job %s gave up after %d attempts", job_id, tries)
        store.settle("webhook", job_id)
    else:
        store.owe("webhook", job_id, time.time() + backoff(tries - 1, s.webhook_backoff_s))


def _signing_secret(job, ctx) -> str | None:
    """The webhook secret of the key that created the job; for keys (or jobs) older than per-key secrets, a
    value derived from the server secret for that key alone (never the server secret, which would let its
    tenant mint grants); None when the key was revoked."""
    if job.key_id is None:
        return legacy_webhook_secret(ctx.settings.secret_key, None)
    key = ctx.store.key_by_id(job.key_id)
    if key is None:
        return None
    return key.webhook_secret or legacy_webhook_secret(ctx.settings.secret_key, key.key_id)
