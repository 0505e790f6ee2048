"""A worker started with STEMS_ENV=production refuses to start when its Redis does not persist (stems/production.py)."""
from __future__ import annotations

import sys

from celery.signals import celeryd_init

from stems.production import UnsafeProduction, check
from stems.settings import get_settings


@celeryd_init.connect
def _refuse_unsafe(**_):
    try:
        check(get_settings())
    except UnsafeProduction as exc:
        print(f"stems worker: {exc}", file=sys.stderr, flush=True)
        # SystemExit, not an Exception: Celery logs and ignores exceptions of signal handlers
        raise SystemExit(78) from None  # EX_CONFIG
