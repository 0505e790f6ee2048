"""Run a mastering on the `cpu` queue: fetch the source, master it (pipelines/mastering.py), store the WAV.

Bounded and idempotent like an import (`workers/importer.py`): a delivery of a mastering that
already ended does nothing; each try is counted (one that kills its worker fails after
STEMS_TASK_MAX_ATTEMPTS); the mastering owes itself a new message once its hard time limit
has passed, so a worker that dies mid-way does not strand it; errors a retry can fix are
sent back after a backoff. Records are only updated, never created: a mastering deleted while
it ran finds no record, and the WAV it stored is removed again.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from pipelines import mastering as M
from pipelines.errors import GaveUp, InternalError, StemsError, TimeLimit
from stems.container import Container
from stems.masterings import TASK_KIND, Mastering, Masterings, output_stem, wav_key
from stems.models import JobStatus, StemStatus
from stems.storage import keys

from .retry import backoff, retryable

log = logging.getLogger(__name__)


def source_key(m: Mastering, ctx: Container) -> str | None:
    if m.source_kind == "audio":
        asset = ctx.store.get_asset(m.source_id)
        return asset.object_key if asset else None
    stem = ctx.store.get_stem(m.source_id)
    return stem.wav_key if stem else None


def _fail(store: Masterings, m: Mastering, error: dict) -> None:
    m.status, m.error, m.finished_at = JobStatus.failed, error, time.time()
    stem = output_stem(m).model_copy(update={"status": StemStatus.failed})
    store.update(m, stem)


def run_master(mastering_id: str, ctx: Container, hostname: str | None = None) -> None:
    s, masters = ctx.settings, ctx.store.masterings
    m = masters.get(mastering_id)
    if m is None or m.status.terminal:
        ctx.store.settle(TASK_KIND, mastering_id)
        return
    tries = ctx.store.count_try(TASK_KIND, mastering_id)
    if tries > s.task_max_attempts:
        _fail(
            masters,
            m,
            GaveUp(f"the mastering was tried {tries - 1} times and never finished", attempts=tries - 1).to_dict(),
        )
        ctx.store.settle(TASK_KIND, mastering_id)
        return
    ctx.store.owe(TASK_KIND, mastering_id, time.time() + s.hard_time_limit(m.audio_seconds) + s.enqueue_grace_s)
    m.status, m.started_at, m.worker = JobStatus.processing, time.time(), hostname
    if not masters.update(m):
        ctx.store.settle(TASK_KIND, mastering_id)
        return
    try:
        _master(m, ctx, masters)
    except SoftTimeLimitExceeded:
        ctx.storage.delete_prefix(keys.job_prefix(m.user_id, m.id))
        _fail(masters, m, TimeLimit("the mastering took longer than its time limit").to_dict())
    except Exception as exc:
        if retryable(exc) and tries < s.task_max_attempts:
            log.warning("mastering %s: retryable error %s, trying again", mastering_id, exc)
            ctx.store.owe(TASK_KIND, mastering_id, time.time() + backoff(tries - 1))
            return
        log.warning("mastering %s failed: %s", mastering_id, exc)
        ctx.storage.delete_prefix(keys.job_prefix(m.user_id, m.id))
        _fail(masters, m, InternalError.of(exc).to_dict())
    ctx.store.settle(TASK_KIND, mastering_id)


def _master(m: Mastering, ctx: Container, masters: Masterings) -> None:
    key = source_key(m, ctx)
    if key is None:
        raise StemsError("the source was deleted or expired before the mastering ran")
    with tempfile.TemporaryDirectory(prefix="stems-master-") as tmp:
        src, dest = Path(tmp) / "source", Path(tmp) / "mastered.wav"
        ctx.storage.get_file(key, src)
        report, info = M.master_file(src, dest, m.preset, m.bit_depth)
        out_key = wav_key(m)
        ctx.storage.put_file(out_key, dest)
        size = dest.stat().st_size
    m.status, m.finished_at = JobStatus.complete, time.time()
    m.source_measured, m.measured = report.source.to_dict(), report.result.to_dict()
    m.processing = {
        "gain_db": report.gain_db,
        "low_shelf_db": report.low_shelf_db,
        "high_shelf_db": report.high_shelf_db,
        "renders": report.renders,
    }
    m.usage_minutes = round(report.result.duration_s / 60, 4)
    stem = output_stem(m).model_copy(
        update={
            "status": StemStatus.complete,
            "made_by": f"mastering:{m.preset}",
            "duration": report.result.duration_s,
            "sample_rate": info.sample_rate,
            "channels": min(info.channels, 2),
            "wav_key": out_key,
            "wav_size": size,
        }
    )
    if not masters.update(m, stem):  # deleted while it ran: leave nothing behind
        ctx.storage.delete_prefix(keys.job_prefix(m.user_id, m.id))
