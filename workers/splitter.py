"""Run one split job: fetch the source, run `pipelines.split` on it, upload the stems, record status.

The audio path is `pipelines.split.run`, the same function `stems split` runs locally: it
streams (decode, separation and encodes block by block in the job's scratch directory), so
a worker's memory follows the chunk and the model, not the track. This module adds what only
a service has: the source from storage, stems to storage, records, progress and cancellation
through the job store. A job on a GPU queue (STEMS_TWO_STAGE) runs only `separate_all` here and
stores its float stems; the CPU queue's delivery stage (`workers/delivery.py`) encodes them.

Each delivery runs as an attempt (`workers/jobstate.py`, the job's state machine): it takes a token, a lease renewed
from a thread (`workers/lease.py`) and a deadline; its objects go under its own prefix, and its
stem records, progress and final status take effect only while its token owns the job. A
delivery of a job that ended, or that a live attempt holds, does nothing. An attempt counter
bounds how often a job that kills its worker is tried; errors a retry can fix send the job
back to the queue after a backoff (`workers/retry.py`). Scratch directories are named by host
and pid, so one left behind by a killed worker is removed by the next job on that host.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipelines import audio as A, split
from pipelines.errors import Cancelled, Superseded
from pipelines.split import Product
from stems.ingest import check_original
from stems.models import DELIVERY_QUEUE, Job, JobStatus, Separated, SeparatedStem, Stem, StemStatus
from stems.storage import keys

from .context import WorkerContext
from .jobstate import alive, complete, hand_to_delivery, run_attempt, start
from .lease import Lease

log = logging.getLogger(__name__)


class Progress:
    """Throttled progress writes, only while this attempt owns the job: a new stage at once, the same
    stage at most once per `every` seconds."""

    def __init__(self, ctx: WorkerContext, job_id: str, attempt_id: str, every: float = 0.5) -> None:
        self.ctx, self.job_id, self.attempt_id, self.every, self.last, self.stage = (
            ctx,
            job_id,
            attempt_id,
            every,
            0.0,
            None,
        )

    def __call__(self, fraction: float, stage: str) -> None:
        t = time.monotonic()
        if stage == self.stage and t - self.last < self.every:
            return
        self.last, self.stage = t, stage

        def apply(job: Job) -> Job | None:
            if job.status != JobStatus.processing or job.attempt_id != self.attempt_id:
                return None
            job.progress, job.stage = round(max(job.progress, min(fraction, 0.999)), 4), stage
            return job

        self.ctx.store.update_job(self.job_id, apply)


def store_product(product: Product, stem: Stem, job: Job, ctx: WorkerContext) -> None:
    """Upload one stem's encoded files under the attempt's prefix, then mark its record complete (only while
    the attempt owns the job)."""

    def put(path: Path, ext: str) -> str:
        key = keys.stem(job.user_id, job.id, job.attempt_id, stem.id, ext)
        ctx.storage.put_file(key, path)
        return key

    stem.wav_key, stem.wav_size = put(product.wav, "wav"), product.wav.stat().st_size
    stem.peaks_key = put(product.peaks, "peaks.json")
    if product.hq is not None:
        stem.hq_key, stem.hq_size = put(product.hq, A.hq_extension(stem.hq_format)), product.hq.stat().st_size
    for path in filter(None, (product.wav, product.hq, product.peaks)):
        path.unlink()
    stem.status, stem.made_by = StemStatus.complete, product.made_by
    stem.duration, stem.sample_rate, stem.channels = (
        product.frames / product.sample_rate,
        product.sample_rate,
        product.channels,
    )
    if not ctx.store.put_stems_fenced([stem], job.id, job.attempt_id):
        raise Superseded("another attempt owns the job now")


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
        if pid != os.getpid() and not alive(pid):
            shutil.rmtree(p, ignore_errors=True)
    return root


def run_split(job_id: str, ctx: WorkerContext, worker: str | None = None) -> None:
    """Run one delivery of a job's message: take an attempt, hold its lease, and end the attempt one way or another."""
    job = start(job_id, ctx, worker)
    if job is None:
        return  # ended, unknown, or a live attempt has it (a duplicate delivery)
    run_attempt(job, ctx, job.attempts, _separate_stage if two_stage(job, ctx) else _run)


def two_stage(job: Job, ctx: WorkerContext) -> bool:
    """Whether the job's encodes go to the CPU queue's delivery stage (STEMS_TWO_STAGE; auto: jobs on GPU queues)."""
    mode = ctx.settings.two_stage
    return mode == "always" or (mode == "auto" and job.queue != DELIVERY_QUEUE)


def _cancelled(job: Job, ctx: WorkerContext, lease: Lease) -> Callable[[], bool]:
    """The run's check between chunks and stems: cancelled, or no longer this attempt's job."""
    return lambda: lease.lost() or ctx.store.cancel_requested(job.id)


def _records(job: Job, ctx: WorkerContext) -> tuple[dict[str, Stem], Callable[[Product], None]]:
    """The job's stem records by name, and `deliver`: a Product uploaded and recorded on its stem's record."""
    records = {s.name: s for s in ctx.store.get_stems(job.stem_ids)}
    restored = {u.of_stem_id: u for u in ctx.store.get_stems(job.upscaled_ids)}

    def deliver(product: Product) -> None:
        stem = records[product.name] if product.of is None else restored[records[product.of].id]
        store_product(product, stem, job, ctx)

    return records, deliver


def _job_dir(ctx: WorkerContext):
    return tempfile.TemporaryDirectory(prefix=f"split-{_HOST}-{os.getpid()}-", dir=scratch_dir(ctx))


def _fetch_source(job: Job, ctx: WorkerContext, tmp: Path, progress: Progress) -> Path:
    progress(0.01, "downloading")
    src = tmp / "source"
    if job.source_kind != "audio":
        ctx.storage.get_file(ctx.store.get_stem(job.source_id).wav_key, src)
        return src
    asset = ctx.store.get_asset(job.source_id)
    ctx.storage.get_file(asset.object_key, src)
    # a registered original stays where its ingestion service wrote it and may be rewritten after the import
    # probed it (and the budget was computed from it): split only what was imported
    check_original(src, asset.size, asset.sha256)
    return src


def _run(job: Job, ctx: WorkerContext, lease: Lease) -> None:
    """The whole job in this process: separation, then the encodes."""
    progress, cancelled = Progress(ctx, job.id, job.attempt_id), _cancelled(job, ctx, lease)
    t0, loaded, model0 = time.perf_counter(), ctx.engine.load_seconds, ctx.engine.model_seconds
    with _job_dir(ctx) as tmpdir:
        tmp = Path(tmpdir)
        src = _fetch_source(job, ctx, tmp, progress)
        records, deliver = _records(job, ctx)
        done = split.run(ctx.engine, job.spec, src, tmp, deliver, progress, cancelled, wanted=set(records))
    record_timings(job, ctx, run_s=time.perf_counter() - t0, model_s=ctx.engine.model_seconds - model0)
    complete(job, ctx, done.made_by, done.seconds, cancelled)
    log.info(
        "job %s: %.2f s, of which %.2f s loading models",
        job.id,
        time.perf_counter() - t0,
        ctx.engine.load_seconds - loaded,
    )


def _separate_stage(job: Job, ctx: WorkerContext, lease: Lease) -> None:
    """Stage one of two: separate (and restore), store the float stems, hand the job to the CPU queue's delivery."""
    progress, cancelled = Progress(ctx, job.id, job.attempt_id), _cancelled(job, ctx, lease)
    t0, model0 = time.perf_counter(), ctx.engine.model_seconds
    with _job_dir(ctx) as tmpdir:
        tmp = Path(tmpdir)
        src = _fetch_source(job, ctx, tmp, progress)
        records, _ = _records(job, ctx)
        separated = split.separate_all(ctx.engine, job.spec, src, tmp, progress, cancelled, wanted=set(records))
        try:
            model_s = ctx.engine.model_seconds - model0
            files = split.materialize(separated, tmp)
        finally:
            separated.close()
        _check(cancelled)
        stored = []
        for name, of, made_by, path in files:
            key = keys.separated(job.user_id, job.id, job.attempt_id, name)
            ctx.storage.put_file(key, path)
            path.unlink()
            stored.append(SeparatedStem(name=name, of=of, made_by=made_by, key=key))
    _check(cancelled)
    done = separated.done
    handed = Separated(
        attempt_id=job.attempt_id,
        worker=job.worker,
        frames=done.frames,
        sample_rate=done.sample_rate,
        made_by=done.made_by,
        stems=stored,
    )
    timings = {"separate_s": round(time.perf_counter() - t0, 4), "model_s": round(model_s, 4)}
    if not hand_to_delivery(job, ctx, handed, timings):
        raise Cancelled("the job was cancelled or taken over while its stems were stored")
    log.info("job %s separated in %.2f s (%.2f s in models); delivery queued", job.id, timings["separate_s"], model_s)


def record_timings(job: Job, ctx: WorkerContext, **seconds: float) -> None:
    """Add stage timings to the job record (only while this attempt owns it): what a node spent on the job."""

    def apply(current: Job) -> Job | None:
        if current.attempt_id != job.attempt_id or current.status != JobStatus.processing:
            return None
        current.timings = {**current.timings, **{k: round(v, 4) for k, v in seconds.items()}}
        return current

    ctx.store.update_job(job.id, apply)


def _check(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise Cancelled("job cancelled")
