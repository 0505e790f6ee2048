"""Test support: real service processes (Redis, moto's S3 server, API, Celery workers) and helpers."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from stems.jobstore import JobStore
from stems.redisboot import free_port
from stems.stack import Proc, api_proc, wait_http, worker_proc
from workers.celery_app import purge_rabbitmq

ROOT = Path(__file__).resolve().parents[1]


def shared_models() -> Path | None:
    """The real pretrained weights of ../shared/models (see its README), or None where there are none."""
    for candidate in (
        os.environ.get("STEMS_SHARED_MODELS"),
        ROOT / "shared" / "models",
        ROOT.parent / "shared" / "models",
    ):
        if candidate and (Path(candidate) / "gtcrn" / "gtcrn.onnx").exists():
            return Path(candidate)
    return None


def start_moto(log: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], {**os.environ}, log
    ).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/", proc=proc)
    return proc, url


class ServiceStack:
    """An API and workers on one Redis and one storage backend, each a real process.

    `broker`: a RabbitMQ URL for the Celery broker (the job store stays in Redis); None uses the Redis.
    """

    def __init__(
        self,
        tmp: Path,
        redis_url: str,
        s3_url: str | None,
        model_dir: Path | None = None,
        broker: str | None = None,
        **extra: str,
    ) -> None:
        self.tmp = tmp
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.broker = broker
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "REDIS_URL": redis_url,
            "STEMS_KEY_PREFIX": self.prefix,
            "STEMS_DATA_DIR": str(tmp / "data"),
            "STEMS_MODEL_DIR": str(model_dir or tmp / "models"),
            "STEMS_LINK_ALLOW_HOSTS": '["127.0.0.1", "localhost"]',
        }
        if s3_url:
            bucket = f"b{uuid.uuid4().hex[:10]}"
            self.env.update(
                {
                    "STEMS_STORAGE": "s3",
                    "S3_ENDPOINT_URL": s3_url,
                    "S3_BUCKET": bucket,
                    "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test",
                    "S3_PREFIX": "svc",
                }
            )
            import boto3

            boto3.client(
                "s3",
                endpoint_url=s3_url,
                region_name="us-east-1",
                aws_access_key_id="test",
                aws_secret_access_key="test",
            ).create_bucket(Bucket=bucket)
        if broker:
            self.env["STEMS_BROKER_URL"] = broker
        self.env.update(extra)
        self.procs: list[Proc] = []
        self.store = JobStore.from_url(redis_url, self.prefix)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def start_api(self) -> Proc:
        p = api_proc(self.env, self.port, self.tmp / "api.log").start()
        self.procs.append(p)
        wait_http(self.base + "/healthz", proc=p)
        return p

    def start_worker(self, queues: str, name: str, wait: bool = True, wrap=None, **env: str) -> Proc:
        """`wrap`: a function of the worker's argv giving the command to run (e.g. inside a network namespace)."""
        p = worker_proc({**self.env, **env}, queues, name, self.tmp / f"worker-{name}.log")
        if wrap is not None:
            p.argv = wrap(p.argv)
        p.start()
        self.procs.append(p)
        if wait:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(w.hostname.startswith(name + "@") for w in self.store.live_workers()):
                    break
                if p.popen.poll() is not None:
                    raise RuntimeError(f"worker {name} exited; see {p.log}")
                time.sleep(0.2)
            else:
                raise RuntimeError(f"worker {name} did not report; see {p.log}")
        return p

    def settings(self):
        """The Settings the stack's processes see (their environment, read the same way)."""
        from stems.settings import Settings

        saved = os.environ.copy()
        os.environ.update(self.env)
        try:
            return Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def objects(self, prefix: str = "users/") -> list[str]:
        from stems.storage import make_storage

        return make_storage(self.settings()).list(prefix)

    def client(self, user: str = "alice") -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"x-api-key": self.store.create_key(user)}, timeout=60)

    def keyed_client(self, user: str = "alice"):
        """A client of a new key, and the key as issued (its id and webhook secret)."""
        issued = self.store.issue_key(user)
        return httpx.Client(base_url=self.base, headers={"x-api-key": issued.api_key}, timeout=60), issued

    def redis(self):
        """A plain client of the stack's Redis, for tests of what is stored as stored (no plaintext keys, records
        written by an older release); everything else goes through `store`'s methods."""
        import redis

        return redis.Redis.from_url(self.env["REDIS_URL"])

    def forget_webhook_secret(self, issued) -> None:
        """Make `issued` a key as keys were made before each had its own webhook secret (no such field)."""
        from stems import rediskeys as K
        from stems.jobstore import hash_key

        self.redis().hdel(f"{self.prefix}:{K.APIKEY}:{hash_key(issued.api_key)}", "webhook_secret")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        if self.broker:
            purge_rabbitmq(self.broker, self.prefix)


def tone_mix(seconds: float = 4.0, sr: int = 44100, channels: int = 2, seed: int = 0) -> np.ndarray:
    """A small stereo test signal: a centred melody, hard-panned chords, noise bursts; (channels, n)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    centre = 0.3 * np.sin(2 * np.pi * 330 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    left = 0.2 * np.sin(2 * np.pi * 440 * t + 1.0)
    right = 0.2 * np.sin(2 * np.pi * 523 * t) + 0.05 * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 2 * t) > 0.5)
    mix = np.stack([centre + left, centre + right]).astype(np.float32)
    return mix[:1] if channels == 1 else mix


def write_audio(path: Path, audio: np.ndarray, sr: int, subtype: str = "PCM_24", format: str | None = None) -> Path:
    sf.write(str(path), audio.T, sr, subtype=subtype, format=format)
    return path


def upload(client: httpx.Client, path: Path, wait: bool = True, timeout: float = 60.0) -> dict:
    with open(path, "rb") as f:
        r = client.post("/from-file", files={"file": (path.name, f, "application/octet-stream")})
    assert r.status_code == 200, r.text
    audio_id = r.json()["audio_id"]
    return wait_for(client, f"/status/audio/{audio_id}", {"complete", "failed"}, timeout) if wait else r.json()


def wait_for(client: httpx.Client, path: str, states: set[str], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(path)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in states:
            return body
        time.sleep(0.2)
    raise AssertionError(f"{path} still {body['status']} after {timeout} s: {body}")


TERMINAL = {"complete", "failed", "cancelled"}
SONG_S = 8.0  # the fault tests' song: a few seconds of small htdemucs on a CPU
LONG_S = 5 * SONG_S  # for drills that must catch one stage of a job mid-way, which the 8 s song's can outrun


def wait_stage(stack: ServiceStack, job_id: str, stage_prefix: str = "", timeout: float = 120, attempts: int = 1):
    """The job record once attempt `attempts` (or a later one) runs in a stage starting with `stage_prefix`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stack.store.get_job(job_id)
        if job.status.value in TERMINAL:
            raise AssertionError(f"job ended before the fault: {job}")
        if job.attempts >= attempts and job.stage.startswith(stage_prefix) and job.worker_pid:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job never reached {stage_prefix!r}: {stack.store.get_job(job_id)}")


def start_job(c: httpx.Client, song: Path, preset: str = "4_tracks", audio_id: str | None = None, **extra) -> str:
    audio_id = audio_id or upload(c, song)["audio_id"]
    r = c.post("/create-stems", json={"preset": preset, "audio_id": audio_id, **extra})
    assert r.status_code == 200, r.text
    return r.json()["creation_id"]


def expected_objects(stack: ServiceStack, job_id: str) -> list[str]:
    """The object keys a job's stem records point at (exactly what storage should hold for it)."""
    job = stack.store.get_job(job_id)
    return sorted(
        k
        for s in stack.store.get_stems(job.stem_ids + job.upscaled_ids)
        for k in (s.wav_key, s.hq_key, s.peaks_key)
        if k
    )


def job_objects(stack: ServiceStack, job_id: str) -> list[str]:
    return stack.objects(f"users/{stack.store.get_job(job_id).user_id}/jobs/{job_id}/")


def asset_record(stack: ServiceStack, user: str, seconds: float, sr: int = 44100) -> str:
    """An imported audio's record as the import leaves it, with no object behind it: for tests whose jobs on it
    never run (the estimate and batch tests queue them on a stack without workers)."""
    from stems.models import AssetStatus, AudioAsset

    a = AudioAsset(
        user_id=user,
        origin="upload",
        status=AssetStatus.complete,
        object_key=f"users/{user}/x",
        info={"duration": seconds, "sample_rate": sr, "channels": 2},
    )
    stack.store.put_asset(a)
    return a.id


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (a Celery worker's pool processes, say)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out
