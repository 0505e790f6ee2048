"""A running attempt's lease: renewed from a thread, and the run's way to learn the job is no longer its own.

The thread keeps renewing while the run sits in a long model call (torch and ONNX Runtime
release the GIL), so only a dead, frozen or cut-off worker lets its lease lapse; the reaper
then runs the job again under a new attempt. Renewal is a compare-and-set on the attempt
token: once another attempt owns the job (or it ended), renewal stops and `lost()` is true,
and the run stops at its next check without writing anything of the job's.

While Redis is unreachable the thread keeps trying: nobody can take the job over without
Redis either, and every write of the run is checked against the token when it lands.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from stems.jobstore import JobStore
from stems.models import Job, JobStatus

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, store: JobStore, job_id: str, attempt_id: str, lease_s: float, renew_s: float) -> None:
        self.store, self.job_id, self.attempt_id = store, job_id, attempt_id
        self.lease_s, self.renew_s = lease_s, renew_s
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"lease-{job_id[:8]}")

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _ours(self, job: Job | None) -> bool:
        return job is not None and job.attempt_id == self.attempt_id and job.status == JobStatus.processing

    def renew(self) -> bool:
        def apply(job: Job) -> Job | None:
            if not self._ours(job):
                return None
            job.lease_until = time.time() + self.lease_s
            return job

        return self._ours(self.store.update_job(self.job_id, apply))

    def _loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                if not self.renew():
                    self._lost.set()
                    return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("job %s: cannot renew its lease (%s); retrying", self.job_id, exc)

    def lost(self) -> bool:
        """True once the job is no longer this attempt's to run (another attempt owns it, or it ended)."""
        if not self._lost.is_set() and not self._ours(self.store.get_job(self.job_id)):
            self._lost.set()
        return self._lost.is_set()

    def superseded(self) -> bool:
        """True if another attempt owns the job, or the reaper handed it back to the queue."""
        job = self.store.get_job(self.job_id)
        return job is None or job.attempt_id != self.attempt_id
