"""A GPU pool scaled to zero (infra/k8s/workers.yaml: minReplicaCount 0) still serves its presets.

Its jobs are accepted and queued, and counted on the queue's load list (what KEDA reads), so the
autoscaler brings a worker up, which runs them.
"""
from __future__ import annotations

import time

import pytest

from pipelines.modelstore import ModelStore
from tests.support import ServiceStack, tone_mix, upload, wait_for, write_audio

SR = 44100


@pytest.fixture(scope="module")
def pools(tmp_path_factory, redis_url, s3_url):
    from tools.random_models import install_random_demucs

    tmp = tmp_path_factory.mktemp("zero")
    gpu_models = ModelStore(tmp / "gpu-models")
    install_random_demucs(gpu_models, "htdemucs", size="small")
    s = ServiceStack(tmp, redis_url, s3_url, model_dir=tmp / "cpu-models")  # the API's own store is empty
    s.gpu_models = gpu_models.root
    s.start_api()
    s.start_worker("cpu", "cpu")
    yield s
    s.stop()


def test_a_preset_whose_pool_is_at_zero_is_queued_and_runs_when_the_pool_scales_up(pools, tmp_path):
    demucs = pools.start_worker("gpu-demucs", "demucs", STEMS_MODEL_DIR=str(pools.gpu_models))
    demucs.stop()  # the pool scales to zero: its worker goes, and so does its report
    assert not [w for w in pools.store.live_workers() if "gpu-demucs" in w["queues"]]
    time.sleep(2.5)  # past the API's cache of the reports
    path = write_audio(tmp_path / "a.wav", tone_mix(2.0, SR), SR)
    with pools.client() as c:
        aid = upload(c, path)["audio_id"]
        r = c.post("/create-stems", json={"preset": "4_tracks", "audio_id": aid})
        assert r.status_code == 200, r.text  # the old code: 422, "no worker holds models ['htdemucs']"
        preset = {p["name"]: p for p in c.get("/presets").json()["presets"]}["4_tracks"]
        assert preset["available"] and preset["queue"] == "gpu-demucs", preset
        job_id = r.json()["creation_id"]
        time.sleep(1.0)
        assert c.get(f"/status/stem_split/{job_id}").json()["status"] == "queued"
        load = pools.store.r.lrange(pools.store.k("load", "gpu-demucs"), 0, -1)
        assert [i.decode() for i in load] == [job_id]  # KEDA's Redis list trigger sees one job waiting
        pools.start_worker("gpu-demucs", "demucs2", STEMS_MODEL_DIR=str(pools.gpu_models))  # KEDA scales up
        status = wait_for(c, f"/status/stem_split/{job_id}", {"complete", "failed"}, 240)
        assert status["status"] == "complete", status
        assert status["worker"].startswith("demucs2@") and status["attempts"] == 1, status
        assert pools.store.load("gpu-demucs") == 0


def test_a_queue_nobody_ever_served_is_still_refused(pools, tmp_path):
    path = write_audio(tmp_path / "a.wav", tone_mix(1.0, SR), SR)
    with pools.client() as c:
        aid = upload(c, path)["audio_id"]
        r = c.post("/create-stems", json={"preset": "5_drums_tracks", "audio_id": aid})
        assert r.status_code == 422 and "drumsep_5" in r.json()["missing_models"], r.text
