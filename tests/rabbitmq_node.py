"""A private RabbitMQ node a drill may SIGKILL and start again on the same data (the machine's stays untouched).

Debian's `rabbitmq-server` runs the node as the `rabbitmq` user, so its directory is a world-writable one
of its own under the system's temporary directory (pytest's are private to root), removed by `stop`;
the node's own pid (the Erlang VM) is read from its pid file, since the process started here is
only the wrapper that switched user.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from stems.redisboot import free_port


class RabbitNode:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="stems-rabbit-"))
        os.chmod(self.dir, 0o777)
        self.port, dist = free_port(), free_port()
        (self.dir / "plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text("")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": f"stems{self.port}@localhost",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(self.dir / "feature_flags"),
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def unavailable() -> str | None:
        return None if shutil.which("rabbitmq-server") else "no rabbitmq-server on this machine"

    def start(self, timeout: float = 90) -> None:
        for f in self.dir.iterdir():
            if f.is_file():
                os.chmod(f, 0o666)
        self.proc = subprocess.Popen(
            ["rabbitmq-server"],
            env=self.env,
            cwd=self.dir,
            start_new_session=True,
            stdout=open(self.dir / "out.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited; see {self.dir / 'out.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"rabbitmq-server did not listen within {timeout} s; see {self.dir / 'out.log'}")

    def kill(self) -> None:
        """SIGKILL the Erlang VM: the broker is gone without a chance to flush anything."""
        pid = int((self.dir / "pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def stop(self) -> None:
        try:
            self.kill()
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
