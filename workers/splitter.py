"""Run one split job: fetch the source, trim, separate, encode, store stems, record status.

Idempotent by construction: a job already terminal is left alone; object keys are
derived from the job and stem ids, so a second delivery overwrites rather than
duplicates; an attempt counter in the job store bounds how often a job that kills its
worker is tried.

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

from pipelines import audio as A
from pipelines.cache import file_key
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
    """Write the WAV and HQ encode (block by block, one pass), upload both, then mark the record complete.

    With a step cache, the encoded files are cached too, keyed by the stem's samples and the
    encoding settings: a stem another job already made (acapella's vocals are 4_tracks' vocals)
    is uploaded from the cache instead of encoded again.
    """
    wav, hq = _encoded(stem, signal, sr, tmp, ctx)
    wav_key = keys.stem(job.user_id, job.id, stem.id, "wav")
    ctx.storage.put_file(wav_key, wav)
    stem.wav_key, stem.wav_size = wav_key, wav.stat().st_size
    if hq is not None:
        hq_key = keys.stem(job.user_id, job.id, stem.id, A.hq_extension(stem.hq_format))
        ctx.storage.put_file(hq_key, hq)
        stem.hq_key, stem.hq_size = hq_key, hq.stat().st_size
        hq.unlink()
    wav.unlink()
    stem.status, stem.made_by = StemStatus.complete, made_by
    stem.duration, stem.sample_rate, stem.channels = signal.frames / sr, sr, signal.channels
    ctx.store.put_stem(stem)


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
            for name, stem in records.items():
                if name not in stems:
                    stem.status = StemStatus.dropped
                    ctx.store.put_stem(stem)
            store_stems([(stem, *stems[name]) for name, stem in records.items() if name in stems], sr, job, tmp, ctx,
                        progress, cancelled, 0.8, 0.15)
            restore(job, stems, sr, tmp, ctx, progress, cancelled)
            for signal, _ in stems.values():
                signal.close()
            mix.close()
        if cancelled():
            raise Cancelled("job cancelled")
        minutes = frames / sr / 60 * load_catalogue().preset(job.preset).usage_multiplier
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
