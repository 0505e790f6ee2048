"""Retry policy: which errors a later try can fix, and how long to wait before it (jittered exponential).

Retries are not Celery countdowns: the work goes back to the outbox, due after the backoff, and
the reaper sends it then, so a retry survives the worker that scheduled it (Redis keeps no
countdown message of a dead worker for a visibility timeout, and RabbitMQ quorum queues need
no delayed-delivery exchanges). The try count lives in our job store.
"""

from __future__ import annotations

import random

import redis

from pipelines.errors import StemsError

RETRYABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


def backoff(tries: int, base: float = 1.0) -> float:
    """Seconds before try `tries + 1`: base * 2**tries, capped at 60 s, jittered +-50%."""
    return min(60.0, base * 2.0**tries) * (0.5 + random.random())


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE) or (isinstance(exc, StemsError) and exc.retryable)
