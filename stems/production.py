"""Production refusals that need the live services: a service started with STEMS_ENV=production checks
that its Redis keeps its data (AOF or RDB snapshots), and that every API key signs its webhooks with a
secret of its own, before serving, and refuses to start otherwise.

The static checks (storage backend, placeholder secrets, a password for a Redis beyond this
machine) live in `Settings`, so a bad environment fails when the settings load.
"""
from __future__ import annotations

import time

import redis

from pipelines.errors import StemsError

from .jobstore import JobStore
from .settings import Settings


class UnsafeProduction(StemsError):
    code = "unsafe_production"


def redis_problems(store: JobStore, settings: Settings) -> list[str]:
    found = store.persistence()
    if found["appendonly"] == "yes" or (found["save"] or "").strip():
        return []
    if found["save"] is None and settings.redis_assume_persistent:
        return []  # a managed Redis that hides CONFIG, and the operator vouches for its persistence
    how = ("appendonly=no and no save points (CONFIG GET)" if found["source"] == "CONFIG"
           else "aof_enabled:0 in INFO persistence, and CONFIG is not available to check save points")
    return [f"Redis has no persistence ({how}): a restart would lose every job, key and queued message. Run it "
            f"with `--appendonly yes` (or save points); for a managed Redis whose persistence you know is on but "
            f"which hides CONFIG, set STEMS_REDIS_ASSUME_PERSISTENT=true"]


def key_problems(store: JobStore) -> list[str]:
    """Keys made before keys had their own webhook secret: their webhooks are signed with a value derived from
    the server secret, which no tenant was ever given; each needs a secret of its own before production serves."""
    legacy = [k.key_id for k in store.list_keys() if not k.webhook_secret]
    if not legacy:
        return []
    return [f"API key(s) {', '.join(legacy)} have no webhook secret of their own (made before keys had one; their "
            f"webhooks are signed with a value derived from STEMS_SECRET_KEY): run `stems keys rotate KEY_ID` for "
            f"each and give its tenant the new webhook_secret it prints"]


def check(settings: Settings, wait_s: float = 30.0) -> None:
    """Raise UnsafeProduction (production only) when Redis does not persist, or cannot be reached to tell, or a
    key has no webhook secret of its own."""
    if settings.env != "production":
        return
    store = JobStore.from_url(settings.redis_url, settings.key_prefix)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            problems = redis_problems(store, settings) + key_problems(store)
            break
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                raise UnsafeProduction(f"cannot reach Redis to check its persistence: {exc}") from exc
            time.sleep(1.0)
    if problems:
        raise UnsafeProduction("refusing to start in production: " + "; ".join(problems), problems=problems)
