"""The prompt-guided `custom` preset: prompts naming an installed chain's stem are routed to it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from pipelines import audio as A
from tests.support import tone_mix, upload, wait_for, write_audio

SR = 44100


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("c") / "c.wav", tone_mix(4.0, SR), SR, "FLOAT")


def _stems(c, status) -> dict[str, np.ndarray]:
    return {
        s["name"]: sf.read(io.BytesIO(c.get(s["download"]["wav"]).content), dtype="float32", always_2d=True)[0].T
        for s in status["stems"]
    }


@pytest.mark.parametrize("stereo_mode", ["mono", "left_right", "mid_sides"])
def test_routed_prompt_gives_target_and_residual(stack, song, stereo_mode):
    with stack.client() as c:
        aid = upload(c, song)["audio_id"]
        r = c.post(
            "/create-stems",
            json={
                "preset": "custom",
                "audio_id": aid,
                "prompt": "  the DRUMS please ",
                "stereo_mode": stereo_mode,
                "bit_depth": 32,
            },
        )
        assert r.status_code == 200, r.text
        assert [s["name"] for s in r.json()["audio_stems"]] == ["target", "residual"]
        status = wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", {"complete", "failed"})
        assert status["status"] == "complete", status
        assert status["models"]["target"] == "dsp.hpss"  # drums: the HPSS fallback is what is installed here
        stems = _stems(c, status)
        source, _ = A.decode(song)
        assert stems["target"].shape == source.shape  # every mode gives the stems in the source's channel layout
        assert np.max(np.abs(stems["target"] + stems["residual"] - source)) < 1e-5  # target + residual = the source
        if stereo_mode == "mono":  # extracted from the downmix: the same target in both channels
            assert np.array_equal(stems["target"][0], stems["target"][1])
        assert np.std(stems["target"]) > 1e-3 and np.std(stems["residual"]) > 1e-3


def test_spans_limit_the_extraction(stack, song):
    with stack.client() as c:
        aid = upload(c, song)["audio_id"]
        r = c.post(
            "/create-stems",
            json={
                "preset": "custom",
                "audio_id": aid,
                "prompt": "drums",
                "bit_depth": 32,
                "selection": {"start": 0.5, "end": 3.5},
                "spans": [{"start": 1.0, "end": 2.0}],
            },
        )
        assert r.status_code == 200, r.text
        status = wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", {"complete", "failed"})
        assert status["status"] == "complete", status
        target = _stems(c, status)["target"]
        assert target.shape[1] == 3 * SR
        inside, outside = target[:, int(0.5 * SR) : int(1.5 * SR)], target[:, int(1.6 * SR) :]
        assert np.max(np.abs(outside)) == 0.0 and np.std(inside) > 1e-3
