"""The job's state machine: every transition of a split job, and the attempt harness that runs its two bodies.

States: `queued` -> `processing` (an attempt holds it: `attempt_id`, a lease, a deadline) ->
`complete` | `failed` | `cancelled`. A two-stage job (`workers/delivery.py`) stays `processing`
between its stages with its float stems named in `Job.separated` and no attempt holding it.
`workers/splitter.py` (separation, or the whole job) and `workers/delivery.py` (the encodes of a
separated job) are the two bodies `run_attempt` runs.

Invariants (each transition below keeps them; tests/service/test_jobstate.py and the crash-point
simulator, tests/service/test_crashpoints.py, check them):

1. Every transition is one compare-and-set transaction on the job record (`JobStore.transition`),
   and reports truly whether it took effect: a write that landed first makes it report "not taken".
2. Terminal is terminal: once `complete`, `failed` or `cancelled`, nothing changes the job's status;
   once complete, nothing removes its stems. Errors after that point are logged, never retried or
   turned into a failure.
3. Usage is metered, and the webhook owed, in the transaction that ends the job, which happens once.
4. Cleanup is owed in the transaction that makes it necessary (`{p}:cleanup`, see
   `stems/runstore.py`): a job that ends owes the removal of every object it must no longer hold
   (other attempts' prefixes and float stems for a complete job; everything for a failed or
   cancelled one); a deleted job owes the removal of its prefix. `clean` does it idempotently,
   called by whoever gets there first (the worker or API that made it necessary, else the reaper),
   and the entry is settled only once storage confirms. Ending a job also owes a last sweep, due
   once every attempt is past its hard time limit, for what a stale attempt uploaded after that.
5. An attempt writes objects only under its own prefix, and records only while its token owns the
   job (fenced writes); an attempt that lost the job removes its own prefix and nothing else.
6. A job's load entry (`{p}:load:{queue}`) is on the queue whose workers must run it next: its model
   queue while it waits for or runs a separation, the delivery queue once separated; it moves in the
   transition that changes that, and goes when the job ends.
7. Stems of a job that is not `complete` never download (the API checks the job, not only the stem).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

from celery.exceptions import SoftTimeLimitExceeded

from pipelines.errors import Cancelled, GaveUp, InternalError, StemsError, Superseded, TimeLimit
from pipelines.presets import load_catalogue
from pipelines.split import SEPARATED
from stems.container import Container
from stems.models import DELIVERY_QUEUE, Job, JobStatus, Separated, Stem, StemStatus
from stems.storage import keys

from .context import WorkerContext
from .lease import Lease
from .retry import backoff, retryable

log = logging.getLogger(__name__)

HOSTNAME = socket.gethostname()


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


# -- transitions ------------------------------------------------------------------------------------------


def start(job_id: str, ctx: Container, worker: str | None = None) -> Job | None:
    """queued -> processing: take the job for a new attempt; None if this delivery has nothing to do.

    Nothing to do: the job is unknown or ended, or separated already (a stale message: its
    delivery stage runs now), or a live attempt holds it (this delivery is a duplicate: a
    broker redelivered a message whose first run still goes on).
    """
    return _claim(job_id, ctx, worker, delivery=False)


def start_delivery(job_id: str, ctx: Container, worker: str | None = None) -> Job | None:
    """separated -> delivering: take a separated job for a delivery run; None if this message has nothing to do."""
    return _claim(job_id, ctx, worker, delivery=True)


def _claim(job_id: str, ctx: Container, worker: str | None, delivery: bool) -> Job | None:
    s, now = ctx.settings, time.time()

    def apply(job: Job) -> Job | None:
        if job.status.terminal or (job.separated is not None) != delivery:
            return None
        if job.status == JobStatus.processing and not holder_gone(job, now):
            return None
        if delivery:
            job.deliveries += 1
            job.attempt_id = f"{job.attempts}-d{job.deliveries}-{secrets.token_hex(4)}"
        else:
            job.attempts += 1
            job.attempt_id = f"{job.attempts}-{secrets.token_hex(4)}"
        job.status, job.stage = JobStatus.processing, "delivering" if delivery else "starting"
        job.started_at = job.started_at or now
        job.lease_until = now + s.lease_s
        job.deadline_at = now + s.hard_time_limit(job.audio_seconds or 0.0)
        job.worker, job.worker_host, job.worker_pid = worker, HOSTNAME, os.getpid()
        return job

    return ctx.store.transition(job_id, apply)


def hand_to_delivery(job: Job, ctx: Container, separated: Separated, timings: dict[str, float]) -> bool:
    """processing -> separated: the job waits for delivery with its float stems (only while this attempt owns it);
    its load entry moves to the delivery queue and its delivery message is owed, in the same transaction."""

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

    return ctx.store.transition(job.id, apply, also) is not None


def finish(
    job_id: str,
    ctx: Container,
    status: JobStatus,
    error: dict | None = None,
    usage_minutes: float = 0.0,
    attempt_id: str | None = None,
) -> Job | None:
    """-> complete | failed: end the job (only by `attempt_id`, if given); the ended job, or None if it was not
    ours to end.

    Completing meters the usage in the same transaction; completing or failing a job with a
    callback URL owes its webhook there too, and ending owes the cleanup of its objects, so none
    of them can be lost or done twice.
    """

    def apply(job: Job) -> Job | None:
        if job.status.terminal or (attempt_id is not None and job.attempt_id != attempt_id):
            return None
        job.status, job.error, job.finished_at = status, error, time.time()
        job.stage = status.value
        job.progress = 1.0 if status == JobStatus.complete else job.progress
        job.usage_minutes = usage_minutes
        job.lease_until = None
        return job

    def also(pipe, job: Job) -> None:
        if job.status == JobStatus.complete:
            ctx.store.meter_usage(pipe, job)
        if job.callback_url and job.status in (JobStatus.complete, JobStatus.failed):
            ctx.store.owe("webhook", job.id, time.time() + ctx.settings.enqueue_grace_s, pipe)
        ctx.store.owe_cleanup(pipe, job.id, job.user_id, time.time() + ctx.settings.enqueue_grace_s)
        _owe_last_sweep(pipe, job, ctx)

    return ctx.store.transition(job_id, apply, also)


def _owe_last_sweep(pipe, job: Job, ctx: Container) -> None:
    # every attempt of the job started before now, so each is dead (its pool process killed at its hard time
    # limit) by now + the longest limit: an attempt frozen past its lease that wakes and uploads before it
    # checks its fence leaves objects after the first cleanup, and this sweep removes them
    ctx.store.owe_cleanup(
        pipe,
        job.id,
        job.user_id,
        time.time() + ctx.settings.hard_time_limit(job.audio_seconds or 0.0) + ctx.settings.lease_s,
        last=True,
    )


def cancel(job_id: str, ctx: Container) -> Job | None:
    """-> cancelled (by its owner): the cancelled job, or None if it had ended (or vanished) first.

    The cleanup of its objects is owed in the same transaction; a running attempt learns of the
    cancel between chunks (the cancel flag, then its fenced writes) and stops."""

    def apply(job: Job) -> Job | None:
        if job.status.terminal:
            return None
        job.status, job.stage = JobStatus.cancelled, "cancelled"
        return job

    def also(pipe, job: Job) -> None:
        # a running attempt may still write until it sees the cancel: the cleanup is settled after its lease
        ctx.store.owe_cleanup(pipe, job.id, job.user_id, time.time() + ctx.settings.enqueue_grace_s)
        _owe_last_sweep(pipe, job, ctx)

    ctx.store.request_cancel(job_id)
    return ctx.store.transition(job_id, apply, also)


def requeue(
    job_id: str,
    ctx: Container,
    stage: str,
    due: float,
    attempt_id: str | None = None,
    lease_lapsed: bool = False,
    worker: str | None = None,
    counts: bool = True,
    now: float | None = None,
) -> Job | None:
    """processing -> queued (or separated -> waiting for another delivery): hand a running job back, owing its
    message at `due`; None if it was not ours to hand back.

    Only from attempt `attempt_id`, only if its lease lapsed by `now` (`lease_lapsed`, the reaper),
    only if worker `worker` runs it; `counts=False`: the attempt is not counted (its worker shut down).
    """
    now = time.time() if now is None else now

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

    return ctx.store.transition(job_id, apply, lambda pipe, new: ctx.store.owe(owed_kind(new), new.id, due, pipe))


def separate_again(job: Job, ctx: Container) -> Job | None:
    """separated -> queued: the float stems are gone, so the job goes back to its model queue to be separated
    again; its load entry moves back with it, and the old float stems' removal is owed (one transaction)."""

    def apply(current: Job) -> Job | None:
        if current.attempt_id != job.attempt_id or current.status != JobStatus.processing:
            return None
        current.separated, current.status, current.stage = (
            None,
            JobStatus.queued,
            "requeued: its separated stems were lost",
        )
        current.attempt_id = current.lease_until = current.deadline_at = None
        return current

    def also(pipe, new: Job) -> None:
        ctx.store.owe("split", new.id, time.time(), pipe)
        ctx.store.move_load(pipe, new.id, DELIVERY_QUEUE, new.queue)

    again = ctx.store.transition(job.id, apply, also)
    if again is not None:  # what is left of the old float stems: nobody else removes them (the job is not ended)
        _best_effort(
            job,
            "remove the old float stems",
            lambda: ctx.storage.delete_prefix(keys.attempt_prefix(job.user_id, job.id, job.separated.attempt_id)),
        )
    return again


def give_up(job: Job, ctx: Container) -> None:
    """-> failed: the job was tried too often (its worker died each time)."""
    if job.separated is not None:
        err = GaveUp(
            f"the job's stems were separated, and their delivery was tried {job.deliveries - 1} times and "
            "never finished (its worker died each time)",
            attempts=job.attempts,
            deliveries=job.deliveries - 1,
        )
    else:
        err = GaveUp(
            f"the job was tried {job.attempts - 1} times and never finished (its worker died each time)",
            attempts=job.attempts - 1,
        )
    ended = finish(job.id, ctx, JobStatus.failed, err.to_dict(), attempt_id=job.attempt_id)
    if ended is not None:
        clean_now(ended, ctx)


def owed_kind(job: Job) -> str:
    """The message a job waiting to run needs: a delivery once it is separated, else a split."""
    return "split" if job.separated is None else "deliver"


def waiting(job: Job) -> bool:
    """Whether the job waits for a message: queued for a split, or separated with no delivery running."""
    if job.separated is None:
        return job.status == JobStatus.queued
    return job.status == JobStatus.processing and job.attempt_id is None


# -- stem records of an attempt ------------------------------------------------------------------------------


def _pending(stem: Stem) -> Stem:
    stem.status, stem.wav_key, stem.hq_key, stem.peaks_key, stem.wav_size, stem.hq_size, stem.made_by = (
        StemStatus.pending,
        None,
        None,
        None,
        None,
        None,
        None,
    )
    return stem


def reset_stems(job: Job, ctx: Container) -> None:
    """Stem records back to pending for a new attempt (they may point at an earlier attempt's objects)."""
    stale = [
        _pending(s) for s in ctx.store.get_stems(job.stem_ids + job.upscaled_ids) if s.status != StemStatus.pending
    ]
    if not ctx.store.put_stems_fenced(stale, job.id, job.attempt_id):
        raise Superseded("another attempt took the job over")


# -- cleanup owed -----------------------------------------------------------------------------------------------


def clean(ctx: Container, job_id: str, user_id: str, now: float | None = None) -> bool:
    """Bring the job's objects to what its state allows; True once storage confirms there is nothing more to do.

    Idempotent, and safe to run by several processes at once. A deleted, failed or cancelled job
    keeps nothing (its stem records go back to pending); a complete job keeps its completing
    attempt's objects only. A job not ended owes nothing yet (an entry for it waits). A cancelled
    job whose last attempt's lease is still live is cleaned again once it lapses: that attempt may
    still write before it sees the cancel.
    """
    now = time.time() if now is None else now
    job = ctx.store.get_job(job_id)
    prefix = keys.job_prefix(user_id, job_id)
    if job is not None and not job.status.terminal:
        return False
    if job is None or job.status != JobStatus.complete:
        ctx.storage.delete_prefix(prefix)
        if job is not None:
            for stem in ctx.store.get_stems(job.stem_ids + job.upscaled_ids):
                if stem.status != StemStatus.pending:
                    ctx.store.put_stem(_pending(stem))
        left = ctx.storage.list(prefix)
        return not left and not (job is not None and job.lease_until and job.lease_until > now)
    mine = keys.attempt_prefix(user_id, job_id, job.attempt_id) if job.attempt_id else None
    for key in ctx.storage.list(prefix):
        if mine is None or not key.startswith(mine):
            ctx.storage.delete(key)
    return True


def settle_clean(
    ctx: Container, job_id: str, user_id: str, score: int, now: float | None = None, last: bool = False
) -> bool:
    """Run an owed cleanup (the entry read with `score`; `last`: a last sweep); settle it once done, else owe it
    again later."""
    if clean(ctx, job_id, user_id, now):
        ctx.store.settle_cleanup(job_id, user_id, score, last)
        return True
    job = ctx.store.get_job(job_id)
    later = max(job.lease_until or 0.0, time.time()) if job is not None else time.time()
    ctx.store.owe_cleanup(None, job_id, user_id, later + ctx.settings.reaper_interval_s, last)
    return False


def clean_now(job: Job, ctx: Container) -> None:
    """The cleanup a transition just owed, done now by the process that owed it; on any error the entry stays
    and the reaper does it."""
    score = ctx.store.cleanup_owed(job.id, job.user_id)
    if score is None:
        return
    _best_effort(job, "clean up", lambda: settle_clean(ctx, job.id, job.user_id, score))


def _best_effort(job: Job, what: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:  # also a soft time limit: what is owed stays owed, the reaper finishes it
        log.warning("job %s: could not %s now (%s); the reaper will", job.id, what, exc)


# -- the attempt harness --------------------------------------------------------------------------------------

Body = Callable[[Job, WorkerContext, Lease], None]


def run_attempt(job: Job, ctx: WorkerContext, tries: int, body: Body) -> None:
    """Run `body` as attempt `job.attempt_id` under its lease; end the attempt one way or another.

    `tries` counts the runs of this stage so far (a job that kills its worker each time is given up).
    The body ends with `complete` (or `hand_to_delivery`); an error before that ends the attempt
    here; nothing after `complete` took effect can undo it (it raises nothing).
    """
    if tries > ctx.settings.task_max_attempts:
        give_up(job, ctx)
        return
    s = ctx.settings
    with Lease(ctx.store, job.id, job.attempt_id, s.lease_s, s.lease_renew_s) as lease:
        try:
            reset_stems(job, ctx)
            body(job, ctx, lease)
        except Superseded:
            stand_down(job, ctx)
        except Cancelled:
            if lease.superseded():
                stand_down(job, ctx)
            else:
                _end_without_stems(job, ctx, JobStatus.cancelled)
        except SoftTimeLimitExceeded:
            _end_without_stems(job, ctx, JobStatus.failed, TimeLimit("the split ran past its time limit").to_dict())
        except Exception as exc:
            if retryable(exc) and tries < s.task_max_attempts:
                _retry(job, ctx, exc)
            elif isinstance(exc, StemsError):
                log.warning("job %s failed: %s", job.id, exc)
                _end_without_stems(job, ctx, JobStatus.failed, exc.to_dict())
            else:
                log.exception("job %s failed", job.id)
                _end_without_stems(job, ctx, JobStatus.failed, InternalError.of(exc).to_dict())


def complete(
    job: Job, ctx: WorkerContext, made_by: dict[str, str], seconds: float, cancelled: Callable[[], bool]
) -> None:
    """-> complete: mark the stems the chain did not make as dropped, then complete the job (only while this
    attempt owns it). Once that took effect nothing here raises: the cleanup it owes is done now or by the
    reaper."""
    records = {s.name: s for s in ctx.store.get_stems(job.stem_ids)}
    restored = {u.of_stem_id: u for u in ctx.store.get_stems(job.upscaled_ids)}
    dropped = [
        record
        for name, stem in records.items()
        if name not in made_by
        for record in filter(None, (stem, restored.get(stem.id)))
    ]
    for record in dropped:
        record.status = StemStatus.dropped
    if not ctx.store.put_stems_fenced(dropped, job.id, job.attempt_id):
        raise Superseded("another attempt owns the job now")
    if cancelled():
        raise Cancelled("job cancelled")
    if job.separated is not None:  # before the job reads complete: a complete job holds its stems only (the
        # cleanup `finish` owes would remove them too, but after); a failure here is before the end: retried
        ctx.storage.delete_prefix(keys.attempt_prefix(job.user_id, job.id, job.separated.attempt_id))
    minutes = seconds / 60 * load_catalogue().preset(job.preset).usage_multiplier
    ended = finish(job.id, ctx, JobStatus.complete, usage_minutes=minutes, attempt_id=job.attempt_id)
    if ended is None:
        raise Cancelled("the job was cancelled or taken over while its stems were stored")
    clean_now(ended, ctx)  # the float stems and what other attempts left


def _end_without_stems(job: Job, ctx: WorkerContext, status: JobStatus, error: dict | None = None) -> None:
    """-> cancelled | failed: end the job as `status` if this attempt still owns it, leaving no stems; else
    (cancelled by its owner, or ended by the reaper) clean up what its end owes; else stand down."""
    ended = finish(job.id, ctx, status, error, attempt_id=job.attempt_id)
    if ended is not None:
        clean_now(ended, ctx)
        return
    current = ctx.store.get_job(job.id)
    if current is not None and current.status.terminal and current.status != JobStatus.complete:
        clean_now(current, ctx)
    stand_down(job, ctx)


def _retry(job: Job, ctx: WorkerContext, exc: Exception) -> None:
    """processing -> queued: back to the queue after a backoff, then this attempt's objects removed."""
    log.warning("job %s: retryable error %s, trying again", job.id, exc)
    try:
        handed = requeue(job.id, ctx, "retrying", time.time() + backoff(job.attempts - 1), attempt_id=job.attempt_id)
    except Exception as again:  # the store is away too: the lease lapses and the reaper runs the job again
        log.warning("job %s: could not hand it back (%s); the reaper will", job.id, again)
        return
    if handed is None:
        stand_down(job, ctx)
    else:
        _best_effort(job, "remove its attempt's objects", lambda: _remove_own(job, ctx))


def _remove_own(job: Job, ctx: Container) -> None:
    ctx.storage.delete_prefix(keys.attempt_prefix(job.user_id, job.id, job.attempt_id))


def stand_down(job: Job, ctx: Container) -> None:
    """This attempt lost the job: remove its own objects and stop, touching nothing of the owner's.

    Never the objects of the attempt that completed the job, nor the float stems a delivery waits
    for. If nobody owns the job now and nothing is owed for it (its record went back in time with a
    Redis that lost its last second of writes), owe it a message so it cannot stay queued.
    """
    # at WARNING: an operator sees a node that came back from a partition, or a duplicate delivery
    log.warning("job %s: attempt %s lost the job; it stands down", job.id, job.attempt_id)
    now = ctx.store.get_job(job.id)
    completed_by_me = now is not None and now.status == JobStatus.complete and now.attempt_id == job.attempt_id
    handed_by_me = now is not None and now.separated is not None and now.separated.attempt_id == job.attempt_id
    if not completed_by_me and not (handed_by_me and not now.status.terminal):
        _best_effort(job, "remove its attempt's objects", lambda: _remove_own(job, ctx))
    if now is not None and waiting(now) and not ctx.store.owes(owed_kind(now), job.id):
        ctx.store.owe(owed_kind(now), job.id, time.time() + ctx.settings.enqueue_grace_s)
