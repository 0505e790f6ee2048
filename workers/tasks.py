"""Celery tasks: thin, idempotent, JSON ids in; the work lives in importer / splitter.

Retry policy: errors that retrying can fix (storage 5xx or timeouts, Redis connection
loss) are retried with jittered exponential backoff; everything else fails the job at
once with its reason. The attempt count lives in our job store, not only in Celery.
"""
from __future__ import annotations

import logging
import random

import redis
from celery.exceptions import SoftTimeLimitExceeded

from pipelines.errors import StemsError
from stems.models import JobStatus
from stems.netfetch import LinkError
from stems.webhooks import deliver

from . import heartbeat, preflight, retention  # noqa: F401 - worker start-up hooks: model report, refusals, sweep
from .celery_app import app
from .context import context
from .importer import import_audio
from .splitter import discard_outputs, finish, run_split

log = logging.getLogger(__name__)

RETRYABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


def backoff(retries: int, base: float = 1.0) -> float:
    return min(60.0, base * 2.0 ** retries) * (0.5 + random.random())


def _retryable(exc: Exception) -> bool:
    return isinstance(exc, RETRYABLE) or (isinstance(exc, StemsError) and exc.retryable)


@app.task(name="stems.import_audio", bind=True, max_retries=8)
def import_audio_task(self, audio_id: str) -> None:
    try:
        import_audio(audio_id, context())
    except Exception as exc:
        if _retryable(exc):
            raise self.retry(exc=exc, countdown=backoff(self.request.retries))
        raise


@app.task(name="stems.webhook", bind=True, max_retries=None)
def webhook_task(self, job_id: str) -> None:
    """Tell the job's callback_url how it ended; retried with backoff, bounded by settings."""
    ctx = context()
    job = ctx.store.get_job(job_id)
    if job is None or not job.callback_url:
        return
    secret = _signing_secret(job, ctx)
    if secret is None:
        log.warning("webhook for job %s not sent: its API key %s was revoked", job_id, job.key_id)
        return
    payload = {"creation_id": job.id, "status": job.status.value, "preset": job.preset, "audio_id": job.audio_id,
               "error": job.error, "stem_ids": job.stem_ids, "upscaled_ids": job.upscaled_ids}
    try:
        status = deliver(job.callback_url, payload, secret, ctx.settings)
    except LinkError:
        return  # the URL became unsafe (or never was): never retried
    except ConnectionError:
        status = 0
    if status >= 300 or status == 0:
        if self.request.retries + 1 >= ctx.settings.webhook_attempts:
            log.warning("webhook for job %s gave up after %d attempts", job_id, self.request.retries + 1)
            return
        raise self.retry(countdown=backoff(self.request.retries, ctx.settings.webhook_backoff_s))


def _signing_secret(job, ctx) -> str | None:
    """The webhook secret of the key that created the job; the server secret for keys (or jobs) older than
    per-key secrets; None when the key was revoked."""
    if job.key_id is None:
        return ctx.settings.secret_key
    key = ctx.store.key_by_id(job.key_id)
    return None if key is None else key.webhook_secret or ctx.settings.secret_key


def _notify(job_id: str, ctx) -> None:
    job = ctx.store.get_job(job_id)
    if job and job.callback_url and job.status in (JobStatus.complete, JobStatus.failed):
        if ctx.store.r.set(ctx.store.k("webhook", job_id), "1", nx=True, ex=7 * 86400):
            webhook_task.apply_async(args=[job_id], queue="cpu")


@app.task(name="stems.split", bind=True, max_retries=8)
def split_task(self, job_id: str) -> None:
    ctx = context()
    try:
        _split(self, job_id, ctx)
    finally:
        try:
            _notify(job_id, ctx)
        except RETRYABLE:
            pass


def _split(self, job_id: str, ctx) -> None:
    try:
        run_split(job_id, ctx, self.request.hostname)
    except SoftTimeLimitExceeded:
        job = ctx.store.get_job(job_id)
        if job is not None:
            discard_outputs(job, ctx)
        finish(job_id, ctx, JobStatus.failed, {"code": "time_limit", "message": "the split ran past its time limit"})
    except Exception as exc:
        if _retryable(exc) and self.request.retries < self.max_retries:
            log.warning("job %s: retryable error %s, retrying", job_id, exc)
            try:
                ctx.store.update_job(job_id, _back_to_queue)
            except RETRYABLE:
                pass
            raise self.retry(exc=exc, countdown=backoff(self.request.retries))
        log.exception("job %s failed", job_id)
        finish(job_id, ctx, JobStatus.failed, {"code": "internal_error", "message": f"{exc.__class__.__name__}: {exc}"})


def _back_to_queue(job):
    if job.status.terminal:
        return None
    job.status, job.stage = JobStatus.queued, "retrying"
    return job
