"""`stems split` runs the worker's own path: the same request gives the same samples locally and through the service."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.support import ROOT, tone_mix, upload, wait_for, write_audio

SR = 44100

CASES = {
    "custom, mid_sides, selection and spans": (
        {
            "preset": "custom",
            "prompt": " Drums ",
            "stereo_mode": "mid_sides",
            "selection": {"start": 0.5, "end": 3.5},
            "spans": [{"start": 1.0, "end": 2.5}],
        },
        [
            "--preset",
            "custom",
            "--prompt",
            " Drums ",
            "--stereo-mode",
            "mid_sides",
            "--selection",
            "0.5:3.5",
            "--spans",
            "1.0:2.5",
        ],
    ),
    "custom, mono": (
        {"preset": "custom", "prompt": "drums", "stereo_mode": "mono"},
        ["--preset", "custom", "--prompt", "drums", "--stereo-mode", "mono"],
    ),
    "restoration at 0.6": (
        {"preset": "phantom_center", "restoration_params": {"preset": "universal_enhancer", "strength": 0.6}},
        ["--preset", "phantom_center", "--restore", "universal_enhancer:0.6"],
    ),
}


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("cw") / "song.flac", tone_mix(4.0, SR, seed=3), SR, "PCM_24")


def _read(data) -> np.ndarray:
    return sf.read(data, dtype="float32", always_2d=True)[0].T


@pytest.mark.parametrize("case", list(CASES))
def test_cli_gives_the_workers_samples(stack, song, tmp_path, case):
    body, argv = CASES[case]
    with stack.client() as c:
        aid = upload(c, song)["audio_id"]
        r = c.post("/create-stems", json={**body, "audio_id": aid, "bit_depth": 32, "hq_streaming_format": "none"})
        assert r.status_code == 200, r.text
        status = wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", {"complete", "failed"})
        assert status["status"] == "complete", status
        worker = {
            s["name"]: _read(io.BytesIO(c.get(s["download"]["wav"]).content))
            for s in status["stems"] + status["upscaled_audios"]
        }
        made_by = status["models"]

    out = tmp_path / "out"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "split",
            str(song),
            "--out",
            str(out),
            "--bit-depth",
            "32",
            "--model-dir",
            str(tmp_path / "models"),
            *argv,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    local = {p.stem: _read(p) for p in out.glob("*.wav")}
    assert set(local) == set(worker) and len(worker) >= 2
    for name in worker:
        assert local[name].shape == worker[name].shape, name
        assert np.array_equal(local[name], worker[name]), (name, np.max(np.abs(local[name] - worker[name])))
    printed = dict(line.split("\t") for line in cli.stdout.splitlines())  # each stem's file and the model behind it
    assert {out / f"{n}.wav": m for n, m in made_by.items()} == {type(out)(p): m for p, m in printed.items()}
    assert not list(out.glob(".stems-work-*"))  # scratch removed
