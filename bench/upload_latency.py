"""Latency of status polls and /healthz while one large upload streams into the same API process.

`POST /from-file` must not block the event loop: its parsing, writing and hashing run in a worker
thread and its storage, Redis and broker calls in the thread pool (api/upload.py,
api/routes_audio.py). `measure` streams a multipart upload of `size` bytes while one thread per
polled path sends a request after another, and returns each path's latencies during the upload;
`python -m bench.upload_latency` starts a private Redis and one API process (local storage, or an
S3 endpoint with --s3-url) and prints the figures. tests/service/test_upload_nonblocking.py runs
`measure` on the test stack.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BLOCK = os.urandom(1 << 20)  # one random megabyte, sent again and again (no client CPU spent making data)
BOUNDARY = "stemsbenchboundary7d1f"


def multipart(size: int):
    """A multipart/form-data body holding one `file` part of `size` bytes, as an iterator of blocks."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    left = size
    while left > 0:
        yield BLOCK[: min(left, len(BLOCK))]
        left -= len(BLOCK)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with fewer than 100 values the p99 is the maximum, so one stalled poll always shows."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p99_ms": round(percentile(values, 0.99) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


def measure(base: str, key: str, size: int, paths: list[str], pause_s: float = 0.02) -> dict:
    """Upload `size` bytes to /from-file while polling each of `paths`; latencies of the polls made meanwhile."""
    latencies: dict[str, list[float]] = {p: [] for p in paths}
    errors: list[str] = []
    uploading = threading.Event()
    uploading.set()

    def poll(path: str) -> None:
        with httpx.Client(base_url=base, headers={"x-api-key": key}, timeout=120) as c:
            while uploading.is_set():  # every poll sent during the upload counts, also one answered after it
                t0 = time.perf_counter()
                r = c.get(path)
                latencies[path].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{path}: {r.status_code} {r.text[:200]}")
                time.sleep(pause_s)

    pollers = [threading.Thread(target=poll, args=(p,), daemon=True) for p in paths]
    for t in pollers:
        t.start()
    t0 = time.perf_counter()
    try:
        with httpx.Client(base_url=base, headers={"x-api-key": key}, timeout=600) as c:
            r = c.post(
                "/from-file",
                content=multipart(size),
                headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
            )
    finally:
        uploading.clear()
        for t in pollers:
            t.join(130)
    upload_s = time.perf_counter() - t0
    return {
        "size": size,
        "upload_status": r.status_code,
        "upload": r.json() if r.status_code < 500 else r.text,
        "upload_s": round(upload_s, 1),
        "mb_per_s": round(size / 1e6 / upload_s, 1),
        "errors": errors,
        "polls": {p: summary(v) for p, v in latencies.items()},
        "latencies": latencies,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=500, help="upload size in MiB")
    ap.add_argument("--s3-url", help="an S3 endpoint (its bucket `stems-bench` is created); default: local storage")
    args = ap.parse_args()

    from stems.jobstore import JobStore
    from stems.redisboot import free_port, start_redis
    from stems.stack import api_proc, wait_http

    tmp = Path(tempfile.mkdtemp(prefix="stems-bench-upload-"))
    redis, url = start_redis(tmp / "redis")
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": url,
        "STEMS_DATA_DIR": str(tmp / "data"),
        "STEMS_MODEL_DIR": str(tmp / "models"),
        "STEMS_MAX_UPLOAD_BYTES": str((args.mb + 1) << 20),
        "STEMS_RATE_LIMIT_PER_MINUTE": "100000000",
    }
    if args.s3_url:
        import boto3

        boto3.client("s3", endpoint_url=args.s3_url, region_name="us-east-1").create_bucket(Bucket="stems-bench")
        env.update({"STEMS_STORAGE": "s3", "S3_ENDPOINT_URL": args.s3_url, "S3_BUCKET": "stems-bench"})
    api = api_proc(env, port, tmp / "api.log").start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", proc=api)
        key = JobStore.from_url(url).create_key("bench")
        with httpx.Client(base_url=base, headers={"x-api-key": key}) as c:  # an audio whose status is polled
            small = c.post("/from-file", files={"file": ("s.wav", b"RIFF" + bytes(1000))}).json()["audio_id"]
        figures = measure(base, key, args.mb << 20, ["/healthz", f"/status/audio/{small}"])
        figures.pop("latencies")
        print(json.dumps(figures, indent=1))
        return 0 if figures["upload_status"] == 200 and not figures["errors"] else 1
    finally:
        api.stop()
        redis.terminate()
        redis.wait(10)


if __name__ == "__main__":
    sys.exit(main())
