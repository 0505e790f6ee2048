"""Run one split job: fetch the source, run `pipelines.split` on it, upload the stems, record status.

Idempotent by construction: a job already terminal is left alone; object keys are
derived from the job and stem ids, so a second delivery overwrites rather than
duplicates; an attempt counter in the job store bounds how often a job that kills its
worker is tried.

The audio path is `pipelines.split.run`, the same function `stems split` runs locally: it
streams (decode, separation and encodes block by block in the job's scratch directory), so
a worker's memory follows the chunk and the model, not the track. This module adds what only
a service has: the source from storage, stems to storage, records, progress and cancellation
through the job store. Scratch directories are named by host and pid, so one left behind by a killed worker is
removed by the next job on that host.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from pipelines import audio as A
from pipelines import split
from pipelines.errors import Cancelled, StemsError
from pipelines.presets import load_catalogue
from pipelines.split import Product
from stems.models import Job, JobStatus, Stem, StemStatus
from stems.storage import keys

from .context import WorkerContext

log = logging.getLogger(__name__)


class GaveUp(StemsError):
    code = "too_many_attempts"


def _source_key(job: Job, ctx: WorkerContext) -> str:
    if job.source_kind == "audio":
        return ctx.store.get_asset(job.source_id).object_key
    return ctx.store.get_stem(job.source_id).wav_key


class Progress:
    """Throttled progress writes: a new stage at once, the same stage at most once per `every` seconds."""

    def __init__(self, ctx: WorkerContext, job_id: str, every: float = 0.5) -> None:
        self.ctx, self.job_id, self.every, self.last, self.stage = ctx, job_id, every, 0.0, None

    def __call__(self, fraction: float, stage: str) -> None:
        t = time.monotonic()
        if stage == self.stage and t - self.last < self.every:
            return
        self.last, self.stage = t, stage

        def apply(job: Job) -> Job | None:
            if job.status != JobStatus.processing:
                return None
            job.progress, job.stage = round(max(job.progress, min(fraction, 0.999)), 4), stage
            return job

        self.ctx.store.update_job(self.job_id, apply)


def start(job_id: str, ctx: WorkerContext, worker: str | None = None) -> Job | None:
    """Mark the job processing and count the attempt; None if there is nothing to do."""

    def apply(job: Job) -> Job | None:
        if job.status.terminal:
            return None
        job.status, job.stage, job.attempts = JobStatus.processing, "starting", job.attempts + 1
        job.started_at = job.started_at or time.time()
        job.worker, job.worker_pid = worker, os.getpid()
        return job

    job = ctx.store.update_job(job_id, apply)
    if job is None or job.status != JobStatus.processing:
        return None
    return job


def finish(job_id: str, ctx: WorkerContext, status: JobStatus, error: dict | None = None,
           usage_minutes: float = 0.0) -> Job | None:
    def apply(job: Job) -> Job | None:
        if job.status.terminal:
            return None
        job.status, job.error, job.finished_at = status, error, time.time()
        job.stage = status.value
        job.progress = 1.0 if status == JobStatus.complete else job.progress
        job.usage_minutes = usage_minutes
        return job

    return ctx.store.update_job(job_id, apply)


def discard_outputs(job: Job, ctx: WorkerContext) -> None:
    ctx.storage.delete_prefix(keys.job_prefix(job.user_id, job.id))
    for stem in ctx.store.get_stems(job.stem_ids + job.upscaled_ids):
        if stem.status != StemStatus.pending:
            stem.status, stem.wav_key, stem.hq_key, stem.wav_size, stem.hq_size = StemStatus.pending, None, None, None, None
            stem.peaks_key = None
            ctx.store.put_stem(stem)


def store_product(product: Product, stem: Stem, job: Job, ctx: WorkerContext) -> None:
    """Upload one stem's encoded files, then mark its record complete."""
    wav_key = keys.stem(job.user_id, job.id, stem.id, "wav")
    ctx.storage.put_file(wav_key, product.wav)
    stem.wav_key, stem.wav_size = wav_key, product.wav.stat().st_size
    stem.peaks_key = keys.stem(job.user_id, job.id, stem.id, "peaks.json")
    ctx.storage.put_file(stem.peaks_key, product.peaks)
    product.peaks.unlink()
    if product.hq is not None:
        hq_key = keys.stem(job.user_id, job.id, stem.id, A.hq_extension(stem.hq_format))
        ctx.storage.put_file(hq_key, product.hq)
        stem.hq_key, stem.hq_size = hq_key, product.hq.stat().st_size
        product.hq.unlink()
    product.wav.unlink()
    stem.status, stem.made_by = StemStatus.complete, product.made_by
    stem.duration, stem.sample_rate, stem.channels = product.frames / product.sample_rate, product.sample_rate, product.channels
    ctx.store.put_stem(stem)


_HOST = socket.gethostname().replace("-", "_")


def scratch_dir(ctx: WorkerContext) -> Path | None:
    """Where job scratch directories go (the data dir, so cache entries can be hard links), swept of dead ones."""
    root = ctx.scratch_dir
    if root is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob(f"split-{_HOST}-*"):
        try:
            pid = int(p.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_split(job_id: str, ctx: WorkerContext, worker: str | None = None) -> None:
    job = start(job_id, ctx, worker)
    if job is None:
        return
    if job.attempts > ctx.settings.task_max_attempts:
        discard_outputs(job, ctx)
        err = GaveUp(f"the job was tried {job.attempts - 1} times and never finished (its worker died each time)",
                     attempts=job.attempts - 1)
        finish(job_id, ctx, JobStatus.failed, err.to_dict())
        return
    if job.attempts > 1:  # a previous delivery died mid-way: start from a clean slate
        discard_outputs(job, ctx)
    progress = Progress(ctx, job_id)
    t0, loaded = time.perf_counter(), ctx.engine.load_seconds

    def cancelled() -> bool:
        return ctx.store.cancel_requested(job_id)

    try:
        with tempfile.TemporaryDirectory(prefix=f"split-{_HOST}-{os.getpid()}-", dir=scratch_dir(ctx)) as tmpdir:
            tmp = Path(tmpdir)
            progress(0.01, "downloading")
            src = tmp / "source"
            ctx.storage.get_file(_source_key(job, ctx), src)
            records = {s.name: s for s in ctx.store.get_stems(job.stem_ids)}
            restored = {u.of_stem_id: u for u in ctx.store.get_stems(job.upscaled_ids)}

            def deliver(product: Product) -> None:
                stem = records[product.name] if product.of is None else restored[records[product.of].id]
                store_product(product, stem, job, ctx)

            done = split.run(ctx.engine, job.spec, src, tmp, deliver, progress, cancelled, wanted=set(records))
        for name, stem in records.items():
            if name not in done.made_by:
                for record in filter(None, (stem, restored.get(stem.id))):
                    record.status = StemStatus.dropped
                    ctx.store.put_stem(record)
        if cancelled():
            raise Cancelled("job cancelled")
        minutes = done.seconds / 60 * load_catalogue().preset(job.preset).usage_multiplier
        done = finish(job_id, ctx, JobStatus.complete, usage_minutes=minutes)
        if done is not None and done.status == JobStatus.complete:
            ctx.store.add_usage(job.user_id, minutes)
        else:  # cancelled while we were storing: the outputs must not stay
            discard_outputs(job, ctx)
        log.info("job %s: %.2f s, of which %.2f s loading models", job_id, time.perf_counter() - t0,
                 ctx.engine.load_seconds - loaded)
    except Cancelled:
        discard_outputs(job, ctx)
        finish(job_id, ctx, JobStatus.cancelled)
    except StemsError as exc:
        if exc.retryable:
            raise  # the task's retry policy decides
        log.warning("job %s failed: %s", job_id, exc)
        discard_outputs(job, ctx)
        finish(job_id, ctx, JobStatus.failed, exc.to_dict())
