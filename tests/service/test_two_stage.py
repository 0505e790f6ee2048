"""Separation and delivery as two stages: a GPU-queue worker separates, CPU-queue workers encode and deliver.

Real processes throughout: the API, a worker on the model queue only (the "GPU" node) and
workers on the CPU queue only, on S3 over HTTP, with Redis and (where one answers) RabbitMQ
as the broker. Faults are done for real: whole worker process groups SIGKILLed between the
stages and during delivery.
"""

from __future__ import annotations

import os
import signal
import time

from tests.faulty_s3 import FaultyS3
from tests.support import TERMINAL, ServiceStack, expected_objects, job_objects, start_job, upload, wait_for

FAST = {
    "STEMS_LEASE_S": "4",
    "STEMS_LEASE_RENEW_S": "1",
    "STEMS_REAPER_INTERVAL_S": "0.5",
    "STEMS_ENQUEUE_GRACE_S": "2",
    "STEMS_CACHE_MAX_BYTES": "0",
}
REQUEST = {"hq_streaming_format": "aac", "restoration_params": {"preset": "universal_enhancer", "strength": 0.6}}


def _stack(tmp_path, redis_url, s3_url, models, broker=None, **env) -> ServiceStack:
    s = ServiceStack(
        tmp_path, redis_url, s3_url, model_dir=models, broker=broker, STEMS_CHUNK_SECONDS="5", **{**FAST, **env}
    )
    s.start_api()
    return s


def _files(c, status: dict) -> dict[str, bytes]:
    """Every file of a finished split, downloaded: each stem's and restored copy's WAV, HQ copy and peaks."""
    out = {}
    for stem in status["stems"] + status["upscaled_audios"]:
        for kind in ("wav", "hq"):
            r = c.get(stem["download"][kind])
            assert r.status_code == 200, (stem["name"], kind, r.text)
            out[f"{stem['name']}.{kind}"] = r.content
        r = c.get(f"/stem/{stem['stem_id']}/peaks")
        assert r.status_code == 200, r.text
        out[f"{stem['name']}.peaks"] = r.content
    return out


# Waits are for a state to be reached, so they end as soon as it is: they are long because a loaded 2-core
# machine runs these torch splits several times slower (#24), not because a pass needs the time. A drill that
# must act mid-delivery holds the delivery's first upload at the S3 proxy: a fixed point, not a race with a
# long song.
SLOW = 600


def _wait_job(s: ServiceStack, job_id: str, ready, what: str, timeout: float = SLOW):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = s.store.get_job(job_id)
        if job.status.value in TERMINAL:
            raise AssertionError(f"job ended before {what}: {job}")
        if ready(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job never reached {what}: {s.store.get_job(job_id)}")


def _waiting_for_delivery(job) -> bool:
    return job.separated is not None and job.attempt_id is None


def _delivering(n: int):
    return lambda job: (
        job.deliveries >= n and job.attempt_id is not None and job.worker_pid and job.stage != "delivering"
    )


def _imported(s: ServiceStack, c, song) -> str:
    """The song imported by a CPU worker that is then stopped: the stack has no delivery worker until a test starts one."""
    importer = s.start_worker("cpu", "importer")
    audio_id = upload(c, song)["audio_id"]
    importer.stop()
    return audio_id


def _settled(s: ServiceStack, job_id: str, timeout: float = 15) -> list[str]:
    """The job's objects once the finishing run's sweep of other attempts (just after the job completes) is done."""
    deadline = time.monotonic() + timeout
    while job_objects(s, job_id) != expected_objects(s, job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    return job_objects(s, job_id)


def _separated_objects(s: ServiceStack, job_id: str) -> list[str]:
    return [k for k in job_objects(s, job_id) if "/separated/" in k]


def test_two_stages_give_the_one_stage_files(tmp_path, redis_url, s3_url, demucs_models, fault_song):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models)
    try:
        with s.client() as c:
            one = s.start_worker("cpu,gpu-demucs", "one", STEMS_TWO_STAGE="never")
            audio_id = upload(c, fault_song)["audio_id"]
            job_id = start_job(c, fault_song, audio_id=audio_id, **REQUEST)
            single = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, SLOW)
            assert single["status"] == "complete", single
            one_stage = s.store.get_job(job_id)
            assert one_stage.separated is None and one_stage.deliveries == 0
            assert set(one_stage.timings) == {"run_s", "model_s"}
            expected = _files(c, single)
            one.stop()

            s.start_worker("gpu-demucs", "gpu")
            s.start_worker("cpu", "cpu")
            job_id = start_job(c, fault_song, audio_id=audio_id, **REQUEST)
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, SLOW)
            assert status["status"] == "complete", status
            assert status["models"] == single["models"] and status["progress"] == 1.0
            assert _files(c, status) == expected  # the same bytes: WAV, AAC and peaks, stems and restored copies
            assert single["worker"].startswith("one@") and single["delivered_by"] is None
            assert status["worker"].startswith("gpu@") and status["delivered_by"].startswith("cpu@")
            job = s.store.get_job(job_id)
            assert job.separated is not None and job.attempts == 1 and job.deliveries == 1
            assert job.worker.startswith("cpu@")  # the delivery ran on the CPU queue's worker ...
            assert set(job.timings) == {"separate_s", "model_s", "deliver_s"}  # ... the separation elsewhere
            assert 0 < job.timings["model_s"] <= job.timings["separate_s"]
            objects = _settled(s, job_id)
            assert objects == expected_objects(s, job_id) and len(objects) == 24  # 8 WAV, 8 AAC, 8 peaks: no floats
            usage = c.get("/usage").json()
            assert usage["jobs"] == 2, usage
        assert s.store.load("gpu-demucs") == 0 and s.store.load("cpu") == 0
    finally:
        s.stop()


def test_workers_killed_between_the_stages_and_during_delivery_lose_nothing(
    tmp_path, redis_url, s3_url, demucs_models, fault_song, broker
):
    proxy = FaultyS3(s3_url)
    s = _stack(tmp_path, redis_url, proxy.url, demucs_models, broker)
    try:
        gpu = s.start_worker("gpu-demucs", "gpu")
        with s.client() as c:
            job_id = start_job(c, fault_song, audio_id=_imported(s, c, fault_song), **REQUEST)
            handed = _wait_job(s, job_id, _waiting_for_delivery, "its hand-over to delivery")
            assert handed.status.value == "processing" and handed.progress >= 0.8
            assert len(_separated_objects(s, job_id)) == 8  # 4 stems + 4 restored copies, as float32
            os.killpg(gpu.pid, signal.SIGKILL)  # the GPU node is gone between the stages: nothing of the job is lost
            gpu.popen.wait(10)

            # the delivery's first upload is held in flight: a fixed point mid-delivery, whatever the machine's speed
            proxy.hold(f"/jobs/{job_id}/", "PUT")
            c1 = s.start_worker("cpu", "c1")
            proxy.wait_held(SLOW, alive=lambda: s.store.get_job(job_id).status.value not in TERMINAL)
            running = _wait_job(s, job_id, _delivering(1), "its first delivery run")
            os.killpg(c1.pid, signal.SIGKILL)  # the CPU node dies mid-delivery
            c1.popen.wait(10)
            proxy.release()  # its upload is dropped: storage never saw it
            s.start_worker("cpu", "c2")  # the reaper sends the job to delivery again, not to separation

            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, SLOW)
            assert status["status"] == "complete", status
            job = s.store.get_job(job_id)
            assert job.attempts == 1 and job.deliveries == 2, job  # separated once, delivered twice
            assert job.worker.startswith("c2@") and job.attempt_id != running.attempt_id
            assert job.separated.attempt_id == handed.separated.attempt_id
            objects = _settled(s, job_id)
            assert objects == expected_objects(s, job_id) and len(objects) == 24  # no floats, no dead run's files
            assert all(k.startswith(f"users/{job.user_id}/jobs/{job_id}/{job.attempt_id}/") for k in objects)
            assert len(_files(c, status)) == 24
            usage = c.get("/usage").json()
            assert usage["jobs"] == 1, usage
        assert s.store.running() == 0 and s.store.load("gpu-demucs") == 0 and s.store.load("cpu") == 0
    finally:
        s.stop()
        proxy.close()


def test_cancelling_while_waiting_for_delivery_or_during_it_removes_every_output(
    tmp_path, redis_url, s3_url, demucs_models, fault_song
):
    proxy = FaultyS3(s3_url)
    s = _stack(tmp_path, redis_url, proxy.url, demucs_models)
    try:
        s.start_worker("gpu-demucs", "gpu")
        with s.client() as c:
            audio_id = _imported(s, c, fault_song)
            waiting = start_job(c, fault_song, audio_id=audio_id, **REQUEST)
            _wait_job(s, waiting, _waiting_for_delivery, "its hand-over to delivery")
            assert _separated_objects(s, waiting)
            r = c.post(f"/cancel/{waiting}")
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
            assert job_objects(s, waiting) == []  # no worker held it: the API removed the float stems

            running = start_job(c, fault_song, audio_id=audio_id, **REQUEST)
            _wait_job(s, running, _waiting_for_delivery, "its hand-over to delivery")
            proxy.hold(f"/jobs/{running}/", "PUT", forward=True)  # the delivery stops at its first upload ...
            s.start_worker("cpu", "cpu")
            proxy.wait_held(SLOW, alive=lambda: s.store.get_job(running).status.value not in TERMINAL)
            _wait_job(s, running, _delivering(1), "its delivery run")
            r = c.post(f"/cancel/{running}")
            assert r.status_code == 200, r.text
            proxy.release()  # ... and goes on once the job is cancelled
            assert wait_for(c, f"/status/stem_split/{running}", TERMINAL, 60)["status"] == "cancelled"
            deadline = time.monotonic() + 30
            while job_objects(s, running) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert job_objects(s, running) == []  # the delivery run stopped and removed floats and stems alike
            assert s.store.get_job(waiting).status.value == "cancelled"  # its late delivery message did nothing
            assert c.get("/usage").json()["jobs"] == 0
        assert s.store.load("gpu-demucs") == 0 and s.store.load("cpu") == 0
    finally:
        s.stop()
        proxy.close()
