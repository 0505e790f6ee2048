"""Shared resources of the API process and the request dependencies (auth, rate limit)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Depends, Header, Request

from pipelines.errors import StemsError
from pipelines.modelstore import ModelStore
from stems.jobstore import JobStore
from stems.settings import Settings
from stems.storage import Storage


class Unauthorized(StemsError):
    code = "unauthorized"


class NotFound(StemsError):
    code = "not_found"


class Conflict(StemsError):
    code = "conflict"


class Invalid(StemsError):
    code = "invalid_request"


class RateLimited(StemsError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int, **fields: object) -> None:
        super().__init__(message, retry_after=retry_after, **fields)
        self.retry_after = retry_after


class PayloadTooLarge(StemsError):
    code = "too_large"


class Unavailable(StemsError):
    """A service the request needs (the broker) refused; nothing of the request was kept. Retry later."""

    code = "unavailable"

    def __init__(self, message: str, retry_after: int, **fields: object) -> None:
        super().__init__(message, retry_after=retry_after, **fields)
        self.retry_after = retry_after


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: Storage
    models: ModelStore
    celery: object  # celery.Celery, imported lazily by the app factory
    availability: object = None  # api.availability.Availability


def services(request: Request) -> Services:
    return request.app.state.services


def current_user(request: Request, x_api_key: str | None = Header(None, description="your API key")) -> str:
    """The user of the key; 401 without a known key; 429 past the per-key rate limit."""
    svc: Services = request.app.state.services
    if not x_api_key:
        raise Unauthorized("missing x-api-key header")
    user = svc.store.user_for_key(x_api_key)
    if user is None:
        raise Unauthorized("unknown API key")
    window = int(time.time() // 60)
    key = svc.store.k("rate", user, str(window))
    count = svc.store.r.incr(key)
    if count == 1:
        svc.store.r.expire(key, 120)
    if count > svc.settings.rate_limit_per_minute:
        raise RateLimited(f"more than {svc.settings.rate_limit_per_minute} requests a minute",
                          retry_after=60 - int(time.time()) % 60 + 1)
    return user


User = Depends(current_user)
Svc = Depends(services)
