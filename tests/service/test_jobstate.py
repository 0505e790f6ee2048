"""The job's transitions at the exact points where the review of issue #18 found them broken.

Each test drives an in-process worker, reaper or API (real Redis, moto's S3 server) to one point:
an error after the job completed, a separated job whose float stems are lost, a process that dies
between ending a job and removing its outputs, a write that lands between a transition's read and
its commit. See RELIABILITY.md, "The job lifecycle".
"""

from __future__ import annotations

import io
import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from stems import rediskeys as K
from stems.jobstore import JobStore, StoreClient
from stems.models import DELIVERY_QUEUE, JobStatus, StemStatus
from stems.storage import keys
from tests.inproc import api_client, queued_job, worker_ctx
from tests.support import tone_mix, write_audio

SR = 44100


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("song") / "song.wav", tone_mix(2.0, SR), SR)


@pytest.fixture
def ctx(tmp_path, redis_url, s3_url):
    return worker_ctx(tmp_path, redis_url, s3_url)


@pytest.fixture
def two_stage_ctx(tmp_path, redis_url, s3_url):
    return worker_ctx(tmp_path, redis_url, s3_url, two_stage="always")


class FailingStorage:
    """The context's storage, raising `exc` once at the first `method` call after `when()` holds."""

    def __init__(self, inner, method: str, exc: BaseException, when) -> None:
        self.inner, self.method, self.exc, self.when, self.fired = inner, method, exc, when, False

    def __getattr__(self, name):
        real = getattr(self.inner, name)
        if name != self.method:
            return real

        def call(*args, **kwargs):
            if not self.fired and self.when():
                self.fired = True
                raise self.exc
            return real(*args, **kwargs)

        return call


class RacingRedis:
    """The store's Redis client; `race()` runs once, from another client, between a transaction's WATCH and
    its EXEC (the first transaction after `arm`): the write a concurrent process lands at the worst time."""

    def __init__(self, inner) -> None:
        self.inner, self.race = inner, None

    def arm(self, race) -> None:
        self.race = race

    def pipeline(self, *args, **kwargs):
        pipe = self.inner.pipeline(*args, **kwargs)
        execute = pipe.execute

        def racing_execute(*a, **kw):
            if self.race is not None and pipe.watching:
                race, self.race = self.race, None
                race()
            return execute(*a, **kw)

        pipe.execute = racing_execute
        return pipe

    def __getattr__(self, name):
        return getattr(self.inner, name)


def assert_downloads(ctx, job_id: str) -> None:
    """The job is complete and every stem of it is stored whole (the size its record gives)."""
    job = ctx.store.get_job(job_id)
    assert job.status == JobStatus.complete, job
    stems = ctx.store.get_stems(job.stem_ids)
    assert stems and all(s.status == StemStatus.complete for s in stems), stems
    for s in stems:
        assert ctx.storage.size(s.wav_key) == s.wav_size > 0, (s.name, s.wav_key)
    assert ctx.store.usage(job.user_id)["jobs"] == 1


# -- finding 1: terminal is terminal ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [ConnectionError("storage away"), RuntimeError("boom"), SoftTimeLimitExceeded("soft limit")],
    ids=["retryable", "internal", "soft-limit"],
)
def test_error_after_complete_keeps_the_stems(ctx, song, exc):
    """An error while the worker removes what other attempts left (after `finish`) is logged; the job stays
    complete with every stem (main: `_retry` / `_end_without_stems` deleted the attempt's prefix)."""
    from workers.splitter import run_split

    job = queued_job(ctx, song)
    done = lambda: ctx.store.get_job(job.id).status == JobStatus.complete  # noqa: E731
    ctx.storage = FailingStorage(ctx.storage, "list", exc, done)
    run_split(job.id, ctx, "w1")
    assert ctx.storage.fired
    assert_downloads(ctx, job.id)


# -- finding 3: the load entry moves with the queue ----------------------------------------------------------


def test_separate_again_moves_the_load_back(two_stage_ctx, song):
    """A delivery that finds its float stems gone sends the job back to its model queue, and its load entry
    with it (main: it stayed on `load:cpu`, so the GPU pool was scaled for nothing to do)."""
    from workers.delivery import run_delivery
    from workers.splitter import run_split

    ctx = two_stage_ctx
    job = queued_job(ctx, song, queue="gpu-demucs")
    assert ctx.store.queued("gpu-demucs") == [job.id]
    run_split(job.id, ctx, "gpu1")
    sep = ctx.store.get_job(job.id).separated
    assert sep is not None
    assert (ctx.store.queued("gpu-demucs"), ctx.store.queued(DELIVERY_QUEUE)) == ([], [job.id])
    ctx.storage.delete_prefix(keys.attempt_prefix("u", job.id, sep.attempt_id))  # storage lost the float stems

    run_delivery(job.id, ctx, "cpu1")
    again = ctx.store.get_job(job.id)
    assert again.status == JobStatus.queued and again.separated is None
    assert (ctx.store.queued("gpu-demucs"), ctx.store.queued(DELIVERY_QUEUE)) == ([job.id], [])

    run_split(job.id, ctx, "gpu1")
    run_delivery(job.id, ctx, "cpu1")
    assert_downloads(ctx, job.id)
    assert (ctx.store.queued("gpu-demucs"), ctx.store.queued(DELIVERY_QUEUE)) == ([], [])


# -- finding 4: cleanup owed in durable state ---------------------------------------------------------------


class Died(BaseException):
    """The process stops here (not an Exception: no handler of ours catches it)."""


def _running_with_stems(ctx, song):
    """A job whose attempt stored every stem and then froze past its deadline: run whole, then put back to
    `processing` with its lease and deadline lapsed, as the reaper finds such a job."""
    from workers.splitter import run_split

    job = queued_job(ctx, song)
    run_split(job.id, ctx, "w1")

    def back(j):
        j.status, j.finished_at, j.lease_until, j.deadline_at = JobStatus.processing, None, 1.0, 2.0
        return j

    ctx.store.update_job(job.id, back)
    return job


def test_time_out_dying_before_cleanup_leaves_it_owed(ctx, song):
    """The reaper fails a job past its deadline and dies before removing its outputs: the next pass (any
    reaper) removes them, and no stem of the failed job downloads (main: the stems stayed for ever)."""
    from workers.reaper import Reaper

    job = _running_with_stems(ctx, song)
    assert ctx.storage.list(keys.job_prefix("u", job.id))
    reaper = Reaper(ctx.settings, "r1")
    reaper.ctx = ctx
    real = ctx.storage
    ctx.storage = FailingStorage(real, "delete_prefix", Died(), lambda: True)
    with pytest.raises(Died):
        reaper.pass_once()
    assert ctx.store.get_job(job.id).status == JobStatus.failed
    ctx.storage = real
    later = time.time() + ctx.settings.enqueue_grace_s + 1
    reaper.pass_once(now=later)
    assert ctx.storage.list(keys.job_prefix("u", job.id)) == []
    assert all(s.status == StemStatus.pending for s in ctx.store.get_stems(job.stem_ids))
    assert ctx.store.usage("u")["jobs"] == 1  # the run that completed it counted once; the failure adds nothing


def test_cancel_dying_before_cleanup_leaves_it_owed(two_stage_ctx, song):
    """POST /cancel of a separated job waiting for delivery, the API dying before it removes the float stems:
    the reaper removes them (main: the cancel answered 500 and the float stems stayed for ever)."""
    from workers.reaper import Reaper
    from workers.splitter import run_split

    ctx = two_stage_ctx
    job = queued_job(ctx, song, queue="gpu-demucs")
    run_split(job.id, ctx, "gpu1")
    assert ctx.storage.list(keys.job_prefix("u", job.id))
    real = ctx.storage
    with api_client(ctx) as client:
        client.app.state.services.storage = FailingStorage(real, "delete_prefix", ConnectionError("died"), lambda: True)
        r = client.post(f"/cancel/{job.id}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert ctx.store.get_job(job.id).status == JobStatus.cancelled
    reaper = Reaper(ctx.settings, "r1")
    reaper.ctx = ctx
    reaper.pass_once(now=time.time() + ctx.settings.lease_s + ctx.settings.enqueue_grace_s + 1)
    assert ctx.storage.list(keys.job_prefix("u", job.id)) == []
    assert ctx.store.queued(DELIVERY_QUEUE) == [] and ctx.store.queued("gpu-demucs") == []


def test_stems_of_a_failed_job_never_download(ctx, song):
    """A job failed (by the reaper, say) while its stem records still say complete: no download, no link."""
    from workers.splitter import run_split

    job = queued_job(ctx, song)
    run_split(job.id, ctx, "w1")

    def fail(j):
        j.status = JobStatus.failed
        return j

    ctx.store.update_job(job.id, fail)  # as the reaper's `finish` leaves it before its cleanup
    stem = ctx.store.get_stems(job.stem_ids)[0]
    assert stem.status == StemStatus.complete
    with api_client(ctx) as client:
        r = client.get(f"/download/stem/{stem.id}")
        assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
        assert client.post("/download-links", json={"stem_ids": [stem.id]}).status_code == 409
        assert client.post("/download-archive", json={"stem_ids": [stem.id]}).status_code == 409
        status = client.get(f"/status/stem_split/{job.id}").json()
        assert all(s["download"] is None for s in status["stems"]), status


# -- finding 7: a transition reports truly whether it took effect --------------------------------------------


def _cancel_from_elsewhere(ctx, job_id):
    other = JobStore.from_url(ctx.settings.redis_url, ctx.store.prefix)

    def cancel(j):
        j.status, j.stage = JobStatus.cancelled, "cancelled"
        return j

    return lambda: other.update_job(job_id, cancel)


def test_finish_reports_a_cancel_that_landed_first(ctx, song):
    """A cancel lands between `finish`'s read and its commit: `finish` says it did not end the job, meters
    nothing and owes no webhook (main: it returned the job as if it had completed it)."""
    from workers.jobstate import finish, start

    job = queued_job(ctx, song, callback_url="http://127.0.0.1:9/hook")
    attempt = start(job.id, ctx, "w1")
    racing = RacingRedis(StoreClient.from_url(ctx.settings.redis_url))
    ctx = ctx.replace(store=JobStore(racing, ctx.store.prefix))
    racing.arm(_cancel_from_elsewhere(ctx, job.id))
    assert finish(job.id, ctx, JobStatus.complete, usage_minutes=1.0, attempt_id=attempt.attempt_id) is None
    assert ctx.store.get_job(job.id).status == JobStatus.cancelled
    assert ctx.store.usage("u")["jobs"] == 0 and not ctx.store.owes("webhook", job.id)


def test_hand_to_delivery_reports_a_cancel_that_landed_first(two_stage_ctx, song):
    from stems.models import Separated
    from workers.jobstate import hand_to_delivery, start

    ctx = two_stage_ctx
    job = queued_job(ctx, song, queue="gpu-demucs")
    attempt = start(job.id, ctx, "w1")
    racing = RacingRedis(StoreClient.from_url(ctx.settings.redis_url))
    ctx = ctx.replace(store=JobStore(racing, ctx.store.prefix))
    racing.arm(_cancel_from_elsewhere(ctx, job.id))
    sep = Separated(attempt_id=attempt.attempt_id, worker="w1", frames=1, sample_rate=SR, made_by={}, stems=[])
    assert hand_to_delivery(attempt, ctx, sep, {}) is False
    assert not ctx.store.owes("deliver", job.id) and ctx.store.queued(DELIVERY_QUEUE) == []


def test_cancel_racing_a_delivery_keeps_the_stems(two_stage_ctx, song):
    """POST /cancel reads a job waiting for delivery; the delivery completes it before the cancel commits. The
    cancel answers 409 and the complete job keeps every stem (main: the stale read deleted its prefix)."""
    from workers.delivery import run_delivery
    from workers.splitter import run_split

    ctx = two_stage_ctx
    job = queued_job(ctx, song, queue="gpu-demucs")
    run_split(job.id, ctx, "gpu1")
    other = JobStore.from_url(ctx.settings.redis_url, ctx.store.prefix)
    delivery_ctx = ctx.replace(store=other)

    def deliver_now():
        # the delivery passed its last check before the flag was set (nothing of ours ever clears it: a raw delete)
        StoreClient.from_url(ctx.settings.redis_url).delete(f"{other.prefix}:{K.CANCEL}:{job.id}")
        run_delivery(job.id, delivery_ctx, "cpu1")
        assert other.get_job(job.id).status == JobStatus.complete

    with api_client(ctx) as client:
        racing = RacingRedis(StoreClient.from_url(ctx.settings.redis_url))
        client.app.state.services.store = JobStore(racing, ctx.store.prefix)
        racing.arm(deliver_now)
        r = client.post(f"/cancel/{job.id}")
        assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
        assert racing.race is None  # the race ran
    assert_downloads(ctx, job.id)
    assert ctx.storage.list(keys.job_prefix("u", job.id)) == sorted(
        k for s in ctx.store.get_stems(job.stem_ids) for k in (s.wav_key, s.hq_key, s.peaks_key) if k
    )


# -- finding 4, for an audio: its original and peaks are owed with the record's deletion --------------------


def test_deleting_an_audio_and_dying_before_its_objects_go_leaves_them_owed(ctx, song):
    """The API deletes an audio (and its split) and dies before removing its original and peaks: they are owed
    in the transaction that deleted the record, and the reaper removes them (main: orphaned for ever)."""
    from stems.jobstore import OBJECTS_GRACE_S
    from stems.lifecycle import delete_asset
    from workers.reaper import Reaper

    job = queued_job(ctx, song)
    asset = ctx.store.get_asset(job.audio_id)
    asset.peaks_key = keys.audio_peaks("u", asset.id)
    ctx.storage.put_stream(asset.peaks_key, io.BytesIO(b"[]"))
    ctx.store.update_asset(asset)
    real = ctx.storage
    ctx.storage = FailingStorage(real, "delete", Died(), lambda: True)
    with pytest.raises(Died):
        delete_asset(ctx.store, ctx.storage, asset)
    ctx.storage = real
    assert ctx.store.get_asset(asset.id) is None and ctx.store.get_job(job.id) is None
    assert sorted(ctx.storage.list(f"users/u/audio/{asset.id}")) == sorted(asset.stored_keys)  # left behind ...
    assert ctx.store.objects_owed() == 2  # ... but owed

    reaper = Reaper(ctx.settings, "r1")
    reaper.ctx = ctx
    reaper.pass_once()
    assert ctx.store.objects_owed() == 2  # not yet: the deleting process had OBJECTS_GRACE_S to do it itself
    reaper.pass_once(now=time.time() + OBJECTS_GRACE_S + 1)
    assert ctx.storage.list(f"users/u/audio/{asset.id}") == [] and ctx.store.objects_owed() == 0


def test_a_deletion_that_finishes_owes_nothing(ctx, song):
    from stems.lifecycle import delete_asset

    asset = ctx.store.get_asset(queued_job(ctx, song).audio_id)
    delete_asset(ctx.store, ctx.storage, asset)
    assert ctx.storage.list(f"users/u/audio/{asset.id}") == [] and ctx.store.objects_owed() == 0


# -- a stale attempt that uploads after the job's cleanup ----------------------------------------------------


def test_what_a_stale_attempt_uploads_after_the_cleanup_goes_in_the_last_sweep(ctx, song):
    """An attempt frozen past its lease wakes after the job completed and its cleanup was settled, uploads a
    stem and dies before it checks its fence: the last sweep, owed when the job ended and due once every
    attempt is past its hard time limit, removes it and nothing of the winner's (main: kept for ever)."""
    from workers.reaper import Reaper
    from workers.splitter import run_split

    job = queued_job(ctx, song)
    run_split(job.id, ctx, "w1")
    done = ctx.store.get_job(job.id)
    assert done.status == JobStatus.complete and ctx.store.cleanup_owed(job.id, "u") is None
    owed = ctx.store.cleanup_owed(job.id, "u", last=True)
    assert owed is not None and owed / 1000 >= done.finished_at + ctx.settings.hard_time_limit(2.0)
    due = owed / 1000
    stale = keys.stem("u", job.id, "1-stale", "x", "wav")
    ctx.storage.put_stream(stale, io.BytesIO(b"RIFF"))

    reaper = Reaper(ctx.settings, "r1")
    reaper.ctx = ctx
    reaper.pass_once(now=time.time() + 60)
    assert stale in ctx.storage.list(keys.job_prefix("u", job.id))  # not yet: that attempt may still be alive
    reaper.pass_once(now=due + 1)
    assert stale not in ctx.storage.list(keys.job_prefix("u", job.id))
    assert ctx.store.cleanup_owed(job.id, "u", last=True) is None
    assert_downloads(ctx, job.id)  # the winner's stems untouched
