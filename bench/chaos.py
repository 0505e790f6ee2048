"""Jobs while whole worker nodes die at random: none lost, none run twice (`python -m bench.chaos`).

Starts a private Redis (the job store, and the broker unless RabbitMQ is asked for), the API
and W worker groups (`stems worker`, its own process group each, as a node), with a small
randomly initialised htdemucs on torch (ONNX Runtime would finish a split before most kills
land) so a split takes seconds. For M minutes it submits `4_tracks` splits of a `--seconds`
file (40 by default) at a steady rate while, every 10 to 25 s (random), it SIGKILLs one
worker group's whole process group (parent and pool: a reclaimed spot node) and starts a
replacement at once. Leases, the reaper and every other setting keep their defaults unless
given. Then it waits for every accepted job to end and audits the job store and storage:

- accepted, completed, failed, lost (an accepted job that never ended: goal 0),
- duplicated (a job whose storage holds other than exactly one set of stems, or usage counted
  other than once per completed job: goal 0),
- the delay a kill added to each job it interrupted: its end minus the kill, minus the median
  run time of the jobs no kill touched (p50, p99).

Prints a table per broker and writes bench/chaos_results.json; exits 1 if a job was lost or
duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

TERMINAL = {"complete", "failed", "cancelled"}
RABBITMQ_URL = os.environ.get("STEMS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 1)


def run(broker: str, args, tmp: Path) -> dict:
    from pipelines.modelstore import ModelStore
    from stems.jobstore import JobStore
    from stems.redisboot import free_port, start_redis
    from stems.settings import Settings
    from stems.stack import api_proc, make_sample, upload_file, wait_http, wait_workers, worker_proc
    from stems.storage import make_storage
    from tools.random_models import install_random_demucs
    from workers.celery_app import purge_rabbitmq

    tmp.mkdir(parents=True)
    redis, url = start_redis(tmp / "redis")
    prefix = f"chaos{random.randrange(1 << 30):x}"
    models = ModelStore(tmp / "models")
    install_random_demucs(models, "htdemucs", size="small", params={"backend": "torch"}, share_derived=False)
    env = {
        **os.environ,
        "REDIS_URL": url,
        "STEMS_KEY_PREFIX": prefix,
        "STEMS_STORAGE": "local",
        "STEMS_DATA_DIR": str(tmp / "data"),
        "STEMS_MODEL_DIR": str(models.root),
        "STEMS_CHUNK_SECONDS": "5",
        "STEMS_CACHE_MAX_BYTES": "0",
        "STEMS_MAX_ACTIVE_JOBS": "1000",
        "STEMS_RATE_LIMIT_PER_MINUTE": "100000",
    }
    if broker == "rabbitmq":
        env["STEMS_BROKER_URL"] = RABBITMQ_URL
    for name, value in (("STEMS_LEASE_S", args.lease), ("STEMS_LEASE_RENEW_S", args.lease and args.lease / 4)):
        if value:
            env[name] = str(value)
    port = free_port()
    api = api_proc(env, port, tmp / "api.log").start()
    workers: dict[str, object] = {}
    serial = 0

    def start_worker() -> None:
        nonlocal serial
        serial += 1
        name = f"node{serial}"
        workers[name] = worker_proc(env, "cpu,gpu-demucs", name, tmp / f"{name}.log").start()

    for _ in range(args.workers):
        start_worker()
    store = JobStore.from_url(url, prefix)
    storage = make_storage(Settings(redis_url=url, key_prefix=prefix, storage="local", data_dir=tmp / "data"))
    accepted: list[str] = []
    kills: list[dict] = []
    errors: dict[str, int] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", proc=api)
        wait_workers(store, args.workers, 120)
        sample = tmp / "sample.wav"
        make_sample(sample, seconds=args.seconds)
        with httpx.Client(base_url=base, headers={"x-api-key": store.create_key("chaos")}, timeout=60) as c:
            audio_id = upload_file(c, sample)["audio_id"]
            body = {"preset": "4_tracks", "audio_id": audio_id, "hq_streaming_format": "none"}
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            next_job, next_kill = t0, t0 + random.uniform(10, 25)
            while time.monotonic() < end:
                now = time.monotonic()
                if now >= next_job:
                    next_job += 60.0 / args.jobs_per_minute
                    try:
                        r = c.post("/create-stems", json=body)
                        if r.status_code == 200:
                            accepted.append(r.json()["creation_id"])
                        else:
                            errors[f"HTTP {r.status_code}"] = errors.get(f"HTTP {r.status_code}", 0) + 1
                    except httpx.HTTPError as exc:
                        errors[exc.__class__.__name__] = errors.get(exc.__class__.__name__, 0) + 1
                if now >= next_kill:
                    next_kill = now + random.uniform(10, 25)
                    victim = random.choice(sorted(workers))
                    proc = workers.pop(victim)
                    hit = [
                        j
                        for j in map(store.get_job, accepted)
                        if j
                        and j.status.value == "processing"
                        and j.attempt_id
                        and (j.worker or "").startswith(victim + "@")
                    ]  # a run it holds
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.popen.wait(10)
                    kills.append({"at": time.time(), "node": victim, "jobs": [j.id for j in hit]})
                    start_worker()  # the replacement node
                time.sleep(0.05)
        drain_deadline = time.monotonic() + args.drain_timeout
        pending = set(accepted)
        while pending and time.monotonic() < drain_deadline:
            pending = {i for i in pending if not (j := store.get_job(i)) or not j.status.terminal}
            time.sleep(1.0)
        return audit(store, storage, accepted, kills, errors, broker, args)
    finally:
        for p in [api, *workers.values()]:
            p.stop()
        redis.terminate()
        redis.wait(10)
        if broker == "rabbitmq":
            purge_rabbitmq(RABBITMQ_URL, prefix)


def audit(store, storage, accepted, kills, errors, broker, args) -> dict:
    statuses: dict[str, int] = {}
    lost, duplicated, reasons = [], [], {}
    clean_runs, jobs = [], {}
    for job_id in accepted:
        job = store.get_job(job_id)
        if job is None or not job.status.terminal:
            lost.append(job_id)
            continue
        jobs[job_id] = job
        statuses[job.status.value] = statuses.get(job.status.value, 0) + 1
        if job.error:
            reasons[job.error.get("code", "?")] = reasons.get(job.error.get("code", "?"), 0) + 1
        stems = store.get_stems(job.stem_ids)
        objects = sorted(storage.list(f"users/{job.user_id}/jobs/{job.id}/"))
        expected = (
            sorted(k for s in stems for k in (s.wav_key, s.hq_key, s.peaks_key) if k)
            if job.status.value == "complete"
            else []
        )
        whole = sum(1 for s in stems if s.wav_key) == len(job.stem_ids)  # every stem stored, once
        if objects != expected or (job.status.value == "complete" and not whole):
            duplicated.append(job_id)
        if job.status.value == "complete" and job.attempts == 1 and job.started_at:
            clean_runs.append(job.finished_at - job.started_at)
    usage = store.usage("chaos")
    completed = statuses.get("complete", 0)
    if usage["jobs"] != completed:
        duplicated.append(f"usage counted {usage['jobs']} jobs for {completed} completed")
    run_s = statistics.median(clean_runs) if clean_runs else 0.0
    delays = []
    for kill in kills:
        for job_id in kill["jobs"]:
            job = jobs.get(job_id)
            if job is not None and job.status.value == "complete":
                delays.append(job.finished_at - kill["at"] - run_s)
    return {
        "broker": broker,
        "minutes": args.minutes,
        "workers": args.workers,
        "jobs_per_minute": args.jobs_per_minute,
        "lease_s": args.lease or "default",
        "kills": len(kills),
        "jobs_hit_by_kills": sum(len(k["jobs"]) for k in kills),
        "accepted": len(accepted),
        "completed": completed,
        "failed": statuses.get("failed", 0),
        "failure_reasons": reasons,
        "lost": len(lost),
        "duplicated": len(duplicated),
        "http_errors": errors,
        "median_run_s": round(run_s, 1),
        "kill_delay_p50_s": pct(delays, 0.5),
        "kill_delay_p99_s": pct(delays, 0.99),
        "kill_delays_s": [round(d, 1) for d in sorted(delays)],
        "problems": (lost + duplicated)[:20],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--broker", choices=("redis", "rabbitmq", "both"), default="both")
    ap.add_argument("--minutes", type=float, default=3.0, help="how long jobs are submitted and nodes killed")
    ap.add_argument("--workers", type=int, default=2, help="worker groups (nodes) alive at a time")
    ap.add_argument("--jobs-per-minute", type=float, default=12.0)
    ap.add_argument("--seconds", type=float, default=40.0, help="length of the file each job splits")
    ap.add_argument("--lease", type=float, default=None, help="STEMS_LEASE_S (default: the setting's default)")
    ap.add_argument("--drain-timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=Path("bench/chaos_results.json"))
    args = ap.parse_args(argv)
    if not (0 < args.minutes <= 30 and 1 <= args.workers <= 6 and 0 < args.jobs_per_minute <= 120):
        ap.error("--minutes up to 30, --workers 1..6, --jobs-per-minute up to 120")
    brokers = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    from workers.celery_app import rabbitmq_unreachable

    results = {}
    root = Path(tempfile.mkdtemp(prefix="stems-chaos-"))
    try:
        for broker in brokers:
            if broker == "rabbitmq" and (reason := rabbitmq_unreachable(RABBITMQ_URL)):
                print(f"rabbitmq: skipped, {reason}")
                continue
            print(
                f"{broker}: {args.minutes:g} min, {args.workers} nodes, {args.jobs_per_minute:g} jobs/min, "
                f"a node killed every 10-25 s ...",
                flush=True,
            )
            r = results[broker] = run(broker, args, root / broker)
            for key in (
                "kills",
                "jobs_hit_by_kills",
                "accepted",
                "completed",
                "failed",
                "lost",
                "duplicated",
                "median_run_s",
                "kill_delay_p50_s",
                "kill_delay_p99_s",
            ):
                print(f"  {key:20} {r[key]}")
            for p in r["problems"]:
                print(f"  PROBLEM {p}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if results:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if any(r["lost"] or r["duplicated"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
