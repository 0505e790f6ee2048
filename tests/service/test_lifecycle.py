"""Deletion and retention against the real stack, on both storage backends.

A user deletes an audio after splitting it (and splitting a stem of the split): every id
answers 404 and storage holds nothing under the asset's and the jobs' prefixes. A worker that
is still writing when the deletion lands cannot bring records or objects back (in-process, with
the deletion injected between the worker's upload and its record write). The retention sweep
removes expired objects and records together, both when called with a clock and as the cpu
worker runs it on its own.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from pipelines.jobspec import SplitSpec
from stems import rediskeys as K
from stems.jobstore import JobStore
from stems.lifecycle import delete_job, run_locked, sweep
from stems.models import AssetStatus, AudioAsset, Job, JobStatus, StemStatus
from stems.settings import Settings
from stems.storage import LocalStorage, S3Storage, keys
from tests.service.test_storage import s3_settings
from tests.support import ServiceStack, tone_mix, upload, wait_for, write_audio

SR = 44100
TERMINAL = {"complete", "failed", "cancelled"}


@pytest.fixture
def lc(backend_stack):
    return backend_stack


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    return write_audio(tmp_path_factory.mktemp("song") / "song.wav", tone_mix(2.0, SR), SR)


def _split(c, body: dict) -> dict:
    r = c.post("/create-stems", json={"preset": "phantom_center", **body})
    assert r.status_code == 200, r.text
    status = wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", TERMINAL, 120)
    assert status["status"] == "complete", status
    return status


def _records(s: ServiceStack, *ids: str) -> list[str]:
    """What of ours in Redis still names any of `ids`: keys (records, per-id indexes), or members of the
    retention indexes. Tombstones and cancel flags are meant to stay."""
    left = [
        name
        for name in s.store.key_names()
        if any(i in name for i in ids) and not name.startswith(("gone:", "cancel:"))
    ]
    for phase in ("original", "asset", "stems", "job"):
        left += [f"retain:{phase} {i}" for i in s.store.due(phase, float("inf"), 10**6) if i in ids]
    return left


def test_delete_audio_after_split_removes_everything(lc, song):
    user = f"del-{uuid.uuid4().hex[:6]}"
    with lc.client(user) as c:
        aid = upload(c, song)["audio_id"]
        first = _split(c, {"audio_id": aid, "restoration_params": {"preset": "universal_enhancer", "strength": 0.5}})
        second = _split(c, {"stem_id": first["stems"][0]["stem_id"]})  # a job on a stem of the first
        jobs = [first, second]
        stem_ids = [s["stem_id"] for j in jobs for s in j["stems"] + j["upscaled_audios"]]
        assert lc.objects(f"users/{user}/audio/{aid}/") and all(
            lc.objects(keys.job_prefix(user, j["creation_id"])) for j in jobs
        )
        usage = c.get("/usage").json()
        assert usage["jobs"] == 2
        # with an audio, two jobs, their stems, a key, usage and leases written: each key's name is one of
        # stems/rediskeys.py (the one place a name is spelled)
        named = {v for n, v in vars(K).items() if n.isupper()}
        written = {name.split(":")[0] for name in lc.store.key_names()}
        assert written and written <= named, written - named

        r = c.delete(f"/audio/{aid}")
        assert r.status_code == 204, r.text

        assert c.get(f"/status/audio/{aid}").status_code == 404
        for j in jobs:
            assert c.get(f"/status/stem_split/{j['creation_id']}").status_code == 404
            assert c.post("/download-archive", json={"creation_id": j["creation_id"]}).status_code == 404
            assert c.delete(f"/stem_split/{j['creation_id']}").status_code == 404
        for sid in stem_ids:
            for fmt in ("wav", "hq"):
                r = c.get(f"/download/stem/{sid}", params={"format": fmt})
                assert r.status_code == 404 and r.json()["code"] == "not_found", (sid, fmt, r.text)
        assert c.post("/download-archive", json={"stem_ids": stem_ids[:2]}).status_code == 404
        assert c.post("/create-stems", json={"preset": "phantom_center", "stem_id": stem_ids[0]}).status_code == 404
        assert c.post("/create-stems", json={"preset": "phantom_center", "audio_id": aid}).status_code == 404
        assert c.delete(f"/audio/{aid}").status_code == 404
        # storage lists nothing under the asset's and the jobs' prefixes; Redis holds no record of them
        assert lc.objects(f"users/{user}/audio/{aid}/") == []
        for j in jobs:
            assert lc.objects(keys.job_prefix(user, j["creation_id"])) == []
        assert lc.objects(f"users/{user}/") == []
        assert _records(lc, aid, *(j["creation_id"] for j in jobs), *stem_ids) == []
        assert c.get("/usage").json() == usage  # billing stays
        assert lc.store.deleted(aid)["kind"] == "audio"
        assert all(lc.store.deleted(j["creation_id"])["kind"] == "job" for j in jobs)
        assert c.get("/healthz").status_code == 200


def test_delete_finished_split_keeps_the_audio(lc, song):
    user = f"dels-{uuid.uuid4().hex[:6]}"
    with lc.client(user) as c:
        aid = upload(c, song)["audio_id"]
        job = _split(c, {"audio_id": aid})
        cid = job["creation_id"]
        r = c.delete(f"/stem_split/{cid}")
        assert r.status_code == 204, r.text
        assert c.get(f"/status/stem_split/{cid}").status_code == 404
        for s in job["stems"]:
            assert c.get(f"/download/stem/{s['stem_id']}").status_code == 404
        assert lc.objects(keys.job_prefix(user, cid)) == []
        assert _records(lc, cid, *(s["stem_id"] for s in job["stems"])) == []
        assert c.get(f"/status/audio/{aid}").json()["status"] == "complete"
        assert lc.objects(f"users/{user}/audio/{aid}/") != []
        _split(c, {"audio_id": aid})  # still splittable


def test_delete_audio_while_its_split_runs(lc, tmp_path):
    """The running split is cancelled; whatever the worker writes after the deletion is removed again."""
    user = f"delrun-{uuid.uuid4().hex[:6]}"
    long_song = write_audio(tmp_path / "long.wav", tone_mix(90.0, SR), SR)
    with lc.client(user) as c:
        aid = upload(c, long_song)["audio_id"]
        cid = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": aid}).json()["creation_id"]
        deadline = time.monotonic() + 60
        while lc.store.get_job(cid).status != JobStatus.processing and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lc.store.get_job(cid).status == JobStatus.processing
        assert c.delete(f"/audio/{aid}").status_code == 204
        assert c.get(f"/status/stem_split/{cid}").status_code == 404
        deadline = time.monotonic() + 60  # the worker notices between chunks, removes its outputs, and is free again
        while lc.store.active_jobs(user) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)
        assert lc.objects(f"users/{user}/") == []
        assert _records(lc, aid, cid) == []
        assert c.get(f"/status/stem_split/{cid}").status_code == 404


def test_idempotent_replay_of_deleted_things_is_410(lc, song):
    user = f"delidem-{uuid.uuid4().hex[:6]}"
    with lc.client(user) as c:
        with open(song, "rb") as f:
            data = f.read()
        first = c.post("/from-file", files={"file": ("s.wav", data)}, headers={"Idempotency-Key": "up"}).json()
        aid = wait_for(c, f"/status/audio/{first['audio_id']}", {"complete", "failed"})["audio_id"]
        body = {"preset": "phantom_center", "audio_id": aid}
        job = c.post("/create-stems", json=body, headers={"Idempotency-Key": "split"}).json()
        wait_for(c, f"/status/stem_split/{job['creation_id']}", TERMINAL)
        assert c.delete(f"/stem_split/{job['creation_id']}").status_code == 204
        jobs_before = len(lc.store.asset_job_ids(aid))
        r = c.post("/create-stems", json=body, headers={"Idempotency-Key": "split"})
        assert r.status_code == 410 and r.json()["code"] == "gone" and r.json()["creation_id"] == job["creation_id"], (
            r.text
        )
        assert len(lc.store.asset_job_ids(aid)) == jobs_before  # not silently re-created
        assert c.delete(f"/audio/{aid}").status_code == 204
        r = c.post("/from-file", files={"file": ("s.wav", data)}, headers={"Idempotency-Key": "up"})
        assert r.status_code == 410 and r.json()["audio_id"] == aid, r.text
        fresh = c.post("/from-file", files={"file": ("s.wav", data)}, headers={"Idempotency-Key": "up-2"})
        assert fresh.status_code == 200 and fresh.json()["audio_id"] != aid


# -- a worker that writes after the deletion -------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def worker_ctx(request, tmp_path, redis_url, s3_url):
    from pipelines.engine import Engine
    from pipelines.modelstore import ModelStore
    from workers.context import WorkerContext

    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, storage="local")
    storage = LocalStorage(tmp_path / "objects") if request.param == "local" else S3Storage(s3_settings(s3_url))
    models = ModelStore(tmp_path / "models")
    return WorkerContext(
        settings=settings,
        store=JobStore.from_url(redis_url, f"t{uuid.uuid4().hex[:8]}"),
        storage=storage,
        models=models,
        engine=Engine(models, cache=None),
        scratch_dir=tmp_path / "data" / "work",
    )


class DeletingStorage:
    """The context's real storage, with a deletion of the job landing right after its first stem upload."""

    def __init__(self, inner, on_first_put) -> None:
        self.inner, self.on_first_put, self.fired = inner, on_first_put, False

    def put_file(self, key, path):
        self.inner.put_file(key, path)
        if "/jobs/" in key and not self.fired:
            self.fired = True
            self.on_first_put()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _queued_job(ctx, song: Path) -> Job:
    asset = AudioAsset(
        user_id="u",
        origin="upload",
        status=AssetStatus.complete,
        object_key=keys.original("u", "a"),
        info={"duration": 2.0, "sample_rate": SR, "channels": 2},
    )
    ctx.storage.put_file(asset.object_key, song)
    ctx.store.put_asset(asset)
    job = Job(
        user_id="u",
        audio_id=asset.id,
        source_kind="audio",
        source_id=asset.id,
        spec=SplitSpec(preset="phantom_center", chain_index=0, hq_format="aac"),
        queue="cpu",
    )
    stems, _ = job.make_stems(("centre", "sides"))
    ctx.store.create_job(job, stems)
    return job


@pytest.mark.parametrize("flagged", [True, False], ids=["cancel-flag-seen", "cancel-flag-missed"])
def test_worker_finishing_after_the_delete_leaves_nothing(worker_ctx, song, flagged):
    """The deletion lands between the worker's first upload and its record write. With the cancel flag the
    worker stops at its next check; without it (a deletion after the worker's last check) it runs to the
    end; either way its `put_stem` writes nothing and its `finish` finds no job, so it removes its outputs."""
    from workers.splitter import run_split

    ctx = worker_ctx
    job = _queued_job(ctx, song)

    def delete_now():
        if flagged:
            delete_job(ctx.store, ctx.storage, ctx.store.get_job(job.id))
        else:  # the records and objects go, and the worker never sees a cancel flag
            ctx.store.delete_job_records(ctx.store.get_job(job.id))
            ctx.storage.delete_prefix(keys.job_prefix("u", job.id))

    ctx.storage = DeletingStorage(ctx.storage, delete_now)
    run_split(job.id, ctx, "test-worker")
    assert ctx.storage.fired
    assert ctx.store.get_job(job.id) is None and ctx.store.get_stems(job.stem_ids) == []
    assert ctx.storage.list(keys.job_prefix("u", job.id)) == []
    assert ctx.store.asset_job_ids(job.audio_id) == [] and ctx.store.active_jobs("u") == 0
    assert ctx.store.usage("u")["jobs"] == 0  # a deleted job that never completed costs nothing


# -- retention ---------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store_and_storage(request, tmp_path, redis_url, s3_url):
    storage = LocalStorage(tmp_path / "objects") if request.param == "local" else S3Storage(s3_settings(s3_url))
    return JobStore.from_url(redis_url, f"t{uuid.uuid4().hex[:8]}"), storage


def _stored_split(store, storage, tmp_path: Path, user: str, created: float, finished: float | None):
    """An imported asset and a split of it with two stored stems, as the service leaves them."""
    src = tmp_path / f"{uuid.uuid4().hex}.bin"
    src.write_bytes(b"audio")
    asset = AudioAsset(
        user_id=user,
        origin="upload",
        status=AssetStatus.complete,
        created_at=created,
        object_key="",
        info={"duration": 2.0, "sample_rate": SR, "channels": 2},
    )
    asset.object_key = keys.original(user, asset.id)
    storage.put_file(asset.object_key, src)
    store.put_asset(asset)
    job = Job(
        user_id=user,
        audio_id=asset.id,
        source_kind="audio",
        source_id=asset.id,
        spec=SplitSpec(preset="phantom_center", chain_index=0),
        queue="cpu",
        created_at=created,
    )
    stems, _ = job.make_stems(("centre", "sides"))
    store.create_job(job, stems)
    for s in stems:
        s.status, s.wav_key = StemStatus.complete, keys.stem(user, job.id, "1-test", s.id, "wav")
        storage.put_file(s.wav_key, src)
        store.put_stem(s)
    if finished is not None:

        def done(j):
            j.status, j.finished_at = JobStatus.complete, finished
            return j

        store.update_job(job.id, done)
    return asset, store.get_job(job.id)


def test_sweep_expires_objects_and_records_together(store_and_storage, tmp_path):
    store, storage = store_and_storage
    day = 86400.0
    settings = Settings(retain_originals_s=7 * day, retain_stems_s=7 * day, retain_records_s=30 * day)
    t0 = time.time()
    asset, job = _stored_split(store, storage, tmp_path, "old", t0, t0 + 60)
    running_asset, running = _stored_split(store, storage, tmp_path, "busy", t0, None)  # a job still queued on it
    prefix = keys.job_prefix("old", job.id)

    assert sweep(store, storage, settings, now=t0 + 6 * day).total == 0  # nothing due yet
    assert len(storage.list(prefix)) == 2

    report = sweep(store, storage, settings, now=t0 + 7 * day + 120)  # stems and originals are due
    assert (report.stems, report.originals, report.postponed) == (1, 1, 1), report
    assert storage.list(prefix) == [] and storage.size(asset.object_key) is None
    assert {s.status for s in store.get_stems(job.stem_ids)} == {StemStatus.expired}
    assert all(s.wav_key is None for s in store.get_stems(job.stem_ids))
    assert store.get_asset(asset.id).status == AssetStatus.expired
    assert store.get_job(job.id).status == JobStatus.complete  # the record stays, saying what happened
    assert storage.size(running_asset.object_key) is not None  # its split still needs it

    report = sweep(store, storage, settings, now=t0 + 30 * day + 120)  # records are due
    assert (report.jobs, report.assets) == (1, 1), report
    assert store.get_job(job.id) is None and store.get_asset(asset.id) is None and store.get_stems(job.stem_ids) == []
    assert store.asset_job_ids(asset.id) == [] and storage.list("users/old/") == []
    assert store.get_asset(running_asset.id) is not None and store.get_job(running.id) is not None
    assert sweep(store, storage, settings, now=t0 + 31 * day).total == 0  # nothing left to do, nothing redone


def test_sweep_keeps_what_a_queued_job_still_needs(store_and_storage, tmp_path):
    """Stems that a queued split will read stay until it ends; so does the original under a queued split."""
    store, storage = store_and_storage
    settings = Settings(retain_originals_s=10, retain_stems_s=10, retain_records_s=1000)
    t0 = time.time()
    asset, job = _stored_split(store, storage, tmp_path, "dep", t0, t0 + 1)
    on_stem = Job(
        user_id="dep",
        audio_id=asset.id,
        source_kind="stem",
        source_id=job.stem_ids[0],
        spec=SplitSpec(preset="phantom_center", chain_index=0),
        queue="cpu",
    )
    store.create_job(on_stem, [])
    report = sweep(store, storage, settings, now=t0 + 60)
    assert report.postponed == 2 and report.total == 0, report
    assert len(storage.list(keys.job_prefix("dep", job.id))) == 2 and storage.size(asset.object_key) is not None
    assert {s.status for s in store.get_stems(job.stem_ids)} == {StemStatus.complete}
    assert store.get_asset(asset.id).status == AssetStatus.complete

    def done(j):
        j.status, j.finished_at = JobStatus.complete, t0 + 2
        return j

    store.update_job(on_stem.id, done)
    report = sweep(store, storage, settings, now=t0 + 60)
    assert (report.stems, report.originals) == (2, 1), report  # both jobs ended: both due
    assert storage.list(keys.job_prefix("dep", job.id)) == [] and storage.size(asset.object_key) is None


def _split_of_stem(store, asset, job) -> Job:
    """A queued split of `job`'s first stem: it will read that stem's object."""
    on_stem = Job(
        user_id=job.user_id,
        audio_id=asset.id,
        source_kind="stem",
        source_id=job.stem_ids[0],
        spec=SplitSpec(preset="phantom_center", chain_index=0),
        queue="cpu",
    )
    store.create_job(on_stem, [])
    return on_stem


@pytest.mark.parametrize("stems_s,records_s", [(10, 10), (1000, 10)], ids=["together", "records-first"])
def test_records_of_a_job_whose_stem_is_being_split_are_kept(store_and_storage, tmp_path, stems_s, records_s):
    """The records phase checks dependents as the stems phase does: the old sweep ran it first and deleted
    the job (records and objects) under a queued split of its stem."""
    store, storage = store_and_storage
    settings = Settings(retain_originals_s=1000, retain_stems_s=stems_s, retain_records_s=records_s)
    t0 = time.time()
    asset, job = _stored_split(store, storage, tmp_path, "rec", t0, t0 + 1)
    on_stem = _split_of_stem(store, asset, job)
    report = sweep(store, storage, settings, now=t0 + 60)
    assert report.total == 0 and report.postponed >= 1, report
    assert store.get_job(job.id) is not None and len(storage.list(keys.job_prefix("rec", job.id))) == 2
    assert {s.status for s in store.get_stems(job.stem_ids)} == {StemStatus.complete}

    def done(j):
        j.status, j.finished_at = JobStatus.complete, t0 + 2
        return j

    store.update_job(on_stem.id, done)
    report = sweep(store, storage, settings, now=t0 + 60)
    assert report.jobs >= 1 and store.get_job(job.id) is None and storage.list(keys.job_prefix("rec", job.id)) == []


def test_a_sweeper_that_died_after_marking_stems_leaves_them_to_the_next(store_and_storage, tmp_path):
    """Marking stems expired is kept in their records, not in the sweeper's memory: the next sweep undoes
    the mark of stems a split still needs (the old one left them expired, their keys gone, for good)."""
    store, storage = store_and_storage
    settings = Settings(retain_originals_s=1000, retain_stems_s=10, retain_records_s=1000)
    t0 = time.time()
    asset, job = _stored_split(store, storage, tmp_path, "died", t0, t0 + 1)
    on_stem = _split_of_stem(store, asset, job)
    store.mark_stems_expired(job)  # a sweep's first step; its process died there
    report = sweep(store, storage, settings, now=t0 + 60)
    assert report.postponed == 1 and report.stems == 0, report
    stems = store.get_stems(job.stem_ids)
    assert {s.status for s in stems} == {StemStatus.complete} and all(s.wav_key for s in stems), stems
    assert sorted(s.wav_key for s in stems) == storage.list(keys.job_prefix("died", job.id))

    def done(j):
        j.status, j.finished_at = JobStatus.complete, t0 + 2
        return j

    store.update_job(on_stem.id, done)
    store.mark_stems_expired(job)  # and again it dies after marking, now with nothing depending on the stems
    report = sweep(store, storage, settings, now=t0 + 60)
    assert report.stems == 2, report  # both jobs' stems (the split of the stem made none)
    stems = store.get_stems(job.stem_ids)
    assert {s.status for s in stems} == {StemStatus.expired} and not any(s.wav_key for s in stems)
    assert storage.list(keys.job_prefix("died", job.id)) == []


def test_zero_retention_keeps_everything(store_and_storage, tmp_path):
    store, storage = store_and_storage
    t0 = time.time() - 400 * 86400
    asset, job = _stored_split(store, storage, tmp_path, "keep", t0, t0 + 1)
    report = sweep(store, storage, Settings(retain_originals_s=0, retain_stems_s=0, retain_records_s=0))
    assert report.total == 0
    assert len(storage.list("users/keep/")) == 3 and store.get_job(job.id) is not None


def test_one_sweeper_at_a_time(store_and_storage):
    store, storage = store_and_storage
    token = store.try_lock("retention", 30)
    assert token and run_locked(store, storage, Settings()) is None  # another holds the lock
    store.unlock("retention", token)
    assert run_locked(store, storage, Settings()) is not None


def _until(done, deadline: float, what: str) -> None:
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_the_cpu_worker_sweeps_on_its_own(tmp_path, redis_url, s3_url, song):
    """Short retention on the S3 stack: stems, then the original, then every record go, with no call made."""
    s = ServiceStack(
        tmp_path,
        redis_url,
        s3_url,
        STEMS_RETENTION_SWEEP_S="0.3",
        STEMS_RETAIN_STEMS_S="2",
        STEMS_RETAIN_ORIGINALS_S="6",
        STEMS_RETAIN_RECORDS_S="14",
    )
    s.start_api()
    s.start_worker("cpu", "sweeper")
    try:
        user = f"ret-{uuid.uuid4().hex[:6]}"
        with s.client(user) as c:
            aid = upload(c, song)["audio_id"]
            job = _split(c, {"audio_id": aid})
            cid, sid = job["creation_id"], job["stems"][0]["stem_id"]
            assert job["expires_at"] == pytest.approx(job["finished_at"] + 2, abs=0.01)
            deadline = time.monotonic() + 60
            while c.get(f"/status/stem_split/{cid}").json()["stems"][0]["status"] != "expired":
                assert time.monotonic() < deadline, "stems never expired"
                time.sleep(0.2)
            # the sweeper marks a stem expired before it deletes its objects (a mark it can finish if it
            # dies): the status answers first, and the objects go a moment later
            _until(lambda: s.objects(keys.job_prefix(user, cid)) == [], deadline, "the stems' objects stayed")
            r = c.get(f"/download/stem/{sid}")
            assert r.status_code == 410 and r.json()["code"] == "gone"
            while c.get(f"/status/audio/{aid}").json()["status"] != "expired":
                assert time.monotonic() < deadline, "the original never expired"
                time.sleep(0.2)
            _until(lambda: s.objects(f"users/{user}/audio/") == [], deadline, "the original's objects stayed")
            r = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": aid})
            assert r.status_code == 410, r.text
            while c.get(f"/status/stem_split/{cid}").status_code != 404:
                assert time.monotonic() < deadline, "the records never expired"
                time.sleep(0.2)
            assert c.get(f"/status/audio/{aid}").status_code == 404
            _until(
                lambda: _records(s, aid, cid, sid) == [] and s.objects(f"users/{user}/") == [],
                deadline,
                "records or objects stayed",
            )
            assert c.get("/usage").json()["jobs"] == 1
    finally:
        s.stop()
