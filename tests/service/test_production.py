"""Production refusals: unsafe settings fail when they load, and a service started with STEMS_ENV=production
refuses to start on a Redis that does not persist. Real redis-server processes, with and without persistence
(and one that hides CONFIG, as managed services do), and the real API and worker processes."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from stems.redisboot import start_redis
from stems.settings import Settings
from tests.support import ROOT, ServiceStack

STRONG = secrets.token_urlsafe(32)


def _prod(**kw) -> Settings:
    return Settings(**{"env": "production", "storage": "s3", "secret_key": STRONG, **kw})


@pytest.mark.parametrize(
    "secret", ["change-me", "dev-webhook-secret", "dev-secret-key", "CHANGEME", "secret", "short-secret", ""]
)
def test_placeholder_secrets_are_refused(secret):
    with pytest.raises(ValueError, match="STEMS_SECRET_KEY"):
        _prod(secret_key=secret)
    Settings(secret_key=secret)  # development takes anything


def test_the_old_name_of_the_secret_is_still_read(monkeypatch):
    monkeypatch.setenv("STEMS_WEBHOOK_SECRET", STRONG)
    assert Settings().secret_key == STRONG


@pytest.mark.parametrize(
    "url,refused",
    [
        ("redis://10.0.0.5:6379/0", True),
        ("redis://redis:6379/0", True),
        ("rediss://cache.example.com:6380/0", True),
        ("redis://user@10.0.0.5:6379/0", True),
        ("redis://[fd00::5]:6379/0", True),
        ("redis://:hunter2-long-password@10.0.0.5:6379/0", False),
        ("redis://app:pw@redis:6379/0", False),
        ("redis://127.0.0.1:6379/0", False),
        ("redis://localhost:6379/0", False),
        ("redis://[::1]:6379/0", False),
        ("unix:///run/redis.sock", False),
    ],
)
def test_a_password_is_required_beyond_loopback(url, refused):
    if refused:
        with pytest.raises(ValueError, match="without a password"):
            _prod(redis_url=url)
    else:
        _prod(redis_url=url)
    Settings(redis_url=url)


def _stack(tmp: Path, redis_url: str, s3_url: str, **env) -> ServiceStack:
    return ServiceStack(
        tmp, redis_url, s3_url, STEMS_ENV="production", STEMS_SECRET_KEY=STRONG, STEMS_LINK_ALLOW_HOSTS="[]", **env
    )


def _refuses(proc, *needles: str) -> str:
    code = proc.popen.wait(90)
    log = proc.log.read_text()
    assert code != 0, log[-2000:]
    for needle in needles:
        assert needle in log, log[-2000:]
    return log


@pytest.fixture
def redis_server(tmp_path):
    started = []

    def start(**kw):
        proc, url = start_redis(tmp_path / f"redis{len(started)}", **kw)
        started.append(proc)
        return url

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def test_api_and_worker_refuse_a_redis_without_persistence(tmp_path, s3_url, redis_server):
    s = _stack(tmp_path, redis_server(persist=False), s3_url)
    try:
        from stems.stack import api_proc, worker_proc

        api = api_proc(s.env, s.port, tmp_path / "api.log").start()
        worker = worker_proc(s.env, "cpu", "prod", tmp_path / "worker.log").start()
        s.procs += [api, worker]
        _refuses(api, "Redis has no persistence", "appendonly=no")
        _refuses(worker, "Redis has no persistence")
    finally:
        s.stop()


def test_api_and_worker_start_on_a_persistent_redis_with_a_password(tmp_path, s3_url, redis_server):
    url = redis_server(persist=True, password=secrets.token_urlsafe(16))
    s = _stack(tmp_path, url, s3_url)
    try:
        s.start_api()
        s.start_worker("cpu", "prod")
        with s.client("prod-user") as c:
            assert c.get("/usage").status_code == 200
    finally:
        s.stop()


def test_a_redis_hiding_config_needs_aof_or_the_operators_word(tmp_path, s3_url, redis_server):
    hidden = ("--rename-command", "CONFIG", "")  # as managed Redis services do
    s = _stack(tmp_path / "a", redis_server(extra_args=hidden), s3_url)
    try:
        from stems.stack import api_proc

        api = api_proc(s.env, s.port, tmp_path / "api.log").start()
        s.procs.append(api)
        _refuses(api, "aof_enabled:0", "STEMS_REDIS_ASSUME_PERSISTENT")
    finally:
        s.stop()
    s = _stack(tmp_path / "b", redis_server(extra_args=hidden), s3_url, STEMS_REDIS_ASSUME_PERSISTENT="true")
    try:
        s.start_api()
    finally:
        s.stop()
    url = redis_server(extra_args=(*hidden, "--appendonly", "yes"))
    s = _stack(tmp_path / "c", url, s3_url)
    try:
        s.start_api()
    finally:
        s.stop()


def test_production_refuses_keys_without_their_own_webhook_secret(tmp_path, s3_url, redis_server):
    """A key made before keys had their own secret blocks production until `stems keys rotate` gives it one."""
    s = _stack(tmp_path, redis_server(persist=True), s3_url)
    legacy, modern = s.store.issue_key("old-tenant"), s.store.issue_key("new-tenant")
    s.forget_webhook_secret(legacy)
    try:
        from stems.stack import api_proc, worker_proc

        api = api_proc(s.env, s.port, tmp_path / "api.log").start()
        worker = worker_proc(s.env, "cpu", "prod", tmp_path / "worker.log").start()
        s.procs += [api, worker]
        log = _refuses(api, legacy.key_id, "stems keys rotate")
        assert modern.key_id not in log
        _refuses(worker, legacy.key_id, "stems keys rotate")
        s.procs.clear()
        assert s.store.rotate_webhook_secret(legacy.key_id) is not None
        s.start_api()
        with s.client("prod-user") as c:
            assert c.get("/usage").status_code == 200
    finally:
        s.stop()


def test_api_refuses_a_placeholder_secret_at_start(tmp_path, s3_url, redis_server):
    s = _stack(tmp_path, redis_server(persist=True), s3_url)
    s.env["STEMS_SECRET_KEY"] = "change-me"
    try:
        from stems.stack import api_proc

        api = api_proc(s.env, s.port, tmp_path / "api.log").start()
        s.procs.append(api)
        _refuses(api, "STEMS_SECRET_KEY")
    finally:
        s.stop()


def test_deployment_files_run_production_with_flower_behind_basic_auth():
    compose = (ROOT / "infra" / "compose.yaml").read_text()
    assert "STEMS_ENV: production" in compose and "change-me" not in compose
    flower = compose[compose.index("  flower:") :]
    assert "--basic-auth=${FLOWER_BASIC_AUTH:?" in flower and '"127.0.0.1:5555:5555"' in flower
    redis = compose[compose.index("  redis:") : compose.index("  minio:")]
    assert "--requirepass" in redis and '"--appendonly", "yes"' in redis
    assert "redis://:${REDIS_PASSWORD:?" in compose
    for manifest in ("api.yaml", "workers.yaml"):
        assert "{name: STEMS_ENV, value: production}" in (ROOT / "infra" / "k8s" / manifest).read_text()
    # the bucket's lifecycle rule: tests/service/test_s3_lifecycle_rule.py


def test_api_and_worker_refuse_to_start_without_their_bucket(tmp_path, s3_url, redis_server):
    """Production: storage, Redis and the broker are checked at start; a missing bucket is waited for for
    STEMS_STARTUP_WAIT_S, then both refuse with one line that says what is wrong and what to do."""
    import boto3

    s = _stack(tmp_path, redis_server(persist=True), s3_url, STEMS_STARTUP_WAIT_S="2")
    boto3.client(
        "s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    ).delete_bucket(Bucket=s.env["S3_BUCKET"])
    try:
        from stems.stack import api_proc, worker_proc

        api = api_proc(s.env, s.port, tmp_path / "api.log").start()
        worker = worker_proc(s.env, "cpu", "prod", tmp_path / "worker.log").start()
        s.procs += [api, worker]
        line = (
            "refusing to start in production: storage: storage is unavailable (bucket missing): the bucket does "
            "not exist; the operator should create it or correct S3_BUCKET"
        )
        for proc, who in ((api, "stems api"), (worker, "stems worker")):
            _refuses(proc, f"{who}: {line}", "still so after 2 s")
    finally:
        s.stop()
