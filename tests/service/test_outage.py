"""A Redis outage longer than the lease does not supersede live attempts.

The rule (workers/reaper.py): a lease is judged only against time the reaper has watched. After a
gap in its contact with Redis longer than half a lease, the reaper requeues no lapsed lease until it
has again been in contact for a whole STEMS_LEASE_S: live workers renew within STEMS_LEASE_RENEW_S
of Redis coming back, so what still lapses then belongs to a worker that is really gone.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from stems.redisboot import free_port, start_redis
from tests.support import TERMINAL, ServiceStack, expected_objects, job_objects, start_job, upload, wait_for, wait_stage

FAST = {
    "STEMS_LEASE_S": "4",
    "STEMS_LEASE_RENEW_S": "1",
    "STEMS_REAPER_INTERVAL_S": "0.5",
    "STEMS_ENQUEUE_GRACE_S": "2",
    "STEMS_CACHE_MAX_BYTES": "0",
    "STEMS_CHUNK_SECONDS": "5",
}
LEASE_S = 4.0


@pytest.mark.timeout(600)
def test_redis_down_for_twice_the_lease_mid_job_completes_with_one_attempt(
    tmp_path, s3_url, demucs_models, fault_song, broker
):
    port = free_port()
    proc, url = start_redis(tmp_path / "redis", port=port, persist=True)
    s = ServiceStack(tmp_path, url, s3_url, model_dir=demucs_models, broker=broker, **FAST)
    try:
        s.start_api()
        s.start_worker("cpu,gpu-demucs", "w")
        with s.client() as c:
            job_id = start_job(c, fault_song, audio_id=upload(c, fault_song, timeout=120)["audio_id"])
            running = wait_stage(s, job_id, "separating")
            # the run's renewal lands a moment after Redis is back, not before the reaper looks: a renewal in
            # its reconnect backoff (capped at 2 s, stems/jobstore.py) may; here it is held back for half a lease
            os.kill(running.worker_pid, signal.SIGSTOP)
            proc.terminate()  # SIGTERM: Redis writes its AOF and exits; same port and data when it comes back
            proc.wait(10)
            time.sleep(2 * LEASE_S)
            proc, _ = start_redis(tmp_path / "redis", port=port, persist=True)
            job = s.store.get_job(job_id)
            assert job.status.value == "processing" and job.lease_until < time.time(), job  # lapsed, mid-job
            time.sleep(LEASE_S / 2)  # the reaper's passes run meanwhile
            os.kill(running.worker_pid, signal.SIGCONT)
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 300)
            assert status["status"] == "complete", status
            assert status["attempts"] == 1, status  # the old reaper ran it again: its lease had lapsed
            assert job_objects(s, job_id) == expected_objects(s, job_id)
    finally:
        s.stop()
        proc.kill()
        proc.wait(10)
