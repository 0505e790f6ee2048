"""The retention sweep runs inside the workers of the cpu queue: no scheduler to set up.

Each such worker's main process starts a thread that, every STEMS_RETENTION_SWEEP_S (jittered),
takes a Redis lock and runs one `stems.lifecycle.sweep`; whoever misses the lock waits for the
next turn, so one sweep runs at a time across the deployment however many workers there are.
"""

from __future__ import annotations

import logging
import random
import threading

from celery.signals import worker_ready, worker_shutdown

from stems.container import Container
from stems.lifecycle import run_locked
from stems.settings import get_settings

from .celery_app import our_queue

log = logging.getLogger(__name__)
_stop = threading.Event()


def _loop(interval_s: float) -> None:
    s = get_settings()
    parts = Container(s)
    store, storage = parts.store, parts.storage
    while not _stop.wait(interval_s * (0.75 + 0.5 * random.random())):
        try:
            report = run_locked(store, storage, s, lock_ttl_s=max(60.0, 10 * interval_s))
        except Exception as exc:  # Redis or storage away: the next turn tries again
            log.warning("retention sweep failed: %s", exc)
            continue
        if report is not None and (report.total or report.errors):
            log.info("retention sweep: %s", report)


@worker_ready.connect
def _start(sender=None, **_):
    s = get_settings()
    queues = {our_queue(q.name, s) for q in sender.app.amqp.queues.consume_from.values()} if sender else set()
    if "cpu" in queues and s.retention_sweep_s > 0:
        threading.Thread(target=_loop, args=(s.retention_sweep_s,), daemon=True, name="stems-retention").start()


@worker_shutdown.connect
def _stop_sweeping(**_):
    _stop.set()
