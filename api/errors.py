"""Map our errors to HTTP answers: every refusal is a clear 4xx with a code and the fields, and a dependency
that is down (storage, Redis, the broker) is a 503 naming it, with Retry-After: never a 500."""

from __future__ import annotations

import json
import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from pipelines.errors import DependencyUnavailable, LinkError, ObjectMissing, RateLimited, StemsError, Unauthorized
from stems.jobstore import unavailable as redis_unavailable
from stems.unavailable import RedisUnavailable

log = logging.getLogger(__name__)


def unavailable_response(request: Request, exc: DependencyUnavailable) -> JSONResponse:
    # the operator's line (host, bucket, the client's error) goes to the log; the answer says what to check
    log.warning("%s %s: 503 %s: %s", request.method, request.url.path, exc.code, exc.line())
    return JSONResponse(
        {"detail": exc.message, **exc.to_dict()}, status_code=503, headers={"Retry-After": str(exc.retry_after)}
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(StemsError)
    async def _ours(request: Request, exc: StemsError) -> JSONResponse:
        if isinstance(exc, DependencyUnavailable):
            return unavailable_response(request, exc)
        # the class says its status (pipelines/errors.py); nothing here decides it
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "ApiKey"}
        return JSONResponse({"detail": exc.message, **exc.to_dict()}, status_code=exc.http_status, headers=headers)

    @app.exception_handler(ObjectMissing)
    async def _missing(request: Request, exc: ObjectMissing) -> JSONResponse:
        # an object the records point at is gone (deleted behind our back, lost): the resource cannot be
        # served again, so 410; its storage key is internal and stays in the log
        log.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return JSONResponse(
            {
                "detail": "the stored audio of this resource is missing, so it cannot be served; "
                "separate or upload it again",
                "code": exc.code,
            },
            status_code=exc.http_status,
        )

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        # the job store raises RedisUnavailable itself; this is for a Redis error from elsewhere
        error = redis_unavailable(exc) or RedisUnavailable(
            "refused",
            "Redis refused a command; the operator should check the API's log",
            f"{exc.__class__.__name__}: {exc}",
        )
        return unavailable_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # a URL the schema refused (api/schemas.py::Link) answers like one the handler refused: code
        # invalid_link, with the field named. Others keep FastAPI's shape without echoing the input,
        # which JSON may not carry (1e400 parses as inf, "\ud800" is a lone surrogate): that was a 500
        errors = exc.errors()
        link = next((e for e in errors if e.get("type") == "invalid_link"), None)
        if link is None:
            body = {
                "detail": [
                    {"type": e["type"], "loc": [p if isinstance(p, int) else str(p) for p in e["loc"]], "msg": e["msg"]}
                    for e in errors
                ]
            }
        else:
            field = ".".join(str(p) for p in link["loc"][1:])
            body = {"detail": f"{field}: {link['msg']}", **LinkError(link["msg"], field=field).to_dict()}
        return Response(
            json.dumps(body, ensure_ascii=True, default=str), status_code=422, media_type="application/json"
        )
