"""Mastered versions: their records, indexes, deletion and retention, beside the job store's.

A mastering is two records under one id: the `Mastering` (what was asked, how it went, what
the result measures) and a `Stem` of kind `mastered` (the WAV it made). The Stem is what
makes a mastered version splittable as a stem or an upscaled copy is: `/create-stems` with
`mastered_id` and the split worker read it through `get_stem` like the others. Its objects
live under `keys.job_prefix(user, id)`, so deleting a mastering is one prefix.

Indexes: `asset_masters:{audio_id}` (masterings whose root audio is it: they go with it),
`active_masters:{user}` (queued and running ones, for the active-work quota), `retain:mastered`
(objects expire STEMS_RETAIN_STEMS_S after the end) and `retain:mastered_record`
(records go STEMS_RETAIN_RECORDS_S after the end).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from pydantic import BaseModel, Field

from stems import rediskeys as K

from .jobstore import JobStore
from .models import JobStatus, SourceKind, Stem, StemStatus, new_id, now
from .runstore import TaskKind
from .storage import Storage, keys

TASK_KIND: TaskKind = "master"  # its outbox entries and try counters


class Mastering(BaseModel):
    id: str = Field(default_factory=new_id)
    user_id: str
    audio_id: str  # the original upload it descends from
    source_kind: SourceKind
    source_id: str
    preset: str
    bit_depth: int = 24
    status: JobStatus = JobStatus.queued
    error: dict[Any, Any] | None = None
    audio_seconds: float = 0.0
    source_measured: dict[Any, Any] | None = None  # pipelines.mastering.Measurement.to_dict() of the source
    measured: dict[Any, Any] | None = None  # ... and of the result
    processing: dict[Any, Any] | None = None  # gain_db, low_shelf_db, high_shelf_db, renders
    worker: str | None = None
    usage_minutes: float = 0.0
    key_id: str | None = None
    created_at: float = Field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None


def output_stem(m: Mastering) -> Stem:
    """The record of the WAV a mastering makes (same id, so `mastered_id` names both)."""
    return Stem(id=m.id, user_id=m.user_id, job_id=m.id, name="mastered", kind="mastered", bit_depth=m.bit_depth)


def wav_key(m: Mastering) -> str:
    return f"{keys.job_prefix(m.user_id, m.id)}mastered.wav"


def root_audio_id(store: JobStore, stem: Stem) -> str:
    """The original upload a stem, an upscaled copy or a mastered version descends from."""
    job = store.get_job(stem.job_id)
    if job is not None:
        return job.audio_id
    m = store.masterings.get(stem.job_id) if stem.kind == "mastered" else None
    return m.audio_id if m is not None else stem.id


class Masterings:
    """The mastering records in the job store's Redis, under its prefix."""

    def __init__(self, store: JobStore, client: Any, key: Callable[..., str]) -> None:
        # built by the store (`JobStore.masterings`), which hands over its private client and key names
        self.store, self._r, self._k = store, client, key

    def get(self, id_: str) -> Mastering | None:
        raw = self._r.get(self._k(K.MASTERING, id_))
        return Mastering.model_validate_json(raw) if raw else None

    def create(self, m: Mastering, due: float, also: Callable[[object], None] | None = None) -> int:
        """The mastering, its output stem and its owed message in one transaction; returns the outbox score."""
        pipe = self._r.pipeline(transaction=True)
        pipe.set(self._k(K.MASTERING, m.id), m.model_dump_json())
        pipe.set(self._k(K.STEM, m.id), output_stem(m).model_dump_json())
        pipe.sadd(self._k(K.ASSET_MASTERS, m.audio_id), m.id)
        pipe.sadd(self._k(K.ACTIVE_MASTERS, m.user_id), m.id)
        score = self.store.owe(TASK_KIND, m.id, due, pipe)
        if also is not None:
            also(pipe)
        pipe.execute()
        return score

    def update(self, m: Mastering, stem: Stem | None = None) -> bool:
        """Write a mastering that exists (and its stem); False, nothing written, if it was deleted meanwhile.

        A WATCH transaction: usage is metered, and retention starts, only by the write that ends it."""
        key = self._k(K.MASTERING, m.id)
        with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return False
                    before = Mastering.model_validate_json(raw)
                    pipe.multi()
                    pipe.set(key, m.model_dump_json())
                    if stem is not None:
                        pipe.set(self._k(K.STEM, stem.id), stem.model_dump_json(), xx=True)
                    if m.status.terminal and not before.status.terminal:
                        pipe.srem(self._k(K.ACTIVE_MASTERS, m.user_id), m.id)
                        ended = m.finished_at or time.time()
                        pipe.zadd(self._k(K.RETAIN, "mastered"), {m.id: ended})
                        pipe.zadd(self._k(K.RETAIN, "mastered_record"), {m.id: ended})
                        if m.status == JobStatus.complete:
                            pipe.hincrbyfloat(self._k(K.USAGE, m.user_id), "minutes", m.usage_minutes)
                            pipe.hincrby(self._k(K.USAGE, m.user_id), "mastered", 1)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def active(self, user_id: str) -> int:
        active: int = self._r.scard(self._k(K.ACTIVE_MASTERS, user_id))
        return active

    def of_asset(self, audio_id: str) -> list[str]:
        return sorted(i.decode() for i in self._r.smembers(self._k(K.ASSET_MASTERS, audio_id)))

    def delete(self, storage: Storage, m: Mastering) -> int:
        """Remove the records, every index entry and the stored objects; returns objects deleted. Storage is asked
        first, as `stems.lifecycle.delete_job` does: when it is down, StorageUnavailable is raised with nothing
        removed, rather than records gone and objects left without them."""
        storage.ping()
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._k(K.MASTERING, m.id), self._k(K.STEM, m.id), self._k(K.TRIES, TASK_KIND, m.id))
        pipe.srem(self._k(K.ASSET_MASTERS, m.audio_id), m.id)
        pipe.srem(self._k(K.ACTIVE_MASTERS, m.user_id), m.id)
        pipe.zrem(self._k(K.OUTBOX), f"{TASK_KIND}:{m.id}")
        for phase in ("mastered", "mastered_record"):
            pipe.zrem(self._k(K.RETAIN, phase), m.id)
        pipe.execute()
        return storage.delete_prefix(keys.job_prefix(m.user_id, m.id))

    def delete_of_asset(self, storage: Storage, audio_id: str) -> int:
        removed = 0
        for id_ in self.of_asset(audio_id):
            m = self.get(id_)
            if m is None:
                self._r.srem(self._k(K.ASSET_MASTERS, audio_id), id_)
            else:
                removed += self.delete(storage, m)
        return removed

    # -- retention ------------------------------------------------------------------------------------------
    def expire_objects(self, storage: Storage, id_: str) -> bool:
        """Delete a mastered WAV past STEMS_RETAIN_STEMS_S (its records stay, `expired`); False: postponed,
        because a queued or running split reads it."""
        m, stem = self.get(id_), self.store.get_stem(id_)
        if m is not None and stem is not None:
            if any(
                j is not None and not j.status.terminal and j.source_id == id_
                for j in map(self.store.get_job, self.store.asset_job_ids(m.audio_id))
            ):
                return False
            if stem.status == StemStatus.complete:
                self.store.put_stem(stem.model_copy(update={"status": StemStatus.expired, "wav_key": None}))
            storage.delete_prefix(keys.job_prefix(m.user_id, m.id))
        self.store.done_with("mastered", id_)
        return True

    def expire_record(self, storage: Storage, id_: str) -> None:
        m = self.get(id_)
        if m is not None:
            self.delete(storage, m)
        self.store.done_with("mastered_record", id_)
