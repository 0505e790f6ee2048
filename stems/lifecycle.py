"""Deleting what a user asks to delete, and what the retention policy expires: records and objects together.

Every object of a job lives under its prefix (`keys.job_prefix`), and an asset's original is one
object, so a deletion is: ask a running worker to stop (the cancel flag), remove the records
(one Redis transaction), then remove the objects. Records go first: a worker that is still
writing finds its records gone (`put_stem` and `update_asset` only update, `update_job`
returns None) and removes what it wrote itself (`run_split` discards the job's prefix when
its `finish` does not take), so no interleaving leaves a record or an object behind.

Retention phases (sorted sets in the job store, scored by the time each clock starts):

- `original` (STEMS_RETAIN_ORIGINALS_S from the asset's creation): the original is deleted and the
  asset becomes `expired` (its record still answers status; it can no longer be split);
- `stems` (STEMS_RETAIN_STEMS_S from the job's end): the job's objects are deleted and its stems
  become `expired` (unless a queued or running job splits one of them);
- `mastered` and `mastered_record` (the same two times from a mastering's end): its WAV, then its
  records (`stems/masterings.py`);
- `job` (STEMS_RETAIN_RECORDS_S from the job's end) and `asset` (STEMS_RETAIN_RECORDS_S from its
  creation, never before its original): the record goes, with anything still stored for it (a
  job not while a queued or running job splits one of its stems).

An asset with a queued or running job is left for the next sweep, so no job loses its source.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pipelines.errors import Expired

from .jobstore import JobStore
from .models import AssetStatus, AudioAsset, Job
from .settings import Settings
from .storage import Storage, keys

log = logging.getLogger(__name__)


def expiry(start: float | None, keep_s: float) -> float | None:
    """When the retention policy deletes what started its clock at `start` (None: kept)."""
    return start + keep_s if start is not None and keep_s > 0 else None


def delete_job(store: JobStore, storage: Storage, job: Job, tombstone: bool = True, checked: bool = False) -> int:
    """Stop (if running) and remove a job: its records, stems and upscaled copies. Returns objects deleted.

    Storage is asked first (`checked`: the caller did): when it is down, StorageUnavailable is raised before
    any record goes, so a deletion refused for it leaves records and objects as they were."""
    if not checked:
        storage.ping()
    if not job.status.terminal:
        store.request_cancel(job.id)  # a running worker stops between chunks and removes its own writes
    store.delete_job_records(job, tombstone)  # owes the removal of its objects in the same transaction
    score = store.cleanup_owed(job.id, job.user_id)
    removed = storage.delete_prefix(keys.job_prefix(job.user_id, job.id))
    if score is not None and not job.status.terminal:
        return removed  # a running worker may still write: the reaper removes its prefix again later
    if score is not None:
        store.settle_cleanup(job.id, job.user_id, score)
    return removed


def delete_asset(store: JobStore, storage: Storage, asset: AudioAsset, tombstone: bool = True) -> int:
    """Remove an asset, its original and every job made from it (also jobs on its stems). Returns objects deleted.

    The asset record goes first, so no new job can be created on it; then the jobs the index
    holds, until it holds none (a create-stems that read the asset just before checks again
    after creating its job, and removes it: see `api/routes_stems.py`). Storage is asked first, as in
    `delete_job`.
    """
    storage.ping()
    store.delete_asset_record(asset, tombstone)
    removed = 0
    for _ in range(100):  # bounded: each round removes what the index held
        ids = store.asset_job_ids(asset.id)
        if not ids:
            break
        for job_id in ids:
            job = store.get_job(job_id)
            if job is None:
                store.forget_asset_job(asset.id, job_id)
                continue
            removed += delete_job(store, storage, job, tombstone, checked=True)
    removed += store.masterings.delete_of_asset(storage, asset.id)  # a running one finds its record gone
    return removed + delete_asset_objects(store, storage, asset)


def delete_asset_objects(store: JobStore, storage: Storage, asset: AudioAsset) -> int:
    """The asset's stored original and its waveform peaks, then what was owed of them settled; returns how many
    objects that is."""
    for key in asset.stored_keys:
        storage.delete(key)
    store.settle_objects(asset.stored_keys)
    return len(asset.stored_keys)


def asset_record_retention(settings: Settings) -> float:
    """An asset's record outlives its original: it goes STEMS_RETAIN_RECORDS_S after creation, but never
    before the original (an audio whose original is kept forever keeps its record too)."""
    if settings.retain_originals_s <= 0 or settings.retain_records_s <= 0:
        return 0.0
    return max(settings.retain_originals_s, settings.retain_records_s)


def _has_active_job(store: JobStore, audio_id: str) -> bool:
    """A queued or running split of the audio (or of what was made from it), or mastering of it."""
    masters = store.masterings
    return any(
        j is not None and not j.status.terminal for j in map(store.get_job, store.asset_job_ids(audio_id))
    ) or any(m is not None and not m.status.terminal for m in map(masters.get, masters.of_asset(audio_id)))


@dataclass
class SweepReport:
    originals: int = 0
    stems: int = 0
    assets: int = 0
    jobs: int = 0
    postponed: int = 0  # assets left for later because a job on them still runs
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.originals + self.stems + self.assets + self.jobs


def sweep(
    store: JobStore, storage: Storage, settings: Settings, now: float | None = None, batch: int = 500
) -> SweepReport:
    """One pass of the retention policy over at most `batch` ids per phase."""
    now = time.time() if now is None else now
    report = SweepReport()
    # objects before records, and every phase checks what depends on it: a split of a stem keeps the stem's
    # job (records and objects), a split of an audio keeps the audio, a mastering keeps its original
    phases = (
        ("stems", settings.retain_stems_s, _expire_stems),
        ("mastered", settings.retain_stems_s, _expire_mastered),
        ("job", settings.retain_records_s, _expire_job),
        ("mastered_record", settings.retain_records_s, _expire_mastered_record),
        ("original", settings.retain_originals_s, _expire_original),
        ("asset", asset_record_retention(settings), _expire_asset),
    )
    for phase, keep_s, expire in phases:
        if keep_s <= 0:
            continue
        for id_ in store.due(phase, now - keep_s, batch):
            try:
                expire(store, storage, id_, report)
            except Exception as exc:  # one bad record must not stop the sweep; it is tried again next time
                log.warning("retention %s %s: %s", phase, id_, exc)
                report.errors.append(f"{phase} {id_}: {exc.__class__.__name__}: {exc}")
    return report


def _expire_job(store: JobStore, storage: Storage, job_id: str, report: SweepReport) -> None:
    job = store.get_job(job_id)
    if job is not None:
        if _splits_of_stems(store, job):  # its stems are the source of a queued or running split
            report.postponed += 1
            return
        delete_job(store, storage, job, tombstone=False)
        report.jobs += 1
    store.done_with("job", job_id)
    store.done_with("stems", job_id)


def _splits_of_stems(store: JobStore, job: Job) -> bool:
    """Does a queued or running job split one of `job`'s stems?"""
    mine = set(job.stem_ids + job.upscaled_ids)
    return any(
        j is not None and not j.status.terminal and j.source_id in mine
        for j in map(store.get_job, store.asset_job_ids(job.audio_id))
    )


def _expire_stems(store: JobStore, storage: Storage, job_id: str, report: SweepReport) -> None:
    job = store.get_job(job_id)
    if job is not None:
        # marked, checked, then deleted, as for originals below; each step is kept in the stem records
        # (`JobStore.mark_stems_expired`), so a sweeper that dies half-way leaves nothing the next cannot finish
        store.mark_stems_expired(job)
        if _splits_of_stems(store, job):
            store.unmark_stems_expired(job)
            report.postponed += 1
            return
        storage.delete_prefix(keys.job_prefix(job.user_id, job.id))
        store.drop_expired_keys(job)
        report.stems += 1
    store.done_with("stems", job_id)


def _expire_asset(store: JobStore, storage: Storage, audio_id: str, report: SweepReport) -> None:
    asset = store.get_asset(audio_id)
    if asset is not None:
        if _has_active_job(store, audio_id):
            report.postponed += 1
            return
        store.delete_asset_record(asset, tombstone=False)
        delete_asset_objects(store, storage, asset)
        report.assets += 1
    store.done_with("asset", audio_id)
    store.done_with("original", audio_id)


def _expire_original(store: JobStore, storage: Storage, audio_id: str, report: SweepReport) -> None:
    asset = store.get_asset(audio_id)
    if asset is not None:
        if asset.status == AssetStatus.processing or _has_active_job(store, audio_id):
            report.postponed += 1
            return
        if asset.status == AssetStatus.complete:
            # marked first, checked again, then deleted: a create-stems that read the asset as complete just
            # before checks the status again after creating its job (api/routes_stems.py), so either it sees
            # `expired` and withdraws the job, or its job is seen here and the original stays for now
            before = asset.model_copy()
            asset.status = AssetStatus.expired
            asset.error = Expired("the original was deleted by the retention policy").to_dict()
            store.update_asset(asset)
            if _has_active_job(store, audio_id):
                store.update_asset(before)
                report.postponed += 1
                return
        delete_asset_objects(store, storage, asset)  # its peaks too: they are drawn from the music
        report.originals += 1
    store.done_with("original", audio_id)


def _expire_mastered(store: JobStore, storage: Storage, id_: str, report: SweepReport) -> None:
    if store.masterings.expire_objects(storage, id_):
        report.stems += 1
    else:
        report.postponed += 1


def _expire_mastered_record(store: JobStore, storage: Storage, id_: str, report: SweepReport) -> None:
    store.masterings.expire_record(storage, id_)
    report.jobs += 1


def run_locked(store: JobStore, storage: Storage, settings: Settings, lock_ttl_s: float = 600.0) -> SweepReport | None:
    """`sweep` by whoever holds the lock: one sweeper at a time across every worker; None if another holds it."""
    token = store.try_lock("retention", lock_ttl_s)
    if token is None:
        return None
    try:
        return sweep(store, storage, settings)
    finally:
        store.unlock("retention", token)
