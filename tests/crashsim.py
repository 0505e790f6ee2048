"""The crash-point simulator: whole jobs run in-process, with one fault injected at one external call per run.

A simulated process (`Proc`) gets its own Redis client, storage and broker, each wrapped so that
every external call it makes is a numbered *point*: each Redis command that writes (a transaction's
EXEC counts once, reads pass through), each storage put/list/delete, each broker publish. Nobody
lists the points: a new call in the code under test is a new point. A run injects one fault at
point `i`:

- `crash`: the process stops there. `Crash` is a BaseException that none of our handlers catch, and
  every later call of the process (a `finally`, a handler, its lease thread) raises it too, so
  nothing of it reaches Redis, storage or the broker again, and its lease is not renewed.
- `error`: the call raises a retryable ConnectionError, as a storage or Redis outage would.
- `pause`: the process freezes for longer than the lease: before the call proceeds, recovery runs
  with the clock moved past the lease (the reaper takes the job over, a fresh worker runs it), and
  then the frozen process goes on as if nothing happened.

After the run, recovery (the reaper, a fresh worker, the retention sweep) runs to quiescence and
`check` says which of the invariants of `workers/jobstate.py` do not hold.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import get_args

import redis

from stems.models import JobStatus, StemStatus
from stems.runstore import TaskKind
from stems.storage import keys

FAULTS = ("crash", "error", "pause")
# Redis commands that only read: a fault there is a fault at the next write (or an error of a read, which
# the error of the next write covers)
READS = {
    "GET",
    "MGET",
    "EXISTS",
    "ZSCORE",
    "ZRANGEBYSCORE",
    "ZRANGE",
    "ZREVRANGE",
    "ZREVRANGEBYSCORE",
    "LRANGE",
    "LLEN",
    "HGET",
    "HGETALL",
    "HVALS",
    "SMEMBERS",
    "SCARD",
    "ZCARD",
    "INFO",
    "PING",
    "SCAN",
    "TTL",
    "TYPE",
    "CONFIG GET",
    "WATCH",
    "UNWATCH",
}
STORAGE_POINTS = ("put_file", "put_stream", "delete", "delete_prefix", "list")


class Crash(BaseException):
    """The simulated process died at this call (a BaseException: no handler of ours catches it)."""


@dataclass
class Plan:
    """One run's fault: `kind` at point number `target` (0: none), counted over every simulated process."""

    target: int = 0
    kind: str = "crash"
    on_pause: Callable[[], None] | None = None
    actions: list = field(default_factory=list)  # [(predicate(label), action())] run once, before the call
    labels: list[str] = field(default_factory=list)
    fired: str | None = None
    duplicate_webhooks: int = 0

    def point(self, proc: Proc, label: str) -> None:
        self.labels.append(label)
        for entry in list(self.actions):
            if entry[0](label):
                self.actions.remove(entry)
                entry[1]()
        if len(self.labels) != self.target:
            return
        self.fired = f"{self.kind} at #{self.target} {label}"
        if self.kind == "crash":
            proc.dead = True
            raise Crash(label)
        if self.kind == "error":
            raise ConnectionError(f"injected at {label}")
        if self.on_pause is not None:
            self.on_pause()


class Proc:
    """A simulated process: its calls are points (its lease thread's renewals excepted: their timing is not
    the job's); any call after its crash raises Crash."""

    def __init__(self, plan: Plan, name: str) -> None:
        self.plan, self.name, self.dead = plan, name, False
        self.lock = threading.RLock()

    def call(self, label: str, counted: bool = True) -> None:
        if self.dead:
            raise Crash(f"{self.name} is dead")
        if counted and not threading.current_thread().name.startswith("lease-"):
            with self.lock:
                self.plan.point(self, label)


class FaultyRedis(redis.Redis):
    """The store's client for one simulated process (the same connection pool)."""

    def __init__(self, inner: redis.Redis, proc: Proc) -> None:
        super().__init__(connection_pool=inner.connection_pool)
        self.proc = proc

    def execute_command(self, *args, **options):
        self.proc.call(f"redis.{args[0]}", counted=str(args[0]).upper() not in READS)
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        proc, execute, immediate = self.proc, pipe.execute, pipe.immediate_execute_command

        def faulty_execute(*a, **kw):
            proc.call("redis.transaction")
            return execute(*a, **kw)

        def faulty_immediate(*a, **kw):  # WATCH and the reads under it: a dead process sends nothing
            proc.call("redis.watch", counted=False)
            return immediate(*a, **kw)

        pipe.execute, pipe.immediate_execute_command = faulty_execute, faulty_immediate
        return pipe


class FaultyStorage:
    def __init__(self, inner, proc: Proc) -> None:
        self.inner, self.proc = inner, proc

    def __getattr__(self, name):
        real = getattr(self.inner, name)
        if not callable(real):
            return real
        proc = self.proc

        def call(*args, **kwargs):
            proc.call(f"storage.{name} {args[0] if args else ''}", counted=name in STORAGE_POINTS)
            return real(*args, **kwargs)

        return call


class Broker:
    """The message broker, in memory: what was published, in order; `app` publishes through one process."""

    def __init__(self) -> None:
        self.queue: deque[tuple[str, str]] = deque()
        self.sent = 0

    def app(self, proc: Proc | None = None) -> BrokerApp:
        return BrokerApp(self, proc)


@dataclass
class BrokerApp:
    """What `workers/messages.py` needs of a Celery app: `send_task`."""

    broker: Broker
    proc: Proc | None

    def send_task(self, name: str, args=None, **_) -> None:
        if self.proc is not None:
            self.proc.call(f"broker.{name}")
        self.broker.queue.append((name, str(args[0])))
        self.broker.sent += 1


def process_ctx(ctx, proc: Proc):
    """`ctx` as seen by simulated process `proc`: its own wrapped Redis client and storage."""

    return ctx.replace(
        store=ctx.store.wrapped(lambda client: FaultyRedis(client, proc)), storage=FaultyStorage(ctx.storage, proc)
    )


class World:
    """One run: the fresh (fault-free) side of the service, the broker, and what the webhooks received."""

    def __init__(self, ctx, shift_s: float) -> None:
        from workers.reaper import Reaper

        self.ctx, self.shift_s = ctx, shift_s
        self.broker = Broker()
        self.reaper = Reaper(ctx.settings, "sim-reaper")
        self.reaper.ctx, self.reaper.app = ctx, self.broker.app()
        self.webhooks: dict[str, list[str]] = {}  # job id -> the status each webhook delivery said
        self.retention = False

    def run_message(self, name: str, id_: str, ctx, app) -> None:
        """What a worker does with one message (`workers/tasks.py`), on `ctx`, publishing through `app`."""
        from workers.delivery import run_delivery
        from workers.messages import KINDS, run_then_flush
        from workers.splitter import run_split

        try:  # the receipt is owed again for a while (`workers/reaper.py::_received`, which logs an error)
            ctx.store.owe(KINDS[name], id_, time.time() + ctx.settings.enqueue_grace_s)
        except Exception:
            pass
        if name == "stems.webhook":
            job = ctx.store.get_job(id_)
            if job is not None and job.callback_url and job.status in (JobStatus.complete, JobStatus.failed):
                self.webhooks.setdefault(id_, []).append(job.status.value)
            ctx.store.settle("webhook", id_)
            return
        run_then_flush(run_split if name == "stems.split" else run_delivery, id_, ctx, app, "sim-worker")

    def drain(self, ctx, app, until: Callable[[], bool] = lambda: False) -> int:
        ran = 0
        while self.broker.queue and not until():
            name, id_ = self.broker.queue.popleft()
            self.run_message(name, id_, ctx, app)
            ran += 1
        return ran

    def recover(self, rounds: int = 12) -> None:
        """The reaper (its clock past every lease, backoff and grace), a fresh worker and the retention sweep,
        until nothing is left to do."""
        from stems.lifecycle import sweep

        app = self.broker.app()
        for _ in range(rounds):
            now = time.time() + self.shift_s
            counts = self.reaper.pass_once(now=now)
            ran = self.drain(self.ctx, app)
            swept = sweep(self.ctx.store, self.ctx.storage, self.ctx.settings, now=now).total if self.retention else 0
            if not ran and not swept and not any(counts.values()):
                return


def check(world: World, job_id: str, user: str, queues: tuple[str, ...], deleted_ok: bool) -> list[str]:
    """The invariants after recovery; each string says one that does not hold."""
    store, storage = world.ctx.store, world.ctx.storage
    bad: list[str] = []
    job = store.get_job(job_id)
    on_storage = sorted(storage.list(keys.job_prefix(user, job_id)))
    usage = store.usage(user)["jobs"]
    if job is None:
        if not deleted_ok:
            bad.append("the job vanished")
        if on_storage:
            bad.append(f"a deleted job left {len(on_storage)} objects: {on_storage[:3]}")
        if usage > 1:
            bad.append(f"usage counted {usage} times")
    else:
        if not job.status.terminal:
            bad.append(f"the job did not end: {job.status.value} ({job.stage})")
        stems = store.get_stems(job.stem_ids + job.upscaled_ids)
        if job.status == JobStatus.complete:
            final = sorted(
                k for s in stems if s.status == StemStatus.complete for k in (s.wav_key, s.hq_key, s.peaks_key) if k
            )
            if on_storage != final:
                extra, missing = sorted(set(on_storage) - set(final)), sorted(set(final) - set(on_storage))
                bad.append(f"complete job's storage is not its final products: extra {extra[:3]} missing {missing[:3]}")
            if usage != 1:
                bad.append(f"complete job counted {usage} times in usage")
            for s in stems:
                if s.status not in (StemStatus.complete, StemStatus.dropped, StemStatus.expired):
                    bad.append(f"complete job's stem {s.name} is {s.status.value}")
        else:
            if on_storage:
                bad.append(f"{job.status.value} job left {len(on_storage)} objects: {on_storage[:3]}")
            if usage != 0:
                bad.append(f"{job.status.value} job counted {usage} times in usage")
        hooks = world.webhooks.get(job_id, [])
        owed = job.callback_url and job.status in (JobStatus.complete, JobStatus.failed)
        if owed and not hooks:
            bad.append(f"no webhook sent for a {job.status.value} job")
        if not owed and hooks:
            bad.append(f"a webhook sent for a {job.status.value} job")
        if any(h != job.status.value for h in hooks):
            bad.append(f"a webhook said {hooks} for a {job.status.value} job")
        # delivery is at least once (a sender that dies between publishing and settling sends again; the
        # payload names the job, so a receiver dedupes): counted in `World.duplicate_webhooks`, not an error
    for q in queues:  # every job has ended now: a load list holds none of them
        listed = store.queued(q)
        ended = [i for i, j in zip(listed, store.get_jobs(listed) if listed else []) if j.status.terminal]
        if job_id in listed or ended or len(store.get_jobs(listed) if listed else []) != len(listed):
            bad.append(f"load:{q} lists ended or deleted jobs: {listed}")
    left = [f"{kind}:{job_id}" for kind in get_args(TaskKind) if store.owes(kind, job_id)]
    if left:
        bad.append(f"the outbox still owes {left}")
    if store.cleanup_owed(job_id, user) is not None:
        bad.append("a cleanup is still owed")
    return bad
