"""A stem whose stored object is gone (deleted behind the service's back, lost by storage): every
answer is a clear 410 `object_missing` that names no storage key, never a 200 that breaks off, and
a zip that cannot be built leaves nothing behind."""

from __future__ import annotations

import pytest

from stems.storage import make_storage
from tests.support import start_job, tone_mix, wait_for, write_audio

SR = 44100


@pytest.fixture(scope="module")
def lost_stem(stack, tmp_path_factory):
    """A complete phantom_center split, and its first stem with the WAV object deleted."""
    song = write_audio(tmp_path_factory.mktemp("lost") / "a.wav", tone_mix(2.0, SR), SR)
    with stack.client("lost") as c:
        job_id = start_job(c, song, preset="phantom_center")
        status = wait_for(c, f"/status/stem_split/{job_id}", {"complete", "failed"}, 120)
    assert status["status"] == "complete", status
    stem = stack.store.get_stem(status["stems"][0]["stem_id"])
    make_storage(stack.settings()).delete(stem.wav_key)
    return job_id, stem


def test_a_stem_whose_object_is_missing_answers_410_before_any_body(stack, lost_stem):
    job_id, stem = lost_stem
    with stack.client("lost") as c:
        r = c.get(f"/download/stem/{stem.id}")  # the old code: 200, then the connection broke off
        assert r.status_code == 410, (r.status_code, r.headers)
        assert r.json()["code"] == "object_missing"
        assert "users/" not in r.text and stem.wav_key not in r.text


def test_an_archive_with_a_missing_object_answers_410_and_leaves_no_zip(stack, lost_stem):
    job_id, stem = lost_stem
    tmp = stack.settings().data_dir / "tmp"
    before = sorted(tmp.glob("*.zip"))
    with stack.client("lost") as c:
        for body in ({"creation_id": job_id}, {"stem_ids": [stem.id]}):
            r = c.post("/download-archive", json=body)  # the old code: 400 echoing the object's key
            assert r.status_code == 410 and r.json()["code"] == "object_missing", r.text
            assert "users/" not in r.text and "svc/" not in r.text
    assert sorted(tmp.glob("*.zip")) == before  # the old code left each half-built zip in data/tmp
