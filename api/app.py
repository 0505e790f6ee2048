"""The FastAPI application factory; `uvicorn api.app:app` serves it with settings from the environment."""

from __future__ import annotations

import sys

from fastapi import FastAPI

from pipelines.errors import UnsafeProduction
from stems import production
from stems.jobstore import API_RETRIES
from stems.settings import Settings, get_settings

from . import (
    errors,
    routes_audio,
    routes_batch,
    routes_downloads,
    routes_master,
    routes_meta,
    routes_page,
    routes_peaks,
    routes_stems,
)
from .availability import Availability
from .deps import Services
from .limits import BodyLimit

DESCRIPTION = """Self-hostable stem splitting. Bring audio in (`/from-file`, `/from-link`,
`/from-storage`), wait for `status: complete` on `/status/audio/{audio_id}`, ask for a split
with `/create-stems`, poll `/status/stem_split/{creation_id}`, then download each stem
(`/download/stem/{stem_id}`) or one zip (`/download-archive`). `DELETE /audio/{audio_id}` removes
a track and everything made from it; the retention policy removes originals, stems and records
after the times the deployment sets. Every call except the health checks carries an `x-api-key`
header."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # storage, Redis and the broker answer: development warns in one line each, production refuses to start
    # (also on a Redis that does not persist)
    try:
        production.check(settings, "stems api")
    except UnsafeProduction as exc:
        print(f"stems api: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(78) from None  # EX_CONFIG, as a worker's refusal
    from workers.celery_app import make_celery

    (settings.data_dir / "tmp").mkdir(parents=True, exist_ok=True)
    # a request rides out a Redis blip of a second or two, then answers 503 redis_unavailable with Retry-After
    svc = Services(settings, retries=API_RETRIES, celery=make_celery(settings))
    _ = svc.storage  # built now: a storage setting that cannot work fails the start, not the first request
    svc.availability = Availability(svc)
    app = FastAPI(title="stems", version="0.1.0", description=DESCRIPTION)
    app.state.services = svc
    errors.install(app)
    app.add_middleware(BodyLimit)
    routers = (routes_audio, routes_batch, routes_stems, routes_master, routes_downloads, routes_peaks, routes_meta)
    for module in routers:
        app.include_router(module.router)
    routes_page.install(app)
    return app


def __getattr__(name: str):  # `uvicorn api.app:app` builds the app on first access, not at import
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
