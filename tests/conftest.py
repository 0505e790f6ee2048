"""Shared fixtures: one private Redis and one S3-protocol server (moto) for the whole run; the brokers."""

from __future__ import annotations

import os

import pytest

from stems.redisboot import start_redis
from tests.support import ServiceStack, start_moto
from workers.celery_app import rabbitmq_unreachable

RABBITMQ_URL = os.environ.get("STEMS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

# The tiers (pyproject's markers). A test's tier follows from where it lives, so a new test file is in a tier
# without anyone marking it: pure code under tests/pipelines, the real stack under tests/service, except the
# modules that kill processes, cut services or crash simulated ones at every write (drills) and those that
# install the project (install). A test marked with a tier itself (a drill in a service module) keeps it.
TIERS = ("unit", "service", "drill", "install", "browser")
DRILLS = {
    "test_nodeloss.py",
    "test_faults.py",
    "test_durability.py",
    "test_two_stage.py",
    "test_outage.py",
    "test_outbox.py",
    "test_node_drills.py",
    "test_unavailable.py",
    "test_crashpoints.py",
}
INSTALLS = {"test_make_run.py", "test_modelpull.py"}


def tier(path) -> str:
    if path.parent.name == "browser":
        return "browser"
    if path.parent.name in ("pipelines", "tests"):  # tests/test_infra.py reads files only
        return "unit"
    if path.name in DRILLS:
        return "drill"
    return "install" if path.name in INSTALLS else "service"


def pytest_collection_modifyitems(config, items):
    for item in items:
        kind = next((t for t in TIERS if item.get_closest_marker(t)), None) or tier(item.path)
        item.add_marker(getattr(pytest.mark, kind))
        if kind == "drill" and item.get_closest_marker("timeout") is None:
            # a drill waits for its job to reach a state (no fixed sleeps), however slow a loaded machine is (#24)
            item.add_marker(pytest.mark.timeout(1200))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def s3_url(tmp_path_factory):
    proc, url = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, redis_url, s3_url):
    """API + one CPU worker on S3 storage: the service as deployed, minus GPUs."""
    s = ServiceStack(tmp_path_factory.mktemp("stack"), redis_url, s3_url, STEMS_MAX_DURATION_S="600")
    s.start_api()
    s.start_worker("cpu", "cpu")
    yield s
    s.stop()


@pytest.fixture(scope="session", params=["local", "s3"])
def backend_stack(request, tmp_path_factory, redis_url, s3_url):
    """API + CPU worker on each storage backend in turn: a local directory, and S3 over HTTP."""
    s = ServiceStack(
        tmp_path_factory.mktemp(f"stack-{request.param}"), redis_url, s3_url if request.param == "s3" else None
    )
    s.start_api()
    s.start_worker("cpu", f"cpu{request.param}")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def rabbitmq_url():
    """The RabbitMQ the tests use as a broker (STEMS_TEST_RABBITMQ_URL); its tests are skipped, saying why, without one."""
    reason = rabbitmq_unreachable(RABBITMQ_URL)
    if reason:
        pytest.skip(f"RabbitMQ broker tests skipped: {reason}")
    return RABBITMQ_URL


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request):
    """The Celery broker of a test's stack: None (the stack's own Redis) or a RabbitMQ URL."""
    return None if request.param == "redis" else request.getfixturevalue("rabbitmq_url")
