"""Nodes lost at the points where a finished job's stems are at stake, on both brokers (#18, item 8).

The other drills kill a worker while it separates, before it has written anything. These land
after a write: a delivery node SIGKILLed once some of its stems are in storage and others are still
uploading; the node that then wins the job SIGKILLed after the job completed, while it removes
what the dead node left (its delete calls held in flight, so they never reach storage); and a
worker cut off from Redis and storage for longer than its lease, which comes back while another
runs its job. Each checks what the user and the bucket end with: one complete job, every stem
downloadable, exactly its final objects, usage counted once, nothing owed or leased.
"""
from __future__ import annotations

import os
import signal
import time
from urllib.parse import urlsplit

from stems.storage import keys
from tests.faulty_s3 import FaultyS3
from tests.service.test_two_stage import (REQUEST, SLOW, _files, _imported, _settled, _stack, _wait_job,
                                          _waiting_for_delivery)
from tests.support import TERMINAL, expected_objects, job_objects, start_job, wait_for
from tests.tcpproxy import TcpProxy


def _stored(s, job) -> list[str]:
    return s.objects(keys.attempt_prefix(job.user_id, job.id, job.attempt_id)) if job.attempt_id else []


def _nothing_owed(s, job_id: str, user_id: str, timeout: float = 60) -> None:
    """No lease, no owed cleanup or message, no load entry: nothing about the job is left to do."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {"running": s.store.running(), "cleanup": s.store.cleanup_owed(job_id, user_id),
                "owed": len(s.store.owed(time.time() + 3600)),
                "load": s.store.load("cpu") + s.store.load("gpu-demucs")}
        if not any(left.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"left over: {left}")


def _one_complete_job(s, c, job_id: str, status: dict) -> None:
    assert status["status"] == "complete", status
    job = s.store.get_job(job_id)
    objects = _settled(s, job_id, SLOW)
    assert objects == expected_objects(s, job_id) and len(objects) == 24, objects  # no floats, no dead run's files
    assert all(k.startswith(keys.attempt_prefix(job.user_id, job_id, job.attempt_id)) for k in objects)
    assert len(_files(c, status)) == 24  # every stem, restored copy and peaks downloads
    assert c.get("/usage").json()["jobs"] == 1


def test_killed_while_uploading_stems_then_the_winner_killed_while_it_cleans_up(tmp_path, redis_url, s3_url,
                                                                                demucs_models, long_song, broker):
    proxy = FaultyS3(s3_url)
    s = _stack(tmp_path, redis_url, proxy.url, demucs_models, broker)
    try:
        s.start_worker("gpu-demucs", "gpu")
        with s.client() as c:
            job_id = start_job(c, long_song, audio_id=_imported(s, c, long_song), **REQUEST)
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


def test_a_worker_cut_off_past_its_lease_comes_back_and_leaves_nothing(tmp_path, redis_url, s3_url, demucs_models,
                                                                       long_song, broker):
    """Its own network path to Redis and storage (proxies a test can cut), not the API's or the other node's."""
    to_redis = TcpProxy(urlsplit(redis_url).port)
    to_s3 = TcpProxy(urlsplit(s3_url).port)
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker)
    queues = "cpu,gpu-demucs"
    try:
        with s.client() as c:
            audio_id = _imported(s, c, long_song)
            cut = s.start_worker(queues, "cut", REDIS_URL=redis_url.replace(f":{urlsplit(redis_url).port}/",
                                                                           f":{to_redis.port}/"),
                                 S3_ENDPOINT_URL=to_s3.url)
            job_id = start_job(c, long_song, audio_id=audio_id, **REQUEST)
            lost = _wait_job(s, job_id, lambda j: j.stage.startswith("separating") and j.worker_pid
                             and j.worker.startswith("cut@"), "its separation on the node to cut off")
            to_redis.stop()
            to_s3.stop()  # the node is partitioned: it goes on separating, but reaches nothing
            s.start_worker(queues, "b")
            _wait_job(s, job_id, lambda j: j.attempt_id not in (None, lost.attempt_id), "the job's next attempt")
            to_redis.start()
            to_s3.start()  # the partition heals while the other node runs the job

            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, SLOW)
            deadline = time.monotonic() + SLOW
            while f"attempt {lost.attempt_id} lost the job" not in cut.log.read_text():
                assert time.monotonic() < deadline, "the node that came back never stood down"
                assert cut.popen.poll() is None, "the node that came back exited"
                time.sleep(0.2)
            _one_complete_job(s, c, job_id, status)
            job = s.store.get_job(job_id)
            assert job.separated.attempt_id != lost.attempt_id and job.attempts == 2, job
            assert _stored(s, lost) == []  # whatever it wrote on its return, it removed
        _nothing_owed(s, job_id, job.user_id)
    finally:
        s.stop()
        to_redis.stop()
        to_s3.stop()
