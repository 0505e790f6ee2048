"""Run one split job: fetch the source, trim, separate, encode, store stems, record status.

Each delivery runs as an attempt (`workers/attempts.py`): it takes a token, a lease renewed
from a thread (`workers/lease.py`) and a deadline; its objects go under its own prefix, and its
stem records, progress and final status take effect only while its token owns the job. A
delivery of a job that ended, or that a live attempt holds, does nothing. An attempt counter
bounds how often a job that kills its worker is tried; errors a retry can fix send the job
back to the queue after a backoff (`workers/retry.py`).

Streaming: the selection is decoded block by block into a float32 file in the job's
scratch directory, the engine separates it chunk by chunk into more such files, and each
stem's WAV and HQ encode are written block by block from them, so a worker's memory follows
the chunk and the model, not the track (`custom` jobs, whose stereo modes and spans work on
whole arrays, and whole-signal model families are the exceptions; see pipelines/engine.py).
Scratch directories are named by host and pid, so one left behind by a killed worker is
removed by the next job on that host.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded

from pipelines import audio as A
from pipelines.cache import file_key
from pipelines.errors import Cancelled, StemsError
from pipelines.presets import load_catalogue
from stems.models import Job, JobStatus, Stem, StemStatus
from stems.storage import keys

from .attempts import (Superseded, alive, discard_attempt, discard_outputs, finish, give_up, requeue, reset_stems,
                       stand_down, start, sweep_other_attempts)
from .context import WorkerContext
from .lease import Lease
from .retry import backoff, retryable

log = logging.getLogger(__name__)


def _source_key(job: Job, ctx: WorkerContext) -> str:
    if job.source_kind == "audio":
        return ctx.store.get_asset(job.source_id).object_key
    return ctx.store.get_stem(job.source_id).wav_key


class Progress:
    """Throttled progress writes: at most one Redis write per `every` seconds."""

    def __init__(self, ctx: WorkerContext, job_id: str, attempt_id: str, every: float = 0.5) -> None:
        self.ctx, self.job_id, self.attempt_id, self.every, self.last = ctx, job_id, attempt_id, every, 0.0

    def __call__(self, fraction: float, stage: str, force: bool = False) -> None:
        t = time.monotonic()
        if not force and t - self.last < self.every:
            return
        self.last = t

        def apply(job: Job) -> Job | None:
            if job.status != JobStatus.processing or job.attempt_id != self.attempt_id:
                return None
            job.progress, job.stage = round(max(job.progress, min(fraction, 0.999)), 4), stage
            return job

        self.ctx.store.update_job(self.job_id, apply)


def separate(job: Job, mix: A.Signal, sr: int, ctx: WorkerContext, progress, cancelled,
             workdir: Path | None = None) -> dict[str, tuple[A.Signal, str]]:
    """The stems of `job` as {name: (signal, made_by)}; `custom` jobs run their routed chain."""
    params = job.params
    if job.preset != "custom":
        result = ctx.engine.run_stream(job.preset, mix, sr, workdir, job.chain_index,
                                       progress=lambda f, m: progress(0.05 + 0.75 * f, f"separating ({m})"),
                                       cancelled=cancelled)
        return {k: (v, result.made_by[k]) for k, v in result.stems.items()}
    # custom: stereo modes and spans work on whole arrays (memory grows with the selection)
    audio = mix.to_array()
    route = params["route"]

    def extract(x: np.ndarray) -> np.ndarray:
        r = ctx.engine.run(route["preset"], x, sr, route["chain_index"],
                           progress=lambda f, m: progress(0.05 + 0.75 * f, f"separating ({m})"), cancelled=cancelled)
        return np.sum([r.stems[s] for s in route["stems"]], axis=0).astype(np.float32), r.made_by[route["stems"][0]]

    mode = params.get("stereo_mode", "mono")
    if mode == "mono" or audio.shape[0] == 1:
        mix_a = audio.mean(axis=0, keepdims=True)
        target, made_by = extract(mix_a)
    elif mode == "left_right":
        outs = [extract(audio[c:c + 1]) for c in range(audio.shape[0])]
        mix_a, target, made_by = audio, np.concatenate([o[0] for o in outs]), outs[0][1]
    else:  # mid_sides: separate mid and side, then back to left/right
        mid, side = (audio[0] + audio[1]) / 2, (audio[0] - audio[1]) / 2
        (tm, made_by), (ts, _) = extract(mid[None]), extract(side[None])
        mix_a, target = audio, np.concatenate([tm + ts, tm - ts]).astype(np.float32)
    if params.get("spans"):  # extract only inside the spans (relative to the selection start)
        offset = (params.get("selection") or {}).get("start", 0.0)
        gate = np.zeros(target.shape[1], dtype=np.float32)
        for span in params["spans"]:
            gate[int((span["start"] - offset) * sr): int((span["end"] - offset) * sr)] = 1.0
        target = target * gate
    return {"target": (A.ArraySignal(target), made_by),
            "residual": (A.ArraySignal((mix_a - target).astype(np.float32)), made_by)}


def store_stem(stem: Stem, signal: A.Signal, sr: int, job: Job, tmp: Path, ctx: WorkerContext,
               made_by: str) -> None:
    """Write the WAV and HQ encode (block by block, one pass), upload both under the attempt's prefix, then mark
    the record complete (only while the attempt owns the job).

    With a step cache, the encoded files are cached too, keyed by the stem's samples and the
    encoding settings: a stem another job already made (acapella's vocals are 4_tracks' vocals)
    is uploaded from the cache instead of encoded again.
    """
    wav, hq = _encoded(stem, signal, sr, tmp, ctx)
    wav_key = keys.stem(job.user_id, job.id, job.attempt_id, stem.id, "wav")
    ctx.storage.put_file(wav_key, wav)
    stem.wav_key, stem.wav_size = wav_key, wav.stat().st_size
    if hq is not None:
        hq_key = keys.stem(job.user_id, job.id, job.attempt_id, stem.id, A.hq_extension(stem.hq_format))
        ctx.storage.put_file(hq_key, hq)
        stem.hq_key, stem.hq_size = hq_key, hq.stat().st_size
        hq.unlink()
    wav.unlink()
    stem.status, stem.made_by = StemStatus.complete, made_by
    stem.duration, stem.sample_rate, stem.channels = signal.frames / sr, sr, signal.channels
    if not ctx.store.put_stems_fenced([stem], job.id, job.attempt_id):
        raise Superseded("another attempt owns the job now")


def _encoded(stem: Stem, signal: A.Signal, sr: int, tmp: Path, ctx: WorkerContext) -> tuple[Path, Path | None]:
    cache = ctx.engine.cache
    key = None
    if cache is not None:
        key = file_key("stem-files", samples=A.content_digest(signal), sample_rate=sr, channels=signal.channels,
                       frames=signal.frames, bit_depth=stem.bit_depth, hq_format=stem.hq_format,
                       encoder=A.encoder_identity())
        hit = cache.get_files(key, tmp / f"{stem.id}-cached")
        if hit is not None:
            return hit["wav"], hit.get("hq")
    wav = tmp / f"{stem.id}.wav"
    hq = tmp / f"{stem.id}.{A.hq_extension(stem.hq_format)}" if stem.hq_format else None
    with A.WavWriter(wav, sr, signal.channels, stem.bit_depth) as w, \
            (A.HqEncoder(hq, sr, signal.channels, stem.hq_format) if hq else contextlib.nullcontext()) as encoder:
        for _, block in signal.blocks(STORE_BLOCK_S * sr):
            w.write(block)
            if encoder is not None:
                encoder.write(block)
    if key is not None:
        cache.put_files(key, {"wav": wav, **({"hq": hq} if hq is not None else {})})
    return wav, hq


def store_stems(items: list[tuple[Stem, A.Signal, str]], sr: int, job: Job, tmp: Path, ctx: WorkerContext,
                progress, cancelled, at: float, span: float) -> None:
    """store_stem for several stems at once: encoders are single-threaded and release the GIL.

    A failure (or a cancellation, checked before each stem starts) stops stems not yet started;
    it is raised once the running ones have finished, so nothing is uploaded after it.
    """
    if not items:
        return
    threads = max(1, min(len(items), STORE_THREADS))

    def one(stem: Stem, signal: A.Signal, made_by: str) -> None:
        if cancelled():
            raise Cancelled("job cancelled")
        store_stem(stem, signal, sr, job, tmp, ctx, made_by)

    with ThreadPoolExecutor(threads, thread_name_prefix="store-stem") as pool:
        futures = {pool.submit(one, *item): item[0].name for item in items}
        try:
            for i, future in enumerate(as_completed(futures)):
                future.result()
                progress(at + span * (i + 1) / len(items), f"stored {futures[future]}", force=True)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


STORE_BLOCK_S = 10  # seconds of a stem written per block
STORE_THREADS = max(1, min(4, os.cpu_count() or 1))  # stems encoded at once
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
    """Run one delivery of a job: take an attempt, hold its lease, and end the attempt one way or another."""
    job = start(job_id, ctx, worker)
    if job is None:
        return  # ended, unknown, or a live attempt has it (a duplicate delivery)
    if job.attempts > ctx.settings.task_max_attempts:
        give_up(job, ctx)
        return
    s = ctx.settings
    with Lease(ctx.store, job.id, job.attempt_id, s.lease_s, s.lease_renew_s) as lease:
        try:
            reset_stems(job, ctx)
            _run(job, ctx, lease)
        except Superseded:
            stand_down(job, ctx)
        except Cancelled:
            if lease.superseded():
                stand_down(job, ctx)
            else:
                _end_without_stems(job, ctx, JobStatus.cancelled)
        except SoftTimeLimitExceeded:
            _end_without_stems(job, ctx, JobStatus.failed,
                               {"code": "time_limit", "message": "the split ran past its time limit"})
        except Exception as exc:
            if retryable(exc) and job.attempts < s.task_max_attempts:
                _retry(job, ctx, exc)
            elif isinstance(exc, StemsError):
                log.warning("job %s failed: %s", job_id, exc)
                _end_without_stems(job, ctx, JobStatus.failed, exc.to_dict())
            else:
                log.exception("job %s failed", job_id)
                _end_without_stems(job, ctx, JobStatus.failed,
                                   {"code": "internal_error", "message": f"{exc.__class__.__name__}: {exc}"})


def _run(job: Job, ctx: WorkerContext, lease: Lease) -> None:
    progress = Progress(ctx, job.id, job.attempt_id)
    t0, loaded = time.perf_counter(), ctx.engine.load_seconds

    def cancelled() -> bool:  # checked between chunks and stems: cancelled, or no longer this attempt's job
        return lease.lost() or ctx.store.cancel_requested(job.id)

    with tempfile.TemporaryDirectory(prefix=f"split-{_HOST}-{os.getpid()}-", dir=scratch_dir(ctx)) as tmpdir:
        tmp = Path(tmpdir)
        progress(0.01, "downloading", force=True)
        src = tmp / "source"
        ctx.storage.get_file(_source_key(job, ctx), src)
        sel = job.params.get("selection") or {}
        mix, sr = A.decode_to_file(src, tmp / "mix.npy", sel.get("start", 0.0), sel.get("end"),
                                   digest=ctx.engine.cache is not None)
        frames = mix.frames
        src.unlink()
        progress(0.05, "separating", force=True)
        stems = separate(job, mix, sr, ctx, progress, cancelled, tmp)
        records = {s.name: s for s in ctx.store.get_stems(job.stem_ids)}
        if cancelled():
            raise Cancelled("job cancelled")
        progress(0.8, "encoding", force=True)
        dropped = [stem for name, stem in records.items() if name not in stems]
        for stem in dropped:
            stem.status = StemStatus.dropped
        if not ctx.store.put_stems_fenced(dropped, job.id, job.attempt_id):
            raise Superseded("another attempt owns the job now")
        store_stems([(stem, *stems[name]) for name, stem in records.items() if name in stems], sr, job, tmp, ctx,
                    progress, cancelled, 0.8, 0.15)
        restore(job, stems, sr, tmp, ctx, progress, cancelled)
        for signal, _ in stems.values():
            signal.close()
        mix.close()
    if cancelled():
        raise Cancelled("job cancelled")
    minutes = frames / sr / 60 * load_catalogue().preset(job.preset).usage_multiplier
    if finish(job.id, ctx, JobStatus.complete, usage_minutes=minutes, attempt_id=job.attempt_id) is None:
        raise Cancelled("the job was cancelled or taken over while its stems were stored")
    sweep_other_attempts(job, ctx)
    log.info("job %s: %.2f s, of which %.2f s loading models", job.id, time.perf_counter() - t0,
             ctx.engine.load_seconds - loaded)


def _end_without_stems(job: Job, ctx: WorkerContext, status: JobStatus, error: dict | None = None) -> None:
    """End the job as `status` if this attempt still owns it, leaving no stems; else stand down."""
    ended = finish(job.id, ctx, status, error, attempt_id=job.attempt_id)
    current = ctx.store.get_job(job.id)
    if ended is not None or (current is not None and current.attempt_id == job.attempt_id):
        discard_outputs(job, ctx)  # the job is over (cancelled by its owner, failed by us or the reaper)
    else:
        stand_down(job, ctx)


def _retry(job: Job, ctx: WorkerContext, exc: Exception) -> None:
    """Back to the queue: this attempt's outputs removed, the message owed again after a backoff."""
    log.warning("job %s: retryable error %s, trying again", job.id, exc)
    try:
        discard_attempt(job, ctx)
        requeue(job.id, ctx, "retrying", time.time() + backoff(job.attempts - 1), attempt_id=job.attempt_id)
    except Exception as again:  # the store is away too: the lease lapses and the reaper runs the job again
        log.warning("job %s: could not hand it back (%s); the reaper will", job.id, again)


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
        wet = ctx.engine.stream_model(preset.model, dry, sr, tmp, cancelled=cancelled)[preset.source]
        store_stem(up, _WetDry(wet, dry, strength), sr, job, tmp, ctx, preset.model)


class _WetDry(A.Signal):
    """strength * wet + (1 - strength) * dry, computed per read."""

    def __init__(self, wet: A.Signal, dry: A.Signal, strength: float) -> None:
        self.wet, self.dry, self.strength = wet, dry, strength
        self.channels, self.frames = dry.channels, dry.frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        return (self.strength * self.wet.read(lo, hi) + (1 - self.strength) * self.dry.read(lo, hi)).astype(np.float32)
