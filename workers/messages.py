"""The messages of our tasks, and sending the ones the outbox owes.

Work is owed a message in the outbox (`stems/runstore.py`) from the moment it is written;
whoever sends the message then settles the entry. Five kinds: `split` (a queued job), `master` (a mastering, `workers/mastering.py`),
`deliver` (a separated job waiting for its delivery stage, `workers/delivery.py`), `import`
(an asset being imported) and `webhook` (a job that ended with a callback URL).
`send` looks at the record first, so an entry whose work has started, ended or vanished is
settled without a message: sending twice is harmless (a delivery of work already started is
dropped), and the checks keep it rare.
"""

from __future__ import annotations

import logging
import time

from celery import Celery

from stems.jobstore import JobStore
from stems.masterings import Mastering
from stems.models import DELIVERY_QUEUE, AssetStatus, Job, JobStatus
from stems.settings import Settings

from .celery_app import broker_queue, broker_unavailable
from .jobstate import owed_kind, waiting
from .retry import RETRYABLE

log = logging.getLogger(__name__)

TASKS = {
    "split": "stems.split",
    "deliver": "stems.deliver",
    "import": "stems.import_audio",
    "webhook": "stems.webhook",
    "master": "stems.master_audio",
}
KINDS = {task: kind for kind, task in TASKS.items()}


def publish(app: Celery, s: Settings, kind: str, id_: str, queue: str, **options) -> None:
    """Send one task message; `BrokerUnavailable` (with the reason) if the broker is down or refuses it."""
    try:
        app.send_task(TASKS[kind], args=[id_], queue=broker_queue(queue, s), **options)
    except Exception as exc:  # whatever the broker's client raises (kombu, py-amqp, redis-py, sockets)
        raise broker_unavailable(exc, s, f"send {kind} {id_}") from None


def send_split(app: Celery, s: Settings, job: Job, kind: str = "split") -> None:
    """A split's message (to its model queue) or a separated job's delivery (to the CPU queue); limits follow the audio."""
    seconds = job.audio_seconds or 0.0
    queue = job.queue if kind == "split" else DELIVERY_QUEUE
    publish(
        app, s, kind, job.id, queue, soft_time_limit=s.soft_time_limit(seconds), time_limit=s.hard_time_limit(seconds)
    )


def send_master(app: Celery, s: Settings, m: Mastering) -> None:
    """A mastering's message, to the CPU queue, with limits that follow the audio as a split's do."""
    publish(
        app,
        s,
        "master",
        m.id,
        "cpu",
        soft_time_limit=s.soft_time_limit(m.audio_seconds),
        time_limit=s.hard_time_limit(m.audio_seconds),
    )


def needs_message(store: JobStore, kind: str, id_: str) -> bool:
    """Whether the work `kind:id` still waits for a message."""
    if kind in ("split", "deliver"):
        job = store.get_job(id_)
        return job is not None and owed_kind(job) == kind and waiting(job)
    if kind == "import":
        asset = store.get_asset(id_)
        return asset is not None and asset.status == AssetStatus.processing
    if kind == "master":
        m = store.masterings.get(id_)
        return m is not None and not m.status.terminal
    if kind == "webhook":
        job = store.get_job(id_)
        return job is not None and bool(job.callback_url) and job.status in (JobStatus.complete, JobStatus.failed)
    return False


def send(app: Celery, s: Settings, store: JobStore, kind: str, id_: str) -> bool:
    """Send the message for `kind:id` if its work still waits for one; False if it did not."""
    if not needs_message(store, kind, id_):
        return False
    if kind in ("split", "deliver"):
        send_split(app, s, store.get_job(id_), kind)
    elif kind == "master":
        send_master(app, s, store.masterings.get(id_))
    else:
        publish(app, s, kind, id_, "cpu")
    return True


def send_owed(app: Celery, s: Settings, store: JobStore, kind: str, id_: str, score: int | None = None) -> None:
    """Send an owed message and settle its entry (only the entry read, if `score` is given).

    `send` returns once the broker has the message (on RabbitMQ, once it confirmed it). A job's entry
    then falls due again after STEMS_RESEND_QUEUED_S, and is cleared when the job starts: a job whose
    message the broker lost is sent again (reconciliation), a duplicate is dropped by its claim."""
    sent = send(app, s, store, kind, id_)
    again = time.time() + s.resend_queued_s if sent and kind in ("split", "deliver") else None
    store.settle(kind, id_, score, again)


def flush(app: Celery, s: Settings, store: JobStore, kind: str, id_: str) -> None:
    """Send `kind:id` now if the outbox owes it; if the broker refuses, the reaper sends it when it falls due."""
    # settle only the entry read here: a worker that already received the message owes it anew, and
    # that entry must outlive this settle, or the worker's death would leave the job without a message
    score = store.owed_score(kind, id_)
    if score is None:
        return
    try:
        send_owed(app, s, store, kind, id_, score)
    except Exception as exc:  # the entry stays: the reaper retries it
        log.warning("could not send %s %s now (%s); the reaper will", kind, id_, exc)


def run_then_flush(run, job_id: str, ctx, app: Celery, hostname: str | None) -> None:
    """Run a split or delivery task's work, then send what the run owes (its delivery stage, or the webhook of
    its final status) now rather than at the reaper's next pass."""
    try:
        run(job_id, ctx, hostname)
    finally:
        for kind in ("deliver", "webhook"):
            try:
                flush(app, ctx.settings, ctx.store, kind, job_id)
            except RETRYABLE:
                pass
