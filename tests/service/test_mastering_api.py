"""Mastering through the real stack: API, cpu worker, Redis and S3 (moto), over HTTP.

Master real music to each target and measure the downloaded WAV independently; split the
mastered version; delete it and its audio; keep tenants apart; refuse bad requests without a
trace; expire it with the stems' retention.
"""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
from scipy import signal as sps

from stems.client import ApiError, Client
from stems.jobstore import JobStore
from stems.lifecycle import sweep
from stems.masterings import Mastering, output_stem, wav_key
from stems.models import AssetStatus, AudioAsset, JobStatus, StemStatus
from stems.settings import Settings
from stems.storage import LocalStorage
from tests.support import ROOT, ServiceStack, child_pids, tone_mix, upload, wait_for, write_audio

SR = 44100
TERMINAL = {"complete", "failed"}
REAL = Path("/work/shared/corpus/real/musdb7s_falcon69/mixture.flac")


@pytest.fixture(scope="module")
def music(tmp_path_factory) -> Path:
    """The shared MUSDB excerpt (real music) where the corpus is mounted, else a synthetic mix."""
    if REAL.exists():
        return REAL
    return write_audio(tmp_path_factory.mktemp("m") / "mix.flac", tone_mix(6.0, SR), SR, "PCM_24", "FLAC")


def _master(c, body: dict) -> dict:
    r = c.post("/master-audio", json=body)
    assert r.status_code == 200, r.text
    queued = r.json()
    assert set(queued) == {"status", "message", "mastered_id", "audio_id", "user_id", "preset"}
    return wait_for(c, f"/status/mastered/{queued['mastered_id']}", TERMINAL, 180)


def _keys_of(stack, id_: str) -> list[str]:
    return [name for name in stack.store.key_names() if id_ in name]


@pytest.mark.parametrize(
    "preset,target,ceiling,bits,subtype",
    [
        ("streaming", -14.0, -1.0, 24, "PCM_24"),
        ("loud", -9.0, -1.0, 16, "PCM_16"),
        ("podcast", -16.0, -1.5, 32, "FLOAT"),
    ],
)
def test_master_reaches_the_target_measured_independently(stack, music, preset, target, ceiling, bits, subtype):
    with stack.client() as c:
        asset = upload(c, music)
        before = c.get("/usage").json()["minutes"]
        status = _master(c, {"audio_id": asset["audio_id"], "preset": preset, "bit_depth": bits})
        assert status["status"] == "complete", status
        assert status["target"] == {"integrated_lufs": target, "true_peak_dbtp": ceiling}
        wav = c.get(f"/download/mastered/{status['mastered_id']}")
        assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
        assert len(wav.content) == status["size"]
        info = sf.info(io.BytesIO(wav.content))
        assert (info.samplerate, info.channels, info.subtype) == (asset["sample_rate"], 2, subtype)
        assert info.frames == round(asset["duration"] * asset["sample_rate"])
        y, sr = sf.read(io.BytesIO(wav.content), dtype="float64", always_2d=True)
        lufs = pyloudnorm.Meter(sr).integrated_loudness(y)
        peak = 20 * math.log10(np.abs(sps.resample_poly(y, 4, 1, axis=0)).max())
        assert abs(lufs - target) <= 0.5 and peak <= ceiling, (lufs, peak, status)
        assert status["measured"]["integrated_lufs"] == pytest.approx(lufs, abs=0.05)  # 16-bit rounding
        assert status["measured"]["loudness_range_lu"] is not None
        assert c.get("/usage").json()["minutes"] == pytest.approx(before + asset["duration"] / 60, abs=1e-3)


def test_a_mastered_version_splits_like_a_stem_and_goes_with_its_audio(stack, music):
    with stack.client() as c, stack.client("mallory") as other:
        asset = upload(c, music)
        m = _master(c, {"audio_id": asset["audio_id"]})
        assert m["status"] == "complete", m
        mid = m["mastered_id"]
        # another tenant sees nothing of it
        assert other.get(f"/status/mastered/{mid}").status_code == 404
        assert other.get(f"/download/mastered/{mid}").status_code == 404
        assert other.post("/create-stems", json={"preset": "phantom_center", "mastered_id": mid}).status_code == 404
        assert other.post("/master-audio", json={"mastered_id": mid}).status_code == 404
        assert other.delete(f"/mastered/{mid}").status_code == 404

        r = c.post("/create-stems", json={"preset": "phantom_center", "mastered_id": mid})
        assert r.status_code == 200, r.text
        assert r.json()["audio_id"] == asset["audio_id"]  # the job descends from the original upload
        split = wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", TERMINAL | {"cancelled"}, 180)
        assert split["status"] == "complete", split
        job = stack.store.get_job(split["creation_id"])
        assert (job.source_kind, job.source_id) == ("mastered", mid)
        mastered, _ = sf.read(io.BytesIO(c.get(f"/download/mastered/{mid}").content), dtype="float32")
        centre = sf.read(io.BytesIO(c.get(split["stems"][0]["download"]["wav"]).content), dtype="float32")[0]
        sides = sf.read(io.BytesIO(c.get(split["stems"][1]["download"]["wav"]).content), dtype="float32")[0]
        assert np.max(np.abs(centre + sides - mastered)) < 1e-4  # it split the mastered WAV, not the original

        again = _master(c, {"mastered_id": mid, "preset": "podcast"})  # a master of a master
        assert again["status"] == "complete" and again["source_kind"] == "mastered"

        assert c.delete(f"/audio/{asset['audio_id']}").status_code == 204
        for id_ in (mid, again["mastered_id"]):
            assert c.get(f"/status/mastered/{id_}").status_code == 404
            assert c.get(f"/download/mastered/{id_}").status_code == 404
            assert stack.objects(f"users/alice/jobs/{id_}/") == []
            assert _keys_of(stack, id_) == []
        assert c.get(f"/status/stem_split/{split['creation_id']}").status_code == 404


def test_delete_a_mastered_version(stack, music):
    with stack.client() as c:
        asset = upload(c, music)
        m = _master(c, {"audio_id": asset["audio_id"], "preset": "podcast"})
        assert stack.objects(f"users/alice/jobs/{m['mastered_id']}/") != []
        assert c.delete(f"/mastered/{m['mastered_id']}").status_code == 204
        assert c.get(f"/status/mastered/{m['mastered_id']}").status_code == 404
        assert (
            c.post("/create-stems", json={"preset": "phantom_center", "mastered_id": m["mastered_id"]}).status_code
            == 404
        )
        assert stack.objects(f"users/alice/jobs/{m['mastered_id']}/") == []
        assert _keys_of(stack, m["mastered_id"]) == []
        assert c.get(f"/status/audio/{asset['audio_id']}").json()["status"] == "complete"  # the audio stays


def test_bad_mastering_requests_are_4xx_and_change_nothing(stack, music):
    with stack.client("bad-master") as c:
        asset = upload(c, music)
        before = sorted(name for name in stack.store.key_names() if "rate" not in name)
        cases = [
            ({"audio_id": asset["audio_id"], "preset": "radio"}, 422),
            ({"audio_id": asset["audio_id"], "bit_depth": 8}, 422),
            ({"audio_id": asset["audio_id"], "extra": 1}, 422),
            ({}, 422),
            ({"audio_id": "not-a-uuid"}, 422),
            ({"audio_id": str(uuid.uuid4())}, 404),
            ({"stem_id": str(uuid.uuid4())}, 404),
            ({"upscaled_id": asset["audio_id"]}, 404),
        ]
        for body, code in cases:
            r = c.post("/master-audio", json=body)
            assert r.status_code == code, (body, r.text)
        for path in (f"/status/mastered/{uuid.uuid4()}", f"/download/mastered/{uuid.uuid4()}"):
            assert c.get(path).status_code == 404
        assert c.get("/status/mastered/nope").status_code == 422
        assert c.delete(f"/mastered/{uuid.uuid4()}").status_code == 404
        assert (
            c.post("/create-stems", json={"preset": "phantom_center", "mastered_id": str(uuid.uuid4())}).status_code
            == 404
        )
        after = sorted(name for name in stack.store.key_names() if "rate" not in name)
        new = [k for k in after if k not in before]
        assert [k for k in new if "bad-master" in k or ":mastering:" in k or "masters" in k] == []


def test_a_mastering_not_finished_cannot_be_split_or_downloaded(stack, tmp_path):
    """Queued (its message not due yet, so no worker has it): 409 for the split and the download."""
    masters = stack.store.masterings
    m = Mastering(
        user_id="alice",
        audio_id=str(uuid.uuid4()),
        source_kind="audio",
        source_id=str(uuid.uuid4()),
        preset="streaming",
    )
    masters.create(m, time.time() + 3600)
    try:
        with stack.client() as c:
            assert c.get(f"/status/mastered/{m.id}").json()["status"] == "queued"
            assert c.post("/create-stems", json={"preset": "phantom_center", "mastered_id": m.id}).status_code == 409
            assert c.get(f"/download/mastered/{m.id}").status_code == 409
    finally:
        masters.delete(LocalStorage(tmp_path), m)


def test_retention_expires_a_mastered_version_then_its_records(redis_url, tmp_path):
    store = JobStore.from_url(redis_url, f"t{uuid.uuid4().hex[:8]}")
    storage = LocalStorage(tmp_path / "objects")
    masters = store.masterings
    m = Mastering(user_id="u", audio_id="a", source_kind="audio", source_id="a", preset="streaming")
    masters.create(m, time.time() + 3600)
    src = tmp_path / "w.wav"
    src.write_bytes(b"RIFF")
    storage.put_file(wav_key(m), src)
    t0 = time.time()
    m.status, m.finished_at = JobStatus.complete, t0
    assert masters.update(m, output_stem(m).model_copy(update={"status": StemStatus.complete, "wav_key": wav_key(m)}))
    settings = Settings(retain_originals_s=0, retain_stems_s=100, retain_records_s=1000)

    assert sweep(store, storage, settings, now=t0 + 50).total == 0
    report = sweep(store, storage, settings, now=t0 + 101)
    assert report.stems == 1 and storage.list("users/u/") == []
    assert store.get_stem(m.id).status == StemStatus.expired and masters.get(m.id) is not None
    report = sweep(store, storage, settings, now=t0 + 1001)
    assert report.jobs == 1 and masters.get(m.id) is None and store.get_stem(m.id) is None
    assert store.usage("u")["minutes"] == 0.0  # usage_minutes was 0 here; metered once, at completion


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stems.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=240
    )


def test_client_and_cli_master_remotely_and_locally(stack, music, tmp_path):
    """The Python client, `stems remote master` and `stems master` (no server) make the same kind of result."""
    key = stack.store.create_key("cli-master")
    with Client(stack.base, key) as client:
        audio = client.upload(music)
        client.wait_audio(audio.audio_id)
        queued = client.master_audio(audio_id=audio.audio_id, preset="podcast")
        done = client.wait_mastered(queued.mastered_id, timeout=180)
        assert done.measured.integrated_lufs == pytest.approx(-16.0, abs=0.5)
        path = client.download_mastered(done.mastered_id, tmp_path / "m.wav")
        assert sf.info(path).samplerate == done.sample_rate
        job = client.create_stems(preset="phantom_center", mastered_id=done.mastered_id)
        assert client.wait(job.creation_id, timeout=180).status == "complete"
        client.delete_mastered(done.mastered_id)
        with pytest.raises(ApiError) as err:
            client.mastered_status(done.mastered_id)
        assert err.value.status == 404

    env = {**os.environ, "STEMS_SERVER": stack.base, "STEMS_API_KEY": key, "PYTHONPATH": str(ROOT)}
    remote = _cli("remote", "master", str(music), "--preset", "loud", "--out", str(tmp_path / "r.wav"), env=env)
    assert remote.returncode == 0, remote.stderr
    out, lufs, peak, *_ = remote.stdout.strip().split("\t")
    assert out == str(tmp_path / "r.wav") and abs(float(lufs.split()[0]) + 9.0) <= 0.5 and float(peak.split()[0]) <= -1
    local = _cli("master", str(music), "--preset", "loud", "--out", str(tmp_path / "l.wav"), env=env)
    assert local.returncode == 0, local.stderr
    assert sf.read(tmp_path / "l.wav")[0] == pytest.approx(sf.read(tmp_path / "r.wav")[0], abs=1e-6)  # same chain
    bad = _cli("master", str(tmp_path / "missing.flac"), env=env)
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_retention_keeps_an_original_a_queued_mastering_needs(redis_url, tmp_path):
    store = JobStore.from_url(redis_url, f"t{uuid.uuid4().hex[:8]}")
    storage = LocalStorage(tmp_path / "objects")
    t0 = time.time()
    asset = AudioAsset(
        user_id="u",
        origin="upload",
        status=AssetStatus.complete,
        object_key="users/u/audio/a/original",
        created_at=t0,
        info={"duration": 2.0, "sample_rate": SR, "channels": 2},
    )
    src = tmp_path / "o.bin"
    src.write_bytes(b"audio")
    storage.put_file(asset.object_key, src)
    store.put_asset(asset)
    m = Mastering(user_id="u", audio_id=asset.id, source_kind="audio", source_id=asset.id, preset="loud")
    store.masterings.create(m, t0 + 3600)
    settings = Settings(retain_originals_s=10, retain_stems_s=10, retain_records_s=1000)
    report = sweep(store, storage, settings, now=t0 + 20)
    assert report.postponed == 1 and storage.size(asset.object_key) is not None  # the mastering still reads it
    m.status, m.finished_at = JobStatus.failed, t0 + 21
    store.masterings.update(m)
    report = sweep(store, storage, settings, now=t0 + 22)
    assert report.originals == 1 and storage.size(asset.object_key) is None


@pytest.mark.drill
def test_a_worker_killed_mid_mastering_loses_nothing(tmp_path, redis_url, s3_url):
    """SIGKILL the pool process mid-way: the mastering runs again (its outbox entry, or the broker's redelivery),
    completes once, metered once, with exactly one WAV stored."""
    s = ServiceStack(
        tmp_path,
        redis_url,
        s3_url,
        STEMS_REAPER_INTERVAL_S="0.5",
        STEMS_ENQUEUE_GRACE_S="2",
        STEMS_TIME_LIMIT_BASE_S="3",
        STEMS_TIME_LIMIT_PER_AUDIO_S="2",
        STEMS_TIME_LIMIT_GRACE_S="1",
    )
    try:
        s.start_api()
        worker = s.start_worker("cpu", "mw")
        # hot (the limiter works) and long enough that the kill lands mid-way on a fast, quiet CPU too: 30 s
        # was mastered within the second the test waited after seeing it start (#24)
        song = write_audio(tmp_path / "long.wav", tone_mix(150.0, SR) * 2.5, SR)
        with s.client("killed") as c:
            audio = upload(c, song)["audio_id"]
            mid = c.post("/master-audio", json={"audio_id": audio, "preset": "loud"}).json()["mastered_id"]
            wait_for(c, f"/status/mastered/{mid}", {"processing", "complete", "failed"}, 60)
            time.sleep(0.5)  # into the first pass (it reads and measures the source)
            assert c.get(f"/status/mastered/{mid}").json()["status"] == "processing"
            for child in child_pids(worker.pid):
                os.kill(child, signal.SIGKILL)
            done = wait_for(c, f"/status/mastered/{mid}", TERMINAL, 240)
            assert done["status"] == "complete", done
            assert s.store.tries("master", mid) == 2
            assert s.objects(f"users/killed/jobs/{mid}/") == [f"users/killed/jobs/{mid}/mastered.wav"]
            assert c.get("/usage").json()["minutes"] == pytest.approx(2.5, abs=1e-3)  # counted once
            assert not s.store.owes("master", mid)
            assert abs(done["measured"]["integrated_lufs"] + 9.0) <= 0.5
    finally:
        s.stop()
