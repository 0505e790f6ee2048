"""Batches of splits (`POST /create-stems/batch`) against a real API and Redis, and the client and CLI on them.

The first stack has no worker, so what it queues stays queued and the quota is exact; each
item must answer what a single call would (its job, or its error's status and code).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import soundfile as sf

from stems.client import Client
from tests.support import ROOT, ServiceStack, asset_record, tone_mix, write_audio

SR = 44100


@pytest.fixture(scope="module")
def idle(tmp_path_factory, redis_url, s3_url):
    s = ServiceStack(
        tmp_path_factory.mktemp("batch"),
        redis_url,
        s3_url,
        STEMS_MAX_ACTIVE_JOBS="4",
        STEMS_MAX_JOB_OUTPUT_BYTES=str(20 << 20),
    )
    s.start_api()
    yield s
    s.stop()


def test_each_item_answers_what_a_single_call_would(idle):
    with idle.client("b1") as c, idle.client("b1-other") as other:
        audio = asset_record(idle, "b1", 20.0)
        theirs = asset_record(idle, "b1-other", 20.0)
        items = [
            {"preset": "phantom_center", "audio_id": audio},
            {"preset": "nope", "audio_id": audio},
            {"preset": "phantom_center", "audio_id": theirs},  # another tenant's: 404 as alone
            {"preset": "phantom_center", "audio_id": audio, "bit_depth": 12},
            {"preset": "phantom_center", "audio_id": audio, "dry_run": True},
            {"preset": "phantom_center", "audio_id": audio, "selection": {"start": 0, "end": 10}},
        ]
        r = c.post("/create-stems/batch", json={"items": items})
        assert r.status_code == 200, r.text
        got = r.json()["items"]
        assert len(got) == len(items)
        singles = [
            other.post("/create-stems", json=items[1]),
            c.post("/create-stems", json=items[2]),
            c.post("/create-stems", json=items[3]),
        ]
        for item, single in zip(got[1:4], singles):
            assert item["status"] == "error" and item["http_status"] == single.status_code, (item, single.text)
            assert item["code"] == single.json().get("code", "invalid_request")
        assert got[3]["detail"][0]["loc"] == single.json()["detail"][0]["loc"] == ["body", "bit_depth"]
        assert got[4]["dry_run"] is True
        jobs = [got[0]["creation_id"], got[5]["creation_id"]]
        assert [idle.store.get_job(j).audio_seconds for j in jobs] == [20.0, 10.0]  # in order
        assert idle.store.active_jobs("b1") == 2  # the dry run and the refused items took no slot


def test_the_quota_counts_every_item_and_one_key_covers_the_batch(idle):
    with idle.client("b2") as c:
        audio = asset_record(idle, "b2", 5.0)
        items = [{"preset": "phantom_center", "audio_id": audio}] * 6
        r = c.post("/create-stems/batch", json={"items": items}, headers={"Idempotency-Key": "k1"})
        got = r.json()["items"]
        assert ["creation_id" in i for i in got] == [True] * 4 + [False] * 2  # STEMS_MAX_ACTIVE_JOBS=4
        assert {(i["http_status"], i["code"]) for i in got[4:]} == {(429, "rate_limited")}
        assert idle.store.active_jobs("b2") == 4
        again = c.post("/create-stems/batch", json={"items": items}, headers={"Idempotency-Key": "k1"})
        assert again.json() == r.json()  # the recorded answer: nothing new queued
        assert idle.store.active_jobs("b2") == 4
        other = c.post("/create-stems/batch", json={"items": items[:2]}, headers={"Idempotency-Key": "k1"})
        assert other.status_code == 409


def test_the_output_budget_counts_every_item(idle):
    """STEMS_MAX_JOB_OUTPUT_BYTES=20 MiB: each item is checked against it as a single call is."""
    with idle.client("b3") as c:
        audio = asset_record(idle, "b3", 200.0)
        items = [
            {"preset": "phantom_center", "audio_id": audio, "selection": {"start": 0, "end": 10}},
            {"preset": "phantom_center", "audio_id": audio},
        ]  # 200 s x 2 stems x 24-bit: ~100 MiB
        got = c.post("/create-stems/batch", json={"items": items}).json()["items"]
        single = c.post("/create-stems", json=items[1])
        assert "creation_id" in got[0]
        assert (
            (got[1]["http_status"], got[1]["code"])
            == (single.status_code, single.json()["code"])
            == (422, "over_budget")
        )
        assert got[1]["estimated_bytes"] == single.json()["estimated_bytes"]


@pytest.mark.parametrize("body", [{"items": []}, {"items": [{}] * 101}, {"items": "x"}, {}, {"items": [1]}])
def test_bad_batches_are_422_and_change_nothing(idle, body):
    with idle.client("b4") as c:
        r = c.post("/create-stems/batch", json=body)
        assert r.status_code == 422, r.text
        assert idle.store.active_jobs("b4") == 0


def test_client_and_remote_split_of_several_files_use_the_batch(stack, tmp_path):
    """`stems remote split A B` uploads both, queues them in one batch, and downloads each file's stems."""
    songs = [write_audio(tmp_path / f"song{i}.wav", tone_mix(2.0 + i, SR, seed=i), SR) for i in range(2)]
    key = stack.store.create_key("batch-cli")
    with Client(stack.base, key) as client:
        ids = [client.upload(s).audio_id for s in songs]
        for i in ids:
            client.wait_audio(i)
        answers = client.create_stems_batch(
            [{"preset": "phantom_center", "audio_id": i} for i in ids]
            + [{"preset": "phantom_center", "audio_id": str(uuid.uuid4())}]
        )
        assert [a.status for a in answers] == ["processing", "processing", "error"]
        assert answers[2].http_status == 404
        assert [client.wait(a.creation_id, timeout=120).status for a in answers[:2]] == ["complete"] * 2
    env = {**os.environ, "STEMS_SERVER": stack.base, "STEMS_API_KEY": key, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "remote",
            "split",
            *map(str, songs),
            "--preset",
            "phantom_center",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    paths = sorted(line.split("\t")[0] for line in done.stdout.splitlines())
    assert paths == sorted(str(out / s.stem / f"{n}.wav") for s in songs for n in ("centre", "sides"))
    for s in songs:
        assert sf.info(out / s.stem / "centre.wav").frames == sf.info(s).frames
