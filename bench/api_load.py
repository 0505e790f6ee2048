"""Latency of `POST /create-stems` under concurrent load on loopback (`make bench-api`).

Starts a private Redis and the API (no worker: jobs just queue), imports one short file
through the real import task run in-process, then has C concurrent clients send
create-stems requests for a bounded number of requests. Prints median and p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx


async def _client(base: str, key: str, body: dict, n: int, latencies: list[float], errors: list[int]) -> None:
    async with httpx.AsyncClient(base_url=base, headers={"x-api-key": key}, timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = await c.post("/create-stems", json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors.append(r.status_code)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--api-workers", type=int, default=1)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    args = ap.parse_args()

    from stems.jobstore import JobStore
    from stems.redisboot import free_port, start_redis
    from stems.stack import api_proc, make_sample, wait_http

    tmp = Path(tempfile.mkdtemp(prefix="stems-bench-api-"))
    redis, url = start_redis(tmp / "redis")
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": url,
        "STEMS_DATA_DIR": str(tmp / "data"),
        "STEMS_MODEL_DIR": str(tmp / "models"),
        "STEMS_MAX_ACTIVE_JOBS": "100000000",
        "STEMS_RATE_LIMIT_PER_MINUTE": "100000000",
    }
    api = api_proc(env, port, tmp / "api.log")
    api.argv += ["--workers", str(args.api_workers)]
    api.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", proc=api)
        os.environ.update({k: v for k, v in env.items() if k.startswith(("REDIS_URL", "STEMS_"))})
        store = JobStore.from_url(url)
        key = store.create_key("bench")
        sample = tmp / "sample.wav"
        make_sample(sample, seconds=5)
        with httpx.Client(base_url=base, headers={"x-api-key": key}) as c, open(sample, "rb") as f:
            audio_id = c.post("/from-file", files={"file": ("s.wav", f)}).json()["audio_id"]
        from workers.context import context
        from workers.importer import import_audio

        import_audio(audio_id, context())  # the import task's code, run here: no worker in this bench
        body = {"preset": "phantom_center", "audio_id": audio_id, "selection": {"start": 0.5, "end": 4.0}}
        err: list[int] = []
        asyncio.run(_client(base, key, body, args.warmup, [], err))
        results = []
        for clients in args.clients:
            lat: list[float] = []
            per = args.requests // clients
            t0 = time.perf_counter()

            async def load(per: int = per, lat: list[float] = lat, clients: int = clients) -> None:
                await asyncio.wait_for(
                    asyncio.gather(*(_client(base, key, body, per, lat, err) for _ in range(clients))), 600
                )

            asyncio.run(load())
            wall = time.perf_counter() - t0
            lat.sort()
            results.append(
                {
                    "clients": clients,
                    "requests": len(lat),
                    "errors": len(err),
                    "p50_ms": round(statistics.median(lat) * 1000, 2),
                    "p99_ms": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 2),
                    "throughput_rps": round(len(lat) / wall, 1),
                }
            )
        print("| concurrent clients | requests | p50 ms | p99 ms | requests/s | errors |\n|---|---|---|---|---|---|")
        for r in results:
            print(
                f"| {r['clients']} | {r['requests']} | {r['p50_ms']} | {r['p99_ms']} | {r['throughput_rps']} | {r['errors']} |"
            )
        Path("bench").mkdir(exist_ok=True)
        Path("bench/api_load.json").write_text(
            json.dumps({"api_workers": args.api_workers, "cpus": os.cpu_count(), "runs": results}, indent=1) + "\n"
        )
        return 0 if not err else 1
    finally:
        api.stop()
        redis.terminate()


if __name__ == "__main__":
    sys.exit(main())
