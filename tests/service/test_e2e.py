"""End to end over HTTP: upload, split with a selection, poll, download each stem and the zip."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import soundfile as sf

from pipelines import audio as A
from tests.support import tone_mix, upload, wait_for, write_audio

SR = 44100
CREATE_KEYS = {"status", "message", "audio_id", "user_id", "creation_id", "audio_stems", "upscaled_audios"}


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    path = tmp_path_factory.mktemp("song") / "song.flac"
    return write_audio(path, tone_mix(6.0, SR), SR, "PCM_24", "FLAC")


@pytest.mark.parametrize("bit_depth,subtype,hq", [(24, "PCM_24", "aac"), (16, "PCM_16", "mp3"), (32, "FLOAT", "flac")])
def test_split_round_trip(stack, song, bit_depth, subtype, hq):
    with stack.client() as c:
        asset = upload(c, song)
        assert asset["status"] == "complete", asset
        assert asset["sample_rate"] == SR and asset["channels"] == 2 and asset["codec"] == "flac"
        assert asset["duration"] == pytest.approx(6.0, abs=1e-6)

        r = c.post(
            "/create-stems",
            json={
                "preset": "phantom_center",
                "audio_id": asset["audio_id"],
                "selection": {"start": 1.0, "end": 4.5},
                "bit_depth": bit_depth,
                "hq_streaming_format": hq,
            },
        )
        assert r.status_code == 200, r.text
        queued = r.json()
        assert set(queued) == CREATE_KEYS
        assert queued["status"] == "processing" and queued["message"] == "Stem separation queued"
        assert [s["name"] for s in queued["audio_stems"]] == ["centre", "sides"]

        status = wait_for(c, f"/status/stem_split/{queued['creation_id']}", {"complete", "failed", "cancelled"})
        assert status["status"] == "complete", status
        assert status["progress"] == 1.0
        assert status["models"] == {"centre": "dsp.centre", "sides": "dsp.centre"}
        assert [s["stem_id"] for s in status["stems"]] == [s["stem_id"] for s in queued["audio_stems"]]

        source, _ = A.decode(song, 1.0, 4.5)
        total = np.zeros_like(source)
        for stem in status["stems"]:
            wav = c.get(stem["download"]["wav"])
            assert wav.status_code == 200
            assert wav.headers["content-type"] == "audio/wav"
            info = sf.info(io.BytesIO(wav.content))
            assert (info.samplerate, info.channels, info.subtype) == (SR, 2, subtype)
            assert info.frames == round(3.5 * SR)  # duration equals the selection
            assert stem["duration"] == pytest.approx(3.5) and stem["size"] == len(wav.content)
            data, _ = sf.read(io.BytesIO(wav.content), dtype="float32", always_2d=True)
            total += data.T
            encoded = c.get(stem["download"]["hq"])
            assert encoded.status_code == 200 and len(encoded.content) == stem["hq_size"]
            part = c.get(stem["download"]["wav"], headers={"Range": "bytes=100-1099"})
            assert part.status_code == 206 and part.content == wav.content[100:1100]
            assert part.headers["content-range"] == f"bytes 100-1099/{len(wav.content)}"
        # centre + sides partition the mix: they sum back to the trimmed source
        tolerance = {16: 2e-4, 24: 1e-5, 32: 1e-6}[bit_depth]
        assert np.max(np.abs(total - source)) < tolerance

        z = c.post("/download-archive", json={"creation_id": queued["creation_id"], "format": "wav"})
        assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
            assert sorted(zf.namelist()) == ["centre.wav", "sides.wav"]
            assert zf.read("centre.wav") == c.get(status["stems"][0]["download"]["wav"]).content

        z = c.post("/download-archive", json={"stem_ids": [status["stems"][1]["stem_id"]], "format": "hq"})
        assert z.status_code == 200
        with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
            assert zf.namelist() == [f"sides.{A.hq_extension(hq)}"]


def test_split_of_a_stem_and_restoration(stack, song):
    """A stem can be split again (stem_id), and restoration makes an upscaled copy of each stem."""
    with stack.client() as c:
        asset = upload(c, song)
        first = c.post(
            "/create-stems",
            json={
                "preset": "phantom_center",
                "audio_id": asset["audio_id"],
                "restoration_params": {"preset": "universal_enhancer", "strength": 0.5},
            },
        ).json()
        assert len(first["upscaled_audios"]) == 2
        status = wait_for(c, f"/status/stem_split/{first['creation_id']}", {"complete", "failed"})
        assert status["status"] == "complete", status
        assert {u["name"] for u in status["upscaled_audios"]} == {"centre_restored", "sides_restored"}
        assert all(u["made_by"] == "dsp.universal_enhancer" for u in status["upscaled_audios"])
        sides = status["stems"][1]["stem_id"]
        again = c.post(
            "/create-stems", json={"preset": "phantom_center", "stem_id": sides, "audio_id": asset["audio_id"]}
        ).json()
        assert again["audio_id"] == asset["audio_id"]
        done = wait_for(c, f"/status/stem_split/{again['creation_id']}", {"complete", "failed"})
        assert done["status"] == "complete", done
        up = status["upscaled_audios"][0]["stem_id"]
        third = c.post("/create-stems", json={"preset": "phantom_center", "upscaled_id": up})
        assert third.status_code == 200, third.text
        assert (
            wait_for(c, f"/status/stem_split/{third.json()['creation_id']}", {"complete", "failed"})["status"]
            == "complete"
        )
