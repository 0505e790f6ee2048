"""The reaper, and a worker's part in keeping work alive: what it received, what it hands back on shutdown.

The reaper runs as a thread in every worker's main process; a lock in Redis lets one act at
a time (it lapses three passes after its holder stops, and another worker's reaper takes
over). Every STEMS_REAPER_INTERVAL_S it

1. fails running jobs past their hard deadline (their worker was killed at the time limit, or
   ignores it) with `time_limit`: quota slot freed, webhook and the removal of its outputs owed
   in that transaction;
2. runs again the jobs whose lease lapsed (the worker died, froze or lost its network): back
   to `queued` with a new message, or, for a delivery stage, to delivery again with the
   separated stems kept (a lapse past the deadline is a time limit, as in 1). A lease is judged
   only against time this reaper watched: after a gap in its contact with Redis longer than half
   a lease (Redis down, a partition, the reaper's own stall), it requeues nothing until it has been
   in contact again for a whole STEMS_LEASE_S. Live workers renew within STEMS_LEASE_RENEW_S of
   Redis coming back, so an outage longer than the lease does not run every job again;
3. sends the messages the outbox owes: jobs written but never queued (the API died or the
   broker refused), retries whose backoff is over, work a dead worker had received but not
   started, webhooks not yet sent;
4. does the cleanups owed (`{p}:cleanup`) that their owner did not get to (it died, or storage
   was away): the objects of ended and deleted jobs brought to what their state allows
   (`workers/jobstate.py::clean`).

Each worker also owes a message, for a few seconds, for every message it receives (Celery's
`task_received`), cleared once the task starts: a worker that dies holding messages it had
not started (with Redis they would wait for the visibility timeout) loses nothing.

On SIGTERM a worker stops taking messages and lets its running jobs finish for
STEMS_SHUTDOWN_GRACE_S; then it hands back those still running (not counted as attempts):
they go back to `queued` with a message at once, and the runs, no longer owners, stop at
their next check. SIGQUIT (Celery's cold shutdown) waits the same grace first.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from celery.signals import task_received, worker_ready, worker_shutdown, worker_shutting_down

from pipelines.errors import TimeLimit
from stems.container import Container
from stems.jobstore import JobStore
from stems.models import JobStatus
from stems.settings import Settings, get_settings

from .celery_app import dead_letter_queue, make_celery
from .jobstate import clean_now, finish, owed_kind, requeue, settle_clean
from .messages import KINDS, flush, send_owed

log = logging.getLogger(__name__)

PRUNE_EVERY = 30  # passes between prunes of the load lists


class Reaper:
    def __init__(self, settings: Settings, holder: str) -> None:
        self.ctx = Container(settings)
        self.app = make_celery(settings)  # its own broker connections: the consumer's are not for other threads
        self.holder = holder
        self.passes = 0
        self.contact_at: float | None = None  # this reaper's last successful exchange with Redis
        self.watching_since: float | None = None  # start of its unbroken contact (see the module's step 2)

    @property
    def store(self) -> JobStore:
        return self.ctx.store

    def step(self) -> dict[str, int] | None:
        """One pass if this reaper holds (or takes) the lock; None if another one is active."""
        try:
            held = self.store.hold_lock("reaper", self.holder, 3 * self.ctx.settings.reaper_interval_s + 1)
        except Exception:
            self.contact_at = None  # out of contact: the next success starts a new watch
            raise
        self.saw_redis(time.time())
        return self.pass_once() if held else None

    def saw_redis(self, at: float) -> None:
        """Count `at` as contact with Redis; a gap since the last contact longer than half a lease (a renewal
        period may have fallen in it) restarts the watch. A call that blocked through an outage and then
        succeeded is such a gap too."""
        if self.contact_at is None or at - self.contact_at > self.ctx.settings.lease_s / 2:
            self.watching_since = at
        self.contact_at = at

    def judges_leases(self, now: float) -> bool:
        """Whether this reaper has watched Redis for a whole lease: only then is a lapsed lease a dead holder."""
        return self.watching_since is not None and now - self.watching_since >= self.ctx.settings.lease_s

    def pass_once(self, now: float | None = None) -> dict[str, int]:
        s, store = self.ctx.settings, self.store
        now = now or time.time()
        counts = {"timed_out": 0, "requeued": 0, "sent": 0, "cleaned": 0}
        for job_id in store.past_deadline(now - s.lease_s):
            counts["timed_out"] += self.time_out(job_id)
        for job_id in store.expired_leases(now) if self.judges_leases(now) else ():
            job = store.get_job(job_id)
            if job is None or job.status != JobStatus.processing:
                store.forget_run(job_id)  # an index entry whose record went away
            elif job.deadline_at and now >= job.deadline_at:
                counts["timed_out"] += self.time_out(job_id)
            elif requeue(
                job_id, self.ctx, "requeued: its worker stopped renewing the lease", now, lease_lapsed=True, now=now
            ):
                log.warning("job %s: the lease of attempt %s lapsed; running it again", job_id, job.attempt_id)
                counts["requeued"] += 1
        for kind, id_, score in store.owed(now):
            try:
                send_owed(self.app, s, store, kind, id_, score)
            except Exception as exc:  # the broker is away: the entries stay for the next pass
                log.warning("reaper: cannot send %s %s (%s)", kind, id_, exc)
                break
            counts["sent"] += 1
        self.saw_redis(time.time())
        for last in (False, True):  # the cleanups owed, then the last sweeps of ended jobs
            for job_id, user_id, score in store.cleanups_due(now, last=last):
                try:
                    counts["cleaned"] += settle_clean(self.ctx, job_id, user_id, score, now, last)
                except Exception as exc:  # storage away: the entry stays for the next pass
                    log.warning("reaper: cannot clean up job %s (%s)", job_id, exc)
                    break
        for key in store.objects_due(now):  # what a deleted record named, left by a process that died
            try:
                self.ctx.storage.delete(key)
            except Exception as exc:
                log.warning("reaper: cannot remove an owed object (%s)", exc)
                break
            store.settle_objects([key])
            counts["cleaned"] += 1
        self.passes += 1
        if self.passes % PRUNE_EVERY == 0:
            from pipelines.presets import load_catalogue

            for q in load_catalogue().queues():
                store.prune_load(q)
        return counts

    def time_out(self, job_id: str) -> int:
        """Fail a job that ran past its hard time limit; 1 if this call failed it."""
        s = self.ctx.settings
        job = self.store.get_job(job_id)
        if job is None or job.status != JobStatus.processing:
            self.store.forget_run(job_id)
            return 0
        limit = s.hard_time_limit(job.audio_seconds or 0.0)
        err = TimeLimit(
            f"the split ran past its hard time limit of {limit:.0f} s and its worker was stopped", limit_s=round(limit)
        ).to_dict()
        ended = finish(job_id, self.ctx, JobStatus.failed, err, attempt_id=job.attempt_id)
        if ended is None:
            return 0
        log.warning("job %s: past its hard time limit (%.0f s); failed", job_id, limit)
        clean_now(ended, self.ctx)  # owed by `finish`: a reaper that dies here leaves it to the next pass
        return 1

    def loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.ctx.settings.reaper_interval_s):
            try:
                self.step()
            except Exception as exc:  # Redis or the broker away: the next pass tries again
                self.contact_at = None
                log.warning("reaper pass failed: %s", exc)
        try:
            self.store.release_lock("reaper", self.holder)
        except Exception:
            pass


_stop = threading.Event()
_store: JobStore | None = None


def _job_store() -> JobStore:
    global _store
    if _store is None:
        _store = Container(get_settings()).store
    return _store


@task_received.connect
def _received(request=None, **_):
    """A message is in this worker's hands: owe it again shortly, unless its task starts (which settles that)."""
    kind = KINDS.get(getattr(request, "name", None))
    if kind is None or not request.args:
        return
    try:
        _job_store().owe(kind, str(request.args[0]), time.time() + get_settings().enqueue_grace_s)
    except Exception as exc:  # Redis away: the message itself is still in the broker's hands
        log.warning("could not record the receipt of %s %s: %s", kind, request.args[0], exc)


def _check_rabbitmq(app, s: Settings) -> None:
    """Declare the dead-letter queue, and say so when the server ignores our per-queue consumer timeout."""
    with app.connection_for_write() as conn:
        dead_letter_queue(s)(conn.default_channel).declare()
        version = conn.connection.server_properties.get("version", "0")
        version = version.decode() if isinstance(version, bytes) else str(version)
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < (3, 12):
        log.warning(
            "RabbitMQ %s ignores the per-queue consumer timeout: set consumer_timeout = %d (ms) or more in "
            "rabbitmq.conf (see infra/rabbitmq.conf), or a split longer than its default 30 minutes is "
            "delivered twice (our lease drops the second)",
            version,
            s.visibility_timeout_s * 1000,
        )


@worker_ready.connect
def _start(sender=None, **_):
    s = get_settings()
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    if s.rabbitmq and sender is not None:
        try:
            _check_rabbitmq(sender.app, s)
        except Exception as exc:
            log.warning("could not declare the dead-letter queue: %s", exc)
    reaper = Reaper(s, f"{hostname}:{os.getpid()}")
    threading.Thread(target=reaper.loop, args=(_stop,), daemon=True, name="stems-reaper").start()


def _running_splits() -> list[str]:
    from celery.worker import state

    for _ in range(5):  # the consumer thread may change the set while we copy it
        try:
            return [
                str(r.args[0])
                for r in list(state.active_requests)
                if r.name in ("stems.split", "stems.deliver") and r.args
            ]
        except RuntimeError:
            time.sleep(0.01)
    return []


def hand_back(hostname: str, ctx: Container, app) -> list[str]:
    """Send the split and delivery runs this worker still has back to their queues, with a message now; not
    counted as attempts."""
    handed = []
    for job_id in _running_splits():
        job = requeue(job_id, ctx, "handed back: its worker shut down", time.time(), worker=hostname, counts=False)
        if job:
            flush(app, ctx.settings, ctx.store, owed_kind(job), job_id)
            handed.append(job_id)
    if handed:
        log.warning("handed back %d running job(s) at shutdown: %s", len(handed), ", ".join(handed))
    return handed


_shutting_down = threading.Event()


@worker_shutting_down.connect
def _shutting(sender=None, **_):
    if _shutting_down.is_set():
        return
    _shutting_down.set()
    s = get_settings()
    hostname = str(sender) if sender else socket.gethostname()

    def later() -> None:
        if _stop.wait(s.shutdown_grace_s):
            return  # the worker finished its jobs and stopped first
        try:
            hand_back(hostname, Container(s), make_celery(s))
        except Exception as exc:
            log.warning("could not hand jobs back at shutdown: %s", exc)

    threading.Thread(target=later, daemon=True, name="stems-handback").start()


@worker_shutdown.connect
def _stop_reaper(**_):
    _stop.set()
