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

from . import heartbeat  # noqa: F401 - registers the worker's model report on start
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
    payload = {"creation_id": job.id, "status": job.status.value, "preset": job.preset, "audio_id": job.audio_id,
               "error": job.error, "stem_ids": job.stem_ids, "upscaled_ids": job.upscaled_ids}
    try:
        status = deliver(job.callback_url, payload, ctx.settings)
    except LinkError:
        return  # the URL became unsafe (or never was): never retried
    except ConnectionError:
        status = 0
    if status >= 300 or status == 0:
        if self.request.retries + 1 >= ctx.settings.webhook_attempts:
            log.warning("webhook for job %s gave up after %d attempts", job_id, self.request.retries + 1)
            return
        raise self.retry(countdown=backoff(self.request.retries, ctx.settings.webhook_backoff_s))


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
