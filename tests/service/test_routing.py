"""Routing: each job runs on a worker that serves its preset's queue and holds its chain; a pool scaled to
zero (infra/k8s/workers.yaml: minReplicaCount 0) still takes its presets' jobs, counted on its load list
(what KEDA reads), and its next worker runs them."""

from __future__ import annotations

import time

import pytest

from pipelines.modelstore import ModelStore
from tests.support import ServiceStack, tone_mix, upload, wait_for, write_audio

SR = 44100


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, redis_url, s3_url):
    from tools.random_models import install_random_demucs

    tmp = tmp_path_factory.mktemp("routing")
    gpu_models = ModelStore(tmp / "gpu-models")
    install_random_demucs(gpu_models, "htdemucs", size="small")
    s = ServiceStack(tmp, redis_url, s3_url, model_dir=tmp / "cpu-models")  # the API's own store is empty
    s.start_api()
    s.start_worker("cpu", "cpu")
    s.gpu_models = gpu_models.root
    s.demucs = s.start_worker("gpu-demucs", "demucs", STEMS_MODEL_DIR=str(gpu_models.root))
    yield s
    s.stop()


def test_workers_report_their_queues_and_models(two_workers):
    reports = {w.hostname.split("@")[0]: w for w in two_workers.store.live_workers()}
    assert reports["cpu"].queues == ["cpu"] and "htdemucs" not in reports["cpu"].models
    assert reports["demucs"].queues == ["gpu-demucs"] and "htdemucs" in reports["demucs"].models


def test_each_job_runs_on_the_worker_of_its_queue(two_workers, tmp_path):
    path = write_audio(tmp_path / "a.wav", tone_mix(3.0, SR), SR)
    with two_workers.client() as c:
        presets = {p["name"]: p for p in c.get("/presets").json()["presets"]}
        # htdemucs_ft (the first chain) is nowhere; the htdemucs chain is held by the demucs worker
        assert presets["4_tracks"]["available"] and presets["4_tracks"]["chain"] == ["htdemucs"]
        assert presets["4_tracks"]["queue"] == "gpu-demucs"
        assert presets["phantom_center"]["queue"] == "cpu"
        assert not presets["6_tracks"]["available"]
        aid = upload(c, path)["audio_id"]
        jobs = {
            p: c.post("/create-stems", json={"preset": p, "audio_id": aid}).json()["creation_id"]
            for p in ("phantom_center", "4_tracks", "2_tracks", "phantom_center")
        }
        for preset, job_id in jobs.items():
            status = wait_for(c, f"/status/stem_split/{job_id}", {"complete", "failed"}, 180)
            assert status["status"] == "complete", status
            if preset == "phantom_center":  # DSP on the cpu queue, in one stage
                assert status["worker"].startswith("cpu@") and status["delivered_by"] is None, (preset, status)
            else:  # separated on the model's queue, then encoded and stored on the cpu queue
                assert status["worker"].startswith("demucs@"), (preset, status["worker"])
                assert status["delivered_by"].startswith("cpu@"), (preset, status["delivered_by"])
        status = c.get(f"/status/stem_split/{jobs['2_tracks']}").json()
        assert status["models"] == {"vocals": "htdemucs", "instrumental": "htdemucs"}


def test_preset_nobody_serves_is_refused_with_missing_models(two_workers, tmp_path):
    path = write_audio(tmp_path / "a.wav", tone_mix(1.0, SR), SR)
    with two_workers.client() as c:
        aid = upload(c, path)["audio_id"]
        r = c.post("/create-stems", json={"preset": "5_drums_tracks", "audio_id": aid})
        assert r.status_code == 422
        assert "drumsep_5" in r.json()["missing_models"]


# last in the module: it stops the fixture's demucs worker
def test_a_preset_whose_pool_is_at_zero_is_queued_and_runs_when_the_pool_scales_up(two_workers, tmp_path):
    two_workers.demucs.stop()  # the pool scales to zero: its worker goes, and so does its report
    assert not [w for w in two_workers.store.live_workers() if "gpu-demucs" in w.queues]
    time.sleep(2.5)  # past the API's cache of the reports
    path = write_audio(tmp_path / "a.wav", tone_mix(2.0, SR), SR)
    with two_workers.client() as c:
        aid = upload(c, path)["audio_id"]
        r = c.post("/create-stems", json={"preset": "4_tracks", "audio_id": aid})
        assert r.status_code == 200, r.text  # the old code: 422, "no worker holds models ['htdemucs']"
        preset = {p["name"]: p for p in c.get("/presets").json()["presets"]}["4_tracks"]
        assert preset["available"] and preset["queue"] == "gpu-demucs", preset
        job_id = r.json()["creation_id"]
        time.sleep(1.0)
        assert c.get(f"/status/stem_split/{job_id}").json()["status"] == "queued"
        assert two_workers.store.queued("gpu-demucs") == [job_id]  # KEDA's Redis list trigger sees one job waiting
        two_workers.start_worker("gpu-demucs", "demucs2", STEMS_MODEL_DIR=str(two_workers.gpu_models))  # KEDA scales up
        status = wait_for(c, f"/status/stem_split/{job_id}", {"complete", "failed"}, 240)
        assert status["status"] == "complete", status
        assert status["worker"].startswith("demucs2@") and status["attempts"] == 1, status
        assert two_workers.store.load("gpu-demucs") == 0
