"""Licences through the API: a deployment that declares commercial use skips chains whose weights do not allow it.

The same model store (a random stand-in for htdemucs, whose real weights are "provided only
for scientific purposes") serves 2_tracks with htdemucs under the default declared use
(research), and under STEMS_DECLARED_USE=commercial skips that chain: GET /presets says so,
the preset falls to the DSP fallback, 4_tracks (all of whose chains need such models) is
refused with a 422 that names the licence, and a job's stems give the licence of what made them.
"""

from __future__ import annotations

import pytest

from pipelines.modelstore import ModelStore
from tests.support import ServiceStack, tone_mix, upload, wait_for, write_audio

pytest.importorskip("demucs")

SR = 44100


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    from tools.random_models import install_random_demucs

    store = ModelStore(tmp_path_factory.mktemp("store"))
    install_random_demucs(store, "htdemucs", seed=1)
    return store


def _serving(stack: ServiceStack, use: str) -> dict:
    """Start the stack's API and a worker holding the store; its presets by name, once it declares `use`."""
    stack.start_api()
    stack.start_worker("cpu,gpu-demucs", "w")
    with stack.client() as c:
        r = c.get("/presets")
    assert r.status_code == 200 and r.json()["declared_use"] == use, r.text
    return {p["name"]: p for p in r.json()["presets"]}


@pytest.mark.timeout(600)
def test_declared_commercial_use_skips_chains_whose_licence_does_not_allow_it(store, tmp_path, redis_url, s3_url):
    research = ServiceStack(tmp_path / "research", redis_url, s3_url, model_dir=store.root)
    try:
        by_name = _serving(research, "research")
        assert by_name["2_tracks"]["chain"] == ["htdemucs"] and not by_name["2_tracks"]["dsp_fallback"]
        assert by_name["2_tracks"]["licence_refused"] == [] and by_name["4_tracks"]["available"]
    finally:
        research.stop()

    commercial = ServiceStack(
        tmp_path / "commercial", redis_url, s3_url, model_dir=store.root, STEMS_DECLARED_USE="commercial"
    )
    try:
        by_name = _serving(commercial, "commercial")
        two = by_name["2_tracks"]
        assert two["available"] and two["chain"] == ["dsp.repet_sim"] and two["dsp_fallback"]
        assert {"htdemucs", "htdemucs_ft", "hdemucs_mmi"} <= set(two["licence_refused"])
        four = by_name["4_tracks"]
        assert not four["available"] and "htdemucs" in four["licence_refused"]
        assert four["install_command"] is None  # no download can make it servable here

        path = write_audio(tmp_path / "mix.wav", tone_mix(3.0, SR), SR)
        with commercial.client() as c:
            aid = upload(c, path)["audio_id"]
            refused = c.post("/create-stems", json={"preset": "4_tracks", "audio_id": aid})
            assert refused.status_code == 422 and "licence" in refused.text and "commercial" in refused.text
            assert c.get("/stem_split").json()["items"] == []  # the refusal created nothing
            job = c.post("/create-stems", json={"preset": "2_tracks", "audio_id": aid}).json()
            status = wait_for(c, f"/status/stem_split/{job['creation_id']}", {"complete", "failed"}, 300)
        assert status["status"] == "complete", status
        for stem in status["stems"]:
            assert stem["made_by"] == "dsp.repet_sim"
            assert [lic["model"] for lic in stem["licence"]] == ["dsp.repet_sim"]
            assert stem["licence"][0]["commercial_use"] == "yes" and stem["licence"][0]["source"]
    finally:
        commercial.stop()


def test_stems_split_follows_the_declared_use_as_the_api_does(store, tmp_path):
    """`stems split` on the same store: the default picks htdemucs; under commercial use it falls to the DSP
    fallback, and a chain asked for by name whose licence does not allow it is refused, saying why."""
    import os
    import subprocess
    import sys

    from tests.support import ROOT

    src = write_audio(tmp_path / "mix.wav", tone_mix(2.0, SR), SR)

    def split(use: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "stems.cli",
                "split",
                str(src),
                "--preset",
                "2_tracks",
                "--out",
                str(tmp_path / use),
                "--model-dir",
                str(store.root),
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "STEMS_DECLARED_USE": use, "PYTHONPATH": str(ROOT)},
        )

    research = split("research")
    assert research.returncode == 0, research.stderr
    assert {line.split("\t")[1] for line in research.stdout.splitlines() if "\t" in line} == {"htdemucs"}
    commercial = split("commercial")
    assert commercial.returncode == 0, commercial.stderr
    assert {line.split("\t")[1] for line in commercial.stdout.splitlines() if "\t" in line} == {"dsp.repet_sim"}
    named = split("commercial", "--chain", "htdemucs")
    assert named.returncode != 0 and "licence" in named.stderr and "commercial" in named.stderr, named.stderr
