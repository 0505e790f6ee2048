"""The Celery app: Redis or RabbitMQ broker, late acks, prefetch of one, task events for Flower.

Queues come from the preset catalogue (`Catalogue.queues()`): `cpu` for DSP, speech
enhancement and import work, and one `gpu-<family>` queue per neural model family. A
worker serves the queues given with `-Q`, so a node only loads the models it has.

On RabbitMQ (`STEMS_BROKER_URL=amqp://...`) every queue is a quorum queue (replicated, and
it counts deliveries): a message delivered more than `STEMS_TASK_MAX_ATTEMPTS + 2` times
goes to the dead-letter queue `<prefix>.dead` instead of killing workers forever, and the
consumer timeout is the visibility timeout. Queue and exchange names carry
`STEMS_KEY_PREFIX`, so deployments and test runs can share one RabbitMQ as they share one
Redis. No task uses countdowns or ETAs (retries are scheduled by the reaper from our job
store), so Celery's native delayed delivery for quorum queues is left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Celery
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.entity import Exchange, Queue

from pipelines.presets import load_catalogue
from stems import rediskeys as K
from stems.settings import Settings, get_settings

if TYPE_CHECKING:
    from pipelines.errors import BrokerUnavailable


def broker_queue(name: str, s: Settings) -> str:
    """The broker's name for one of our queues (Redis keys carry the prefix already; RabbitMQ names need it)."""
    return f"{s.key_prefix}.{name}" if s.rabbitmq else name


def our_queue(broker_name: str, s: Settings) -> str:
    """Inverse of `broker_queue`."""
    return broker_name.removeprefix(f"{s.key_prefix}.") if s.rabbitmq else broker_name


def dead_letter_queue(s: Settings) -> Queue:
    return Queue(
        f"{s.key_prefix}.dead",
        Exchange(f"{s.key_prefix}.dead", type="fanout"),
        queue_arguments={"x-queue-type": "quorum"},
    )


def _rabbitmq_queues(s: Settings, names: list[str]) -> list[Queue]:
    exchange = Exchange(s.key_prefix, type="direct")
    arguments = {
        "x-queue-type": "quorum",
        "x-delivery-limit": s.task_max_attempts + 2,  # our attempt counter fails the job first, with its reason
        "x-dead-letter-exchange": dead_letter_queue(s).exchange.name,
        # RabbitMQ >= 3.12 reads this per queue; older servers need consumer_timeout in rabbitmq.conf (infra/)
        "x-consumer-timeout": s.visibility_timeout_s * 1000,
    }
    return [Queue(broker_queue(n, s), exchange, routing_key=n, queue_arguments=arguments) for n in names]


class Consumer(CeleryConsumer):
    """Celery's consumer without native delayed delivery (28 extra queues per vhost that nothing here uses)."""

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [s for s in CeleryConsumer.Blueprint.default_steps if not s.endswith(":DelayedDelivery")]


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("stems", broker=s.broker_url, include=["workers.tasks"])
    names = load_catalogue().queues()
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # state lives in our job store, not in a result backend
        task_acks_late=True,  # a split killed mid-way is delivered again ...
        task_reject_on_worker_lost=True,  # ... also when its process dies (SIGKILL, OOM)
        worker_prefetch_multiplier=1,  # a long split never sits reserved behind another
        worker_send_task_events=True,  # Flower (task-sent events would cost every POST a publish)
        task_default_queue=broker_queue("cpu", s),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # a run that outlives its broker connection may be delivered again: our attempt fencing
        # lets only one of the two write, so there is no need to kill it
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_consumer="workers.celery_app:Consumer",
        # SIGQUIT (cold shutdown) waits this long too; SIGTERM hands jobs back after it (workers/reaper.py)
        worker_soft_shutdown_timeout=s.shutdown_grace_s,
    )
    if s.rabbitmq:
        app.conf.update(
            task_queues=_rabbitmq_queues(s, names),
            task_default_exchange=s.key_prefix,
            task_default_exchange_type="direct",
            task_default_routing_key="cpu",
            control_exchange=f"{s.key_prefix}.control",
            event_exchange=f"{s.key_prefix}.events",
            # publisher confirms: send_task returns once the broker has the message (and raises if it refused
            # it), so an outbox entry is settled only for a message the broker holds
            broker_transport_options={"confirm_publish": True},
        )
    else:
        app.conf.update(
            task_queues=[Queue(q) for q in names],
            broker_transport_options={
                # Redis hands an unacknowledged message out again after this: the lease drops such a
                # duplicate of a running split, but keep it above the longest job to spare the delivery
                "visibility_timeout": s.visibility_timeout_s,
                "global_keyprefix": f"{s.key_prefix}:{K.CELERY}:",
            },
        )
    return app


BROKER_CHECKS = {
    "unreachable": "the broker cannot be reached; the operator should check that it (RabbitMQ, or the Redis of "
    "REDIS_URL) is running and that STEMS_BROKER_URL points at it",
    "timeout": "the broker did not answer in time; the operator should check its load and the network to it",
    "access_denied": "the broker refused our credentials; the operator should check the user and password in "
    "STEMS_BROKER_URL (or REDIS_URL)",
    "refused": "the broker refused the message; the operator should check the broker's log and the API's",
}


def broker_failure(exc: BaseException) -> str:
    """Why a send or a connection to the broker failed: access_denied, timeout, unreachable or refused."""
    import socket

    import redis
    from kombu.exceptions import OperationalError

    names: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(names) < 8:
        names.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(
        e.__class__.__name__ in ("AccessRefused", "AuthenticationError") or isinstance(e, redis.AuthenticationError)
        for e in names
    ):
        return "access_denied"
    if any(isinstance(e, (socket.timeout, TimeoutError, redis.TimeoutError)) for e in names):
        return "timeout"
    if any(
        isinstance(e, (OSError, OperationalError, redis.ConnectionError))
        or e.__class__.__name__ in ("ConnectionError", "RecoverableConnectionError", "ConnectionForced")
        for e in names
    ):
        return "unreachable"
    return "refused"


def broker_unavailable(exc: BaseException, s: Settings, what: str) -> BrokerUnavailable:
    from pipelines.errors import BrokerUnavailable
    from stems.unavailable import redact_url, scrub

    reason = broker_failure(exc)
    return BrokerUnavailable(
        reason,
        BROKER_CHECKS[reason],
        scrub(f"broker at {redact_url(s.broker_url)}, {what}: {exc.__class__.__name__}: {exc}"),
    )


def broker_check(s: Settings, timeout_s: float = 3.0) -> None:
    """Readiness and start-up: the broker takes a connection within `timeout_s`; BrokerUnavailable with the
    reason if not. The connection is tried in a thread, so a broker that accepts and never answers costs
    `timeout_s`, not a hang."""
    import threading

    from kombu.connection import Connection

    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            with Connection(
                s.broker_url, connect_timeout=timeout_s, transport_options={"socket_timeout": timeout_s}
            ) as conn:
                conn.connect()
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    probe = threading.Thread(target=connect, daemon=True, name="stems-broker-check")
    probe.start()
    probe.join(timeout_s + 1.0)
    if not outcome:
        raise broker_unavailable(TimeoutError(f"no answer within {timeout_s:.0f} s"), s, "connect")
    if outcome[0] is not None:
        raise broker_unavailable(outcome[0], s, "connect") from None


def rabbitmq_unreachable(url: str) -> str | None:
    """Why no RabbitMQ answers at `url` (None if one does)."""
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.connect()
    except Exception as exc:
        return f"no RabbitMQ answers at {url.split('@')[-1]} ({exc.__class__.__name__}: {exc})"
    return None


def purge_rabbitmq(url: str, prefix: str) -> None:
    """Delete the queues and exchanges a deployment with key prefix `prefix` declared (tests, benches)."""
    from kombu.connection import Connection

    from pipelines.presets import load_catalogue

    queues = [f"{prefix}.{q}" for q in load_catalogue().queues()] + [f"{prefix}.dead"]
    exchanges = [
        prefix,
        f"{prefix}.dead",
        f"{prefix}.events",
        f"{prefix}.control.pidbox",
        f"reply.{prefix}.control.pidbox",
    ]
    with Connection(url, connect_timeout=5) as conn:
        for name in queues + exchanges:
            channel = conn.channel()
            try:
                (channel.queue_delete if name in queues else channel.exchange_delete)(name)
            except Exception:  # never declared
                pass
            finally:
                try:
                    channel.close()
                except Exception:
                    pass


app = make_celery()
