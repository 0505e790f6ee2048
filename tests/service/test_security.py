"""Security and abuse limits against real processes: SSRF-safe links and callbacks, hashed API
keys, rate limits and quotas, usage metering, idempotency, signed webhooks, per-user isolation.

Link targets and webhook receivers are a loopback HTTP server (tests/webserver.py). The
`guarded` stack allowlists only the name "localhost", so the same server reached as
127.0.0.1 counts as a private address; the `idle` stack has no worker, so its jobs stay
queued and the Celery queue can be counted.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid

import httpx
import pytest
import soundfile as sf

from pipelines.presets import load_catalogue
from stems import rediskeys as K
from stems.models import AssetStatus, AudioAsset
from stems.purpose_keys import legacy_webhook_secret
from stems.storage import keys
from stems.webhooks import sign, verify
from tests.support import ServiceStack, tone_mix, upload, wait_for, write_audio
from tests.webserver import WebServer

SR = 44100
TERMINAL = {"complete", "failed", "cancelled"}
MAX_BYTES = 300_000


def _wav(seconds: float, sr: int = 22050, channels: int = 2) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone_mix(seconds, sr, channels).T, sr, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def _count(s: ServiceStack, kind: str) -> int:
    return len(s.store.ids(kind))


def _queued(s: ServiceStack, queue: str = "cpu") -> int:
    """Messages waiting in a Celery queue of the stack (the broker keys share the stack's prefix)."""
    return s.store.broker_backlog(queue)


def _ready_audio(s: ServiceStack, user: str, seconds: float = 3.0) -> str:
    """An imported asset record, for stacks without a worker (create-stems reads only the record)."""
    asset = AudioAsset(
        user_id=user,
        origin="upload",
        object_key=keys.original(user, "x"),
        status=AssetStatus.complete,
        info={"duration": seconds, "sample_rate": SR, "channels": 2},
    )
    s.store.put_asset(asset)
    return asset.id


@pytest.fixture(scope="module")
def web():
    w = WebServer()
    yield w
    w.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, redis_url, s3_url):
    """API + worker that may fetch only the host name "localhost"; small upload limit; quick webhook retries."""
    s = ServiceStack(
        tmp_path_factory.mktemp("guarded"),
        redis_url,
        s3_url,
        STEMS_LINK_ALLOW_HOSTS='["localhost"]',
        STEMS_MAX_UPLOAD_BYTES=str(MAX_BYTES),
        STEMS_WEBHOOK_ATTEMPTS="3",
        STEMS_WEBHOOK_BACKOFF_S="0.3",
    )
    s.start_api()
    s.start_worker("cpu", "guard")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def idle(tmp_path_factory, redis_url, s3_url):
    """API only: accepted jobs stay queued, so quotas and the Celery queue can be observed."""
    s = ServiceStack(tmp_path_factory.mktemp("idle"), redis_url, s3_url, STEMS_MAX_ACTIVE_JOBS="3")
    s.start_api()
    yield s
    s.stop()


# -- /from-link: SSRF ---------------------------------------------------------------

MALFORMED_LINKS = [
    "ftp://localhost/a.wav",
    "file:///etc/passwd",
    "gopher://localhost:70/_x",
    "javascript:alert(1)",
    "localhost/a.wav",
    "http:///a.wav",
    "http://user:secret@localhost/a.wav",
    "http://@localhost/a.wav",
    # what urlsplit() or .port raise ValueError for (a 500 before: #19)
    "http://[::1/a.wav",
    "http://[abc]/a.wav",
    "http://localhost:99999/a.wav",
    "http://localhost:x/a.wav",
    "http://localhost:-1/a.wav",
    "http://localhost:0/a.wav",
    # blanks and control characters; a host that is no IDNA name
    "http://local host/a.wav",
    "http://localhost/a\x00.wav",
    "http://local\thost/",
    "http://xn--a-ecp.ru\u0000/",
    "http://" + "a" * 64 + ".example/",
    "http://\u00e9" + "a" * 300 + ".example/",
]


@pytest.mark.parametrize("url", MALFORMED_LINKS)
def test_link_scheme_and_form_refused(guarded, url):
    """Every malformed link is a 422 invalid_link naming the field, from /from-link and from a callback_url."""
    with guarded.client("ssrf") as c:
        before = _count(guarded, K.AUDIO)
        r = c.post("/from-link", json={"url": url})
        assert r.status_code == 422, (url, r.text)
        assert r.json()["code"] == "invalid_link" and r.json()["field"] == "url", r.text
        assert _count(guarded, K.AUDIO) == before


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1.2.3",
        "2130706433",
        "0.0.0.0",  # loopback: literal, decimal form, "any"
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",  # private, carrier-grade NAT
        "169.254.169.254",
        "169.254.1.1",  # link-local, cloud metadata
        "[::1]",
        "[fd00::1]",
        "[fe80::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:169.254.169.254]",
        "[2002:7f00:1::1]",
        "[64:ff9b::a9fe:a9fe]",
        "224.0.0.1",
        "[fec0::1]",
        "[fec0:1::5]",
        "[feff::1]",  # site-local (fec0::/10): is_global calls it global
        "[::ffff:10.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2001:db8::1]",
        "[100::1]",
        "198.18.0.1",
        "240.0.0.1",
    ],
)
def test_link_to_non_public_address_refused(guarded, web, host):
    with guarded.client("ssrf") as c:
        before = _count(guarded, K.AUDIO)
        r = c.post("/from-link", json={"url": f"http://{host}:{web.port}/a.wav"})
        assert r.status_code == 422, (host, r.text)
        assert r.json()["code"] == "invalid_link" and "non-public" in r.json()["detail"]
        assert _count(guarded, K.AUDIO) == before
    assert not web.requests("GET", "/a.wav")  # never connected


@pytest.mark.parametrize(
    "address, public",
    [
        ("::ffff:8.8.8.8", True),  # an IPv4-mapped address is judged as its IPv4 address: this was an AttributeError
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("fec0::1", False),
        ("2001:4860:4860::8888", True),
        ("8.8.8.8", True),
        ("fe80::1%eth0", False),
    ],
)
def test_an_address_is_judged_public_or_not_without_raising(address, public):
    """A link whose host resolves to a public IPv4-mapped IPv6 address raised AttributeError in the check (an
    IPv4 address has no `is_site_local`): /from-link and a callback_url answered 500 for it."""
    from stems.netfetch import _public

    assert _public(address) is public


def test_host_name_resolving_to_private_address_refused(guarded, web):
    """A name, not a literal: this machine's own host name resolves to loopback or a private address."""
    import socket

    from stems.netfetch import _public

    name = socket.gethostname()
    try:
        addresses = {i[4][0] for i in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        pytest.skip(f"host name {name!r} does not resolve here")
    if all(_public(a) for a in addresses):
        pytest.skip(f"host name {name!r} resolves to public addresses {addresses}")
    with guarded.client("ssrf") as c:
        r = c.post("/from-link", json={"url": f"http://{name}:{web.port}/a.wav"})
    assert r.status_code == 422 and "non-public" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/secret.wav",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/secret.wav",
        "file:///etc/passwd",
    ],
)
def test_redirect_to_private_address_fails_the_import(guarded, web, target):
    web.files["/secret.wav"] = _wav(1.0)
    hop = f"/hop-{uuid.uuid4().hex[:8]}"
    web.redirects[hop] = target.format(port=web.port)
    with guarded.client("ssrf") as c:
        r = c.post("/from-link", json={"url": web.url(hop, "localhost")})  # allowlisted: accepted
        assert r.status_code == 200, r.text
        status = wait_for(c, f"/status/audio/{r.json()['audio_id']}", TERMINAL, 60)
    assert status["status"] == "failed", status
    assert status["error"]["code"] == "invalid_link"
    reason = "only http and https" if target.startswith("file") else "non-public address"
    assert reason in status["error"]["message"], status["error"]
    assert len(web.requests("GET", hop)) == 1
    assert not web.requests("GET", "/secret.wav")  # the redirect was not followed
    assert guarded.objects(f"users/ssrf/audio/{status['audio_id']}/") == []


def test_redirect_loop_fails_the_import(guarded, web):
    web.redirects["/loop"] = web.url("/loop", "localhost")
    with guarded.client("ssrf") as c:
        audio_id = c.post("/from-link", json={"url": web.url("/loop", "localhost")}).json()["audio_id"]
        status = wait_for(c, f"/status/audio/{audio_id}", TERMINAL, 60)
    assert status["status"] == "failed" and "redirects" in status["error"]["message"]
    assert len(web.requests("GET", "/loop")) == 6  # the first request and five redirects


def test_link_import_of_a_real_wav(guarded, web):
    data = _wav(2.0)
    path = f"/ok-{uuid.uuid4().hex[:8]}.wav"
    web.files[path] = data
    web.redirects["/to-ok"] = path  # a relative redirect to an allowed host is followed
    with guarded.client("linker") as c:
        for url in (web.url(path, "localhost"), web.url("/to-ok", "localhost")):
            r = c.post("/from-link", json={"url": url})
            assert r.status_code == 200, r.text
            status = wait_for(c, f"/status/audio/{r.json()['audio_id']}", TERMINAL, 60)
            assert status["status"] == "complete", status
            assert status["size"] == len(data) and status["sample_rate"] == 22050 and status["channels"] == 2
            assert abs(status["duration"] - 2.0) < 1e-3
            key = guarded.store.get_asset(status["audio_id"]).object_key
            assert key in guarded.objects()
    hits = web.requests("GET", path)
    assert len(hits) == 2 and all(h.headers["host"] == f"localhost:{web.port}" for h in hits)


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "unsized"])
def test_link_larger_than_the_limit_fails_too_large(guarded, web, sized):
    path = f"/big-{sized}.wav"
    web.files[path] = _wav(10.0)  # ~880 kB, over the 300 kB limit
    if not sized:
        web.unsized.add(path)
    with guarded.client("linker") as c:
        audio_id = c.post("/from-link", json={"url": web.url(path, "localhost")}).json()["audio_id"]
        status = wait_for(c, f"/status/audio/{audio_id}", TERMINAL, 60)
    assert status["status"] == "failed" and status["error"]["code"] == "too_large", status
    assert str(MAX_BYTES) in status["error"]["message"]
    assert guarded.objects(f"users/linker/audio/{audio_id}/") == []


# -- API keys ---------------------------------------------------------------------------


def test_api_keys_are_stored_hashed(stack):
    key = stack.store.create_key("hashed-user")
    # use it too, also as an Idempotency-Key: nothing on the request path stores it in plain either
    with httpx.Client(base_url=stack.base, headers={"x-api-key": key}, timeout=60) as c:
        assert c.get("/usage").status_code == 200
        r = c.post("/from-link", json={"url": "http://127.0.0.1:9/x.wav"}, headers={"Idempotency-Key": key})
        assert r.status_code == 200, r.text
    r = stack.redis()
    plain = key.encode()
    seen = 0
    for name in r.scan_iter(count=1000):
        seen += 1
        assert plain not in name, name
        kind = r.type(name).decode()
        if kind == "string":
            values = [r.get(name) or b""]
        elif kind == "hash":
            values = [x for kv in r.hgetall(name).items() for x in kv]
        elif kind == "set":
            values = list(r.smembers(name))
        elif kind == "list":
            values = r.lrange(name, 0, -1)
        elif kind == "zset":
            values = r.zrange(name, 0, -1)
        else:
            values = []
        assert not any(plain in v for v in values), name
    assert seen > 10
    from stems.jobstore import hash_key

    assert r.hget(f"{stack.prefix}:{K.APIKEY}:{hash_key(key)}", "user_id") == b"hashed-user"


# -- rate limit and quota -------------------------------------------------------------


def test_rate_limit_is_429_with_retry_after(tmp_path, redis_url):
    s = ServiceStack(tmp_path, redis_url, None, STEMS_RATE_LIMIT_PER_MINUTE="5")
    s.start_api()
    try:
        with s.client("busy") as c, s.client("calm") as other:
            answers = [c.get("/usage") for _ in range(12)]  # at most one minute boundary in between
            codes = [r.status_code for r in answers]
            assert 429 in codes, codes
            first = codes.index(429)
            assert 5 <= first <= 10, codes
            refused = answers[first]
            assert refused.json()["code"] == "rate_limited"
            assert 1 <= int(refused.headers["retry-after"]) <= 61
            assert other.get("/usage").status_code == 200  # the limit is per key
            assert c.get("/healthz").status_code == 200  # health checks are not limited
    finally:
        s.stop()


def test_active_job_quota_is_429_and_queues_nothing(idle):
    with idle.client("quota") as c:
        audio_id = _ready_audio(idle, "quota")
        body = {"preset": "phantom_center", "audio_id": audio_id}
        jobs, queued = _count(idle, K.JOB), _queued(idle)
        accepted = [c.post("/create-stems", json=body) for _ in range(3)]
        assert [r.status_code for r in accepted] == [200] * 3
        r = c.post("/create-stems", json=body)
        assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert _count(idle, K.JOB) == jobs + 3 and _queued(idle) == queued + 3  # nothing for the refused one
        assert idle.store.active_jobs("quota") == 3
        with idle.client("quota-other") as other:  # the quota is per user
            assert (
                other.post("/create-stems", json={**body, "audio_id": _ready_audio(idle, "quota-other")}).status_code
                == 200
            )
        assert c.post(f"/cancel/{accepted[0].json()['creation_id']}").status_code == 200  # frees a slot
        assert c.post("/create-stems", json=body).status_code == 200
        assert c.post("/create-stems", json=body).status_code == 429


# -- usage metering ---------------------------------------------------------------------


def test_usage_multiplier_comes_from_the_catalogue():
    catalogue = load_catalogue()
    assert catalogue.preset("mvsep_mega_53").usage_multiplier == 3
    assert catalogue.preset("phantom_center").usage_multiplier == 1


def test_usage_grows_by_processed_minutes(stack, tmp_path):
    user = f"meter-{uuid.uuid4().hex[:6]}"
    mult = load_catalogue().preset("phantom_center").usage_multiplier
    with stack.client(user) as c:
        assert c.get("/usage").json() == {"user_id": user, "minutes": 0.0, "jobs": 0}
        asset = upload(c, write_audio(tmp_path / "m.wav", tone_mix(4.0, SR), SR))
        expected = 0.0
        for selection, seconds in (({"start": 0.5, "end": 3.5}, 3.0), (None, 4.0)):
            body = {"preset": "phantom_center", "audio_id": asset["audio_id"], "hq_streaming_format": "none"}
            job = c.post("/create-stems", json={**body, **({"selection": selection} if selection else {})}).json()
            status = wait_for(c, f"/status/stem_split/{job['creation_id']}", TERMINAL, 120)
            assert status["status"] == "complete", status
            expected += seconds / 60 * mult
            usage = c.get("/usage").json()
            assert usage["minutes"] == pytest.approx(expected, abs=1e-3), usage
            assert stack.store.get_job(job["creation_id"]).usage_minutes == pytest.approx(seconds / 60 * mult, abs=1e-4)
        assert usage["jobs"] == 2
        # a job that never completes costs nothing
        job = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]}).json()
        c.post(f"/cancel/{job['creation_id']}")
        final = wait_for(c, f"/status/stem_split/{job['creation_id']}", TERMINAL, 120)
        if final["status"] == "cancelled":
            assert c.get("/usage").json() == usage


# -- idempotency --------------------------------------------------------------------------


def test_idempotent_upload(idle):
    data, other = _wav(1.0), _wav(1.5)
    with idle.client("idem") as c:
        assets, queued = _count(idle, K.AUDIO), _queued(idle)
        first = c.post("/from-file", files={"file": ("a.wav", data)}, headers={"Idempotency-Key": "up-1"})
        again = c.post("/from-file", files={"file": ("renamed.wav", data)}, headers={"Idempotency-Key": "up-1"})
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert first.json()["audio_id"] == again.json()["audio_id"]
        assert _count(idle, K.AUDIO) == assets + 1 and _queued(idle) == queued + 1
        r = c.post("/from-file", files={"file": ("a.wav", other)}, headers={"Idempotency-Key": "up-1"})
        assert r.status_code == 409 and "different request body" in r.text
        fresh = c.post("/from-file", files={"file": ("a.wav", data)}, headers={"Idempotency-Key": "up-2"})
        assert fresh.json()["audio_id"] != first.json()["audio_id"]
        assert _count(idle, K.AUDIO) == assets + 2 and _queued(idle) == queued + 2
    with idle.client("idem-other") as c:  # keys are per user: the same key is a new request for another user
        r = c.post("/from-file", files={"file": ("a.wav", data)}, headers={"Idempotency-Key": "up-1"})
        assert r.status_code == 200 and r.json()["audio_id"] != first.json()["audio_id"]


def test_idempotent_create_stems(idle):
    with idle.client("idem-split") as c:
        audio_id = _ready_audio(idle, "idem-split")
        body = {"preset": "phantom_center", "audio_id": audio_id, "selection": {"start": 0.5, "end": 2.0}}
        jobs, queued = _count(idle, K.JOB), _queued(idle)
        first = c.post("/create-stems", json=body, headers={"Idempotency-Key": "split-1"})
        again = c.post("/create-stems", json=body, headers={"Idempotency-Key": "split-1"})
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json()
        assert _count(idle, K.JOB) == jobs + 1 and _queued(idle) == queued + 1
        r = c.post("/create-stems", json={**body, "bit_depth": 16}, headers={"Idempotency-Key": "split-1"})
        assert r.status_code == 409 and r.json()["code"] == "conflict"
        # a refused request does not burn its key: the same key with a valid body is accepted later
        bad = c.post(
            "/create-stems", json={**body, "selection": {"start": 0, "end": 99}}, headers={"Idempotency-Key": "split-2"}
        )
        assert bad.status_code == 422
        ok = c.post("/create-stems", json=body, headers={"Idempotency-Key": "split-2"})
        assert ok.status_code == 200 and ok.json()["creation_id"] != first.json()["creation_id"]
        # the replay answers the accepted job even once the quota is full
        c.post("/create-stems", json=body)
        assert c.post("/create-stems", json=body).status_code == 429
        replay = c.post("/create-stems", json=body, headers={"Idempotency-Key": "split-1"})
        assert replay.status_code == 200 and replay.json() == first.json()
        assert _count(idle, K.JOB) == jobs + 3 and _queued(idle) == queued + 3
        assert c.post("/create-stems", json=body, headers={"Idempotency-Key": "x" * 256}).status_code == 422


# -- webhooks -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_audio(guarded, tmp_path_factory):
    path = write_audio(
        tmp_path_factory.mktemp("wh") / "w.wav", tone_mix(2.0, 22050), 22050, "PCM_16"
    )  # under the limit
    with guarded.client("hooked") as c:
        asset = upload(c, path)
    assert asset["status"] == "complete", asset
    return asset["audio_id"]


def _split_with_callback(s: ServiceStack, audio_id: str, callback: str) -> tuple[dict, str]:
    """The finished split and the webhook secret of the key that created it."""
    c, issued = s.keyed_client("hooked")
    with c:
        r = c.post(
            "/create-stems",
            json={
                "preset": "phantom_center",
                "audio_id": audio_id,
                "callback_url": callback,
                "hq_streaming_format": "none",
            },
        )
        assert r.status_code == 200, r.text
        return wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", TERMINAL, 120), issued.webhook_secret


def _signature(hit) -> str:
    return hit.headers["x-stems-signature"]


def test_webhook_is_signed_with_the_final_status(guarded, guarded_audio, web):
    path = f"/hook-{uuid.uuid4().hex[:8]}"
    status, secret = _split_with_callback(guarded, guarded_audio, web.url(path, "localhost"))
    assert status["status"] == "complete", status
    (hit,) = web.wait_posts(path, 1)
    assert verify(secret, hit.body, _signature(hit))
    other_key = guarded.store.issue_key("hooked").webhook_secret  # the same tenant's other key cannot have signed it
    for wrong in (other_key, "dev-secret-key", guarded.settings().secret_key):
        assert not verify(wrong, hit.body, _signature(hit))
    assert not verify(secret, hit.body + b" ", _signature(hit))
    t = int(_signature(hit).split(",")[0].removeprefix("t="))
    assert abs(t - time.time()) < 120
    # the timestamp is signed too: a receiver refuses a delivery older (or newer) than 5 minutes ...
    assert not verify(secret, hit.body, _signature(hit), now=t + 301)
    assert not verify(secret, hit.body, _signature(hit), now=t - 301)
    assert verify(secret, hit.body, _signature(hit), now=t + 299)
    # ... and moving `t` to make an old delivery look fresh breaks the HMAC
    forged = f"t={t + 1000}," + _signature(hit).split(",", 1)[1]
    assert not verify(secret, hit.body, forged, now=t + 1000)
    assert verify(secret, hit.body, sign(secret, hit.body, t + 1000), now=t + 1000)  # (what a real one would be)
    payload = json.loads(hit.body)
    assert payload["creation_id"] == status["creation_id"] and payload["status"] == "complete"
    assert payload["audio_id"] == guarded_audio and sorted(payload["stem_ids"]) == sorted(
        s["stem_id"] for s in status["stems"]
    )
    time.sleep(2)
    assert len(web.requests("POST", path)) == 1  # delivered once


def test_webhook_secret_rotation_and_revocation(guarded, guarded_audio, web):
    c, issued = guarded.keyed_client("hooked")
    with c:
        rotated = guarded.store.rotate_webhook_secret(issued.key_id)
        assert rotated.key_id == issued.key_id and rotated.webhook_secret != issued.webhook_secret
        path = f"/hook-{uuid.uuid4().hex[:8]}"
        r = c.post(
            "/create-stems",
            json={
                "preset": "phantom_center",
                "audio_id": guarded_audio,
                "hq_streaming_format": "none",
                "callback_url": web.url(path, "localhost"),
            },
        )
        wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", TERMINAL, 120)
        (hit,) = web.wait_posts(path, 1)
        assert verify(rotated.webhook_secret, hit.body, _signature(hit))
        assert not verify(issued.webhook_secret, hit.body, _signature(hit))  # the old secret stopped signing
        assert guarded.store.revoke_key(issued.key_id)
        assert c.get("/usage").status_code == 401
        assert not guarded.store.revoke_key(issued.key_id)


def test_a_key_without_its_own_secret_signs_with_a_value_for_it_alone(guarded, guarded_audio, web):
    """A key made before keys had their own secret: its webhooks are signed with a value derived for that key
    (never the server secret, which also signed grants: #19), until `stems keys rotate` gives it its own."""
    c, issued = guarded.keyed_client("hooked")
    guarded.forget_webhook_secret(issued)
    assert guarded.store.key_by_id(issued.key_id).webhook_secret is None  # as such keys are stored
    server = guarded.settings().secret_key
    legacy = legacy_webhook_secret(server, issued.key_id)
    with c:
        path = f"/hook-{uuid.uuid4().hex[:8]}"
        r = c.post(
            "/create-stems",
            json={
                "preset": "phantom_center",
                "audio_id": guarded_audio,
                "hq_streaming_format": "none",
                "callback_url": web.url(path, "localhost"),
            },
        )
        assert r.status_code == 200, r.text
        wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", TERMINAL, 120)
        (hit,) = web.wait_posts(path, 1)
        assert verify(legacy, hit.body, _signature(hit))
        other_legacy = legacy_webhook_secret(server, guarded.store.issue_key("hooked").key_id)
        for wrong in (server, other_legacy, issued.webhook_secret):  # nor another legacy key's value
            assert not verify(wrong, hit.body, _signature(hit))


def test_webhook_retried_after_5xx(guarded, guarded_audio, web):
    path = f"/hook-{uuid.uuid4().hex[:8]}"
    web.answers[path] = [500, 503]
    _, secret = _split_with_callback(guarded, guarded_audio, web.url(path, "localhost"))
    hits = web.wait_posts(path, 3)
    gaps = [b.at - a.at for a, b in zip(hits, hits[1:])]
    assert all(g >= 0.1 for g in gaps), gaps  # backed off (0.3 s, then 0.6 s, jittered +-50%)
    assert len({h.body for h in hits}) == 1 and json.loads(hits[-1].body)["status"] == "complete"
    assert all(verify(secret, h.body, _signature(h)) for h in hits)
    time.sleep(3)
    assert len(web.requests("POST", path)) == 3  # accepted on the third: no more


def test_webhook_gives_up_after_the_configured_attempts(guarded, guarded_audio, web):
    path = f"/hook-{uuid.uuid4().hex[:8]}"
    web.answers[path] = [500] * 10
    _split_with_callback(guarded, guarded_audio, web.url(path, "localhost"))
    web.wait_posts(path, 3)
    time.sleep(4)  # a fourth attempt would come within 0.6-1.8 s
    assert len(web.requests("POST", path)) == 3  # STEMS_WEBHOOK_ATTEMPTS=3


@pytest.mark.parametrize(
    "callback",
    [
        "http://127.0.0.1:{port}/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/hook",
        "http://[fd00::1]/hook",
        "ftp://localhost/hook",
        "file:///etc/passwd",
    ],
)
def test_callback_to_private_address_refused_at_create(guarded, guarded_audio, web, callback):
    jobs = _count(guarded, K.JOB)
    with guarded.client("hooked") as c:
        r = c.post(
            "/create-stems",
            json={
                "preset": "phantom_center",
                "audio_id": guarded_audio,
                "callback_url": callback.format(port=web.port),
            },
        )
    assert r.status_code == 422 and r.json()["code"] == "invalid_link", r.text
    assert _count(guarded, K.JOB) == jobs


@pytest.mark.parametrize("callback", MALFORMED_LINKS + ["http://[fec0::1]/hook"])
def test_malformed_callback_url_is_422_naming_the_field(guarded, guarded_audio, callback):
    jobs = _count(guarded, K.JOB)
    with guarded.client("hooked") as c:
        r = c.post(
            "/create-stems", json={"preset": "phantom_center", "audio_id": guarded_audio, "callback_url": callback}
        )
        assert r.status_code == 422 and r.json()["code"] == "invalid_link", (callback, r.text)
        if "fec0" in callback:  # well-formed, refused by the handler's address check
            return
        assert r.json()["field"] == "callback_url", r.text  # the malformed ones: by the schema, before any handler
        r = c.post("/from-link", json={"url": "https://example.com/a.wav", "callback_url": callback})
        assert r.status_code == 422 and r.json()["field"] == "callback_url", (callback, r.text)
    assert _count(guarded, K.JOB) == jobs


# -- isolation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def owned(stack, tmp_path_factory):
    """A complete split (with restored copies) of one user's audio, and a mastered version of it."""
    owner = f"owner-{uuid.uuid4().hex[:6]}"
    path = write_audio(tmp_path_factory.mktemp("iso") / "o.wav", tone_mix(2.0, SR), SR)
    c = stack.client(owner)
    asset = upload(c, path)
    r = c.post(
        "/create-stems",
        json={
            "preset": "phantom_center",
            "audio_id": asset["audio_id"],
            "restoration_params": {"preset": "universal_enhancer", "strength": 0.5},
        },
    )
    assert r.status_code == 200, r.text
    status = wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", TERMINAL, 120)
    assert status["status"] == "complete", status
    r = c.post("/master-audio", json={"audio_id": asset["audio_id"], "preset": "streaming"})
    assert r.status_code == 200, r.text
    mastered = wait_for(c, f"/status/mastered/{r.json()['mastered_id']}", TERMINAL, 180)
    assert mastered["status"] == "complete", mastered
    status["mastered_id"] = mastered["mastered_id"]
    yield c, asset["audio_id"], status
    c.close()


def test_download_links_stop_when_their_key_is_revoked(stack, owned):
    c, _, status = owned
    owner, sid = c.get("/usage").json()["user_id"], status["stems"][0]["stem_id"]
    doomed, issued = stack.keyed_client(owner)
    links = {}
    for name, client in (("doomed", doomed), ("kept", c)):
        r = client.post("/download-links", json={"stem_ids": [sid]})
        assert r.status_code == 200, r.text
        links[name] = r.json()["links"][0]["url"]
    doomed.close()
    with httpx.Client(base_url=stack.base, timeout=60) as anonymous:
        assert anonymous.get(links["doomed"]).status_code == 200
        assert stack.store.revoke_key(issued.key_id)
        r = anonymous.get(links["doomed"])
        assert r.status_code == 401 and "revoked" in r.json()["detail"], r.text
        assert anonymous.get(links["kept"]).status_code == 200  # the same user's other key's links still work


def _id_inputs(doc: dict) -> set[tuple[str, str, str]]:
    """(method, path, where:name) of every id an operation of the served OpenAPI document takes: a path or query
    parameter, or a JSON body field, that is a UUID or a list of UUIDs."""
    schemas = doc["components"]["schemas"]

    def resolve(schema: dict) -> dict:
        while "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def is_id(schema: dict) -> bool:
        schema = resolve(schema)
        return (
            schema.get("format") == "uuid"
            or (schema.get("type") == "array" and is_id(schema.get("items", {})))
            or any(is_id(s) for s in schema.get("anyOf", []))
        )

    found = set()
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            found |= {
                (method.upper(), path, f"{p['in']}:{p['name']}")
                for p in op.get("parameters", [])
                if is_id(p.get("schema", {}))
            }
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                found |= {
                    (method.upper(), path, f"body:{name}")
                    for name, prop in resolve(body).get("properties", {}).items()
                    if is_id(prop)
                }
    return found


def test_other_users_ids_are_404_on_every_route(stack, owned):
    """Every id-taking input of every route (enumerated from the served OpenAPI document, so a new route or
    field fails here until it is covered) answers another tenant 404, exactly as an unknown id, changing nothing."""
    c, aid, status = owned
    cid, sid, uid = status["creation_id"], status["stems"][0]["stem_id"], status["upscaled_audios"][0]["stem_id"]
    mid = status["mastered_id"]
    owner = c.get("/usage").json()["user_id"]
    too_long = {"selection": {"start": 0, "end": 999}}  # the owner gets 422 for this: the source was found
    split = {"preset": "phantom_center"}
    # (method, path template, input it exercises) -> calls: (path, body, the owner's answer; None: the intruder only)
    calls = {
        ("GET", "/status/audio/{audio_id}", "path:audio_id"): [(f"/status/audio/{aid}", None, 200)],
        ("DELETE", "/audio/{audio_id}", "path:audio_id"): [(f"/audio/{aid}", None, None)],
        ("GET", "/audio/{audio_id}/peaks", "path:audio_id"): [(f"/audio/{aid}/peaks", None, 200)],
        ("POST", "/create-stems", "body:audio_id"): [("/create-stems", {**split, "audio_id": aid, **too_long}, 422)],
        ("POST", "/create-stems", "body:stem_id"): [("/create-stems", {**split, "stem_id": sid, **too_long}, 422)],
        ("POST", "/create-stems", "body:upscaled_id"): [
            ("/create-stems", {**split, "upscaled_id": uid, **too_long}, 422)
        ],
        ("POST", "/create-stems", "body:mastered_id"): [
            ("/create-stems", {**split, "mastered_id": mid, **too_long}, 422)
        ],
        # a mastering the owner asked for would add objects: these are the intruder's alone
        ("POST", "/master-audio", "body:audio_id"): [("/master-audio", {"audio_id": aid}, None)],
        ("POST", "/master-audio", "body:stem_id"): [("/master-audio", {"stem_id": sid}, None)],
        ("POST", "/master-audio", "body:upscaled_id"): [("/master-audio", {"upscaled_id": uid}, None)],
        ("POST", "/master-audio", "body:mastered_id"): [("/master-audio", {"mastered_id": mid}, None)],
        ("GET", "/status/mastered/{mastered_id}", "path:mastered_id"): [(f"/status/mastered/{mid}", None, 200)],
        ("GET", "/download/mastered/{mastered_id}", "path:mastered_id"): [(f"/download/mastered/{mid}", None, 200)],
        ("DELETE", "/mastered/{mastered_id}", "path:mastered_id"): [(f"/mastered/{mid}", None, None)],
        ("GET", "/status/stem_split/{creation_id}", "path:creation_id"): [(f"/status/stem_split/{cid}", None, 200)],
        ("POST", "/cancel/{creation_id}", "path:creation_id"): [(f"/cancel/{cid}", None, 409)],
        ("DELETE", "/stem_split/{creation_id}", "path:creation_id"): [(f"/stem_split/{cid}", None, None)],
        ("POST", "/download-links", "body:stem_ids"): [
            ("/download-links", {"stem_ids": [sid]}, 200),
            ("/download-links", {"stem_ids": [uid], "format": "hq"}, 200),
        ],
        ("GET", "/download/stem/{stem_id}", "path:stem_id"): [
            (f"/download/stem/{sid}", None, 200),
            (f"/download/stem/{sid}?format=hq", None, 200),
            (f"/download/stem/{uid}", None, 200),
        ],
        ("POST", "/download-archive", "body:creation_id"): [("/download-archive", {"creation_id": cid}, 200)],
        ("POST", "/download-archive", "body:stem_ids"): [
            ("/download-archive", {"stem_ids": [sid]}, 200),
            ("/download-archive", {"stem_ids": [uid, sid]}, 200),
        ],
        ("GET", "/stem/{stem_id}/peaks", "path:stem_id"): [
            (f"/stem/{sid}/peaks", None, 200),
            (f"/stem/{uid}/peaks", None, 200),
        ],
    }
    assert _id_inputs(c.get("/openapi.json").json()) == set(calls), "an id-taking input lacks an isolation check"
    before = (
        c.get(f"/status/stem_split/{cid}").json(),
        c.get(f"/status/audio/{aid}").json(),
        sorted(stack.objects(f"users/{owner}/")),
    )
    intruder = f"intruder-{uuid.uuid4().hex[:6]}"
    with stack.client(intruder) as m:
        unknown = m.get(f"/status/stem_split/{uuid.uuid4()}")
        for (method, _, _), cases in calls.items():
            for path, body, owner_status in cases:
                if owner_status is not None:
                    mine = c.request(method, path, json=body)
                    assert mine.status_code == owner_status, (method, path, mine.text)
                theirs = m.request(method, path, json=body)
                assert theirs.status_code == 404, (method, path, theirs.text)
                assert theirs.json()["code"] == "not_found"
        # a foreign id answers exactly like an id that does not exist: no existence oracle
        foreign = m.get(f"/status/stem_split/{cid}").json()
        assert {k: v for k, v in unknown.json().items() if k != "creation_id"} == {
            k: v for k, v in foreign.items() if k != "creation_id"
        }
        # the listing shows the intruder none of the owner's splits, even from a cursor made of the owner's split
        cursor = base64.urlsafe_b64encode(f"{time.time() + 60!r}|{cid}".encode()).decode()
        for params in ({}, {"cursor": cursor}):
            listed = m.get("/stem_split", params=params)
            assert listed.status_code == 200 and listed.json()["items"] == [], listed.text
        # a download link names one stem: the owner's link for one stem opens no other, whoever sends it
        token = c.post("/download-links", json={"stem_ids": [sid]}).json()["links"][0]["url"].rsplit("token=", 1)[1]
        r = m.get(f"/download/stem/{uid}", params={"token": token})
        assert r.status_code == 401 and "download link" in r.json()["detail"], r.text
        assert m.get("/usage").json() == {"user_id": intruder, "minutes": 0.0, "jobs": 0}
    # nothing the intruder did changed anything: the owner's records and objects are as they were
    after = (
        c.get(f"/status/stem_split/{cid}").json(),
        c.get(f"/status/audio/{aid}").json(),
        sorted(stack.objects(f"users/{owner}/")),
    )
    assert after == before
    assert stack.store.get_job(cid).status.value == "complete"
    assert c.get(f"/download/stem/{sid}").status_code == 200 and c.get(f"/download/mastered/{mid}").status_code == 200
    assert stack.store.active_jobs(intruder) == 0 and stack.store.list_jobs(intruder, 10, None) == []
