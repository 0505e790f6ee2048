"""The Celery app: Redis broker, late acks, prefetch of one, task events for Flower.

Queues come from the preset catalogue (`Catalogue.queues()`): `cpu` for DSP, speech
enhancement and import work, and one `gpu-<family>` queue per neural model family. A
worker serves the queues given with `-Q`, so a node only loads the models it has.
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from pipelines.presets import load_catalogue
from stems.settings import Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("stems", broker=s.redis_url, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json", accept_content=["json"],
        task_ignore_result=True,  # state lives in our job store, not in a result backend
        task_acks_late=True,  # a split killed mid-way is delivered again ...
        task_reject_on_worker_lost=True,  # ... also when its process dies (SIGKILL, OOM)
        worker_prefetch_multiplier=1,  # a long split never sits reserved behind another
        worker_send_task_events=True,  # Flower (task-sent events would cost every POST a publish)
        task_default_queue="cpu",
        task_queues=[Queue(q) for q in load_catalogue().queues()],
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # must exceed the longest allowed job, or Redis redelivers a running split
            "visibility_timeout": s.visibility_timeout_s,
            "global_keyprefix": f"{s.key_prefix}:celery:",
        },
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


app = make_celery()
