"""Separation and delivery as two stages, measured on this machine (`python -m bench.two_stage`).

Starts a private Redis, the API and real `stems worker` processes on local storage, with a
randomly initialised htdemucs of the released size (ONNX Runtime on a CPU, as a worker runs it),
and splits N copies of one clip with `4_tracks` and AAC, twice:

- **one stage**: one worker on the model queue and the CPU queue, STEMS_TWO_STAGE=never (the job
  as it ran before: separation, WAVs, AAC and peaks in one task);
- **two stages**: one worker on the model queue only (the "GPU" node) and two on the CPU queue,
  which encode and upload while the model worker separates the next job.

Figures: the model worker's busy time per job over the model's own run time (`Job.timings`:
`separate_s`, from the run's start, once it took the job, to the hand-over: source download,
decode, separation, float stems written and uploaded; over `model_s`, the engine's time in
models), median and worst, with the one-stage job's `run_s / model_s` beside it; and the throughput of the N jobs, two stages over one. On this
machine the "GPU" and the CPU workers share the same cores, so the throughput figure is what a
CPU-only host gains, not a GPU node's. Merges its figures into bench/results.json (kept
figures of other runs stay).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
TERMINAL = {"complete", "failed", "cancelled"}


def run_mode(mode: str, args, tmp: Path, models: Path, sample: Path) -> dict:
    from stems.jobstore import JobStore
    from stems.redisboot import free_port, start_redis
    from stems.stack import api_proc, upload_file, wait_http, wait_workers, worker_proc

    work = tmp / mode
    work.mkdir(parents=True)
    redis, url = start_redis(work / "redis")
    prefix = f"bench{mode.replace('-', '')}"
    env = {
        **os.environ,
        "REDIS_URL": url,
        "STEMS_KEY_PREFIX": prefix,
        "STEMS_STORAGE": "local",
        "STEMS_DATA_DIR": str(work / "data"),
        "STEMS_MODEL_DIR": str(models),
        "STEMS_CACHE_MAX_BYTES": "0",
        "STEMS_MAX_ACTIVE_JOBS": "1000",
        "STEMS_RATE_LIMIT_PER_MINUTE": "100000",
        "PYTHONPATH": str(ROOT),
    }
    port = free_port()
    procs = [api_proc(env, port, work / "api.log").start()]
    if mode == "one-stage":
        procs.append(
            worker_proc({**env, "STEMS_TWO_STAGE": "never"}, "cpu,gpu-demucs", "model", work / "w.log").start()
        )
    else:
        procs.append(worker_proc(env, "gpu-demucs", "model", work / "model.log").start())
        procs += [worker_proc(env, "cpu", f"cpu{i}", work / f"cpu{i}.log").start() for i in range(2)]
    store = JobStore.from_url(url, prefix)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", proc=procs[0])
        wait_workers(store, len(procs) - 1, 180)
        with httpx.Client(base_url=base, headers={"x-api-key": store.create_key("bench")}, timeout=60) as c:
            audio_id = upload_file(c, sample)["audio_id"]
            body = {"preset": "4_tracks", "audio_id": audio_id, "hq_streaming_format": "aac"}
            # a warm-up job: model loading is not what either figure is about
            warm = c.post("/create-stems", json=body).raise_for_status().json()["creation_id"]
            _wait(c, [warm], args.timeout)
            t0 = time.perf_counter()
            ids = [
                c.post("/create-stems", json=body).raise_for_status().json()["creation_id"] for _ in range(args.jobs)
            ]
            _wait(c, ids, args.timeout)
            wall = time.perf_counter() - t0
        jobs = [store.get_job(i) for i in ids]
        bad = [j.id for j in jobs if j.status.value != "complete"]
        if bad:
            raise SystemExit(f"{mode}: {len(bad)} job(s) did not complete: {bad}")
        return {
            "mode": mode,
            "jobs": args.jobs,
            "wall_s": round(wall, 2),
            "jobs_per_hour": round(args.jobs / wall * 3600, 1),
            "timings": [j.timings for j in jobs],
        }
    finally:
        for p in reversed(procs):
            p.stop()
        redis.terminate()
        redis.wait(10)


def _wait(c: httpx.Client, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        pending = {i for i in pending if c.get(f"/status/stem_split/{i}").json()["status"] not in TERMINAL}
        time.sleep(0.5)
    if pending:
        raise SystemExit(f"{len(pending)} job(s) still running after {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=4, help="jobs per mode (after one warm-up job)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the clip")
    ap.add_argument("--size", choices=("full", "small"), default="full", help="the random htdemucs's channels")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from pipelines.modelstore import ModelStore
    from stems.stack import make_sample
    from tools.random_models import install_random_demucs

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="stems-bench-two-stage-"))
    from pipelines.machine import bench_description  # the figures hold for this CPU, at this load

    machine = {**bench_description(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        store = ModelStore(tmp / "models")
        install_random_demucs(store, "htdemucs", size=args.size)
        sample = tmp / "clip.wav"
        make_sample(sample, seconds=args.seconds)
        one = run_mode("one-stage", args, tmp, store.root, sample)
        two = run_mode("two-stage", args, tmp, store.root, sample)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    busy = [t["separate_s"] / t["model_s"] for t in two["timings"]]
    before = [t["run_s"] / t["model_s"] for t in one["timings"]]
    command = f"python -m bench.two_stage --jobs {args.jobs} --seconds {args.seconds:g} --size {args.size}"
    clip = f"{args.jobs} jobs of a {args.seconds:g} s clip, 4_tracks + AAC, random htdemucs ({args.size} size)"
    figures = [
        {
            "figure": "two_stage_model_busy_over_forward",
            "value": round(statistics.median(busy), 4),
            "goal": "<= 1.05",
            "how": f"model-queue task time per job / time in the model, median of {clip}; worst "
            f"{max(busy):.3f}; one stage: {statistics.median(before):.3f}",
            "detail": {
                "per_job": [round(b, 4) for b in busy],
                "one_stage_per_job": [round(b, 4) for b in before],
                "timings": two["timings"],
            },
            "machine": machine,
            "command": command,
        },
        {
            "figure": "two_stage_throughput_over_one_stage",
            "value": round(two["jobs_per_hour"] / one["jobs_per_hour"], 3),
            "goal": "> 1 (report)",
            "how": f"jobs per hour, 1 model-queue worker + 2 CPU workers over 1 worker doing both, {clip}; the model "
            "worker and the CPU workers share this machine's cores",
            "detail": {
                "one_stage": {k: v for k, v in one.items() if k != "timings"},
                "two_stage": {k: v for k, v in two.items() if k != "timings"},
                "one_stage_timings": one["timings"],
            },
            "machine": machine,
            "command": command,
        },
    ]
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"figures": []}
    names = {f["figure"] for f in figures}
    doc["figures"] = [f for f in doc.get("figures", []) if f["figure"] not in names] + figures
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for f in figures:
        print(f"{f['figure']}: {f['value']} (goal {f['goal']}): {f['how']}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
