"""Fidelity to the reference implementations through `stems split` and through a worker.

For each Demucs model id, a small randomly initialised model saved in Demucs's own format and
installed in a model store gives the same stems as demucs's own loading + apply_model; an ONNX
MDX-style model gives the same as a plain STFT -> ONNX -> inverse-STFT loop; a BS-RoFormer and a
Mel-Band RoFormer saved as Music-Source-Separation-Training saves them (state dict + YAML) and
installed with `stems models install` give the same as MSST's inference (tools/reference.py).
Output is 32-bit float WAV, so the comparison sees the model's numbers, not a quantiser's.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from pipelines.modelstore import ModelStore
from pipelines.registry import FAMILIES, get_spec
from tests.support import ROOT, ServiceStack, upload, wait_for, write_audio

pytest.importorskip("demucs")

SR = 44100
TOL = 1e-4
SMALL_MDX = dict(n_fft=512, hop=128, dim_f=192, dim_t=32, segment_frames=32, overlap=0.25)

# preset -> (models in the store, how to compute the reference stems)
CASES = {
    "htdemucs": "4_tracks",
    "htdemucs_ft": "4_tracks",
    "hdemucs_mmi": "4_tracks",
    "htdemucs_6s": "6_tracks",
    "drumsep_5": "5_drums_tracks",
    "mdx_strings": "modern_bowed_strings",
    "bs_roformer_viperx_1297": "2_tracks",
    "mel_band_roformer_karaoke": "lead_back",
}


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    audio = (0.1 * np.random.default_rng(5).standard_normal((2, 3 * SR))).astype(np.float32)
    path = write_audio(tmp_path_factory.mktemp("mix") / "mix.wav", audio, SR, "FLOAT")
    return path, audio


def _store(tmp, model_id: str) -> ModelStore:
    from tools.onnx_models import install_random_onnx
    from tools.random_models import install_random_demucs

    store = ModelStore(tmp / f"store-{model_id}")
    if model_id == "drumsep_5":
        install_random_demucs(store, "htdemucs", seed=1)
    if model_id == "mel_band_roformer_karaoke":  # lead_back: the vocals from Mel-Band RoFormer, then karaoke
        _cli_install_roformer(store, "mel_band_roformer_kj", tmp, seed=4)
    if get_spec(model_id).family == "demucs":
        install_random_demucs(store, model_id, seed=2)
    elif get_spec(model_id).family == "roformer":
        _cli_install_roformer(store, model_id, tmp, seed=5)
    else:
        install_random_onnx(store, model_id, seed=3, params=SMALL_MDX)
    return store


def _cli_install_roformer(store: ModelStore, model_id: str, tmp, seed: int) -> None:
    """A random stand-in written as MSST writes one, installed as a user installs a download: `stems models install`."""
    from tools.roformer_models import make_random_roformer

    files = make_random_roformer(model_id, tmp / f"made-{model_id}", seed=seed)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "models",
            "install",
            model_id,
            *map(str, files),
            "--model-dir",
            str(store.root),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def _reference(store: ModelStore, model_id: str, audio: np.ndarray, tmp) -> dict[str, np.ndarray]:
    from tools.reference import demucs_reference, mdx_reference, roformer_reference

    if model_id == "mel_band_roformer_karaoke":
        vocals = roformer_reference(store, "mel_band_roformer_kj", audio)["vocals"]
        return roformer_reference(store, model_id, vocals)
    if get_spec(model_id).family == "roformer":
        return roformer_reference(store, model_id, audio)
    if model_id == "drumsep_5":
        drums = demucs_reference(store, "htdemucs", audio, tmp / "a")["drums"]
        return demucs_reference(store, "drumsep_5", drums, tmp / "b")
    if model_id == "mdx_strings":
        strings = mdx_reference(store.root / "mdx_strings.onnx", audio, SMALL_MDX, 1)[0]
        return {"strings": strings, "other": audio - strings}
    return demucs_reference(store, model_id, audio, tmp / "r")


@pytest.mark.parametrize("model_id", list(CASES))
def test_cli_and_worker_match_the_reference(model_id, mix, tmp_path, redis_url, s3_url):
    path, audio = mix
    store = _store(tmp_path, model_id)
    expected = _reference(store, model_id, audio, tmp_path)
    preset = CASES[model_id]

    out = tmp_path / "cli"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "split",
            str(path),
            "--preset",
            preset,
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
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    cli = {p.stem: sf.read(p, dtype="float32", always_2d=True)[0].T for p in out.glob("*.wav")}
    assert set(cli) == set(expected)
    for name, ref in expected.items():
        assert np.max(np.abs(cli[name] - ref)) <= TOL, (model_id, name, np.max(np.abs(cli[name] - ref)))

    stack = ServiceStack(tmp_path / "svc", redis_url, s3_url, model_dir=store.root)
    stack.start_api()
    queue = FAMILIES[get_spec(model_id).family].queue
    stack.start_worker(f"cpu,{queue}", "gpu")  # cpu too: the import runs there
    try:
        with stack.client() as c:
            aid = upload(c, path)["audio_id"]
            job = c.post(
                "/create-stems",
                json={"preset": preset, "audio_id": aid, "bit_depth": 32, "hq_streaming_format": "none"},
            ).json()
            status = wait_for(c, f"/status/stem_split/{job['creation_id']}", {"complete", "failed"}, 300)
            assert status["status"] == "complete", status
            for stem in status["stems"]:
                data, sr = sf.read(io.BytesIO(c.get(stem["download"]["wav"]).content), dtype="float32", always_2d=True)
                assert sr == SR
                diff = np.max(np.abs(data.T - expected[stem["name"]]))
                assert diff <= TOL, (model_id, stem["name"], diff)
    finally:
        stack.stop()
