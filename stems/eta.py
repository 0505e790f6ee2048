"""How long a split will take: the measured speed of each chain on this deployment's workers, and the queue ahead.

Every completed job leaves its speed (seconds of work per second of audio, from `Job.timings`)
in `speed:{queue}:{preset}:{chain}` and in `speed:{queue}` (the last `SAMPLES` of each, written
in the transaction that completes the job). An estimate takes the median of the chain's
samples (else the queue's, else `DEFAULT_SPEED`, and says which), and adds up the unfinished
jobs of the queue ahead of the job, each at its own chain's speed and minus its progress,
divided among the live workers of the queue, plus the job's own remaining work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .models import Job, JobStatus

if TYPE_CHECKING:
    from .jobstore import JobStore
    from .runstore import Pipe, RunStore

SAMPLES = 20  # kept per chain and per queue: recent enough to follow a change of hardware
DEFAULT_SPEED = 1.0  # seconds per audio second before anything has been measured (says `speed_source: default`)
MAX_AHEAD = 1000  # jobs of the queue read for one estimate (beyond that the rest count at the queue's speed)


def chain_key(queue: str, preset: str, chain_index: int | None) -> str:
    return f"{queue}:{preset}:{'custom' if chain_index is None else chain_index}"


def work_seconds(job: Job) -> float | None:
    """Seconds a node spent on a completed job (one stage, or separation plus delivery), from its timings."""
    t = job.timings
    if "run_s" in t:
        return t["run_s"]
    if "separate_s" in t:
        return t["separate_s"] + t.get("deliver_s", 0.0)
    return None


def record(store: RunStore, pipe: Pipe, job: Job) -> None:
    """Keep a completed job's speed; called in the transaction that completes it (`RunStore.meter_usage`)."""
    seconds = work_seconds(job)
    if not seconds or not job.audio_seconds:
        return
    sample = json.dumps({"s_per_audio_s": round(seconds / job.audio_seconds, 5), "audio_s": job.audio_seconds})
    store.keep_speed(pipe, [chain_key(job.queue, job.preset, job.spec.chain_index), job.queue], sample, SAMPLES)


@dataclass
class Speed:
    s_per_audio_s: float
    source: str  # chain, queue or default
    samples: int


def speed(store: RunStore, queue: str, preset: str, chain_index: int | None) -> Speed:
    for source, key in (("chain", chain_key(queue, preset, chain_index)), ("queue", queue)):
        raw = store.speed_samples(key)
        if raw:
            values = sorted(json.loads(v)["s_per_audio_s"] for v in raw)
            return Speed(values[len(values) // 2], source, len(values))
    return Speed(DEFAULT_SPEED, "default", 0)


def _remaining(store: RunStore, job: Job, cache: dict[tuple[str, str, int | None], float]) -> float:
    key = (job.queue, job.preset, job.spec.chain_index)
    if key not in cache:
        cache[key] = speed(store, *key).s_per_audio_s
    return cache[key] * (job.audio_seconds or 0.0) * (1.0 - (job.progress if job.status == JobStatus.processing else 0))


def workers_of(store: JobStore, queue: str) -> int:
    return max(1, sum(queue in w.queues for w in store.live_workers()))


def estimate(
    store: JobStore, queue: str, preset: str, chain_index: int | None, audio_seconds: float, job: Job | None = None
) -> dict[str, Any]:
    """`eta_s` of a job (an existing queued or running one, or one about to be queued) and what it rests on."""
    ids = store.queued(queue, MAX_AHEAD)
    if job is not None:
        ids = ids[: ids.index(job.id)] if job.id in ids else []  # only the jobs queued before it
    cache: dict[tuple[str, str, int | None], float] = {}
    ahead = [j for j in store.get_jobs(ids) if not j.status.terminal]
    # a running job ahead only delays this one by its remaining work; its own running is not ahead of it
    queued_work = sum(_remaining(store, j, cache) for j in ahead)
    own = speed(store, queue, preset, chain_index)
    progress = job.progress if job is not None and job.status == JobStatus.processing else 0.0
    mine = own.s_per_audio_s * audio_seconds * (1.0 - progress)
    workers = workers_of(store, queue)
    waiting = 0.0 if job is not None and job.status == JobStatus.processing else queued_work / workers
    return {
        "eta_s": round(waiting + mine, 1),
        "basis": {
            "queue": queue,
            "jobs_ahead": len(ahead),
            "workers": workers,
            "seconds_per_audio_second": own.s_per_audio_s,
            "speed_source": own.source,
            "speed_samples": own.samples,
        },
    }
