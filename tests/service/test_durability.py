"""Crash-safe writes and the settings that keep redelivery safe, on both storage backends."""

from __future__ import annotations

import io

import pytest

from pipelines.errors import StemsError
from stems.settings import Settings
from stems.storage import LocalStorage, S3Storage
from tests.service.test_storage import s3_settings


class Breaks(io.RawIOBase):
    """A stream that fails after `n` bytes, like a link download or upload cut off mid-way."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.left <= 0:
            raise ConnectionResetError("the source went away")
        k = min(len(buf), self.left)
        buf[:k] = b"\1" * k
        self.left -= k
        return k


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, s3_url):
    if request.param == "local":
        return LocalStorage(tmp_path / "objects")
    return S3Storage(s3_settings(s3_url))


@pytest.mark.parametrize("size", [100_000, 12 << 20], ids=["small", "multipart"])
def test_interrupted_write_leaves_no_object(storage, size):
    storage.put_stream("users/u/old", io.BytesIO(b"old"))
    with pytest.raises((ConnectionResetError, StemsError)):
        storage.put_stream("users/u/new", io.BufferedReader(Breaks(size)))
    with pytest.raises((ConnectionResetError, StemsError)):
        storage.put_stream("users/u/old", io.BufferedReader(Breaks(size)))  # overwriting: the old object stays whole
    assert storage.list("users/u/") == ["users/u/old"]
    assert storage.size("users/u/new") is None
    assert b"".join(storage.iter_range("users/u/old")) == b"old"
    if isinstance(storage, LocalStorage):  # no temporary file is left behind either
        assert [p.name for p in (storage.root / "users/u").iterdir()] == ["old"]


def test_visibility_timeout_must_outlast_the_longest_job():
    s = Settings()
    assert s.visibility_timeout_s > s.hard_time_limit(s.max_duration_s) > s.soft_time_limit(s.max_duration_s)
    with pytest.raises(ValueError, match="STEMS_VISIBILITY_TIMEOUT_S"):
        Settings(visibility_timeout_s=3600, max_duration_s=4 * 3600)
    from workers.celery_app import make_celery

    conf = make_celery(Settings(visibility_timeout_s=99_999)).conf
    assert conf.broker_transport_options["visibility_timeout"] == 99_999
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1


def test_production_refuses_unsafe_settings():
    with pytest.raises(ValueError) as err:
        Settings(env="production", storage="local", link_allow_hosts=["127.0.0.1"])
    for problem in ("STEMS_STORAGE=local", "STEMS_SECRET_KEY", "STEMS_LINK_ALLOW_HOSTS"):
        assert problem in str(err.value)
    Settings(env="production", storage="s3", secret_key="a-real-secret-of-some-length")


def test_lease_is_renewed_well_within_its_length():
    with pytest.raises(ValueError, match="STEMS_LEASE_RENEW_S"):
        Settings(lease_s=10, lease_renew_s=6)
    s = Settings()
    assert s.lease_renew_s * 2 <= s.lease_s and s.lease_s + s.reaper_interval_s < 60  # recovery under a minute


def test_rabbitmq_queues_are_quorum_with_a_delivery_limit_a_dead_letter_queue_and_a_consumer_timeout():
    from workers.celery_app import Consumer, broker_queue, make_celery, our_queue

    s = Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//", key_prefix="dep1", task_max_attempts=3)
    conf = make_celery(s).conf
    names = {q.name for q in conf.task_queues}
    assert "dep1.cpu" in names and "dep1.gpu-demucs" in names  # deployments sharing a RabbitMQ do not collide
    for q in conf.task_queues:
        args = q.queue_arguments
        assert args["x-queue-type"] == "quorum" and args["x-delivery-limit"] == 5
        assert args["x-dead-letter-exchange"] == "dep1.dead"
        assert args["x-consumer-timeout"] == s.visibility_timeout_s * 1000 > s.hard_time_limit(s.max_duration_s) * 1000
    assert our_queue(broker_queue("gpu-onnx", s), s) == "gpu-onnx"
    assert not any(step.endswith(":DelayedDelivery") for step in Consumer.Blueprint.default_steps)  # no countdowns used
    assert broker_queue("cpu", Settings()) == "cpu"  # Redis: the key prefix is the transport's
