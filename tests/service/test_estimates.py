"""Estimates before queueing (`dry_run`) and `eta_s` in a split's status, against a real API and Redis.

The stack starts with no worker, so the jobs it accepts stay queued and the queue ahead is
exact; then a cpu worker runs them, and the speed their timings measured is what the next
estimate uses.
"""

from __future__ import annotations

import json
import time

import pytest

from api import budget
from stems.models import JobStatus
from tests.support import ServiceStack, asset_record, wait_for

SR = 44100


@pytest.fixture(scope="module")
def idle(tmp_path_factory, redis_url, s3_url):
    """An API with no worker (yet): what it queues stays queued."""
    s = ServiceStack(tmp_path_factory.mktemp("eta"), redis_url, s3_url)
    s.start_api()
    yield s
    s.stop()


def _everything(stack) -> list[str]:
    return sorted(name for name in stack.store.key_names() if not name.startswith(("rate:", "workers")))


def test_dry_run_answers_the_estimate_and_creates_nothing(idle):
    with idle.client("dry") as c:
        audio = asset_record(idle, "dry", 30.0)
        before = _everything(idle)
        body = {
            "preset": "phantom_center",
            "audio_id": audio,
            "selection": {"start": 5, "end": 25},
            "bit_depth": 16,
            "hq_streaming_format": "mp3",
            "restoration_params": {"preset": "universal_enhancer"},
            "dry_run": True,
        }
        r = c.post("/create-stems", json=body, headers={"Idempotency-Key": "dry-1"})
        assert r.status_code == 200, r.text
        est = r.json()
        assert est["dry_run"] is True and "creation_id" not in est
        assert (est["queue"], est["chain"], est["chain_index"]) == ("cpu", ["dsp.centre"], 0)
        assert est["stems"] == ["centre", "sides", "centre_restored", "sides_restored"]
        assert est["seconds"] == 20.0 and est["usage_minutes"] == pytest.approx(20 / 60 * 1.0, abs=1e-4)
        assert est["estimated_output_bytes"] == budget.estimate(2, 2, SR, 20.0, 16, "mp3", True)["estimated_bytes"]
        assert est["eta_s"] == pytest.approx(20.0) and est["eta_basis"]["speed_source"] == "default"
        assert est["would_be_refused"] is None
        assert _everything(idle) == before  # no job, no stem, no quota slot, no idempotency record
        assert c.get("/stem_split").json()["items"] == []
        # the same Idempotency-Key then queues for real: the dry run did not take it
        body["dry_run"] = False
        real = c.post("/create-stems", json=body, headers={"Idempotency-Key": "dry-1"})
        assert real.status_code == 200 and "creation_id" in real.json(), real.text
        assert idle.store.delete_job_records(idle.store.get_job(real.json()["creation_id"])) is None


def test_dry_run_refuses_what_a_real_call_refuses(idle):
    with idle.client("dry-bad") as c:
        audio = asset_record(idle, "dry-bad", 30.0)
        for body, code in (
            ({"preset": "nope", "audio_id": audio}, 422),
            ({"preset": "phantom_center", "audio_id": audio, "selection": {"start": 0, "end": 99}}, 422),
            ({"preset": "phantom_center", "mastered_id": audio}, 404),
            ({"preset": "phantom_center", "audio_id": audio, "dry_run": "maybe"}, 422),
        ):
            assert c.post("/create-stems", json={**body, "dry_run": body.get("dry_run", True)}).status_code == code


def test_queued_jobs_carry_eta_from_the_queue_ahead_then_the_measured_speed(idle, tmp_path):
    store = idle.store
    with idle.client("eta") as c:
        audio = asset_record(idle, "eta", 60.0)
        jobs = []
        for seconds in (10.0, 20.0, 30.0):
            r = c.post(
                "/create-stems",
                json={"preset": "phantom_center", "audio_id": audio, "selection": {"start": 0, "end": seconds}},
            )
            assert r.status_code == 200, r.text
            jobs.append(r.json()["creation_id"])
        ahead = store.queued("cpu")
        earlier = sum(store.get_job(j).audio_seconds for j in ahead if j not in jobs and store.get_job(j) is not None)
        etas = [c.get(f"/status/stem_split/{j}").json()["eta_s"] for j in jobs]
        # nothing measured on this deployment's queue yet: 1 s of work per audio second, one worker assumed
        assert etas == pytest.approx([earlier + 10, earlier + 30, earlier + 60], abs=0.2)

        # the first job runs and is half done: its eta halves and the ones behind wait only for what is left
        def half(job):
            job.status, job.progress = JobStatus.processing, 0.5
            return job

        store.update_job(jobs[0], half)
        etas = [c.get(f"/status/stem_split/{j}").json()["eta_s"] for j in jobs]
        assert etas == pytest.approx([5, earlier + 5 + 20, earlier + 5 + 50], abs=0.2)

        def done(job):
            job.status, job.finished_at = JobStatus.cancelled, time.time()
            return job

        for j in jobs:
            store.update_job(j, done)
        assert c.get(f"/status/stem_split/{jobs[2]}").json()["eta_s"] is None  # ended: no estimate


def test_completed_jobs_measure_the_speed_the_next_estimate_uses(idle, tmp_path):
    from tests.support import tone_mix, upload, write_audio

    idle.start_worker("cpu", "etacpu")
    song = write_audio(tmp_path / "s.wav", tone_mix(4.0, SR), SR)
    with idle.client("speed") as c:
        audio = upload(c, song)["audio_id"]
        ratios = []
        for _ in range(3):
            r = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": audio})
            status = wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", {"complete", "failed"})
            assert status["status"] == "complete" and status["eta_s"] is None
            job = idle.store.get_job(status["creation_id"])
            ratios.append(job.timings["run_s"] / job.audio_seconds)
        kept = [json.loads(v)["s_per_audio_s"] for v in idle.store.speed_samples("cpu:phantom_center:0")]
        assert kept[:3] == pytest.approx(ratios[::-1], rel=1e-3)
        est = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": audio, "dry_run": True}).json()
        assert est["eta_basis"]["speed_source"] == "chain" and est["eta_basis"]["workers"] == 1
        median = sorted(kept)[len(kept) // 2]
        assert est["eta_basis"]["seconds_per_audio_second"] == pytest.approx(median)
        assert est["eta_s"] == pytest.approx(median * 4.0, abs=0.15)
