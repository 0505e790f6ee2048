"""An attempt at a split job, as the job store sees it: taken, renewed, finished, handed back or given up.

Every delivery that runs a job takes a new attempt: a token (`Job.attempt_id`), a lease and a
deadline, by compare-and-set on the job record. From then on the job's writes (stem records,
progress, the final status, usage) take effect only while that token owns the job; objects go
under the attempt's own prefix (`keys.attempt_prefix`), so an attempt that lost the job (its
node froze and came back, its broker connection dropped and the message went elsewhere) can
neither overwrite nor delete the winner's stems. Usage is metered in the transaction that
completes the job, which happens once; the same transaction owes the webhook.

A job split in two stages (`workers/delivery.py`) is handed from its separating attempt to
delivery with its float stems named in `Job.separated`; each delivery run is an attempt of its
own (a token, a lease, a deadline, counted in `Job.deliveries`), and a delivery that dies or is
handed back goes to delivery again, not to separation: the separated stems are kept.
"""
from __future__ import annotations

import os
import secrets
import socket
import time

from pipelines.errors import StemsError
from pipelines.split import SEPARATED
from stems.models import DELIVERY_QUEUE, Job, JobStatus, Separated, Stem, StemStatus
from stems.storage import keys

from .context import StoreContext

HOSTNAME = socket.gethostname()


class Superseded(StemsError):
    """This attempt no longer owns its job: another attempt does, or the job was handed back."""

    code = "superseded"


class GaveUp(StemsError):
    code = "too_many_attempts"


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_gone(job: Job, now: float) -> bool:
    """Whether the attempt holding a processing job can be taken over: its lease lapsed, or its process died here."""
    if job.lease_until is None or job.lease_until < now:
        return True
    return job.worker_host == HOSTNAME and job.worker_pid != os.getpid() and not alive(job.worker_pid)


def start(job_id: str, ctx: StoreContext, worker: str | None = None) -> Job | None:
    """Take the job for a new attempt; None if this delivery has nothing to do.

    Nothing to do: the job is unknown or ended, or separated already (a stale message: its
    delivery stage runs now), or a live attempt holds it (this delivery is a duplicate: a
    broker redelivered a message whose first run still goes on).
    """
    return _claim(job_id, ctx, worker, delivery=False)


def start_delivery(job_id: str, ctx: StoreContext, worker: str | None = None) -> Job | None:
    """Take a separated job for a delivery run; None if this message has nothing to do (as `start`)."""
    return _claim(job_id, ctx, worker, delivery=True)


def _claim(job_id: str, ctx: StoreContext, worker: str | None, delivery: bool) -> Job | None:
    s, now = ctx.settings, time.time()
    token = None

    def apply(job: Job) -> Job | None:
        nonlocal token
        if job.status.terminal or (job.separated is not None) != delivery:
            return None
        if job.status == JobStatus.processing and not holder_gone(job, now):
            return None
        if delivery:
            job.deliveries += 1
            token = job.attempt_id = f"{job.attempts}-d{job.deliveries}-{secrets.token_hex(4)}"
        else:
            job.attempts += 1
            token = job.attempt_id = f"{job.attempts}-{secrets.token_hex(4)}"
        job.status, job.stage = JobStatus.processing, "delivering" if delivery else "starting"
        job.started_at = job.started_at or now
        job.lease_until = now + s.lease_s
        job.deadline_at = now + s.hard_time_limit(job.audio_seconds or 0.0)
        job.worker, job.worker_host, job.worker_pid = worker, HOSTNAME, os.getpid()
        return job

    job = ctx.store.update_job(job_id, apply)
    return job if job is not None and token is not None and job.attempt_id == token else None


def hand_to_delivery(job: Job, ctx: StoreContext, separated: Separated, timings: dict[str, float]) -> bool:
    """Separation is done: the job waits for delivery with its float stems (only while this attempt owns it)."""
    def apply(current: Job) -> Job | None:
        if current.status != JobStatus.processing or current.attempt_id != job.attempt_id:
            return None
        current.separated, current.timings = separated, {**current.timings, **timings}
        current.stage, current.progress = "separated: waiting for delivery", max(current.progress, SEPARATED)
        current.attempt_id = current.lease_until = current.deadline_at = None
        return current

    def also(pipe, new: Job) -> None:
        ctx.store.owe("deliver", new.id, time.time() + ctx.settings.enqueue_grace_s, pipe)
        ctx.store.move_load(pipe, new.id, new.queue, DELIVERY_QUEUE)

    handed = []
    ctx.store.update_job(job.id, apply, lambda pipe, new: (also(pipe, new), handed.append(True)))
    return bool(handed)


def _pending(stem: Stem) -> Stem:
    stem.status, stem.wav_key, stem.hq_key, stem.peaks_key, stem.wav_size, stem.hq_size, stem.made_by = (
        StemStatus.pending, None, None, None, None, None, None)
    return stem


def reset_stems(job: Job, ctx: StoreContext) -> None:
    """Stem records back to pending for a new attempt (they may point at an earlier attempt's objects)."""
    stale = [_pending(s) for s in ctx.store.get_stems(job.stem_ids + job.upscaled_ids) if s.status != StemStatus.pending]
    if not ctx.store.put_stems_fenced(stale, job.id, job.attempt_id):
        raise Superseded("another attempt took the job over")


def finish(job_id: str, ctx: StoreContext, status: JobStatus, error: dict | None = None,
           usage_minutes: float = 0.0, attempt_id: str | None = None) -> Job | None:
    """End the job (only by `attempt_id`, if given); returns the ended job, or None if it was not ours to end.

    Completing meters the usage in the same transaction; completing or failing a job with a
    callback URL owes its webhook there too, so neither can be lost or counted twice.
    """
    ended = False

    def apply(job: Job) -> Job | None:
        nonlocal ended
        if job.status.terminal or (attempt_id is not None and job.attempt_id != attempt_id):
            return None
        job.status, job.error, job.finished_at = status, error, time.time()
        job.stage = status.value
        job.progress = 1.0 if status == JobStatus.complete else job.progress
        job.usage_minutes = usage_minutes
        job.lease_until = None
        ended = True
        return job

    def also(pipe, job: Job) -> None:
        if job.status == JobStatus.complete:
            ctx.store.meter_usage(pipe, job)
        if job.callback_url and job.status in (JobStatus.complete, JobStatus.failed):
            ctx.store.owe("webhook", job.id, time.time() + ctx.settings.enqueue_grace_s, pipe)

    job = ctx.store.update_job(job_id, apply, also)
    return job if ended else None


def requeue(job_id: str, ctx: StoreContext, stage: str, due: float, attempt_id: str | None = None,
            lease_lapsed: bool = False, worker: str | None = None, counts: bool = True) -> Job | None:
    """Hand a running job back to the queue, owing its message at `due`; None if it was not ours to hand back.

    Only from attempt `attempt_id`, only if its lease lapsed (`lease_lapsed`, the reaper), only
    if worker `worker` runs it; `counts=False`: the attempt is not counted (its worker shut down).
    """
    now = time.time()

    def apply(job: Job) -> Job | None:
        if job.status != JobStatus.processing or (attempt_id is not None and job.attempt_id != attempt_id):
            return None
        if worker is not None and job.worker != worker:
            return None
        if lease_lapsed and not holder_gone(job, now):
            return None
        if job.separated is None:
            job.status = JobStatus.queued
            if not counts:
                job.attempts = max(0, job.attempts - 1)
        elif not counts:  # a delivery run: the job stays processing, its separated stems wait for the next one
            job.deliveries = max(0, job.deliveries - 1)
        job.stage = stage
        job.attempt_id = job.lease_until = job.deadline_at = None
        return job

    changed = []
    job = ctx.store.update_job(job_id, apply, lambda pipe, new: changed.append(ctx.store.owe(owed_kind(new), new.id,
                                                                                              due, pipe)))
    return job if changed else None


def owed_kind(job: Job) -> str:
    """The message a job waiting to run needs: a delivery once it is separated, else a split."""
    return "split" if job.separated is None else "deliver"


def waiting(job: Job) -> bool:
    """Whether the job waits for a message: queued for a split, or separated with no delivery running."""
    if job.separated is None:
        return job.status == JobStatus.queued
    return job.status == JobStatus.processing and job.attempt_id is None


def discard_attempt(job: Job, ctx: StoreContext) -> None:
    """Remove this attempt's objects, and its stem records while it still owns the job; never another's."""
    prefix = keys.attempt_prefix(job.user_id, job.id, job.attempt_id)
    ctx.storage.delete_prefix(prefix)
    mine = [_pending(s) for s in ctx.store.get_stems(job.stem_ids + job.upscaled_ids)
            if (s.wav_key or "").startswith(prefix)]
    ctx.store.put_stems_fenced(mine, job.id, job.attempt_id, running=False)


def discard_outputs(job: Job, ctx: StoreContext) -> None:
    """Remove every attempt's objects and reset the stem records: for a job that ended without stems."""
    ctx.storage.delete_prefix(keys.job_prefix(job.user_id, job.id))
    for stem in ctx.store.get_stems(job.stem_ids + job.upscaled_ids):
        if stem.status != StemStatus.pending:
            ctx.store.put_stem(_pending(stem))


def sweep_other_attempts(job: Job, ctx: StoreContext) -> None:
    """Once this attempt completed the job: remove what earlier, dead attempts left under the job."""
    mine = keys.attempt_prefix(job.user_id, job.id, job.attempt_id)
    for key in ctx.storage.list(keys.job_prefix(job.user_id, job.id)):
        if not key.startswith(mine):
            ctx.storage.delete(key)


def stand_down(job: Job, ctx: StoreContext) -> None:
    """This attempt lost the job: remove its own objects and stop, touching nothing of the owner's.

    If nobody owns the job now and nothing is owed for it (its record went back in time with a
    Redis that lost its last second of writes), owe it a message so it cannot stay queued.
    """
    now = ctx.store.get_job(job.id)
    if now is None or now.separated is None or now.separated.attempt_id != job.attempt_id:
        ctx.storage.delete_prefix(keys.attempt_prefix(job.user_id, job.id, job.attempt_id))
    if now is not None and waiting(now) and not ctx.store.owes(owed_kind(now), job.id):
        ctx.store.owe(owed_kind(now), job.id, time.time() + ctx.settings.enqueue_grace_s)


def give_up(job: Job, ctx: StoreContext) -> None:
    if job.separated is not None:
        err = GaveUp(f"the job's stems were separated, and their delivery was tried {job.deliveries - 1} times and "
                     "never finished (its worker died each time)", attempts=job.attempts, deliveries=job.deliveries - 1)
    else:
        err = GaveUp(f"the job was tried {job.attempts - 1} times and never finished (its worker died each time)",
                     attempts=job.attempts - 1)
    if finish(job.id, ctx, JobStatus.failed, err.to_dict(), attempt_id=job.attempt_id) is not None:
        discard_outputs(job, ctx)
