"""`custom` with SAM Audio installed on a gpu-sam worker: which prompts go to SAM, which to a chain, and the job itself."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("mlx_audio", reason="the `sam` extra (mlx-audio) is not installed")

from pipelines import audio as A, custom, signals as S
from pipelines.engine import Engine
from pipelines.jobspec import CustomSpec, TimeRange
from pipelines.modelstore import ModelStore
from tests.support import ROOT, ServiceStack, tone_mix, upload, wait_for, write_audio
from tools.sam_models import write_random_sam

SR = 44100
MODEL = "sam-audio-small"
PARAMS = {"steps": 2, "chunk_seconds": 0.24, "overlap_seconds": 0.08}


@pytest.fixture(scope="module")
def sam_stack(tmp_path_factory, redis_url, s3_url):
    tmp = tmp_path_factory.mktemp("sam-stack")
    files = write_random_sam(tmp / "files", MODEL, seed=3)
    sam_models = tmp / "sam-models"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "models",
            "install",
            MODEL,
            *map(str, files.values()),
            "--params",
            json.dumps(PARAMS),
            "--model-dir",
            str(sam_models),
        ],
        check=True,
        capture_output=True,
    )
    s = ServiceStack(tmp, redis_url, s3_url, model_dir=tmp / "cpu-models")
    s.start_api()
    s.start_worker("cpu", "cpu")
    s.start_worker("gpu-sam", "sam", STEMS_MODEL_DIR=str(sam_models))
    yield s, ModelStore(sam_models)
    s.stop()


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("sam-song") / "s.wav", tone_mix(0.8, SR), SR, "FLOAT")


def _create(c, aid, **fields):
    return c.post("/create-stems", json={"preset": "custom", "audio_id": aid, "bit_depth": 32, **fields})


def test_named_stems_stay_on_their_chain_and_other_prompts_go_to_sam(sam_stack, song):
    stack, _ = sam_stack
    with stack.client() as c:
        aid = upload(c, song)["audio_id"]
        drums = _create(c, aid, prompt="the drums")
        assert drums.status_code == 200, drums.text
        job = stack.store.get_job(drums.json()["creation_id"])
        assert job.queue == "cpu" and job.spec.custom.route.preset  # HPSS's chain, as without SAM
        bark = _create(c, aid, prompt="  a dog barking ", sam_model=MODEL, stereo_mode="mid_sides")
        assert bark.status_code == 200, bark.text
        job = stack.store.get_job(bark.json()["creation_id"])
        assert job.queue == "gpu-sam" and job.spec.custom.route is None and job.spec.custom.sam_model == MODEL
        assert job.spec.custom.prompt == "a dog barking"
        absent = _create(c, aid, prompt="a dog barking", sam_model="sam-audio-large")
        assert absent.status_code == 422 and "sam-audio-large" in absent.json()["message"]
        assert "stems models install sam-audio-large" in absent.json()["message"]


def test_a_sam_job_runs_on_the_sam_worker_and_through_the_cli(sam_stack, song, tmp_path):
    stack, store = sam_stack
    with stack.client() as c:
        aid = upload(c, song)["audio_id"]
        r = _create(
            c,
            aid,
            prompt="a dog barking",
            sam_model=MODEL,
            stereo_mode="left_right",
            selection={"start": 0.1, "end": 0.65},
            spans=[{"start": 0.2, "end": 0.3}],
        )
        assert r.status_code == 200, r.text
        status = wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", {"complete", "failed"})
        assert status["status"] == "complete", status
        assert status["models"] == {"target": MODEL, "residual": MODEL}
        assert status["worker"].startswith("sam@")
        got = {
            s["name"]: sf.read(io.BytesIO(c.get(s["download"]["wav"]).content), dtype="float32", always_2d=True)[0].T
            for s in status["stems"]
        }
    source, _ = A.decode(song, 0.1, 0.65)
    spec = CustomSpec(
        prompt="a dog barking", sam_model=MODEL, stereo_mode="left_right", spans=[TimeRange(start=0.2, end=0.3)]
    )
    want = custom.extract(Engine(store), spec, S.ArraySignal(source), SR, None, 0.1, None, lambda: False)
    out = tmp_path / "cli"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "split",
            str(song),
            "--preset",
            "custom",
            "--out",
            str(out),
            "--prompt",
            "a dog barking",
            "--sam-model",
            MODEL,
            "--stereo-mode",
            "left_right",
            "--selection",
            "0.1:0.65",
            "--spans",
            "0.2:0.3",
            "--bit-depth",
            "32",
            "--model-dir",
            str(store.root),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert sorted(cli.stdout.split()) == sorted([str(out / "residual.wav"), MODEL, str(out / "target.wav"), MODEL])
    for stem in ("target", "residual"):
        assert got[stem].shape == source.shape
        assert np.max(np.abs(got[stem] - want[stem].signal.to_array())) < 1e-4
        local = sf.read(out / f"{stem}.wav", dtype="float32", always_2d=True)[0].T
        assert np.array_equal(local, got[stem])  # the CLI runs the worker's path: the same samples
