"""Run one split job: fetch the source, trim, separate, encode, store stems, record status.

Idempotent by construction: a job already terminal is left alone; object keys are
derived from the job and stem ids, so a second delivery overwrites rather than
duplicates; an attempt counter in the job store bounds how often a job that kills its
worker is tried.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines import audio as A
from pipelines.errors import Cancelled, StemsError
from pipelines.presets import load_catalogue
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
    """Throttled progress writes: at most one Redis write per `every` seconds."""

    def __init__(self, ctx: WorkerContext, job_id: str, every: float = 0.5) -> None:
        self.ctx, self.job_id, self.every, self.last = ctx, job_id, every, 0.0

    def __call__(self, fraction: float, stage: str, force: bool = False) -> None:
        t = time.monotonic()
        if not force and t - self.last < self.every:
            return
        self.last = t

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
            ctx.store.put_stem(stem)


def separate(job: Job, audio: np.ndarray, sr: int, ctx: WorkerContext, progress, cancelled):
    """The stems of `job` as {name: (array, made_by)}; `custom` jobs run their routed chain."""
    params = job.params
    if job.preset != "custom":
        result = ctx.engine.run(job.preset, audio, sr, job.chain_index,
                                progress=lambda f, m: progress(0.05 + 0.75 * f, f"separating ({m})"), cancelled=cancelled)
        return {k: (v, result.made_by[k]) for k, v in result.stems.items()}
    route = params["route"]

    def extract(x: np.ndarray) -> np.ndarray:
        r = ctx.engine.run(route["preset"], x, sr, route["chain_index"],
                           progress=lambda f, m: progress(0.05 + 0.75 * f, f"separating ({m})"), cancelled=cancelled)
        return np.sum([r.stems[s] for s in route["stems"]], axis=0).astype(np.float32), r.made_by[route["stems"][0]]

    mode = params.get("stereo_mode", "mono")
    if mode == "mono" or audio.shape[0] == 1:
        mix = audio.mean(axis=0, keepdims=True)
        target, made_by = extract(mix)
    elif mode == "left_right":
        outs = [extract(audio[c:c + 1]) for c in range(audio.shape[0])]
        mix, target, made_by = audio, np.concatenate([o[0] for o in outs]), outs[0][1]
    else:  # mid_sides: separate mid and side, then back to left/right
        mid, side = (audio[0] + audio[1]) / 2, (audio[0] - audio[1]) / 2
        (tm, made_by), (ts, _) = extract(mid[None]), extract(side[None])
        mix, target = audio, np.concatenate([tm + ts, tm - ts]).astype(np.float32)
    if params.get("spans"):  # extract only inside the spans (relative to the selection start)
        offset = (params.get("selection") or {}).get("start", 0.0)
        gate = np.zeros(target.shape[1], dtype=np.float32)
        for span in params["spans"]:
            gate[int((span["start"] - offset) * sr): int((span["end"] - offset) * sr)] = 1.0
        target = target * gate
    return {"target": (target, made_by), "residual": ((mix - target).astype(np.float32), made_by)}


def store_stem(stem: Stem, data: np.ndarray, sr: int, job: Job, tmp: Path, ctx: WorkerContext, made_by: str) -> None:
    """Write the WAV (and HQ encode), upload both, then mark the record complete."""
    wav = tmp / f"{stem.id}.wav"
    A.write_wav(wav, data, sr, stem.bit_depth)
    wav_key = keys.stem(job.user_id, job.id, stem.id, "wav")
    ctx.storage.put_file(wav_key, wav)
    stem.wav_key, stem.wav_size = wav_key, wav.stat().st_size
    if stem.hq_format:
        ext = A.hq_extension(stem.hq_format)
        hq = tmp / f"{stem.id}.{ext}"
        A.encode_hq(hq, data, sr, stem.hq_format)
        hq_key = keys.stem(job.user_id, job.id, stem.id, ext)
        ctx.storage.put_file(hq_key, hq)
        stem.hq_key, stem.hq_size = hq_key, hq.stat().st_size
        hq.unlink()
    wav.unlink()
    stem.status, stem.made_by = StemStatus.complete, made_by
    stem.duration, stem.sample_rate, stem.channels = data.shape[1] / sr, sr, data.shape[0]
    ctx.store.put_stem(stem)


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

    def cancelled() -> bool:
        return ctx.store.cancel_requested(job_id)

    try:
        with tempfile.TemporaryDirectory(prefix="stems-split-") as tmpdir:
            tmp = Path(tmpdir)
            progress(0.01, "downloading", force=True)
            src = tmp / "source"
            ctx.storage.get_file(_source_key(job, ctx), src)
            sel = job.params.get("selection") or {}
            audio, sr = A.decode(src, sel.get("start", 0.0), sel.get("end"))
            src.unlink()
            progress(0.05, "separating", force=True)
            stems = separate(job, audio, sr, ctx, progress, cancelled)
            records = {s.name: s for s in ctx.store.get_stems(job.stem_ids)}
            for i, (name, stem) in enumerate(records.items()):
                if cancelled():
                    raise Cancelled("job cancelled")
                progress(0.8 + 0.15 * i / max(1, len(records)), f"encoding {name}", force=True)
                if name not in stems:
                    stem.status = StemStatus.dropped
                    ctx.store.put_stem(stem)
                    continue
                store_stem(stem, stems[name][0], sr, job, tmp, ctx, stems[name][1])
            restore(job, stems, sr, tmp, ctx, progress, cancelled)
        if cancelled():
            raise Cancelled("job cancelled")
        minutes = audio.shape[1] / sr / 60 * load_catalogue().preset(job.preset).usage_multiplier
        done = finish(job_id, ctx, JobStatus.complete, usage_minutes=minutes)
        if done is not None and done.status == JobStatus.complete:
            ctx.store.add_usage(job.user_id, minutes)
        else:  # cancelled while we were storing: the outputs must not stay
            discard_outputs(job, ctx)
    except Cancelled:
        discard_outputs(job, ctx)
        finish(job_id, ctx, JobStatus.cancelled)
    except StemsError as exc:
        if exc.retryable:
            raise  # the task's retry policy decides
        log.warning("job %s failed: %s", job_id, exc)
        discard_outputs(job, ctx)
        finish(job_id, ctx, JobStatus.failed, exc.to_dict())


def restore(job: Job, stems: dict, sr: int, tmp: Path, ctx: WorkerContext, progress, cancelled) -> None:
    """The restoration step: an upscaled copy of each stem (`strength` is the wet/dry mix)."""
    params = job.params.get("restoration")
    if not params or not job.upscaled_ids:
        return
    preset = load_catalogue().restoration(params["preset"])
    strength = float(params.get("strength", 1.0))
    originals = {s.id: s for s in ctx.store.get_stems(job.stem_ids)}
    for i, up in enumerate(ctx.store.get_stems(job.upscaled_ids)):
        if cancelled():
            raise Cancelled("job cancelled")
        progress(0.95 + 0.05 * i / len(job.upscaled_ids), f"restoring {up.name}", force=True)
        name = originals[up.of_stem_id].name
        if name not in stems:
            up.status = StemStatus.dropped
            ctx.store.put_stem(up)
            continue
        dry = stems[name][0]
        wet = ctx.engine.run_model(preset.model, dry, sr)[preset.source]
        store_stem(up, (strength * wet + (1 - strength) * dry).astype(np.float32), sr, job, tmp, ctx, preset.model)
