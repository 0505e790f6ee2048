"""The job store's keys that keep work moving when processes and nodes die (a part of `JobStore`).

- **Leases.** A running job's record carries its owning attempt (`attempt_id`), its lease and its
  deadline; `{p}:leases` and `{p}:deadlines` (sorted sets: job id -> time) mirror them, written in
  the record's own transaction (`index_job`), so the reaper finds expired leases and overdue jobs
  without reading every record.
- **The outbox.** `{p}:outbox` (sorted set: "kind:id" -> ms since the epoch) holds every message owed:
  written with the work it is for (a job, an import, a webhook) in one transaction, cleared once a
  worker has started the work. The reaper sends what falls due, so no work is left without a message
  when the API dies between writing a job and queueing it, a broker refuses, or a worker dies
  holding a message it had not started. A job's entry is not cleared when its message is sent
  (and confirmed, on RabbitMQ) but moved STEMS_RESEND_QUEUED_S ahead: a job still waiting then is
  sent again, so a message the broker lost does not leave it queued for ever.
- **Load.** `{p}:load:{queue}` lists the unfinished (queued or running) jobs of a queue, the
  number an autoscaler must keep workers for (KEDA's Redis list trigger reads its length).
- **Cleanup owed.** `{p}:cleanup` (sorted set: "job id:user id" -> ms since the epoch) holds every job whose
  objects must still be brought to what its state allows (`workers/jobstate.py::clean`), written in the
  transaction that made the cleanup necessary (a job ended, a job deleted); settled once storage confirms.
- Usage metering, the reaper's lock, try counters of tasks without a job record, worker reports (and
  `{p}:served`: each queue's last report, kept while its pool is at zero) and request idempotency records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import redis

from stems import rediskeys as K

from . import eta
from .models import DELIVERY_QUEUE, Job, JobStatus, Stem, WorkerReport

DAY_S = 86400

# compare-and-settle: settle an outbox entry only if nobody rescheduled it since we read it (a worker that
# received the message owes it anew); settling is deleting it, or, with ARGV[3], moving it to that score
_SETTLE = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1]) return 1 end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""
# take or keep a lock: set it if free, extend it if ours
_LOCK = """
local v = redis.call('GET', KEYS[1])
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""


def _ms(t: float) -> int:
    return int(t * 1000)


# a pipeline of JobStore's client: typed Any as that client is (see JobStore.__init__)
Pipe = Any

# what the outbox owes a message for, and what a delivery count counts (workers/messages.py::TASKS)
TaskKind = Literal["split", "deliver", "import", "webhook", "master"]


class RunStore:
    """Mixed into `JobStore` (which provides `_r`, `_k`, `_put` and `_get`)."""

    _r: Any  # JobStore's client (see there)
    _k: Callable[..., str]
    transition: Callable[..., Job | None]

    # -- indexes that follow the job record --------------------------------------
    def index_job(self, pipe: Pipe, old: Job | None, new: Job) -> None:
        """Mirror a job write into the run indexes, inside the write's transaction."""
        if new.status == JobStatus.processing and new.lease_until:
            pipe.zadd(self._k(K.LEASES), {new.id: new.lease_until})
            pipe.zadd(self._k(K.DEADLINES), {new.id: new.deadline_at or new.lease_until})
            # a worker holds it: the lease governs now
            pipe.zrem(self._k(K.OUTBOX), f"split:{new.id}", f"deliver:{new.id}")
        else:
            pipe.zrem(self._k(K.LEASES), new.id)
            pipe.zrem(self._k(K.DEADLINES), new.id)
        if old is None:
            pipe.rpush(self._k(K.LOAD, new.queue), new.id)
        if new.status.terminal and (old is None or not old.status.terminal):
            pipe.lrem(self._k(K.LOAD, new.queue), 0, new.id)
            if new.separated is not None:  # counted on the delivery queue since its hand-over
                pipe.lrem(self._k(K.LOAD, DELIVERY_QUEUE), 0, new.id)
            pipe.zrem(self._k(K.OUTBOX), f"split:{new.id}", f"deliver:{new.id}")

    def move_load(self, pipe: Pipe, job_id: str, src: str, dest: str) -> None:
        """Count an unfinished job on another queue (a two-stage job handed from separation to delivery)."""
        if src != dest:
            pipe.lrem(self._k(K.LOAD, src), 0, job_id)
            pipe.rpush(self._k(K.LOAD, dest), job_id)

    def meter_usage(self, pipe: Pipe, job: Job) -> None:
        """Count a completed job's minutes; called in the transaction that completes it, which happens once."""
        pipe.hincrbyfloat(self._k(K.USAGE, job.user_id), "minutes", job.usage_minutes)
        pipe.hincrby(self._k(K.USAGE, job.user_id), "jobs", 1)
        eta.record(self, pipe, job)  # its speed, for the estimates of the jobs after it

    def expired_leases(self, now: float, limit: int = 100) -> list[str]:
        return [m.decode() for m in self._r.zrangebyscore(self._k(K.LEASES), "-inf", now, start=0, num=limit)]

    def past_deadline(self, now: float, limit: int = 100) -> list[str]:
        return [m.decode() for m in self._r.zrangebyscore(self._k(K.DEADLINES), "-inf", now, start=0, num=limit)]

    def forget_run(self, job_id: str) -> None:
        """Drop the lease and deadline entries of a job that no longer runs (its record ended or vanished)."""
        self._r.zrem(self._k(K.LEASES), job_id)
        self._r.zrem(self._k(K.DEADLINES), job_id)

    def running(self) -> int:
        running: int = self._r.zcard(self._k(K.LEASES))
        return running

    def load(self, queue: str) -> int:
        """Unfinished jobs of a queue: what an autoscaler must keep workers for."""
        load: int = self._r.llen(self._k(K.LOAD, queue))
        return load

    def prune_load(self, queue: str) -> int:
        """Drop ids of jobs that ended or vanished without a terminal write (a record deleted by hand)."""
        key = self._k(K.LOAD, queue)
        ids = [i.decode() for i in self._r.lrange(key, 0, -1)]
        raws = self._r.mget([self._k(K.JOB, i) for i in ids]) if ids else []
        gone = [i for i, raw in zip(ids, raws) if raw is None or Job.model_validate_json(raw).status.terminal]
        for i in gone:
            self._r.lrem(key, 0, i)
        return len(gone)

    # -- fenced writes -----------------------------------------------------------
    def fenced(self, job_id: str, attempt_id: str, writes: Callable[[object], None], running: bool = True) -> bool:
        """Run `writes(pipe)` in a transaction only while `attempt_id` owns the job (and it runs, if `running`).

        The job record is rewritten unchanged in that transaction (`update_job`), so the check and
        the writes are one atomic step against any other writer of the job."""

        def ours(job: Job) -> Job | None:
            owned = job.attempt_id == attempt_id and (not running or job.status == JobStatus.processing)
            return job if owned else None

        return self.transition(job_id, ours, lambda pipe, _: writes(pipe)) is not None

    def put_stems_fenced(self, stems: list[Stem], job_id: str, attempt_id: str, running: bool = True) -> bool:
        def writes(pipe: Pipe) -> None:
            for s in stems:
                pipe.set(self._k(K.STEM, s.id), s.model_dump_json())

        return self.fenced(job_id, attempt_id, writes, running) if stems else True

    # -- the outbox ----------------------------------------------------------------
    def owe(self, kind: TaskKind, id_: str, due: float, pipe: Pipe = None) -> int:
        """Record that a message for `kind:id` is owed at `due` (unless the work starts first); returns its score."""
        score = _ms(due)
        (pipe or self._r).zadd(self._k(K.OUTBOX), {f"{kind}:{id_}": score})
        return score

    def owed(self, now: float, limit: int = 200) -> list[tuple[TaskKind, str, int]]:
        """(kind, id, score) of the messages due by `now`."""
        rows = self._r.zrangebyscore(self._k(K.OUTBOX), "-inf", _ms(now), start=0, num=limit, withscores=True)
        out = []
        for member, score in rows:
            kind, _, id_ = member.decode().partition(":")
            out.append((cast(TaskKind, kind), id_, int(score)))  # written by `owe`: one of the kinds
        return out

    def owes(self, kind: TaskKind, id_: str) -> bool:
        return self.owed_score(kind, id_) is not None

    def owed_score(self, kind: TaskKind, id_: str) -> int | None:
        """The score of the entry owed for `kind:id` (what `settle` compares), None if none is owed."""
        score = self._r.zscore(self._k(K.OUTBOX), f"{kind}:{id_}")
        return None if score is None else int(score)

    def settle(self, kind: TaskKind, id_: str, score: int | None = None, again_at: float | None = None) -> bool:
        """The message was sent or is no longer needed; with `score`, only if nobody rescheduled it meanwhile.

        With `again_at` the entry is not deleted but falls due again then: the message was sent, and is
        sent again if the work has not started by that time (a message the broker lost)."""
        member = f"{kind}:{id_}"
        if score is None:
            return bool(self._r.zrem(self._k(K.OUTBOX), member))
        return bool(
            self._r.eval(_SETTLE, 1, self._k(K.OUTBOX), member, score, "" if again_at is None else _ms(again_at))
        )

    # -- cleanup owed -------------------------------------------------------------------
    # Two sets of the same entries: `cleanup`, due soon after the transition that owes it, and `last`, the
    # last sweep of an ended job, due once every attempt of it is past its hard time limit (workers/jobstate.py).
    def _cleanups(self, last: bool) -> str:
        return self._k(K.LAST_SWEEP if last else K.CLEANUP)

    def owe_cleanup(self, pipe: Pipe, job_id: str, user_id: str, due: float, last: bool = False) -> int:
        """Owe the cleanup of the job's objects at `due` (in the caller's transaction); returns its score."""
        score = _ms(due)
        (pipe or self._r).zadd(self._cleanups(last), {f"{job_id}:{user_id}": score})
        return score

    def cleanups_due(self, now: float, limit: int = 200, last: bool = False) -> list[tuple[str, str, int]]:
        """(job id, user id, score) of the cleanups due by `now`."""
        rows = self._r.zrangebyscore(self._cleanups(last), "-inf", _ms(now), start=0, num=limit, withscores=True)
        return [(*member.decode().split(":", 1), int(score)) for member, score in rows]

    def cleanup_owed(self, job_id: str, user_id: str, last: bool = False) -> int | None:
        score = self._r.zscore(self._cleanups(last), f"{job_id}:{user_id}")
        return None if score is None else int(score)

    def settle_cleanup(self, job_id: str, user_id: str, score: int, last: bool = False) -> None:
        """The cleanup is done: drop its entry, unless it was owed again since (a newer score)."""
        self._r.eval(_SETTLE, 1, self._cleanups(last), f"{job_id}:{user_id}", score, "")

    # -- objects owed: what a deleted record named (an asset's original and peaks) ---------------
    def owe_objects(self, pipe: Pipe, object_keys: list[str], due: float) -> None:
        """Owe the removal of these objects at `due`, in the transaction that deletes the record naming them:
        a process that dies before removing them leaves them owed (the reaper removes them), not orphaned."""
        if object_keys:
            (pipe or self._r).zadd(self._k(K.CLEANUP_OBJECTS), {key: _ms(due) for key in object_keys})

    def objects_due(self, now: float, limit: int = 200) -> list[str]:
        return [m.decode() for m in self._r.zrangebyscore(self._k(K.CLEANUP_OBJECTS), "-inf", _ms(now), 0, limit)]

    def objects_owed(self) -> int:
        return int(self._r.zcard(self._k(K.CLEANUP_OBJECTS)))

    def settle_objects(self, object_keys: list[str]) -> None:
        """Those objects are gone (deleting a missing object succeeds, so a repeat is harmless)."""
        if object_keys:
            self._r.zrem(self._k(K.CLEANUP_OBJECTS), *object_keys)

    # -- the reaper's lock, try counters, worker reports -------------------------
    def hold_lock(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lock `name` for `holder` for `ttl_s`, or extend it if `holder` has it; False if another has it."""
        return bool(self._r.eval(_LOCK, 1, self._k(K.LOCK, name), holder, max(1, _ms(ttl_s))))

    def release_lock(self, name: str, holder: str) -> None:
        key = self._k(K.LOCK, name)
        if self._r.get(key) == holder.encode():
            self._r.delete(key)

    def count_try(self, kind: TaskKind, id_: str) -> int:
        """One more try of a task on `id_`; returns how many there have been (kept a week)."""
        key = self._k(K.TRIES, kind, id_)
        with self._r.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 7 * DAY_S)
            return int(pipe.execute()[0])

    def tries(self, kind: TaskKind, id_: str) -> int:
        """How many tries of a task on `id_` have been counted."""
        return int(self._r.get(self._k(K.TRIES, kind, id_)) or 0)

    # -- measured speeds (stems/eta.py) ---------------------------------------------
    def keep_speed(self, pipe: Pipe, names: list[str], sample: str, keep: int) -> None:
        """Add a speed sample to each named list (in the caller's transaction), keeping the newest `keep`."""
        for name in names:
            pipe.lpush(self._k(K.SPEED, name), sample)
            pipe.ltrim(self._k(K.SPEED, name), 0, keep - 1)

    def speed_samples(self, name: str) -> list[str]:
        return [v.decode() for v in self._r.lrange(self._k(K.SPEED, name), 0, -1)]

    def put_worker_report(self, report: WorkerReport) -> None:
        """Keep a worker's report, and remember it as what each of its queues serves (`served`)."""
        raw = report.model_dump_json()
        with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self._k(K.WORKERS), report.hostname, raw)
            for queue in report.queues:
                pipe.hset(self._k(K.SERVED), queue, raw)
            pipe.execute()

    def served(self, max_age_s: float) -> dict[str, WorkerReport]:
        """queue -> the last report of a worker of it, within `max_age_s`: what the deployment serves, also
        on a queue whose pool is scaled to zero (its workers gone, their reports dropped)."""
        now = time.time()
        reports = {
            q.decode(): WorkerReport.model_validate_json(v) for q, v in self._r.hgetall(self._k(K.SERVED)).items()
        }
        return {q: r for q, r in reports.items() if now - r.ts < max_age_s}

    def drop_worker_report(self, hostname: str) -> None:
        self._r.hdel(self._k(K.WORKERS), hostname)

    # -- request idempotency ---------------------------------------------------------
    def claim_request(self, scope: tuple[str, ...], digest: str, ttl_s: int, stale_s: float) -> dict[str, Any] | None:
        """Claim an idempotency scope for a request; None if claimed now, else what the first request left.

        A claim still without a response after `stale_s` belonged to a request whose process died
        before it wrote anything: it is taken over.
        """
        key = self._k(K.IDEM, *scope)
        claim = json.dumps({"hash": digest, "response": None, "at": time.time()})
        for _ in range(2):
            if self._r.set(key, claim, nx=True, ex=ttl_s):
                return None
            raw = self._r.get(key)
            if raw is None:
                continue
            seen: dict[str, Any] = json.loads(raw)
            if seen["response"] is not None or time.time() - seen.get("at", time.time()) < stale_s:
                return seen
            with self._r.pipeline(transaction=True) as pipe:  # delete the abandoned claim unless it just changed
                try:
                    pipe.watch(key)
                    if pipe.get(key) == raw:
                        pipe.multi()
                        pipe.delete(key)
                        pipe.execute()
                except redis.WatchError:
                    pass
        claimed: dict[str, Any] = json.loads(self._r.get(key) or claim)
        return claimed

    def remember_request(
        self, scope: tuple[str, ...], digest: str, response: dict[str, Any], ttl_s: int, pipe: Pipe = None
    ) -> None:
        (pipe or self._r).set(self._k(K.IDEM, *scope), json.dumps({"hash": digest, "response": response}), ex=ttl_s)

    def forget_request(self, scope: tuple[str, ...]) -> None:
        self._r.delete(self._k(K.IDEM, *scope))

    # -- undoing work that could not be queued -------------------------------------
    def delete_asset(self, audio_id: str) -> None:
        self._r.delete(self._k(K.AUDIO, audio_id))
