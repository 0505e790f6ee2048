"""Workers report what they serve: queues and installed models, refreshed every few seconds.

The API reads these reports to route a preset only to a queue whose live workers hold
its chain, and to show which presets are available.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from celery.signals import celeryd_init, worker_ready, worker_shutdown

from stems.container import Container
from stems.models import WorkerReport
from stems.settings import get_settings

from .celery_app import our_queue

INTERVAL_S = 5.0
TTL_S = 20
_stop = threading.Event()
_beat: threading.Thread | None = None


def report(hostname: str, queues: list[str]) -> WorkerReport:
    s = get_settings()
    models = sorted(m for m, reason in Container(s).models.installed().items() if reason is None)
    return WorkerReport(hostname=hostname, queues=queues, models=models, pid=os.getpid(), ts=time.time())


def _loop(hostname: str, queues: list[str]) -> None:
    s = get_settings()
    store = Container(s).store
    while not _stop.is_set():
        try:
            store.put_worker_report(report(hostname, queues))
        except Exception:  # Redis away: try again next beat; readers ignore reports older than TTL_S
            pass
        _stop.wait(INTERVAL_S)
    try:
        store.drop_worker_report(hostname)
    except Exception:
        pass


@celeryd_init.connect
def _sync_models(**_):
    """Fetch an S3-kept model store before the pool starts, so no job finds it half-synced."""
    from stems.modelsync import sync_models

    sync_models(get_settings())


@worker_ready.connect
def _start(sender=None, **_):
    s = get_settings()
    queues = sorted(our_queue(q.name, s) for q in sender.app.amqp.queues.consume_from.values()) if sender else []
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    global _beat
    _beat = threading.Thread(target=_loop, args=(hostname, queues), daemon=True, name="stems-heartbeat")
    _beat.start()


@worker_shutdown.connect
def _stop_beat(**_):
    _stop.set()
    if _beat is not None:
        # its last act drops this worker's report: waited for, or the process could exit first (a daemon thread)
        # and leave the report claiming the queue for TTL_S, so a pool scaled to zero would look served
        _beat.join(5)
