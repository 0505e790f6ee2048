"""Faults survived: killed workers, Redis restarts, failing storage, time limits, cancellation.

Each test injects the fault into real processes: SIGKILL to the worker process running
the job, a restart of the Redis server the test started, an S3 proxy that answers 500.
A split of a full-size (randomly initialised) htdemucs on a CPU takes long enough to be
interrupted mid-way.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from pipelines.modelstore import ModelStore
from stems.redisboot import free_port, start_redis
from tests.faulty_s3 import FaultyS3
from tests.support import ServiceStack, tone_mix, upload, wait_for, write_audio

SR = 44100
TERMINAL = {"complete", "failed", "cancelled"}


@pytest.fixture(scope="module")
def demucs_models(tmp_path_factory):
    from tools.random_models import install_random_demucs

    store = ModelStore(tmp_path_factory.mktemp("models"))
    install_random_demucs(store, "htdemucs", size="full")
    return store.root


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("song") / "song.wav", tone_mix(8.0, SR), SR)


def _stack(tmp_path, redis_url, s3_url, models, **env) -> ServiceStack:
    s = ServiceStack(tmp_path, redis_url, s3_url, model_dir=models, STEMS_CHUNK_SECONDS="5", **env)
    s.start_api()
    s.start_worker("cpu,gpu-demucs", "w")
    return s


def _wait_stage(stack, job_id: str, stage_prefix: str, timeout: float = 120, attempts: int = 1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stack.store.get_job(job_id)
        if job.status.value in TERMINAL:
            raise AssertionError(f"job ended before the fault: {job}")
        if job.attempts >= attempts and job.stage.startswith(stage_prefix) and job.worker_pid:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job never reached {stage_prefix!r}: {stack.store.get_job(job_id)}")


def _start_job(c, song, preset="4_tracks", audio_id: str | None = None, **extra) -> str:
    audio_id = audio_id or upload(c, song)["audio_id"]
    r = c.post("/create-stems", json={"preset": preset, "audio_id": audio_id, **extra})
    assert r.status_code == 200, r.text
    return r.json()["creation_id"]


def _expected_objects(stack, job_id: str) -> list[str]:
    job = stack.store.get_job(job_id)
    return sorted(k for s in stack.store.get_stems(job.stem_ids + job.upscaled_ids) for k in (s.wav_key, s.hq_key, s.peaks_key) if k)


def test_sigkill_mid_split_redelivers_and_completes_once(tmp_path, redis_url, s3_url, demucs_models, song):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models)
    try:
        with s.client() as c:
            job_id = _start_job(c, song)
            job = _wait_stage(s, job_id, "separating")
            os.kill(job.worker_pid, signal.SIGKILL)  # what the OOM killer does
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 300)
            assert status["status"] == "complete", status
            assert status["attempts"] == 2
            assert [x["name"] for x in status["stems"]] == ["vocals", "drums", "bass", "other"]
            assert len({x["stem_id"] for x in status["stems"]}) == 4
            prefix = f"users/{s.store.get_job(job_id).user_id}/jobs/{job_id}/"
            assert s.objects(prefix) == _expected_objects(s, job_id)  # no duplicates, no orphans
            assert len(s.objects(prefix)) == 12  # 4 WAV + 4 AAC + 4 peaks
    finally:
        s.stop()


def test_job_that_keeps_killing_its_worker_fails_after_bounded_attempts(tmp_path, redis_url, s3_url, demucs_models, song):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, STEMS_TASK_MAX_ATTEMPTS="2")
    try:
        with s.client() as c:
            job_id = _start_job(c, song)
            for attempt in (1, 2):
                job = _wait_stage(s, job_id, "separating", attempts=attempt)
                os.kill(job.worker_pid, signal.SIGKILL)
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 120)
            assert status["status"] == "failed"
            assert status["error"]["code"] == "too_many_attempts" and status["attempts"] == 3
            assert s.objects(f"users/{s.store.get_job(job_id).user_id}/jobs/{job_id}/") == []
            # the worker still serves: the next job completes
            ok = _start_job(c, song, "phantom_center")
            assert wait_for(c, f"/status/stem_split/{ok}", TERMINAL, 120)["status"] == "complete"
    finally:
        s.stop()


def test_redis_restart_during_a_job(tmp_path, s3_url, demucs_models, song):
    port = free_port()
    proc, url = start_redis(tmp_path / "redis", port=port, persist=True)  # production runs Redis with AOF
    s = _stack(tmp_path, url, s3_url, demucs_models)
    try:
        with s.client() as c:
            job_id = _start_job(c, song)
            _wait_stage(s, job_id, "separating")
            proc.terminate()
            proc.wait(10)
            time.sleep(1.0)
            proc, _ = start_redis(tmp_path / "redis", port=port, persist=True)
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 300)
            assert status["status"] == "complete", status
            assert status["attempts"] == 1
            assert len(status["stems"]) == 4
    finally:
        s.stop()
        proc.terminate()


def test_storage_5xx_is_retried_with_backoff(tmp_path, redis_url, s3_url):
    proxy = FaultyS3(s3_url)
    s = ServiceStack(tmp_path, redis_url, s3_url)
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


def test_unfixable_errors_fail_at_once_with_the_reason(tmp_path, redis_url, s3_url, demucs_models, song):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models)
    try:
        with s.client() as c:
            asset = upload(c, write_audio(tmp_path / "a.wav", tone_mix(2.0, SR), SR))
            # the stored original is damaged after import: corrupt audio is not retried
            from stems.storage import make_storage

            make_storage(s.settings()).put_file(s.store.get_asset(asset["audio_id"]).object_key, tmp_path / "api.log")
            job = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]}).json()
            status = wait_for(c, f"/status/stem_split/{job['creation_id']}", TERMINAL, 60)
            assert status["status"] == "failed" and status["error"]["code"] == "invalid_audio"
            assert status["attempts"] == 1
    finally:
        s.stop()


def test_time_limit_fails_the_job(tmp_path, redis_url, s3_url, demucs_models, song):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, STEMS_TIME_LIMIT_BASE_S="2", STEMS_TIME_LIMIT_PER_AUDIO_S="0")
    try:
        with s.client() as c:
            job_id = _start_job(c, song)
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 120)
            assert status["status"] == "failed" and status["error"]["code"] == "time_limit", status
    finally:
        s.stop()


def test_cancel_running_and_queued_jobs(tmp_path, redis_url, s3_url, demucs_models, song):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models)
    try:
        with s.client() as c:
            audio_id = upload(c, song)["audio_id"]  # imported before the worker is busy with a split
            running = _start_job(c, song, audio_id=audio_id)
            queued = _start_job(c, song, audio_id=audio_id)  # waits behind the first: one worker, prefetch of one
            _wait_stage(s, running, "separating")
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
            ok = _start_job(c, song, "phantom_center", audio_id=audio_id)
            assert wait_for(c, f"/status/stem_split/{ok}", TERMINAL, 120)["status"] == "complete"
            assert s.store.get_job(queued).attempts == 0
    finally:
        s.stop()
