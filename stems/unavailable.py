"""A dependency is down: storage, Redis or the broker. One error type each, raised by the layer that talks to it.

`stems/storage.py` raises `StorageUnavailable`, `stems/jobstore.py` `RedisUnavailable` and the broker's send
path (`workers/messages.py`) `BrokerUnavailable`, each with a `reason` (bucket_missing, access_denied,
unreachable, timeout, ...). The API answers every one of them 503 with `Retry-After` and a body whose
`code` names the dependency (`api/errors.py`); a worker retries the work with backoff (`retryable`).

The message says what is wrong and what the operator should check, by the names of the settings: it
never carries a password, a secret, an endpoint URL or an object key, because an API client reads it.
What the server's own log gets (`detail`) is more: the host, the bucket, the underlying error, with any
password in a URL blanked.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

import redis

from pipelines.errors import DependencyUnavailable


class RedisUnavailable(DependencyUnavailable, redis.ConnectionError):
    """Also a `redis.ConnectionError`, so code written for the client's own errors (leases, retries) still holds."""

    code = "redis_unavailable"
    dependency = "Redis"
    config_reasons = frozenset({"access_denied", "read_only"})


def redact_url(url: str | None) -> str:
    """`url` without its password (redis://:secret@host -> redis://:***@host), for logs and start-up lines."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))


_URL = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^/\s:@]*):([^@\s/]*)@", re.I)


def scrub(text: str) -> str:
    """Blank passwords of any URL inside `text` (an error's message that quotes its URL)."""
    return _URL.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", text)
