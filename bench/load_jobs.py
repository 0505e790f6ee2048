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
            await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), max(0.0, until - time.monotonic())) + 0.05)
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


def drain(store, ids: list[str], timeout: float) -> float:
    """Wait until every job is terminal (bounded); returns the seconds waited."""
    t0 = time.monotonic()
    pending = set(ids)
    while pending and time.monotonic() - t0 < timeout:
        jobs = dict(zip(pending, (store.get_job(i) for i in pending)))
        pending = {i for i, j in jobs.items() if j is not None and not j.status.terminal}
        if pending:
            time.sleep(0.5)
    return time.monotonic() - t0


def audit(store, storage, accepted: list[str], prefix: str) -> dict:
    """Check the job store and storage for lost, unfinished, repeated or duplicated work."""
    problems: list[str] = []
    statuses: dict[str, int] = {}
    finished_at: list[float] = []  # of the complete jobs
    reasons: dict[str, int] = {}  # error code -> failed jobs
    if len(set(accepted)) != len(accepted):
        problems.append(f"{len(accepted) - len(set(accepted))} creation_ids were handed out twice")
    stored_jobs = {k.decode().rsplit(":", 1)[1] for k in store.r.scan_iter(match=f"{prefix}:job:*", count=1000)}
    extra = stored_jobs - set(accepted)
    if extra:
        problems.append(f"{len(extra)} jobs exist that no client was given: {sorted(extra)[:3]}")
    for job_id in accepted:
        job = store.get_job(job_id)
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
    return {"statuses": statuses, "problems": problems, "finished_at": finished_at, "reasons": reasons}


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
    env = {**os.environ, "REDIS_URL": url, "STEMS_KEY_PREFIX": prefix, "STEMS_STORAGE": "local",
           "STEMS_DATA_DIR": str(tmp / "data"), "STEMS_MODEL_DIR": str(tmp / "models"), "STEMS_ENV": "development",
           "STEMS_RATE_LIMIT_PER_MINUTE": str(args.rate_limit),
           "STEMS_MAX_ACTIVE_JOBS": str(args.max_active or args.clients)}
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
        body = {"preset": "phantom_center", "audio_id": audio_id, "hq_streaming_format": "none",
                "selection": {"start": 0.5, "end": 0.5 + args.selection}}

        tally = Tally()
        print(f"{args.clients} clients for {args.seconds:.0f} s, {args.workers} worker(s), "
              f"{args.selection:.1f} s selections, on {os.cpu_count()} CPUs ...", flush=True)
        t0 = time.time()
        asyncio.run(asyncio.wait_for(load(base, key, body, args.clients, args.seconds, args.poll, tally),
                                     args.seconds + 300))
        load_end = time.time()
        waited = drain(store, tally.accepted, args.drain_timeout)
        report = audit(store, storage, tally.accepted, prefix)
        end = max(report["finished_at"] or [time.time()])
        complete = report["statuses"].get("complete", 0)
        done_in_window = sum(1 for t in report["finished_at"] if t <= load_end)
        leftovers = {"queued messages": store.r.llen(f"{prefix}:celery:cpu"), "active jobs": store.active_jobs("bench")}
        if any(leftovers.values()):
            report["problems"].append(f"left over after the drain: {leftovers}")
        result = {
            "clients": args.clients, "seconds": args.seconds, "workers": args.workers, "cpus": os.cpu_count(),
            "selection_s": args.selection, "poll_s": args.poll,
            "accepted": len(tally.accepted), "completed": complete, "failed": report["statuses"].get("failed", 0),
            "cancelled": report["statuses"].get("cancelled", 0),
            "unfinished": len(tally.accepted) - sum(v for k, v in report["statuses"].items() if k in TERMINAL),
            "failure_reasons": report["reasons"], "http_429": tally.rate_limited, "http_errors": tally.errors,
            "create_p50_ms": round(pct(tally.create_latency, 0.50) * 1000, 1),
            "create_p99_ms": round(pct(tally.create_latency, 0.99) * 1000, 1),
            "jobs_per_s": round(complete / max(1e-9, end - t0), 2),
            "jobs_per_s_during_load": round(done_in_window / max(1e-9, load_end - t0), 2),
            "drain_s": round(waited, 1),
            "problems": report["problems"][:50], "problem_count": len(report["problems"]),
        }
        rows = [("accepted", result["accepted"]), ("completed", result["completed"]), ("failed", result["failed"]),
                ("cancelled", result["cancelled"]), ("unfinished", result["unfinished"]), ("429s", result["http_429"]),
                ("other HTTP errors", sum(tally.errors.values())),
                ("create p50 (ms)", result["create_p50_ms"]), ("create p99 (ms)", result["create_p99_ms"]),
                ("jobs/s (start to last finish)", result["jobs_per_s"]),
                ("jobs/s (during load)", result["jobs_per_s_during_load"]),
                ("drain after load (s)", result["drain_s"]),
                ("lost / duplicated / repeated", result["problem_count"])]
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
