"""Nodes lost at the points where a finished job's stems are at stake, on both brokers (#18, item 8).

The other drills kill a worker while it separates, before it has written anything. These land
after a write: a delivery node SIGKILLed once some of its stems are in storage and others are still
uploading; the node that then wins the job SIGKILLed after the job completed, while it removes
what the dead node left (its delete calls held in flight, so they never reach storage); a worker
in its own network namespace cut off from Redis, storage and the broker for longer than its lease,
which comes back while another runs its job; and RabbitMQ itself SIGKILLed with jobs queued in it, then started again. Each checks what the user and the bucket end with: one complete job, every stem
downloadable, exactly its final objects, usage counted once, nothing owed or leased.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from stems.storage import keys
from tests.faulty_s3 import FaultyS3
from tests.partition import make_link
from tests.rabbitmq_node import RabbitNode
from tests.service.test_two_stage import (
    REQUEST,
    SLOW,
    _files,
    _imported,
    _settled,
    _stack,
    _wait_job,
    _waiting_for_delivery,
)
from tests.support import TERMINAL, ServiceStack, expected_objects, start_job, tone_mix, upload, wait_for, write_audio
from workers.celery_app import make_celery


def _stored(s, job) -> list[str]:
    return s.objects(keys.attempt_prefix(job.user_id, job.id, job.attempt_id)) if job.attempt_id else []


def _nothing_owed(s, job_id: str, user_id: str, timeout: float = 60) -> None:
    """No lease, no owed cleanup or message, no load entry: nothing about the job is left to do."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {
            "running": s.store.running(),
            "cleanup": s.store.cleanup_owed(job_id, user_id),
            "owed": len(s.store.owed(time.time() + 3600)),
            "load": s.store.load("cpu") + s.store.load("gpu-demucs"),
        }
        if not any(left.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"left over: {left}")


def _messages(s, queue: str) -> int:
    with make_celery(s.settings()).connection_for_read() as conn:
        return conn.default_channel.queue_declare(f"{s.settings().key_prefix}.{queue}", passive=True).message_count


def _one_complete_job(s, c, job_id: str, status: dict) -> None:
    assert status["status"] == "complete", status
    job = s.store.get_job(job_id)
    objects = _settled(s, job_id, SLOW)
    assert objects == expected_objects(s, job_id) and len(objects) == 24, objects  # no floats, no dead run's files
    assert all(k.startswith(keys.attempt_prefix(job.user_id, job_id, job.attempt_id)) for k in objects)
    assert len(_files(c, status)) == 24  # every stem, restored copy and peaks downloads
    assert c.get("/usage").json()["jobs"] == 1


def test_killed_while_uploading_stems_then_the_winner_killed_while_it_cleans_up(
    tmp_path, redis_url, s3_url, demucs_models, fault_song, broker
):
    proxy = FaultyS3(s3_url)
    s = _stack(tmp_path, redis_url, proxy.url, demucs_models, broker)
    try:
        s.start_worker("gpu-demucs", "gpu")
        with s.client() as c:
            job_id = start_job(c, fault_song, audio_id=_imported(s, c, fault_song), **REQUEST)
            _wait_job(s, job_id, _waiting_for_delivery, "its hand-over to delivery")
            proxy.slow(f"/jobs/{job_id}/", 0.5)  # each stem's upload takes half a second: a window to land in

            c1 = s.start_worker("cpu", "c1")
            dying = _wait_job(s, job_id, lambda j: j.deliveries >= 1 and bool(_stored(s, j)), "its first stem stored")
            os.killpg(c1.pid, signal.SIGKILL)  # the node is gone with some stems stored and the rest unwritten
            c1.popen.wait(10)
            left_by_c1 = _stored(s, dying)
            assert 0 < len(left_by_c1) < 24 and s.store.get_job(job_id).status.value == "processing", left_by_c1
            proxy.slow("", 0)

            # the next run wins; the removal of what c1 left is held in flight, and the node dies there
            proxy.hold(f"/{dying.attempt_id}/", "DELETE")
            c2 = s.start_worker("cpu", "c2")
            deadline = time.monotonic() + SLOW
            while not (proxy.held and s.store.get_job(job_id).status.value == "complete"):
                assert time.monotonic() < deadline, f"the winner never cleaned up: {s.store.get_job(job_id)}"
                assert s.store.get_job(job_id).status.value not in {"failed", "cancelled"}
                time.sleep(0.05)
            os.killpg(c2.pid, signal.SIGKILL)
            c2.popen.wait(10)
            proxy.release()  # the held deletes are dropped: storage never saw them
            assert _stored(s, dying), "the cleanup was not interrupted: the drill landed too late"
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 30)
            assert status["status"] == "complete"  # a complete job stays complete with its cleanup unfinished
            assert len(_files(c, status)) == 24  # and downloads whole meanwhile

            s.start_worker("cpu", "c3")  # its reaper finds the cleanup still owed and finishes it
            _one_complete_job(s, c, job_id, status)
            job = s.store.get_job(job_id)
            assert job.attempts == 1 and job.deliveries == 2 and job.worker.startswith("c2@"), job
            assert _stored(s, dying) == []
        _nothing_owed(s, job_id, job.user_id)
    finally:
        s.stop()
        proxy.close()


def test_a_worker_cut_off_past_its_lease_comes_back_and_leaves_nothing(
    tmp_path, redis_url, s3_url, demucs_models, fault_song, broker
):
    """The worker runs in its own network namespace (where the machine allows one), reaching Redis, storage and
    the broker over a veth link the test takes down: its packets are dropped, not refused. The API and the other
    node keep their paths."""
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker)
    link = make_link(
        {"REDIS_URL": redis_url, "S3_ENDPOINT_URL": s3_url, **({"STEMS_BROKER_URL": broker} if broker else {})}
    )
    queues = "cpu,gpu-demucs"
    try:
        with s.client() as c:
            audio_id = _imported(s, c, fault_song)
            cut = s.start_worker(queues, "cut", wrap=link.argv, **link.env)
            job_id = start_job(c, fault_song, audio_id=audio_id, **REQUEST)
            lost = _wait_job(
                s,
                job_id,
                lambda j: j.stage.startswith("separating") and j.worker_pid and j.worker.startswith("cut@"),
                "its separation on the node to cut off",
            )
            link.cut()  # the node is partitioned: it goes on separating, but reaches nothing
            s.start_worker(queues, "b")
            _wait_job(s, job_id, lambda j: j.attempt_id not in (None, lost.attempt_id), "the job's next attempt")
            link.heal()  # the partition heals while the other node runs the job

            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, SLOW)
            deadline = time.monotonic() + SLOW
            while f"attempt {lost.attempt_id} lost the job" not in cut.log.read_text():
                assert time.monotonic() < deadline, f"the node that came back never stood down ({link.kind})"
                assert cut.popen.poll() is None, "the node that came back exited"
                time.sleep(0.2)
            _one_complete_job(s, c, job_id, status)
            job = s.store.get_job(job_id)
            assert job.separated.attempt_id != lost.attempt_id and job.attempts == 2, job
            assert _stored(s, lost) == []  # whatever it wrote on its return, it removed
        _nothing_owed(s, job_id, job.user_id)
        print(f"cut off through a {link.kind}")
    finally:
        s.stop()
        link.close()


def test_rabbitmq_killed_with_jobs_queued_loses_none(tmp_path, redis_url, s3_url):
    """A private node (the machine's RabbitMQ is left alone), SIGKILLed with three jobs' messages in its queue."""
    if RabbitNode.unavailable():
        pytest.skip(RabbitNode.unavailable())
    rabbit = RabbitNode()
    try:
        rabbit.start()
    except RuntimeError as exc:  # this machine cannot run a second node (not the drill's failure)
        rabbit.stop()
        pytest.skip(f"a private RabbitMQ node could not start: {exc}")
    s = ServiceStack(
        tmp_path,
        redis_url,
        s3_url,
        broker=rabbit.url,
        STEMS_RESEND_QUEUED_S="30",
        STEMS_REAPER_INTERVAL_S="0.5",
        STEMS_ENQUEUE_GRACE_S="2",
    )
    try:
        s.start_api()
        importer = s.start_worker("cpu", "importer")
        with s.client() as c:
            aid = upload(c, write_audio(tmp_path / "a.wav", tone_mix(3.0, 44100), 44100))["audio_id"]
            importer.stop()  # nobody consumes: the jobs' messages wait in the broker
            jobs = []
            for _ in range(3):
                r = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": aid})
                assert r.status_code == 200, r.text
                jobs.append(r.json()["creation_id"])
            deadline = time.monotonic() + 30
            while _messages(s, "cpu") < 3:  # the broker holds the three messages
                assert time.monotonic() < deadline, "the broker never held the jobs' messages"
                time.sleep(0.1)
            rabbit.kill()
            rabbit.start()  # the same node and data again
            deadline = time.monotonic() + 60
            while _messages(s, "cpu") != 3:  # quorum queues: what the broker confirmed was on disk (a restarted
                # queue may count 0 for a moment, until its log is read back)
                assert time.monotonic() < deadline, "the restarted broker lost the messages"
                time.sleep(0.2)
            s.start_worker("cpu", "after")
            for job_id in jobs:
                status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, SLOW)
                assert status["status"] == "complete" and status["attempts"] == 1, status
            assert c.get("/usage").json()["jobs"] == 3
            assert s.store.running() == 0 and s.store.load("cpu") == 0
    finally:
        s.stop()
        rabbit.stop()
