"""Job state in Redis behind a small repository: API keys, assets, jobs and stems.

Each record is one JSON value under `{prefix}:{kind}:{id}`. Updates of a job go through
`update_job`, a WATCH/MULTI transaction, so the API (cancel) and a worker (progress)
never overwrite each other's changes.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Callable, TypeVar

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry
from pydantic import BaseModel

from .models import AudioAsset, Job, Stem
from .runstore import RunStore

T = TypeVar("T", bound=BaseModel)


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class JobStore(RunStore):
    def __init__(self, client: redis.Redis, prefix: str = "stems") -> None:
        self.r = client
        self.p = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = "stems") -> "JobStore":
        # a Redis restart (a few seconds) is ridden out inside the client: reconnect with
        # jittered exponential backoff instead of failing the job that happened to write
        retry = Retry(EqualJitterBackoff(cap=2.0, base=0.05), retries=12)
        return cls(redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30,
                                        retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError]), prefix)

    def k(self, *parts: str) -> str:
        return ":".join((self.p, *parts))

    # -- API keys ----------------------------------------------------------------
    def create_key(self, user_id: str) -> str:
        """A new API key for `user_id`; only its sha256 is stored."""
        api_key = "stk_" + secrets.token_urlsafe(32)
        self.r.hset(self.k("apikey", hash_key(api_key)), mapping={"user_id": user_id})
        return api_key

    def user_for_key(self, api_key: str) -> str | None:
        user = self.r.hget(self.k("apikey", hash_key(api_key)), "user_id")
        return user.decode() if user else None

    # -- generic records ---------------------------------------------------------
    def _get(self, kind: str, model: type[T], id_: str) -> T | None:
        raw = self.r.get(self.k(kind, id_))
        return model.model_validate_json(raw) if raw else None

    def _put(self, kind: str, rec: BaseModel, pipe=None) -> None:
        (pipe or self.r).set(self.k(kind, rec.id), rec.model_dump_json())

    def get_asset(self, id_: str) -> AudioAsset | None:
        return self._get("audio", AudioAsset, id_)

    def put_asset(self, asset: AudioAsset) -> None:
        self._put("audio", asset)

    def get_job(self, id_: str) -> Job | None:
        return self._get("job", Job, id_)

    def get_stem(self, id_: str) -> Stem | None:
        return self._get("stem", Stem, id_)

    def put_stem(self, stem: Stem) -> None:
        self._put("stem", stem)

    def get_stems(self, ids: list[str]) -> list[Stem]:
        if not ids:
            return []
        raws = self.r.mget([self.k("stem", i) for i in ids])
        return [Stem.model_validate_json(r) for r in raws if r]

    def create_job(self, job: Job, stems: list[Stem], also: Callable[[object], None] | None = None) -> None:
        """Job and its stem records in one transaction: all visible, or none; `also(pipe)` adds writes to it."""
        pipe = self.r.pipeline(transaction=True)
        for s in stems:
            self._put("stem", s, pipe)
        self._put("job", job, pipe)
        pipe.sadd(self.k("active", job.user_id), job.id)
        self.index_job(pipe, None, job)
        if also is not None:
            also(pipe)
        pipe.execute()

    def update_job(self, job_id: str, fn: Callable[[Job], Job | None],
                   also: Callable[[object, Job], None] | None = None) -> Job | None:
        """Apply `fn` to the current job atomically; `fn` returns None to leave it unchanged.

        `also(pipe, new)` adds writes to the same transaction (they happen only if the change does)."""
        key = self.k("job", job_id)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    job = Job.model_validate_json(raw)
                    new = fn(job.model_copy(deep=True))
                    if new is None:
                        pipe.unwatch()
                        return job
                    pipe.multi()
                    pipe.set(key, new.model_dump_json())
                    if new.status.terminal:
                        pipe.srem(self.k("active", new.user_id), new.id)
                    self.index_job(pipe, job, new)
                    if also is not None:
                        also(pipe, new)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def active_jobs(self, user_id: str) -> int:
        return self.r.scard(self.k("active", user_id))

    # -- cancellation, usage, idempotency ----------------------------------------
    def request_cancel(self, job_id: str) -> None:
        self.r.set(self.k("cancel", job_id), "1", ex=7 * 86400)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self.k("cancel", job_id)))

    def usage(self, user_id: str) -> dict:
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(self.k("usage", user_id)).items()}
        return {"minutes": round(float(raw.get("minutes", 0)), 4), "jobs": int(raw.get("jobs", 0))}

    def live_workers(self, ttl_s: float = 20.0) -> list[dict]:
        """Reports of workers that beat within the last `ttl_s` seconds (see workers.heartbeat)."""
        now = time.time()
        reports = [json.loads(v) for v in self.r.hvals(self.k("workers"))]
        return [r for r in reports if now - r["ts"] < ttl_s]

    def ping(self) -> None:
        self.r.ping()
