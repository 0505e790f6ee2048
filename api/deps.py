"""Shared resources of the API process and the request dependencies (auth, rate limit)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from pipelines.errors import RateLimited, Unauthorized
from stems.container import Container
from stems.settings import Settings


class Services(Container):
    """The API process's container, with its Celery app (for sending) and the availability of presets."""

    def __init__(
        self, settings: Settings | None = None, *, celery: Any, availability: Any = None, **parts: Any
    ) -> None:
        super().__init__(settings, **parts)
        self.celery = celery  # celery.Celery, imported lazily by the app factory
        self.availability = availability  # api.availability.Availability


def services(request: Request) -> Services:
    return request.app.state.services


def current_user(request: Request, x_api_key: str | None = Header(None, description="your API key")) -> str:
    """The user of the key; 401 without a known key; 429 past the per-key rate limit."""
    svc: Services = request.app.state.services
    if not x_api_key:
        raise Unauthorized("missing x-api-key header")
    key = svc.store.key_record(x_api_key)
    if key is None:
        raise Unauthorized("unknown API key")
    request.state.key_id = key.key_id
    if svc.store.count_request(key.user_id, int(time.time() // 60)) > svc.settings.rate_limit_per_minute:
        raise RateLimited(
            f"more than {svc.settings.rate_limit_per_minute} requests a minute",
            retry_after=60 - int(time.time()) % 60 + 1,
        )
    return key.user_id


def caller_key(request: Request, user: str = Depends(current_user)) -> str:
    """The id of the caller's API key (its webhook secret signs the callbacks of the jobs it creates)."""
    return request.state.key_id


# typed dependencies: a route names what it needs by type (`svc: Svc, user: User`)
User = Annotated[str, Depends(current_user)]
CallerKey = Annotated[str, Depends(caller_key)]
Svc = Annotated[Services, Depends(services)]
