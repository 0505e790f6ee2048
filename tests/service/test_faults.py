"""Faults survived: killed worker processes, failing storage, time limits, cancellation, on both brokers.

Each test injects the fault into real processes: SIGKILL to the worker process running
the job, an S3 proxy that answers 500, a cancel mid-split; each runs once with Redis as the
Celery broker and once with RabbitMQ (skipped, saying why, where none answers). A split of a
full-size (randomly initialised) htdemucs on a CPU takes long enough to be interrupted
mid-way. Losses of whole nodes, of Redis and of the API are in test_nodeloss.py.
"""

from __future__ import annotations

import os
import signal
import time

from tests.faulty_s3 import FaultyS3
from tests.support import (
    TERMINAL,
    ServiceStack,
    expected_objects,
    job_objects,
    start_job,
    tone_mix,
    upload,
    wait_for,
    wait_stage,
    write_audio,
)

SR = 44100


def _stack(tmp_path, redis_url, s3_url, models, broker, **env) -> ServiceStack:
    s = ServiceStack(tmp_path, redis_url, s3_url, model_dir=models, broker=broker, STEMS_CHUNK_SECONDS="5", **env)
    s.start_api()
    s.start_worker("cpu,gpu-demucs", "w")
    return s


def test_sigkill_mid_split_redelivers_and_completes_once(
    tmp_path, redis_url, s3_url, demucs_models, fault_song, broker
):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker)
    try:
        with s.client() as c:
            job_id = start_job(c, fault_song)
            job = wait_stage(s, job_id, "separating")
            os.kill(job.worker_pid, signal.SIGKILL)  # what the OOM killer does
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 300)
            assert status["status"] == "complete", status
            assert status["attempts"] == 2
            assert [x["name"] for x in status["stems"]] == ["vocals", "drums", "bass", "other"]
            assert len({x["stem_id"] for x in status["stems"]}) == 4
            assert job_objects(s, job_id) == expected_objects(s, job_id)  # no duplicates, no orphans
            assert len(job_objects(s, job_id)) == 12  # 4 WAV + 4 AAC + 4 peaks
    finally:
        s.stop()


def test_job_that_keeps_killing_its_worker_fails_after_bounded_attempts(
    tmp_path, redis_url, s3_url, demucs_models, fault_song, broker
):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker, STEMS_TASK_MAX_ATTEMPTS="2")
    try:
        with s.client() as c:
            job_id = start_job(c, fault_song)
            for attempt in (1, 2):
                job = wait_stage(s, job_id, "separating", attempts=attempt)
                os.kill(job.worker_pid, signal.SIGKILL)
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 120)
            assert status["status"] == "failed"
            assert status["error"]["code"] == "too_many_attempts" and status["attempts"] == 3
            assert job_objects(s, job_id) == []
            # the worker still serves: the next job completes
            ok = start_job(c, fault_song, "phantom_center")
            assert wait_for(c, f"/status/stem_split/{ok}", TERMINAL, 120)["status"] == "complete"
    finally:
        s.stop()


def test_storage_5xx_is_retried_with_backoff(tmp_path, redis_url, s3_url, broker):
    proxy = FaultyS3(s3_url)
    s = ServiceStack(tmp_path, redis_url, s3_url, broker=broker)
    s.env["S3_ENDPOINT_URL"] = proxy.url
    s.start_api()
    s.start_worker("cpu", "w")
    try:
        with s.client() as c:
            asset = upload(c, write_audio(tmp_path / "a.wav", tone_mix(3.0, SR), SR))
            proxy.fail(4)  # the next four storage calls (the worker's download first) answer 500
            job = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]}).json()
            status = wait_for(c, f"/status/stem_split/{job['creation_id']}", TERMINAL, 120)
            assert status["status"] == "complete", status
            assert proxy.failed == 4
            proxy.fail(2, "stall")  # read timeouts are retried too
            job = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]}).json()
            assert wait_for(c, f"/status/stem_split/{job['creation_id']}", TERMINAL, 120)["status"] == "complete"
    finally:
        s.stop()
        proxy.close()


def test_unfixable_errors_fail_at_once_with_the_reason(tmp_path, redis_url, s3_url, demucs_models, fault_song, broker):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker)
    try:
        with s.client() as c:
            asset = upload(c, write_audio(tmp_path / "a.wav", tone_mix(2.0, SR), SR))
            # the stored original is damaged after import: the worker finds it is not what was imported (its
            # size and sha256, #19) before decoding anything, and fails at once; this is not retried
            from stems.storage import make_storage

            make_storage(s.settings()).put_file(s.store.get_asset(asset["audio_id"]).object_key, tmp_path / "api.log")
            job = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]}).json()
            status = wait_for(c, f"/status/stem_split/{job['creation_id']}", TERMINAL, 60)
            assert status["status"] == "failed" and status["error"]["code"] == "original_changed", status
            assert status["attempts"] == 1
    finally:
        s.stop()


def test_time_limit_fails_the_job(tmp_path, redis_url, s3_url, demucs_models, long_song, broker):
    # each stage of a job has the limit; the long song's separation outlasts 2 s on any CPU
    s = _stack(
        tmp_path,
        redis_url,
        s3_url,
        demucs_models,
        broker,
        STEMS_TIME_LIMIT_BASE_S="2",
        STEMS_TIME_LIMIT_PER_AUDIO_S="0",
    )
    try:
        with s.client() as c:
            job_id = start_job(c, long_song)
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 120)
            assert status["status"] == "failed" and status["error"]["code"] == "time_limit", status
    finally:
        s.stop()


def test_cancel_running_and_queued_jobs(tmp_path, redis_url, s3_url, demucs_models, fault_song, broker):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker)
    try:
        with s.client() as c:
            audio_id = upload(c, fault_song)["audio_id"]  # imported before the worker is busy with a split
            running = start_job(c, fault_song, audio_id=audio_id)
            queued = start_job(c, fault_song, audio_id=audio_id)  # waits behind the first: one worker, prefetch of one
            wait_stage(s, running, "separating")
            r = c.post(f"/cancel/{running}")
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            r = c.delete(f"/stem_split/{queued}")
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            user = s.store.get_job(running).user_id
            deadline = time.monotonic() + 60
            while s.objects(f"users/{user}/jobs/{running}/") and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)  # give the worker time to (wrongly) write anything more
            assert s.objects(f"users/{user}/jobs/{running}/") == []
            assert s.store.get_job(running).status.value == "cancelled"
            assert s.store.get_job(queued).attempts == 0  # never ran
            ok = start_job(c, fault_song, "phantom_center", audio_id=audio_id)
            assert wait_for(c, f"/status/stem_split/{ok}", TERMINAL, 120)["status"] == "complete"
            assert s.store.get_job(queued).attempts == 0
    finally:
        s.stop()
