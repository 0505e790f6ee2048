"""Job state in Redis behind a small repository: API keys, assets, jobs and stems.

Each record is one JSON value under `{prefix}:{kind}:{id}`. Updates of a job go through
`update_job`, a WATCH/MULTI transaction, so the API (cancel) and a worker (progress)
never overwrite each other's changes. Writes of a worker to an existing record (`update_asset`,
`put_stem`) only ever update (SET XX): a worker that finishes after its records were deleted
cannot bring them back.

Indexes kept here: `asset_jobs:{audio_id}` (every job whose root audio is it, also jobs on its
stems), `active:{user}` and `pending_bytes:{user}` (queued and running jobs, their estimated
output), and `retain:{phase}` sorted sets scored by the time retention counts from (see
`stems/lifecycle.py`). `gone:{id}` tombstones of deleted audio and jobs outlive the
Idempotency-Key window, so a replay can say the resource was deleted.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from pydantic import BaseModel
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.retry import Retry

from stems import rediskeys as K

from .models import USER_ID, AudioAsset, Job, Stem, StemStatus, WorkerReport
from .runstore import Pipe, RunStore
from .unavailable import RedisUnavailable, redact_url

if TYPE_CHECKING:
    from .masterings import Masterings

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")

IDEMPOTENCY_TTL_S = 24 * 3600
TOMBSTONE_TTL_S = IDEMPOTENCY_TTL_S + 3600
RETAIN_PHASES = ("original", "asset", "stems", "job")  # see stems/lifecycle.py
# a deleted record's objects are owed this long before the reaper removes them: the process that deleted the
# record removes them at once, and the reaper only finishes what a process that died left
OBJECTS_GRACE_S = 30.0


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id_of(api_key: str) -> str:
    """The public name of a key (in `stems keys list`, on jobs): a prefix of its hash, never the key."""
    return "key_" + hash_key(api_key)[:16]


class KeyRecord(BaseModel):
    key_id: str
    user_id: str
    webhook_secret: str | None = None  # None: a key made before keys had their own secret
    created_at: float | None = None


class IssuedKey(BaseModel):
    """What `issue_key` / `rotate_webhook_secret` hand out once; only the key's hash is stored."""

    key_id: str
    user_id: str
    api_key: str | None = None
    webhook_secret: str


_RELEASE_LOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


# what the operator should check, by reason (an API client reads it: no host, no password)
REDIS_CHECKS = {
    "unreachable": "Redis cannot be reached; the operator should check that it is running and that REDIS_URL "
    "points at it",
    "timeout": "Redis did not answer in time; the operator should check its load and the network to it",
    "access_denied": "Redis refused our credentials; the operator should check the password in REDIS_URL",
    "loading": "Redis is loading its data after a restart; it answers again when done",
    "out_of_memory": "Redis is out of memory; the operator should check its maxmemory and what fills it",
    "read_only": "Redis is a read-only replica; the operator should point REDIS_URL at the primary",
    "failover": "Redis has no primary (failover in progress); it answers again once one is elected",
}


def _errors(*names: str) -> tuple[type, ...]:
    return tuple(getattr(redis.exceptions, n) for n in names if hasattr(redis.exceptions, n))  # across redis-py 5..8


# (errors, reason), first match wins: what makes Redis unavailable to us, as opposed to a bug or a WATCH conflict
_FAILURES = (
    (_errors("AuthenticationError", "AuthorizationError"), "access_denied"),
    (_errors("BusyLoadingError"), "loading"),
    (_errors("TimeoutError"), "timeout"),
    (_errors("ConnectionError"), "unreachable"),
    (_errors("OutOfMemoryError"), "out_of_memory"),
    (_errors("ReadOnlyError"), "read_only"),
    (_errors("MasterDownError", "TryAgainError"), "failover"),
)


def redis_failure(exc: BaseException) -> str | None:
    """The reason Redis failed us, or None when `exc` is not Redis being unavailable (a bug, a WATCH conflict)."""
    if isinstance(exc, RedisUnavailable):
        return exc.reason
    return next((reason for errors, reason in _FAILURES if isinstance(exc, errors)), None)


def unavailable(exc: BaseException, where: str = "") -> RedisUnavailable | None:
    reason = redis_failure(exc)
    if reason is None:
        return None
    if isinstance(exc, RedisUnavailable):
        return exc
    return RedisUnavailable(reason, REDIS_CHECKS[reason], f"{where}: {exc.__class__.__name__}: {exc}".lstrip(": "))


class _Translating:
    """Commands raise `RedisUnavailable` (with its reason) when Redis is down or refuses us, after the client's
    own retries; every other error of the client is raised as it is."""

    where = ""

    def _translated(self, run: Callable[..., R], *args: Any, **options: Any) -> R:
        try:
            return run(*args, **options)
        except redis.RedisError as exc:
            error = unavailable(exc, self.where)
            if error is None or error is exc:
                raise
            raise error from exc


class _Pipeline(_Translating, redis.client.Pipeline):
    def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        return self._translated(super().immediate_execute_command, *args, **options)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        return self._translated(super().execute, raise_on_error)


class StoreClient(_Translating, redis.Redis):
    """The job store's Redis client: `RedisUnavailable` instead of the client's connection errors."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return self._translated(super().execute_command, *args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> _Pipeline:
        pipe = _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.where = self.where
        return pipe


WORKER_RETRIES = 12  # about 13 s of reconnecting: a worker rides out a Redis restart inside the client
API_RETRIES = 5  # about 2 to 3 s: a request answers 503 with Retry-After rather than hang


class JobStore(RunStore):
    _url: str | None = None
    _probe: Any = None  # a StoreClient without retries, made on first use

    def __init__(self, client: redis.Redis, prefix: str = "stems") -> None:
        # typed Any: redis-py declares every reply as a union of sync and async, bytes and str, while this
        # client is synchronous and answers bytes
        self._r: Any = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = "stems", retries: int = WORKER_RETRIES) -> JobStore:
        # a Redis restart (a few seconds) is ridden out inside the client: reconnect with
        # jittered exponential backoff instead of failing the job that happened to write
        retry = Retry(EqualJitterBackoff(cap=2.0, base=0.05), retries=retries)
        client = StoreClient.from_url(
            url,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
            retry=retry,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        store = cls(client, prefix)
        store._r.where = f"Redis at {redact_url(url)}"
        store._url = url
        return store

    def _k(self, *parts: str) -> str:
        """The key `{prefix}:{name}:{parts...}`; the name is one of stems/rediskeys.py."""
        return ":".join((self.prefix, *parts))

    def wrapped(self, wrap: Callable[[Any], Any]) -> JobStore:
        """This store over `wrap(client)`, sharing its connections: the seam where the crash-point simulator
        puts a fault-injecting client in front of one simulated process's Redis commands."""
        store = type(self)(wrap(self._r), self.prefix)
        store._url = self._url
        return store

    @cached_property
    def masterings(self) -> Masterings:
        from .masterings import Masterings  # it builds on this module

        return Masterings(self, self._r, self._k)

    # -- what operators, benches and tests inspect ----------------------------------
    def ids(self, kind: str) -> list[str]:
        """The ids of every record of one kind (`rediskeys.JOB`, `AUDIO`, ...): a scan, for audits, not requests."""
        head = len(self._k(kind, ""))
        return [name.decode()[head:] for name in self._r.scan_iter(match=self._k(kind, "*"), count=1000)]

    def key_names(self) -> list[str]:
        """Every key this deployment holds, without its prefix (`job:{id}`, `load:cpu`, ...): a scan, for audits."""
        head = len(self._k(""))
        return [name.decode()[head:] for name in self._r.scan_iter(match=self._k("*"), count=1000)]

    def queued(self, queue: str, limit: int | None = None) -> list[str]:
        """The ids on a queue's load list (queued and running jobs of that queue, oldest first)."""
        return [i.decode() for i in self._r.lrange(self._k(K.LOAD, queue), 0, -1 if limit is None else limit - 1)]

    def broker_backlog(self, queue: str) -> int:
        """Messages waiting on a queue of a Redis broker that shares this store's Redis and prefix."""
        return int(self._r.llen(self._k(K.CELERY, queue)))

    # -- API keys ----------------------------------------------------------------
    def issue_key(self, user_id: str) -> IssuedKey:
        """A new API key for `user_id` with its own webhook signing secret; only the key's sha256 is stored."""
        if not USER_ID.fullmatch(user_id):
            raise ValueError(f"user id {user_id!r}: use 1-128 letters, digits, '.', '_', '@' or '-' (no '/')")
        api_key = "stk_" + secrets.token_urlsafe(32)
        secret = "whsec_" + secrets.token_urlsafe(32)
        digest = hash_key(api_key)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(
            self._k(K.APIKEY, digest), mapping={"user_id": user_id, "webhook_secret": secret, "created_at": time.time()}
        )
        pipe.hset(self._k(K.KEYIDS), key_id_of(api_key), digest)
        pipe.execute()
        return IssuedKey(key_id=key_id_of(api_key), user_id=user_id, api_key=api_key, webhook_secret=secret)

    def create_key(self, user_id: str) -> str:
        api_key = self.issue_key(user_id).api_key
        assert api_key is not None  # a new key comes with its secret once
        return api_key

    def user_for_key(self, api_key: str) -> str | None:
        user = self._r.hget(self._k(K.APIKEY, hash_key(api_key)), "user_id")
        return user.decode() if user else None

    # -- download links ----------------------------------------------------------
    def create_download_token(self, user_id: str, key_id: str, stem_id: str, fmt: str, ttl_s: int) -> str:
        """A token that lets a URL (an <audio> element, a link) fetch one stem in one format for `ttl_s`
        seconds, while the API key `key_id` that asked for it lives; only its sha256 is stored, as for API keys."""
        token = "dl_" + secrets.token_urlsafe(24)
        grant = json.dumps({"user_id": user_id, "key_id": key_id, "stem_id": stem_id, "format": fmt})
        self._r.set(self._k(K.DOWNLOAD_TOKEN, hash_key(token)), grant, ex=ttl_s)
        return token

    def download_grant(self, token: str) -> dict[str, Any] | None:
        """{user_id, key_id, stem_id, format} of a live download token; None for an unknown or expired one, or
        one whose API key was revoked since (a revoked key's links stop with it)."""
        raw = self._r.get(self._k(K.DOWNLOAD_TOKEN, hash_key(token)))
        grant: dict[str, Any] | None = json.loads(raw) if raw else None
        if grant is None or not grant.get("key_id") or self.key_by_id(grant["key_id"]) is None:
            return None
        return grant

    def key_record(self, api_key: str) -> KeyRecord | None:
        return self._key_record(hash_key(api_key))

    def _key_record(self, digest: str) -> KeyRecord | None:
        raw = {k.decode(): v.decode() for k, v in self._r.hgetall(self._k(K.APIKEY, digest)).items()}
        if "user_id" not in raw:
            return None
        return KeyRecord(
            key_id="key_" + digest[:16],
            user_id=raw["user_id"],
            webhook_secret=raw.get("webhook_secret"),
            created_at=float(raw["created_at"]) if raw.get("created_at") else None,
        )

    def _digest(self, key_id: str) -> str | None:
        found = self._r.hget(self._k(K.KEYIDS), key_id)
        if found:
            digest: str = found.decode()
            return digest
        if not (key_id.startswith("key_") and len(key_id) == 20):
            return None
        # a key made before the index existed: find it once, then index it
        names = list(self._r.scan_iter(match=self._k(K.APIKEY, key_id[4:] + "*"), count=1000))
        if len(names) != 1:
            return None
        digest = names[0].decode().rsplit(":", 1)[1]
        self._r.hset(self._k(K.KEYIDS), key_id, digest)
        return digest

    def list_keys(self) -> list[KeyRecord]:
        """Every API key (an operator's listing: SCAN is fine for the keys a deployment has)."""
        return [rec for d in sorted(self.ids(K.APIKEY)) if (rec := self._key_record(d))]

    def key_by_id(self, key_id: str) -> KeyRecord | None:
        digest = self._digest(key_id)
        return self._key_record(digest) if digest else None

    def revoke_key(self, key_id: str) -> bool:
        """Delete the key: it answers 401 from now on, and its jobs' webhooks are no longer sent."""
        digest = self._digest(key_id)
        if digest is None:
            return False
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._k(K.APIKEY, digest))
        pipe.hdel(self._k(K.KEYIDS), key_id)
        return bool(pipe.execute()[0])

    def rotate_webhook_secret(self, key_id: str) -> IssuedKey | None:
        """A new webhook secret for the key; the old one stops signing at once."""
        rec, digest = self.key_by_id(key_id), self._digest(key_id)
        if rec is None or digest is None:  # unknown, or revoked in between
            return None
        secret = "whsec_" + secrets.token_urlsafe(32)
        self._r.hset(self._k(K.APIKEY, digest), "webhook_secret", secret)
        return IssuedKey(key_id=rec.key_id, user_id=rec.user_id, webhook_secret=secret)

    def count_request(self, user_id: str, window: int, ttl_s: int = 120) -> int:
        """Requests of `user_id` in the rate-limit window `window` so far, this one included."""
        key = self._k(K.RATE, user_id, str(window))
        count: int = self._r.incr(key)
        if count == 1:
            self._r.expire(key, ttl_s)
        return count

    # -- generic records ---------------------------------------------------------
    def _get(self, kind: str, model: type[T], id_: str) -> T | None:
        raw = self._r.get(self._k(kind, id_))
        return model.model_validate_json(raw) if raw else None

    def _put(self, kind: str, rec: AudioAsset | Job | Stem, pipe: Pipe = None) -> None:
        (pipe or self._r).set(self._k(kind, rec.id), rec.model_dump_json())

    def get_asset(self, id_: str) -> AudioAsset | None:
        return self._get(K.AUDIO, AudioAsset, id_)

    def put_asset(self, asset: AudioAsset, also: Callable[[object], None] | None = None) -> None:
        """Create (or overwrite) an asset record; retention counts from its `created_at`; `also(pipe)` adds writes
        to the same transaction."""
        pipe = self._r.pipeline(transaction=True)
        self._put(K.AUDIO, asset, pipe)
        for phase in ("original", "asset"):
            pipe.zadd(self._k(K.RETAIN, phase), {asset.id: asset.created_at})
        if also is not None:
            also(pipe)
        pipe.execute()

    def update_asset(self, asset: AudioAsset) -> bool:
        """Write an asset that exists; False (nothing written) if it was deleted meanwhile."""
        return bool(self._r.set(self._k(K.AUDIO, asset.id), asset.model_dump_json(), xx=True))

    def get_job(self, id_: str) -> Job | None:
        return self._get(K.JOB, Job, id_)

    def get_stem(self, id_: str) -> Stem | None:
        return self._get(K.STEM, Stem, id_)

    def put_stem(self, stem: Stem) -> bool:
        """Update a stem record of `create_job`; False (nothing written) if its job was deleted meanwhile."""
        return bool(self._r.set(self._k(K.STEM, stem.id), stem.model_dump_json(), xx=True))

    def _get_many(self, kind: str, model: type[T], ids: list[str]) -> list[T]:
        """The records of `ids` that exist, in order, in one round trip."""
        if not ids:
            return []
        return [model.model_validate_json(r) for r in self._r.mget([self._k(kind, i) for i in ids]) if r]

    def get_stems(self, ids: list[str]) -> list[Stem]:
        return self._get_many(K.STEM, Stem, ids)

    def get_assets(self, ids: list[str]) -> list[AudioAsset]:
        return self._get_many(K.AUDIO, AudioAsset, ids)

    def get_jobs(self, ids: list[str]) -> list[Job]:
        return self._get_many(K.JOB, Job, ids)

    def create_job(self, job: Job, stems: list[Stem], also: Callable[[object], None] | None = None) -> None:
        """Job and its stem records in one transaction: all visible, or none; `also(pipe)` adds writes to it."""
        pipe = self._r.pipeline(transaction=True)
        for s in stems:
            self._put(K.STEM, s, pipe)
        self._put(K.JOB, job, pipe)
        pipe.sadd(self._k(K.ACTIVE, job.user_id), job.id)
        pipe.zadd(self._k(K.USER_JOBS, job.user_id), {job.id: job.created_at})
        pipe.sadd(self._k(K.ASSET_JOBS, job.audio_id), job.id)
        if job.output_bytes:
            pipe.hset(self._k(K.PENDING_BYTES, job.user_id), job.id, job.output_bytes)
        self.index_job(pipe, None, job)
        if also is not None:
            also(pipe)
        pipe.execute()

    def list_jobs(self, user_id: str, limit: int, before: tuple[float, str] | None = None) -> list[tuple[str, float]]:
        """(job id, created_at) of the user's jobs, newest first, after the cursor `before` (created_at, id).

        Members of one score come in descending id order, so a cursor is exact even when two jobs
        share a created_at.
        """
        key = self._k(K.USER_JOBS, user_id)
        if before is None:
            rows = self._r.zrevrange(key, 0, limit - 1, withscores=True)
        else:
            score, job_id = before
            rows = [
                (m, sc) for m, sc in self._r.zrevrangebyscore(key, score, score, withscores=True) if m.decode() < job_id
            ]
            if len(rows) < limit:
                rows += self._r.zrevrangebyscore(
                    key, f"({score!r}", "-inf", start=0, num=limit - len(rows), withscores=True
                )
        return [(m.decode(), sc) for m, sc in rows[:limit]]

    def update_job(
        self, job_id: str, fn: Callable[[Job], Job | None], also: Callable[[object, Job], None] | None = None
    ) -> Job | None:
        """Apply `fn` to the current job atomically; `fn` returns None to leave it unchanged.

        Returns the job as it is now (changed or not; None if it does not exist). `also(pipe, new)`
        adds writes to the same transaction (they happen only if the change does)."""
        job, _ = self._transact(job_id, fn, also)
        return job

    def transition(
        self, job_id: str, fn: Callable[[Job], Job | None], also: Callable[[object, Job], None] | None = None
    ) -> Job | None:
        """A compare-and-set of the job: the new job if `fn`'s change was committed, None if it was not (the
        job is gone, or `fn` declined it as the job was when the transaction committed).

        `fn` may run more than once (a concurrent write restarts the transaction): what it decides
        must depend only on the job it is given, never on a flag set by an earlier run."""
        job, changed = self._transact(job_id, fn, also)
        return job if changed else None

    def _transact(
        self, job_id: str, fn: Callable[[Job], Job | None], also: Callable[[object, Job], None] | None
    ) -> tuple[Job | None, bool]:
        key = self._k(K.JOB, job_id)
        with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None, False
                    job = Job.model_validate_json(raw)
                    new = fn(job.model_copy(deep=True))
                    if new is None:
                        pipe.unwatch()
                        return job, False
                    pipe.multi()
                    pipe.set(key, new.model_dump_json())
                    if new.status.terminal:
                        pipe.srem(self._k(K.ACTIVE, new.user_id), new.id)
                        pipe.hdel(self._k(K.PENDING_BYTES, new.user_id), new.id)
                        if not job.status.terminal:  # retention of stems and records counts from here
                            ended = new.finished_at or time.time()
                            pipe.zadd(self._k(K.RETAIN, "stems"), {new.id: ended})
                            pipe.zadd(self._k(K.RETAIN, "job"), {new.id: ended})
                    self.index_job(pipe, job, new)
                    if also is not None:
                        also(pipe, new)
                    pipe.execute()
                    return new, True
                except redis.WatchError:
                    continue

    def active_jobs(self, user_id: str) -> int:
        active: int = self._r.scard(self._k(K.ACTIVE, user_id))
        return active

    def pending_output_bytes(self, user_id: str) -> int:
        """Estimated output of the user's queued and running jobs together."""
        return sum(int(v) for v in self._r.hvals(self._k(K.PENDING_BYTES, user_id)))

    def asset_job_ids(self, audio_id: str) -> list[str]:
        return sorted(i.decode() for i in self._r.smembers(self._k(K.ASSET_JOBS, audio_id)))

    def forget_asset_job(self, audio_id: str, job_id: str) -> None:
        self._r.srem(self._k(K.ASSET_JOBS, audio_id), job_id)

    # -- deletion ------------------------------------------------------------------
    def delete_job_records(self, job: Job, tombstone: bool = True) -> None:
        """Remove a job, its stem records and every index entry of it in one transaction (also a job whose
        message could not be sent: as if it never was).

        The cancel flag stays (a worker still running the job sees it and stops); usage totals
        stay (billing). With `tombstone`, `gone:{id}` remembers the deletion for a while.
        """
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._k(K.JOB, job.id), *(self._k(K.STEM, s) for s in job.stem_ids + job.upscaled_ids))
        pipe.srem(self._k(K.ACTIVE, job.user_id), job.id)
        pipe.srem(self._k(K.ASSET_JOBS, job.audio_id), job.id)
        pipe.hdel(self._k(K.PENDING_BYTES, job.user_id), job.id)
        pipe.zrem(self._k(K.USER_JOBS, job.user_id), job.id)  # the per-user listing (web page)
        pipe.lrem(self._k(K.LOAD, job.queue), 0, job.id)  # the run indexes (stems.runstore)
        pipe.zrem(self._k(K.OUTBOX), f"split:{job.id}")
        pipe.zrem(self._k(K.LEASES), job.id)
        pipe.zrem(self._k(K.DEADLINES), job.id)
        pipe.delete(self._k(K.WEBHOOK, job.id), self._k(K.TRIES, "webhook", job.id))
        self.owe_cleanup(pipe, job.id, job.user_id, time.time())  # its objects: removed by the caller, else the reaper
        for phase in RETAIN_PHASES:
            pipe.zrem(self._k(K.RETAIN, phase), job.id)
        if tombstone:
            self._bury(pipe, "job", job.id, job.user_id)
        pipe.execute()

    def delete_asset_record(self, asset: AudioAsset, tombstone: bool = True) -> None:
        """Delete the record, owing the removal of the objects it names in the same transaction (the caller
        removes them next, and settles; if it dies first, the reaper does, after OBJECTS_GRACE_S)."""
        pipe = self._r.pipeline(transaction=True)
        self.owe_objects(pipe, asset.stored_keys, time.time() + OBJECTS_GRACE_S)
        pipe.delete(self._k(K.AUDIO, asset.id), self._k(K.TRIES, "import", asset.id))
        pipe.zrem(self._k(K.OUTBOX), f"import:{asset.id}")
        for phase in RETAIN_PHASES:
            pipe.zrem(self._k(K.RETAIN, phase), asset.id)
        if tombstone:
            self._bury(pipe, "audio", asset.id, asset.user_id)
        pipe.execute()

    def _bury(self, pipe: Pipe, kind: str, id_: str, user_id: str) -> None:
        pipe.set(
            self._k(K.GONE, id_),
            json.dumps({"kind": kind, "user_id": user_id, "deleted_at": time.time()}),
            ex=TOMBSTONE_TTL_S,
        )

    def deleted(self, id_: str) -> dict[str, Any] | None:
        """The tombstone of a deleted audio or job (kept for a day past the Idempotency-Key window)."""
        raw = self._r.get(self._k(K.GONE, id_))
        tombstone: dict[str, Any] | None = json.loads(raw) if raw else None
        return tombstone

    # A stem expires in three idempotent steps, each safe to repeat by the next sweep if the sweeper dies:
    # marked (expired, its keys kept: no download, no new split of it), then either unmarked (a split of
    # it still runs) or its objects deleted and its keys dropped. Expired with keys = marked, not deleted.
    def mark_stems_expired(self, job: Job) -> None:
        """Mark the job's complete stems expired, keeping their keys (see above)."""
        for stem in self.get_stems(job.stem_ids + job.upscaled_ids):
            if stem.status == StemStatus.complete:
                self.put_stem(stem.model_copy(update={"status": StemStatus.expired}))

    def unmark_stems_expired(self, job: Job) -> None:
        """Undo the mark of stems whose objects were not deleted: complete again, as they were."""
        for stem in self.get_stems(job.stem_ids + job.upscaled_ids):
            if stem.status == StemStatus.expired and stem.wav_key:
                self.put_stem(stem.model_copy(update={"status": StemStatus.complete}))

    def drop_expired_keys(self, job: Job) -> None:
        """The objects of the job's expired stems are deleted: their records stop pointing at them."""
        for stem in self.get_stems(job.stem_ids + job.upscaled_ids):
            if stem.status == StemStatus.expired and (stem.wav_key or stem.hq_key):
                self.put_stem(stem.model_copy(update={"wav_key": None, "hq_key": None}))

    # -- retention -------------------------------------------------------------------
    def due(self, phase: str, before: float, limit: int = 500) -> list[str]:
        """Ids whose retention clock in `phase` started before `before` (oldest first)."""
        return [i.decode() for i in self._r.zrangebyscore(self._k(K.RETAIN, phase), "-inf", before, start=0, num=limit)]

    def done_with(self, phase: str, id_: str) -> None:
        self._r.zrem(self._k(K.RETAIN, phase), id_)

    def try_lock(self, name: str, ttl_s: float) -> str | None:
        """A token if this caller now holds the lock `name` (for `ttl_s` at most), else None."""
        token = secrets.token_hex(8)
        return token if self._r.set(self._k(K.LOCK, name), token, nx=True, px=int(ttl_s * 1000)) else None

    def unlock(self, name: str, token: str) -> None:
        self._r.eval(_RELEASE_LOCK, 1, self._k(K.LOCK, name), token)

    def memory_used(self) -> int:
        return int(self._r.info("memory")["used_memory"])

    # -- cancellation, usage, idempotency, webhooks ------------------------------
    def request_cancel(self, job_id: str) -> None:
        self._r.set(self._k(K.CANCEL, job_id), "1", ex=7 * 86400)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._r.exists(self._k(K.CANCEL, job_id)))

    def usage(self, user_id: str) -> dict[str, float | int]:
        raw = {k.decode(): v.decode() for k, v in self._r.hgetall(self._k(K.USAGE, user_id)).items()}
        return {"minutes": round(float(raw.get("minutes", 0)), 4), "jobs": int(raw.get("jobs", 0))}

    def live_workers(self, ttl_s: float = 20.0) -> list[WorkerReport]:
        """Reports of workers that beat within the last `ttl_s` seconds (see workers.heartbeat)."""
        now = time.time()
        reports = [WorkerReport.model_validate_json(v) for v in self._r.hvals(self._k(K.WORKERS))]
        return [r for r in reports if now - r.ts < ttl_s]

    def ping(self) -> None:
        self._r.ping()

    def check(self, timeout_s: float = 2.0) -> None:
        """Readiness and start-up: one PING, no retries, short timeouts; RedisUnavailable with the reason."""
        if self._url is None:
            return self.ping()
        if self._probe is None:
            self._probe = StoreClient.from_url(
                self._url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
            )
            self._probe.where = self._r.where
        self._probe.ping()

    def persistence(self) -> dict[str, Any]:
        """How the Redis server keeps its data: `appendonly` and `save` from CONFIG, or, where a managed
        Redis hides CONFIG, `aof_enabled` from INFO (then `save` is unknown: None)."""
        try:
            return {
                "appendonly": self._r.config_get("appendonly").get("appendonly", "no"),
                "save": self._r.config_get("save").get("save", ""),
                "source": "CONFIG",
            }
        except redis.ResponseError:  # CONFIG renamed or not permitted
            aof = self._r.info("persistence").get("aof_enabled") == 1
            return {"appendonly": "yes" if aof else "no", "save": None, "source": "INFO"}
