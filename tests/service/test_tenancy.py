"""Tenancy on both storage backends: a tenant registers only objects under its own ingest prefix (or a
signed grant), and learns nothing of anyone else's; keys are managed through the `stems keys` CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import soundfile as sf

from stems.ingest import mint_grant
from stems.purpose_keys import legacy_webhook_secret
from stems.storage import make_storage
from tests.support import ROOT, job_objects, tone_mix, wait_for

SR = 22050


def _wav(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone_mix(seconds, SR).T, SR, subtype="PCM_16", format="WAV")
    return buf.getvalue()


@pytest.fixture
def tenants(backend_stack, tmp_path):
    """Two tenants, and objects an ingestion service stored: one under each tenant's prefix, one shared."""
    s = backend_stack
    a, b = f"ta-{uuid.uuid4().hex[:6]}", f"tb-{uuid.uuid4().hex[:6]}"
    storage = make_storage(s.settings())
    src = tmp_path / "in.wav"
    src.write_bytes(_wav())
    objects = {
        "a": f"ingest/{a}/2026/track.wav",
        "b": f"ingest/{b}/track.wav",
        "shared": f"ingest/shared-{a}.wav",
        "partner": f"partner/{a}/x/track.wav",
    }
    for key in objects.values():
        storage.put_file(key, src)
    ca, cb = s.client(a), s.client(b)
    yield s, (a, ca), (b, cb), objects
    ca.close()
    cb.close()


def _register(c, key: str, **extra):
    return c.post("/from-storage", json={"key": key, **extra})


def test_a_tenant_registers_only_its_own_prefix(tenants):
    s, (a, ca), (b, cb), objects = tenants
    r = _register(ca, objects["a"])
    assert r.status_code == 200, r.text
    asset = wait_for(ca, f"/status/audio/{r.json()['audio_id']}", {"complete", "failed"})
    assert asset["status"] == "complete", asset
    job = ca.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]})
    assert job.status_code == 200
    assert (
        wait_for(ca, f"/status/stem_split/{job.json()['creation_id']}", {"complete", "failed"})["status"] == "complete"
    )

    # tenant B: A's object, A's asset and split, the shared prefix, traversal out of its own prefix: all 404
    missing = _register(cb, f"ingest/{b}/no-such-object.wav")
    assert missing.status_code == 404
    for key in (
        objects["a"],
        objects["shared"],
        objects["partner"],
        f"ingest/{b}/../{a}/2026/track.wav",
        f"/ingest/{a}/2026/track.wav",
        f"ingest/{b}//../../ingest/{a}/2026/track.wav",
        f"users/{a}/audio/{asset['audio_id']}/original",
        f"ingest/{b}",
    ):
        r = _register(cb, key)
        assert r.status_code == 404, (key, r.text)
        assert r.json() == missing.json(), key  # "not yours" reads exactly like "not there"
    assert cb.get(f"/status/audio/{asset['audio_id']}").status_code == 404
    assert cb.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]}).status_code == 404
    assert cb.get(f"/status/stem_split/{job.json()['creation_id']}").status_code == 404
    # B's own object is fine
    r = _register(cb, objects["b"])
    assert r.status_code == 200, r.text
    assert s.store.get_asset(r.json()["audio_id"]).user_id == b
    assert cb.get("/healthz").status_code == 200


def test_a_signed_grant_opens_one_key_to_one_tenant(tenants):
    s, (a, ca), (b, cb), objects = tenants
    secret = s.settings().secret_key
    grant = mint_grant(secret, b, objects["shared"], 60)
    r = _register(cb, objects["shared"], grant=grant)
    assert r.status_code == 200, r.text
    assert wait_for(cb, f"/status/audio/{r.json()['audio_id']}", {"complete", "failed"})["status"] == "complete"
    refused = [
        (ca, objects["shared"], grant),  # granted to B, not A
        (cb, objects["a"], grant),  # another key than the granted one
        (cb, objects["shared"], mint_grant(secret, b, objects["shared"], -1)),  # expired
        (cb, objects["shared"], mint_grant("another-deployments-secret", b, objects["shared"], 60)),
        (cb, objects["shared"], grant[:-2] + ("00" if not grant.endswith("00") else "11")),  # tampered
        (cb, objects["shared"], "g1.not.a-grant"),
        (cb, objects["shared"], ""),
        # what a tenant holding the server secret could mint before #19 (legacy keys' webhooks were signed with it)
        (cb, objects["shared"], _grant_under_the_raw_secret(secret, b, objects["shared"])),
        (cb, objects["shared"], _grant_under_the_raw_secret(secret, b, objects["a"])),
        # nor does any value a tenant holds now: a legacy key's webhook secret mints nothing
        (
            cb,
            objects["shared"],
            mint_grant(legacy_webhook_secret(secret, "key_0123456789abcdef"), b, objects["shared"], 60),
        ),
        (cb, objects["shared"], mint_grant(legacy_webhook_secret(secret, None), b, objects["shared"], 60)),
        # longer than STEMS_GRANT_MAX_TTL_S: refused where it is used, not only by the CLI that mints
        (cb, objects["shared"], mint_grant(secret, b, objects["shared"], s.settings().grant_max_ttl_s + 3600)),
        (cb, objects["shared"], mint_grant(secret, b, objects["shared"], 60, now=time.time() + 3600)),  # minted "later"
    ]
    for client, key, g in refused:
        r = _register(client, key, grant=g)
        assert r.status_code == 404, (key, g, r.text)
    prefix_grant = mint_grant(secret, b, f"partner/{a}/", 60)  # a prefix grant: any key under it
    assert _register(cb, objects["partner"], grant=prefix_grant).status_code == 200
    assert _register(cb, f"partner/{a}x/track.wav", grant=prefix_grant).status_code == 404


@pytest.mark.parametrize("rewrite", ["longer", "same-size"])
def test_a_registered_object_rewritten_after_its_import_fails_the_split(tenants, rewrite):
    """The worker splits only what the import probed: a rewritten ingest object (a longer track past the
    budget the import measured, or other bytes of the same size) fails the job, and nothing is produced."""
    s, (a, ca), _, objects = tenants
    r = _register(ca, objects["a"])
    assert r.status_code == 200, r.text
    asset = wait_for(ca, f"/status/audio/{r.json()['audio_id']}", {"complete", "failed"})
    assert asset["status"] == "complete", asset
    imported = s.store.get_asset(asset["audio_id"])
    assert imported.size and imported.sha256
    original = _wav()
    new = _wav(30.0) if rewrite == "longer" else original[:-4] + b"\x01\x02\x03\x04"
    assert len(new) != len(original) if rewrite == "longer" else len(new) == len(original)
    storage = make_storage(s.settings())
    src = s.tmp / f"rewritten-{rewrite}.wav"
    src.write_bytes(new)
    storage.put_file(objects["a"], src)  # the ingestion service writes the same key again
    job = ca.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]})
    assert job.status_code == 200, job.text
    status = wait_for(ca, f"/status/stem_split/{job.json()['creation_id']}", {"complete", "failed"}, 120)
    assert status["status"] == "failed", status
    assert status["error"]["code"] == "original_changed", status["error"]
    assert "rewritten" in status["error"]["message"]
    assert all(st["status"] != "complete" for st in status["stems"])
    assert job_objects(s, job.json()["creation_id"]) == []


def _grant_under_the_raw_secret(secret: str, user: str, key: str) -> str:
    """A grant as main minted it before #19: HMAC under the server secret itself."""
    import base64
    import hashlib
    import hmac

    payload = base64.urlsafe_b64encode(
        json.dumps({"u": user, "k": key, "e": int(time.time() + 60)}, sort_keys=True).encode()
    ).rstrip(b"=")
    mac = hmac.new(secret.encode(), b"stems-ingest-grant." + payload, hashlib.sha256).hexdigest()
    return f"g1.{payload.decode()}.{mac}"


def _cli(s, *args: str) -> subprocess.CompletedProcess:
    env = {**s.env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stems.cli", "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_keys_cli_create_list_rotate_revoke_grant(backend_stack):
    s = backend_stack
    user = f"cli-{uuid.uuid4().hex[:6]}"
    made = _cli(s, "create", "--user", user, "--json")
    assert made.returncode == 0, made.stderr
    issued = json.loads(made.stdout)
    assert issued["api_key"].startswith("stk_") and issued["webhook_secret"].startswith("whsec_")
    assert s.store.user_for_key(issued["api_key"]) == user
    human = _cli(s, "create", "--user", user)
    assert "api_key" in human.stdout and "webhook_secret" in human.stdout and "only now" in human.stderr
    assert _cli(s, "create", "--user", "a/b").returncode == 2  # user ids are a path segment

    listed = _cli(s, "list", "--json")
    assert listed.returncode == 0
    mine = [k for k in json.loads(listed.stdout) if k["key_id"] == issued["key_id"]]
    assert mine and mine[0]["user_id"] == user
    assert issued["api_key"] not in listed.stdout and issued["webhook_secret"] not in listed.stdout
    assert issued["key_id"] in _cli(s, "list").stdout

    # a key made before keys had their own secret is marked, and rotating gives it one
    legacy = s.store.issue_key(user)
    s.forget_webhook_secret(legacy)
    row = next(line for line in _cli(s, "list").stdout.splitlines() if legacy.key_id in line)
    assert "stems keys rotate" in row, row
    own = json.loads(_cli(s, "rotate", legacy.key_id, "--json").stdout)["webhook_secret"]
    assert own.startswith("whsec_") and s.store.key_by_id(legacy.key_id).webhook_secret == own

    rotated = json.loads(_cli(s, "rotate", issued["key_id"], "--json").stdout)
    assert rotated["key_id"] == issued["key_id"] and rotated["webhook_secret"] != issued["webhook_secret"]
    assert s.store.key_by_id(issued["key_id"]).webhook_secret == rotated["webhook_secret"]

    grant = _cli(s, "grant", "--user", user, "--key", "partner/x.wav", "--ttl", "60").stdout.strip()
    from stems.ingest import grant_allows

    assert grant_allows(s.settings().secret_key, grant, user, "partner/x.wav", s.settings().grant_max_ttl_s)

    revoked = _cli(s, "revoke", issued["key_id"])
    assert revoked.returncode == 0 and s.store.user_for_key(issued["api_key"]) is None
    assert _cli(s, "revoke", issued["key_id"]).returncode == 1
    assert _cli(s, "rotate", "key_0000000000000000").returncode == 1


def test_settings_table_is_generated_from_the_code():
    out = subprocess.run(
        [sys.executable, "-m", "stems.cli", "settings"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    table = out.stdout.strip()
    doc = (ROOT / "docs" / "deployment.md").read_text()
    assert table and table in doc, "docs/deployment.md's settings table is stale: paste `stems settings` into it"


def test_the_readme_webhook_snippet_verifies_our_signatures():
    import re
    import time

    from stems.webhooks import sign

    readme = (ROOT / "docs" / "api.md").read_text()
    snippet = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)  # the receiver's code, as a user copies it
    body, secret = b'{"status": "complete"}', "whsec_test"
    assert scope["verify"](secret, body, sign(secret, body))
    assert not scope["verify"](secret, body, sign(secret, body, int(time.time()) - 301))  # stale
    assert not scope["verify"]("whsec_other", body, sign(secret, body))
    assert not scope["verify"](secret, body + b" ", sign(secret, body))
