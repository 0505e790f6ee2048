"""A worker's start-up check (stems/production.py): storage, Redis and the broker answer, one line for each that
does not. In development it warns and starts (Celery keeps reconnecting to the broker, the job store to Redis,
and work that met storage down is retried with backoff); with STEMS_ENV=production it refuses to start, also
when its Redis does not persist."""

from __future__ import annotations

import sys

from celery.signals import celeryd_init

from pipelines.errors import UnsafeProduction
from stems.production import check
from stems.settings import get_settings


@celeryd_init.connect
def _refuse_unsafe(**_):
    try:
        check(get_settings(), "stems worker")
    except UnsafeProduction as exc:
        print(f"stems worker: {exc}", file=sys.stderr, flush=True)
        # SystemExit, not an Exception: Celery logs and ignores exceptions of signal handlers
        raise SystemExit(78) from None  # EX_CONFIG
