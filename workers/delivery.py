"""The delivery stage of a two-stage job: the separated float stems in, WAVs, HQ encodes and peaks out.

A job on a GPU queue separates there (`workers/splitter.py`) and stores its float stems under
its attempt's prefix; the job, still `processing`, is handed to the CPU queue with those
stems named in `Job.separated`. A delivery run takes an attempt of its own (a token, a lease
and a deadline, counted in `Job.deliveries`), encodes every stem with `pipelines.split`'s own
`deliver_all`, uploads the files under its own prefix, removes the float stems and completes
the job. So a GPU worker's busy time per job is its separation,
and the encodes of one job run on the CPU workers while the GPU separates the next.

A delivery run that dies, freezes or is handed back at shutdown leaves the float stems where
they are: the reaper (or the hand-back) owes the job another delivery, not another separation.
If the float stems are gone (storage lost them), the job goes back to separation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipelines import signals as S, split
from pipelines.errors import ObjectMissing
from pipelines.jobspec import Output
from stems.models import Job, JobStatus

from .context import WorkerContext
from .jobstate import clean_now, complete, run_attempt, separate_again, start_delivery
from .lease import Lease
from .splitter import Progress, _cancelled, _job_dir, _records, record_timings

log = logging.getLogger(__name__)


def run_delivery(job_id: str, ctx: WorkerContext, worker: str | None = None) -> None:
    """Run one delivery message of a separated job: take a delivery attempt and end it one way or another."""
    job = start_delivery(job_id, ctx, worker)
    if job is None:
        _clear_abandoned(job_id, ctx)
        return  # ended, unknown, not separated, or a live delivery has it (a duplicate message)
    run_attempt(job, ctx, job.deliveries, _deliver)


def _clear_abandoned(job_id: str, ctx: WorkerContext) -> None:
    """A job cancelled while it waited for delivery: nobody runs it now, so the cleanup its cancel owes is done
    here (if the API that cancelled it did not get to it; else by the reaper)."""
    job = ctx.store.get_job(job_id)
    if job is not None and job.separated is not None and job.status in (JobStatus.cancelled, JobStatus.failed):
        clean_now(job, ctx)


def _deliver(job: Job, ctx: WorkerContext, lease: Lease) -> None:
    progress, cancelled = Progress(ctx, job.id, job.attempt_id), _cancelled(job, ctx, lease)
    t0, sep = time.perf_counter(), job.separated
    with _job_dir(ctx) as tmpdir:
        tmp = Path(tmpdir)
        progress(split.SEPARATED, "fetching the separated stems")
        items, held = [], []
        try:
            for stem in sep.stems:
                path = tmp / f"separated-{stem.name}.npy"
                try:
                    ctx.storage.get_file(stem.key, path)
                except ObjectMissing:
                    _separate_again(job, ctx, stem.key)
                    return
                signal = S.FrameFile(path)
                held.append(signal)
                items.append((stem.name, stem.of, Output(signal, stem.made_by)))
            separated = split.Separated(items, split.Done(sep.made_by, sep.frames, sep.sample_rate), None, held)
            _, deliver = _records(job, ctx)
            split.deliver_all(ctx.engine, job.spec, separated, tmp, deliver, progress, cancelled)
        finally:
            for signal in held:
                signal.close()
    deliver_s = time.perf_counter() - t0
    record_timings(job, ctx, deliver_s=deliver_s)
    complete(job, ctx, sep.made_by, sep.frames / sep.sample_rate, cancelled)
    log.info("job %s delivered in %.2f s", job.id, deliver_s)


def _separate_again(job: Job, ctx: WorkerContext, key: str) -> None:
    """The float stems are gone: the job goes back to its model queue to be separated again."""
    log.warning("job %s: separated stem %s is missing; separating it again", job.id, key)
    separate_again(job, ctx)
