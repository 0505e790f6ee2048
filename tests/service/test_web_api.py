"""What the page needs from the API: peaks, the paginated split list, download links, the page itself."""

from __future__ import annotations

import io
import json
import re
import time

import numpy as np
import pytest
import soundfile as sf

from api.schemas import Peaks
from pipelines.jobspec import SplitSpec
from pipelines.peaks import resolution
from stems.models import Job
from tests.support import ROOT, tone_mix, upload, wait_for, write_audio

SR = 44100


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("song") / "song.wav", tone_mix(3.0, SR), SR, "PCM_24")


@pytest.fixture(scope="module")
def split(stack, song):
    """One finished phantom_center split: (client, audio status, split status)."""
    with stack.client("webapi") as c:
        asset = upload(c, song)
        r = c.post(
            "/create-stems",
            json={
                "preset": "phantom_center",
                "audio_id": asset["audio_id"],
                "selection": {"start": 0.5, "end": 2.5},
                "hq_streaming_format": "mp3",
            },
        )
        assert r.status_code == 200, r.text
        status = wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", {"complete", "failed", "cancelled"})
        assert status["status"] == "complete", status
        yield c, asset, status


def minmax(audio: np.ndarray, spp: int) -> np.ndarray:
    """(points, channels, 2) min and max of runs of `spp` frames, in -1..1."""
    points = -(-audio.shape[1] // spp)
    return np.array(
        [
            [[ch[i * spp : (i + 1) * spp].min(), ch[i * spp : (i + 1) * spp].max()] for ch in audio]
            for i in range(points)
        ]
    )


def check_peaks(body: dict, audio: np.ndarray) -> None:
    peaks = Peaks.model_validate(body)  # the documented schema
    assert peaks.channels == audio.shape[0] and peaks.sample_rate == SR and peaks.bits == 16
    assert peaks.samples_per_pixel == resolution(audio.shape[1])
    data = np.array(peaks.data, dtype=np.float64).reshape(peaks.length, peaks.channels, 2) / 32767
    np.testing.assert_allclose(data, minmax(audio, peaks.samples_per_pixel), atol=2 / 32767)


def test_peaks_of_the_source_and_of_each_stem(split, song):
    c, asset, status = split
    r = c.get(f"/audio/{asset['audio_id']}/peaks")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    source, _ = sf.read(song, dtype="float32", always_2d=True)
    check_peaks(r.json(), source.T)
    for stem in status["stems"]:
        r = c.get(f"/stem/{stem['stem_id']}/peaks")
        assert r.status_code == 200
        wav, _ = sf.read(io.BytesIO(c.get(stem["download"]["wav"]).content), dtype="float32", always_2d=True)
        check_peaks(r.json(), wav.T)  # peaks of the stem as stored (2 s: the selection)


def test_peaks_of_other_users_and_unknown_ids_are_not_found(stack, split):
    _, asset, status = split
    with stack.client("mallory") as other:
        assert other.get(f"/audio/{asset['audio_id']}/peaks").status_code == 404
        assert other.get(f"/stem/{status['stems'][0]['stem_id']}/peaks").status_code == 404
        r = other.get("/stem/00000000-0000-4000-8000-000000000000/peaks")
        assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_the_split_list_is_the_callers_newest_first_in_pages(stack, song):
    with stack.client("lister") as c, stack.client("someone-else") as other:
        audio_id = upload(c, song)["audio_id"]
        other_id = upload(other, song)["audio_id"]
        made = []
        for _ in range(5):
            r = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": audio_id})
            assert r.status_code == 200, r.text
            made.append(r.json()["creation_id"])
        assert other.post("/create-stems", json={"preset": "phantom_center", "audio_id": other_id}).status_code == 200
        seen, cursor, pages = [], None, 0
        while True:
            r = c.get("/stem_split", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page["items"]) <= 2
            seen += [i["creation_id"] for i in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == made[::-1] and pages == 3  # newest first, each once, only the caller's
        first = c.get("/stem_split", params={"limit": 1}).json()["items"][0]
        assert first["filename"] == "song.wav" and first["preset"] == "phantom_center"
        assert set(first) >= {"status", "progress", "stage", "stems", "created_at"}
        for bad in ({"limit": 0}, {"limit": 101}, {"cursor": "not-a-cursor"}, {"cursor": "bmFufDEyMw"}):
            r = c.get("/stem_split", params=bad)
            assert r.status_code == 422, (bad, r.text)
        assert c.get("/stem_split", params={"cursor": "not-a-cursor"}).json()["field"] == "cursor"
        for creation_id in made:  # leave no queue behind for the other tests
            wait_for(c, f"/status/stem_split/{creation_id}", {"complete", "failed", "cancelled"})


def test_the_cursor_is_exact_when_jobs_share_a_created_at(stack):
    """Jobs made in the same instant still page without a gap or a repeat (ids break the tie)."""
    at = time.time()
    jobs = [
        Job(
            user_id="ties",
            audio_id="a",
            source_kind="audio",
            source_id="a",
            spec=SplitSpec(preset="phantom_center"),
            queue="cpu",
            created_at=at if i < 4 else at - 1,
        )
        for i in range(6)
    ]
    for job in jobs:
        stack.store.create_job(job, [])
    seen, before = [], None
    while True:
        rows = stack.store.list_jobs("ties", 3, before)
        if not rows:
            break
        seen += [job_id for job_id, _ in rows]
        before = (rows[-1][1], rows[-1][0])
    tied = sorted((j.id for j in jobs[:4]), reverse=True)
    assert seen == tied + sorted((j.id for j in jobs[4:]), reverse=True)


def test_download_links_work_without_the_key_for_that_stem_only(stack, split):
    c, _, status = split
    centre, sides = status["stems"]
    r = c.post("/download-links", json={"stem_ids": [centre["stem_id"]], "format": "wav"})
    assert r.status_code == 200, r.text
    link = r.json()["links"][0]
    assert link["expires_at"] > time.time() + 3000
    assert c.headers["x-api-key"] not in link["url"]
    import httpx

    with httpx.Client(base_url=stack.base, timeout=30) as anonymous:  # no key: a media element
        wav = anonymous.get(link["url"])
        assert wav.status_code == 200 and wav.content == c.get(centre["download"]["wav"]).content
        part = anonymous.get(link["url"], headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == wav.content[:100]
        token = re.search(r"token=([^&]+)", link["url"]).group(1)
        for url in (
            f"/download/stem/{sides['stem_id']}?token={token}",  # another stem
            f"/download/stem/{centre['stem_id']}?format=hq&token={token}",  # another format
            f"/download/stem/{centre['stem_id']}?token=dl_forged",
        ):
            r = anonymous.get(url)
            assert r.status_code == 401 and "download link" in r.json()["detail"], url
        assert anonymous.get(f"/download/stem/{centre['stem_id']}").status_code == 401  # neither key nor token
    hq = c.post("/download-links", json={"stem_ids": [centre["stem_id"], sides["stem_id"]], "format": "hq"})
    assert hq.status_code == 200 and [link["stem_id"] for link in hq.json()["links"]] == [
        centre["stem_id"],
        sides["stem_id"],
    ]
    with stack.client("mallory") as other:
        r = other.post("/download-links", json={"stem_ids": [centre["stem_id"]]})
        assert r.status_code == 404
    assert c.post("/download-links", json={"stem_ids": []}).status_code == 422


def test_the_page_and_its_modules_are_served(stack):
    import httpx

    r = httpx.get(stack.base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["referrer-policy"] == "no-referrer"
    for module in (
        "app.js",
        "api.js",
        "mixer.js",
        "waveform.js",
        "style.css",
        "vendor/wavesurfer.esm.js",
        "vendor/regions.esm.js",
    ):
        m = httpx.get(f"{stack.base}/static/{module}")
        assert m.status_code == 200 and len(m.content) > 500, module
    assert "/" not in httpx.get(stack.base + "/openapi.json").json()["paths"]


def test_the_vendored_front_end_is_the_locked_one():
    """api/static/vendor is what `make web` copies from the npm lock file's packages."""
    lock = json.loads((ROOT / "web" / "package-lock.json").read_text())
    locked = lock["packages"]["node_modules/wavesurfer.js"]["version"]
    assert json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]["wavesurfer.js"] == locked
    assert (ROOT / "api" / "static" / "vendor" / "VERSIONS").read_text().split() == ["wavesurfer.js", locked]


def test_openapi_documents_the_new_calls(stack):
    import httpx

    doc = httpx.get(stack.base + "/openapi.json").json()
    paths = doc["paths"]
    assert "get" in paths["/stem_split"] and {p["name"] for p in paths["/stem_split"]["get"]["parameters"]} >= {
        "limit",
        "cursor",
    }
    assert paths["/stem/{stem_id}/peaks"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Peaks"
    }
    assert "/audio/{audio_id}/peaks" in paths and "/download-links" in paths
    assert "token" in {p["name"] for p in paths["/download/stem/{stem_id}"]["get"]["parameters"]}
    assert "group" in doc["components"]["schemas"]["PresetInfo"]["properties"]
