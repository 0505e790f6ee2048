"""Output budgets, checked before a job is queued: per job (422 with the numbers) and per key (429).

The stack has no worker, so accepted jobs stay queued and count against the key's budget.
"""

from __future__ import annotations

import uuid

import pytest

from api.budget import estimate
from stems import rediskeys as K
from stems.models import AssetStatus, AudioAsset
from stems.storage import keys
from tests.support import ServiceStack

SMALL_JOB = 2 * (2 * 44100 * 3.0 * 3 + 3.0 * 256_000 / 8)  # phantom_center, 3 s of 44.1 kHz stereo, 24-bit + AAC


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, redis_url, s3_url):
    s = ServiceStack(
        tmp_path_factory.mktemp("budget"),
        redis_url,
        s3_url,
        STEMS_MAX_KEY_OUTPUT_BYTES=str(int(3.5 * SMALL_JOB)),
        STEMS_MAX_ACTIVE_JOBS="100",
    )
    s.start_api()
    yield s
    s.stop()


def _asset(s: ServiceStack, user: str, seconds: float, sr: int = 44100, channels: int = 2) -> str:
    asset = AudioAsset(
        user_id=user,
        origin="upload",
        object_key=keys.original(user, "x"),
        status=AssetStatus.complete,
        info={"duration": seconds, "sample_rate": sr, "channels": channels},
    )
    s.store.put_asset(asset)
    return asset.id


def _jobs(s: ServiceStack) -> int:
    return len(s.store.ids(K.JOB))


def test_estimate_counts_every_file():
    n = estimate(4, 6, 48000, 60.0, 24, "aac", restored=True)
    wav = 2 * 48000 * 60 * 3  # six channels fold to stereo
    assert n["estimated_bytes"] == 8 * (wav + 60 * 256_000 // 8) and n["channels"] == 2
    assert estimate(2, 1, 8000, 10.0, 16, None, False)["estimated_bytes"] == 2 * 8000 * 10 * 2
    assert estimate(1, 2, 44100, 1.0, 32, "flac", False)["estimated_bytes"] == 2 * 2 * 44100 * 4  # FLAC as the WAV


def test_a_job_over_the_per_job_budget_is_422_with_the_numbers(budgeted):
    user = f"big-{uuid.uuid4().hex[:6]}"
    with budgeted.client(user) as c:
        aid = _asset(budgeted, user, 4 * 3600.0, 192000, 2)  # 4 h at 192 kHz: inside the import limits
        before = _jobs(budgeted)
        r = c.post(
            "/create-stems",
            json={
                "preset": "phantom_center",
                "audio_id": aid,
                "bit_depth": 32,
                "restoration_params": {"preset": "universal_enhancer"},
            },
        )
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["code"] == "over_budget"
        expected = 4 * (2 * 192000 * 14400 * 4 + 14400 * 256_000 // 8)
        assert body["estimated_bytes"] == expected and body["max_bytes"] == 20 << 30
        assert (body["stems"], body["channels"], body["sample_rate"], body["seconds"], body["bit_depth"]) == (
            2,
            2,
            192000,
            14400.0,
            32,
        )
        assert "per-job budget" in body["detail"] and "GiB" in body["detail"]
        assert _jobs(budgeted) == before  # nothing created or queued
        ok = c.post(
            "/create-stems",
            json={"preset": "phantom_center", "audio_id": aid, "bit_depth": 16, "selection": {"start": 0, "end": 1}},
        )
        assert ok.status_code == 200, ok.text  # a part of it fits
        assert (
            budgeted.store.get_job(ok.json()["creation_id"]).output_bytes
            == estimate(2, 2, 192000, 1.0, 16, "aac", False)["estimated_bytes"]
        )
        # under the per-job budget but over this stack's small per-key one: it could never fit, so 422 too
        r = c.post(
            "/create-stems", json={"preset": "phantom_center", "audio_id": aid, "selection": {"start": 0, "end": 600}}
        )
        assert r.status_code == 422 and r.json()["code"] == "over_budget" and "per-key budget" in r.text


def test_the_per_key_budget_of_outstanding_output_is_429(budgeted):
    user = f"many-{uuid.uuid4().hex[:6]}"
    with budgeted.client(user) as c, budgeted.client(user) as same_user:
        aid = _asset(budgeted, user, 3.0)
        body = {"preset": "phantom_center", "audio_id": aid}
        accepted = [c.post("/create-stems", json=body) for _ in range(3)]
        assert [r.status_code for r in accepted] == [200] * 3
        before = _jobs(budgeted)
        r = same_user.post("/create-stems", json=body)  # the budget is the user's, whichever key
        assert r.status_code == 429 and r.json()["code"] == "key_output_budget", r.text
        assert r.json()["pending_bytes"] == pytest.approx(3 * SMALL_JOB, abs=10) and "Retry-After" in r.headers
        assert _jobs(budgeted) == before
        with budgeted.client(f"other-{user}") as other:  # another user's budget is its own
            assert (
                other.post(
                    "/create-stems", json={**body, "audio_id": _asset(budgeted, f"other-{user}", 3.0)}
                ).status_code
                == 200
            )
        assert c.post(f"/cancel/{accepted[0].json()['creation_id']}").status_code == 200  # ended: no longer outstanding
        assert c.post("/create-stems", json=body).status_code == 200
        assert c.post("/create-stems", json=body).status_code == 429
