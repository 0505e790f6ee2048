"""Jobs under concurrent load, end to end on loopback: none lost, none run twice (`python -m bench.load_jobs`).

Starts a private Redis, the API and one or more CPU workers (local storage, all on
127.0.0.1), uploads one short generated file, then C concurrent clients each loop for the
given seconds: create a `phantom_center` split of a short selection and poll it to a
terminal state. Afterwards it waits (bounded) for every accepted job to end and checks the
job store and storage: every accepted creation_id exists and is terminal, no job exists
that was not accepted, every job ran exactly once (attempts == 1), a complete job's stems
are all stored exactly once under its prefix and nothing else is, an unfinished one left
nothing. Prints a table and writes bench/load_jobs.json; exits 1 if a check fails, a job
failed or a request errored (429s from the rate limit or quota are counted, not errors).

With `--retain S`, stems and job records expire S seconds after each job ends and the cpu
workers' retention sweep runs every `--sweep` seconds: Redis memory (INFO used_memory, sampled
every `--sample` seconds) should then stay flat however many jobs pass, and once the last job
has expired no job record or stem object is left. A job gone from the store counts as expired,
not lost, when its client saw it end. Run it with `--retain 0` too to see the growth without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from stems import rediskeys as K

TERMINAL = {"complete", "failed", "cancelled"}


@dataclass
class Tally:
    accepted: list[str] = field(default_factory=list)
    create_latency: list[float] = field(default_factory=list)
    rate_limited: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seen_terminal: dict[str, str] = field(default_factory=dict)  # creation_id -> status the client saw

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def client_loop(c: httpx.AsyncClient, body: dict, until: float, poll_s: float, tally: Tally) -> None:
    await asyncio.sleep(random.random() * poll_s)  # spread the first requests
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            r = await c.post("/create-stems", json=body)
        except httpx.HTTPError as exc:
            tally.error(f"create {exc.__class__.__name__}")
            await asyncio.sleep(poll_s)
            continue
        tally.create_latency.append(time.perf_counter() - t0)
        if r.status_code == 429:
            tally.rate_limited += 1
            await asyncio.sleep(
                min(float(r.headers.get("retry-after", "1")), max(0.0, until - time.monotonic())) + 0.05
            )
            continue
        if r.status_code != 200:
            tally.error(f"create HTTP {r.status_code}")
            await asyncio.sleep(poll_s)
            continue
        job_id = r.json()["creation_id"]
        tally.accepted.append(job_id)
        while time.monotonic() < until:  # past the end, the final drain follows the job
            await asyncio.sleep(poll_s * (0.75 + 0.5 * random.random()))
            try:
                s = await c.get(f"/status/stem_split/{job_id}")
            except httpx.HTTPError as exc:
                tally.error(f"poll {exc.__class__.__name__}")
                continue
            if s.status_code == 429:
                tally.rate_limited += 1
                continue
            if s.status_code != 200:
                tally.error(f"poll HTTP {s.status_code}")
                continue
            if s.json()["status"] in TERMINAL:
                tally.seen_terminal[job_id] = s.json()["status"]
                break


async def load(base: str, key: str, body: dict, clients: int, seconds: float, poll_s: float, tally: Tally) -> None:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers={"x-api-key": key}, timeout=120, limits=limits) as c:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(c, body, until, poll_s, tally) for _ in range(clients)))


def drain(store, ids: list[str], timeout: float, seen: dict[str, str]) -> float:
    """Wait until every job is terminal (bounded), noting in `seen` how each ended; returns the seconds waited."""
    t0 = time.monotonic()
    pending = set(ids) - set(seen)
    while pending and time.monotonic() - t0 < timeout:
        jobs = dict(zip(pending, (store.get_job(i) for i in pending)))
        seen.update({i: j.status.value for i, j in jobs.items() if j is not None and j.status.terminal})
        pending = {i for i, j in jobs.items() if j is not None and not j.status.terminal}
        if pending:
            time.sleep(0.5)
    return time.monotonic() - t0


def audit(store, storage, accepted: list[str], prefix: str, seen_terminal: dict[str, str] | None = None) -> dict:
    """Check the job store and storage for lost, unfinished, repeated or duplicated work.

    With `seen_terminal` (retention on), a job missing from the store that its client saw end has
    expired rather than been lost; it must have left no object either.
    """
    problems: list[str] = []
    statuses: dict[str, int] = {}
    expired = 0
    finished_at: list[float] = []  # of the complete jobs
    reasons: dict[str, int] = {}  # error code -> failed jobs
    if len(set(accepted)) != len(accepted):
        problems.append(f"{len(accepted) - len(set(accepted))} creation_ids were handed out twice")
    stored_jobs = set(store.ids(K.JOB))
    extra = stored_jobs - set(accepted)
    if extra:
        problems.append(f"{len(extra)} jobs exist that no client was given: {sorted(extra)[:3]}")
    for job_id in accepted:
        job = store.get_job(job_id)
        if job is None and seen_terminal is not None and job_id in seen_terminal:
            expired += 1
            statuses[seen_terminal[job_id]] = statuses.get(seen_terminal[job_id], 0) + 1
            if storage.list(f"users/bench/jobs/{job_id}/"):
                problems.append(f"{job_id}: its record expired but its objects are still stored")
            continue
        if job is None:
            problems.append(f"{job_id}: lost (no record)")
            continue
        statuses[job.status.value] = statuses.get(job.status.value, 0) + 1
        if not job.status.terminal:
            problems.append(f"{job_id}: not terminal ({job.status.value}, stage {job.stage})")
            continue
        if job.status.value == "complete":
            finished_at.append(job.finished_at)
        elif job.error:
            reasons[job.error.get("code", "?")] = reasons.get(job.error.get("code", "?"), 0) + 1
        if job.attempts != 1:
            problems.append(f"{job_id}: attempts == {job.attempts}")
        stems = store.get_stems(job.stem_ids + job.upscaled_ids)
        if len(stems) != len(job.stem_ids) + len(job.upscaled_ids):
            problems.append(f"{job_id}: {len(stems)} stem records of {len(job.stem_ids) + len(job.upscaled_ids)}")
        objects = storage.list(f"users/{job.user_id}/jobs/{job.id}/")
        if len(objects) != len(set(objects)):
            problems.append(f"{job_id}: an object is listed twice")
        if job.status.value == "complete":
            expected = sorted(k for s in stems for k in (s.wav_key, s.hq_key) if k)
            if any(s.status.value not in ("complete", "dropped") for s in stems):
                problems.append(f"{job_id}: complete with unfinished stems")
            if sorted(objects) != expected:
                problems.append(f"{job_id}: stored {objects}, expected exactly {expected}")
        elif objects:
            problems.append(f"{job_id}: {job.status.value} but left {len(objects)} objects")
    return {
        "statuses": statuses,
        "problems": problems,
        "finished_at": finished_at,
        "reasons": reasons,
        "expired": expired,
    }


class MemorySampler:
    """INFO used_memory of the Redis every `every` seconds, with the jobs accepted so far, in a thread."""

    def __init__(self, store, tally: Tally, every: float) -> None:
        import threading

        self.store, self.tally, self.every = store, tally, every
        self.samples: list[tuple[float, int, int]] = []  # (seconds since start, bytes, jobs accepted)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.take()
            if self._stop.wait(self.every):
                return

    def take(self) -> None:
        self.samples.append((round(time.monotonic() - self._t0, 1), self.store.memory_used(), len(self.tally.accepted)))

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.take()

    def summary(self, load_s: float) -> dict:
        during = [x for x in self.samples if x[0] <= load_s] or self.samples
        half = len(during) // 2 or 1
        first, second = during[:half], during[half:] or during[:half]
        mib = 1 << 20
        # growth from a quarter into the load (once the in-flight jobs and queues have filled) to its end
        q = during[len(during) // 4]
        growth = (during[-1][1] - q[1]) / max(1, during[-1][2] - q[2]) * 1000
        return {
            "start_mib": round(during[0][1] / mib, 2),
            "end_of_load_mib": round(during[-1][1] / mib, 2),
            "first_half_mean_mib": round(sum(x[1] for x in first) / len(first) / mib, 2),
            "second_half_mean_mib": round(sum(x[1] for x in second) / len(second) / mib, 2),
            "max_mib": round(max(x[1] for x in self.samples) / mib, 2),
            "final_mib": round(self.samples[-1][1] / mib, 2),
            "growth_kib_per_1000_jobs": round(growth / 1024, 1),
            "samples": [[t, round(b / mib, 3), n] for t, b, n in self.samples[:: max(1, len(self.samples) // 60)]],
        }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients (at most 1000)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long clients create jobs (at most 600)")
    ap.add_argument("--workers", type=int, default=2, help="CPU worker processes (1 or 2 suit a small machine)")
    ap.add_argument("--poll", type=float, default=1.0, help="seconds between a client's status polls")
    ap.add_argument("--selection", type=float, default=2.0, help="seconds of audio each split processes")
    ap.add_argument("--rate-limit", type=int, default=1_000_000, help="STEMS_RATE_LIMIT_PER_MINUTE of the API")
    ap.add_argument("--max-active", type=int, default=None, help="STEMS_MAX_ACTIVE_JOBS (default: the client count)")
    ap.add_argument("--drain-timeout", type=float, default=900.0, help="longest wait for accepted jobs to end")
    ap.add_argument(
        "--retain",
        type=float,
        default=0.0,
        help="STEMS_RETAIN_STEMS_S and STEMS_RETAIN_RECORDS_S: seconds jobs live after they end (0 keeps them)",
    )
    ap.add_argument("--sweep", type=float, default=1.0, help="STEMS_RETENTION_SWEEP_S of the workers")
    ap.add_argument("--sample", type=float, default=1.0, help="seconds between Redis memory samples")
    ap.add_argument("--out", type=Path, default=Path("bench/load_jobs.json"))
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 1000 and 0 < args.seconds <= 600 and 1 <= args.workers <= 8):
        ap.error("--clients 1..1000, --seconds up to 600, --workers 1..8")

    from stems.jobstore import JobStore
    from stems.redisboot import free_port, start_redis
    from stems.settings import Settings
    from stems.stack import api_proc, make_sample, wait_http, wait_workers, worker_proc
    from stems.storage import make_storage

    tmp = Path(tempfile.mkdtemp(prefix="stems-bench-jobs-"))
    redis, url = start_redis(tmp / "redis")
    port = free_port()
    prefix = "benchjobs"
    env = {
        **os.environ,
        "REDIS_URL": url,
        "STEMS_KEY_PREFIX": prefix,
        "STEMS_STORAGE": "local",
        "STEMS_DATA_DIR": str(tmp / "data"),
        "STEMS_MODEL_DIR": str(tmp / "models"),
        "STEMS_ENV": "development",
        "STEMS_RATE_LIMIT_PER_MINUTE": str(args.rate_limit),
        "STEMS_MAX_ACTIVE_JOBS": str(args.max_active or args.clients),
        "STEMS_RETAIN_STEMS_S": str(args.retain),
        "STEMS_RETAIN_RECORDS_S": str(args.retain),
        "STEMS_RETAIN_ORIGINALS_S": "0",
        "STEMS_RETENTION_SWEEP_S": str(args.sweep),
    }
    procs = [api_proc(env, port, tmp / "api.log")]
    procs += [worker_proc(env, "cpu", f"bench{i}", tmp / f"worker-{i}.log") for i in range(args.workers)]
    for p in procs:
        p.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", proc=procs[0])
        store = JobStore.from_url(url, prefix)
        wait_workers(store, args.workers, timeout=120)
        settings = Settings(**{"redis_url": url, "key_prefix": prefix, "storage": "local", "data_dir": tmp / "data"})
        storage = make_storage(settings)
        key = store.create_key("bench")
        sample = tmp / "sample.wav"
        make_sample(sample, seconds=max(3.0, args.selection + 1.0))
        with httpx.Client(base_url=base, headers={"x-api-key": key}, timeout=60) as c, open(sample, "rb") as f:
            audio_id = c.post("/from-file", files={"file": ("sample.wav", f)}).raise_for_status().json()["audio_id"]
            deadline = time.monotonic() + 120
            while (st := c.get(f"/status/audio/{audio_id}").json())["status"] == "processing":
                if time.monotonic() > deadline:
                    raise RuntimeError("the sample did not import within 120 s")
                time.sleep(0.2)
            if st["status"] != "complete":
                raise RuntimeError(f"the sample was refused: {st['error']}")
        body = {
            "preset": "phantom_center",
            "audio_id": audio_id,
            "hq_streaming_format": "none",
            "selection": {"start": 0.5, "end": 0.5 + args.selection},
        }

        tally = Tally()
        print(
            f"{args.clients} clients for {args.seconds:.0f} s, {args.workers} worker(s), "
            f"{args.selection:.1f} s selections, on {os.cpu_count()} CPUs ...",
            flush=True,
        )
        t0 = time.time()
        with MemorySampler(store, tally, args.sample) as memory:
            asyncio.run(
                asyncio.wait_for(
                    load(base, key, body, args.clients, args.seconds, args.poll, tally), args.seconds + 300
                )
            )
            load_end = time.time()
            waited = drain(store, tally.accepted, args.drain_timeout, tally.seen_terminal)
            if args.retain > 0:  # until the last job has expired and been swept
                time.sleep(args.retain + 3 * args.sweep + 2)
        report = audit(store, storage, tally.accepted, prefix, tally.seen_terminal if args.retain > 0 else None)
        end = max(report["finished_at"] or [time.time()])
        complete = report["statuses"].get("complete", 0)
        done_in_window = sum(1 for t in report["finished_at"] if t <= load_end)
        leftovers = {
            "queued messages": store.broker_backlog("cpu"),
            "active jobs": store.active_jobs("bench"),
        }
        if args.retain > 0:
            leftovers["job records"] = len(store.ids(K.JOB))
            leftovers["stem objects"] = len(storage.list("users/bench/jobs/"))
            if store.usage("bench")["jobs"] != report["statuses"].get("complete", 0):
                report["problems"].append(
                    f"usage counts {store.usage('bench')['jobs']} jobs, "
                    f"{report['statuses'].get('complete', 0)} completed"
                )
        if any(leftovers.values()):
            report["problems"].append(f"left over after the drain: {leftovers}")
        result = {
            "clients": args.clients,
            "seconds": args.seconds,
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "selection_s": args.selection,
            "poll_s": args.poll,
            "accepted": len(tally.accepted),
            "completed": complete,
            "failed": report["statuses"].get("failed", 0),
            "cancelled": report["statuses"].get("cancelled", 0),
            "unfinished": len(tally.accepted) - sum(v for k, v in report["statuses"].items() if k in TERMINAL),
            "failure_reasons": report["reasons"],
            "http_429": tally.rate_limited,
            "http_errors": tally.errors,
            "create_p50_ms": round(pct(tally.create_latency, 0.50) * 1000, 1),
            "create_p99_ms": round(pct(tally.create_latency, 0.99) * 1000, 1),
            # with retention the records of finished jobs are gone: time to the end of the drain instead
            "jobs_per_s": round(complete / max(1e-9, (end - t0) if not args.retain else load_end + waited - t0), 2),
            "jobs_per_s_during_load": None if args.retain else round(done_in_window / max(1e-9, load_end - t0), 2),
            "drain_s": round(waited, 1),
            "retain_s": args.retain,
            "expired": report["expired"],
            "redis_memory": memory.summary(load_end - t0),
            "problems": report["problems"][:50],
            "problem_count": len(report["problems"]),
        }
        rows = [
            ("accepted", result["accepted"]),
            ("completed", result["completed"]),
            ("failed", result["failed"]),
            ("cancelled", result["cancelled"]),
            ("unfinished", result["unfinished"]),
            ("429s", result["http_429"]),
            ("other HTTP errors", sum(tally.errors.values())),
            ("create p50 (ms)", result["create_p50_ms"]),
            ("create p99 (ms)", result["create_p99_ms"]),
            ("jobs/s (start to last finish)", result["jobs_per_s"]),
            ("jobs/s (during load)", result["jobs_per_s_during_load"]),
            ("drain after load (s)", result["drain_s"]),
            ("expired (retention)", result["expired"]),
            (
                "Redis MiB start / end of load",
                f"{result['redis_memory']['start_mib']} / {result['redis_memory']['end_of_load_mib']}",
            ),
            (
                "Redis MiB 1st / 2nd half mean",
                f"{result['redis_memory']['first_half_mean_mib']} / {result['redis_memory']['second_half_mean_mib']}",
            ),
            ("Redis MiB max / final", f"{result['redis_memory']['max_mib']} / {result['redis_memory']['final_mib']}"),
            ("Redis KiB per 1000 jobs", result["redis_memory"]["growth_kib_per_1000_jobs"]),
            ("lost / duplicated / repeated", result["problem_count"]),
        ]
        for name, value in rows:
            print(f"  {name:30} {value}")
        if report["reasons"]:
            print(f"  failure reasons: {report['reasons']}")
        for p in report["problems"][:10]:
            print(f"  PROBLEM {p}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        ok = not report["problems"] and result["accepted"] > 0 and not result["failed"] and not tally.errors
        return 0 if ok else 1
    finally:
        for p in reversed(procs):
            p.stop()
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
