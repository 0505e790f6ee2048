"""The outbox against the broker: an entry is settled only for a message the broker holds, only if it
is still the entry that was sent, and a queued job whose message was lost is sent again."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest
from celery.signals import after_task_publish

from pipelines.jobspec import SplitSpec
from stems.jobstore import JobStore
from stems.models import Job
from stems.settings import Settings
from tests.support import ServiceStack, tone_mix, upload, wait_for, write_audio
from workers.celery_app import make_celery, purge_rabbitmq
from workers.messages import flush

SR = 44100


def _queued_job(settings: Settings) -> tuple[JobStore, Job]:
    """A queued job on the cpu queue, owed its message now (as the API writes it)."""
    store = JobStore.from_url(settings.redis_url, settings.key_prefix)
    job = Job(
        user_id="u",
        audio_id="a",
        source_kind="audio",
        source_id="a",
        spec=SplitSpec(preset="phantom_center"),
        queue="cpu",
    )
    store.create_job(job, [])
    store.owe("split", job.id, time.time())
    return store, job


def _score(store: JobStore, job: Job) -> float | None:
    """When the job's message falls due (None: nothing owed)."""
    return store.owed_score("split", job.id)


def test_flush_keeps_the_entry_a_worker_wrote_while_it_sent(redis_url):
    """A worker may receive the message before flush settles its entry, and owe it anew (it holds a message
    it has not started): that entry is what brings the job back if the worker dies, so flush must not erase it."""
    s = Settings(redis_url=redis_url, key_prefix=f"t{uuid.uuid4().hex[:8]}")
    store, job = _queued_job(s)

    def received(sender=None, body=None, **_):  # the message is in the broker: a worker takes it at once
        store.owe("split", job.id, time.time() + s.enqueue_grace_s)  # what workers.reaper._received writes

    after_task_publish.connect(received, weak=False)
    try:
        flush(make_celery(s), s, store, "split", job.id)
    finally:
        after_task_publish.disconnect(received)
    assert store.owes("split", job.id)  # the old flush settled without comparing: the worker's entry was gone


@pytest.fixture
def refusing_cpu_queue(rabbitmq_url):
    """A RabbitMQ whose cpu queue of a fresh prefix is full and refuses further messages (a policy of
    max-length 0 and reject-publish; a quorum queue takes one message before it applies the limit)."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on this machine: cannot make the broker refuse a message")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            "rabbitmqctl",
            "set_policy",
            "--apply-to",
            "queues",
            prefix,
            f"^{prefix}\\.cpu$",
            '{"max-length": 0, "overflow": "reject-publish"}',
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    app = make_celery(Settings(key_prefix=prefix, broker_url=rabbitmq_url))
    app.send_task("stems.webhook", args=["filler"], queue=f"{prefix}.cpu")  # fills the queue
    yield prefix
    subprocess.run(["rabbitmqctl", "clear_policy", prefix], capture_output=True, timeout=60)
    purge_rabbitmq(rabbitmq_url, prefix)


def test_a_message_rabbitmq_refuses_is_still_owed(redis_url, rabbitmq_url, refusing_cpu_queue):
    """Sent is not enqueued: with publisher confirms the refusal reaches the sender, and the entry stays
    for the reaper; without them, send_task returned, the entry was settled and the job lost its message."""
    s = Settings(redis_url=redis_url, key_prefix=refusing_cpu_queue, broker_url=rabbitmq_url)
    store, job = _queued_job(s)
    owed = _score(store, job)
    app = make_celery(s)
    flush(app, s, store, "split", job.id)
    assert _score(store, job) == owed  # still due now, not settled nor moved ahead as if sent
    with app.connection_for_read() as conn:  # and the broker really holds only the filler
        assert conn.default_channel.queue_declare(f"{refusing_cpu_queue}.cpu", passive=True).message_count == 1


def test_a_queued_job_whose_message_was_lost_is_sent_again_and_completes(tmp_path, redis_url, s3_url, broker):
    s = ServiceStack(tmp_path, redis_url, s3_url, broker=broker, STEMS_RESEND_QUEUED_S="5")
    try:
        s.start_api()
        worker = s.start_worker("cpu", "cpu")
        path = write_audio(tmp_path / "a.wav", tone_mix(2.0, SR), SR)
        with s.client() as c:
            aid = upload(c, path)["audio_id"]
            worker.stop()  # nobody consumes: the message waits in the broker ...
            r = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": aid})
            assert r.status_code == 200, r.text
            job_id = r.json()["creation_id"]
            make_celery(s.settings()).control.purge()  # ... and is lost (a broker restart without persistence)
            s.start_worker("cpu", "cpu2")
            status = wait_for(c, f"/status/stem_split/{job_id}", {"complete", "failed"}, 90)
            assert status["status"] == "complete" and status["attempts"] == 1, status
    finally:
        s.stop()
