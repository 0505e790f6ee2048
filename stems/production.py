"""Start-up checks that need the live services, for the API process, `stems worker` and `make up`.

Every service checks its dependencies when it starts: storage (the bucket exists and takes a write),
Redis (PING) and the broker (a connection), and says what is wrong in one line per dependency. In
development it warns and starts anyway: it answers 503 naming the dependency until it is back, and a
thread keeps checking and says when it is. In production (STEMS_ENV=production) it waits up to
STEMS_STARTUP_WAIT_S for them, then refuses to start with that line; it also refuses a Redis that does
not keep its data (AOF or RDB snapshots), and API keys that sign their webhooks without a secret of their own.

The static checks (storage backend, placeholder secrets, a password for a Redis beyond this
machine) live in `Settings`, so a bad environment fails when the settings load.
"""

from __future__ import annotations

import sys
import threading
import time

from pipelines.errors import DependencyUnavailable, StorageUnavailable, UnsafeProduction

from .container import Container
from .jobstore import JobStore
from .settings import Settings
from .storage import CHECKS as STORAGE_CHECKS, Storage

DEPENDENCIES = ("redis", "storage", "broker")
RECHECK_S = 5.0


def redis_problems(store: JobStore, settings: Settings) -> list[str]:
    found = store.persistence()
    if found["appendonly"] == "yes" or (found["save"] or "").strip():
        return []
    if found["save"] is None and settings.redis_assume_persistent:
        return []  # a managed Redis that hides CONFIG, and the operator vouches for its persistence
    how = (
        "appendonly=no and no save points (CONFIG GET)"
        if found["source"] == "CONFIG"
        else "aof_enabled:0 in INFO persistence, and CONFIG is not available to check save points"
    )
    return [
        f"Redis has no persistence ({how}): a restart would lose every job, key and queued message. Run it "
        f"with `--appendonly yes` (or save points); for a managed Redis whose persistence you know is on but "
        f"which hides CONFIG, set STEMS_REDIS_ASSUME_PERSISTENT=true"
    ]


def key_problems(store: JobStore) -> list[str]:
    """Keys made before keys had their own webhook secret: their webhooks are signed with a value derived from
    the server secret, which no tenant was ever given; each needs a secret of its own before production serves."""
    legacy = [k.key_id for k in store.list_keys() if not k.webhook_secret]
    if not legacy:
        return []
    return [
        f"API key(s) {', '.join(legacy)} have no webhook secret of their own (made before keys had one; their "
        f"webhooks are signed with a value derived from STEMS_SECRET_KEY): run `stems keys rotate KEY_ID` for "
        f"each and give its tenant the new webhook_secret it prints"
    ]


def dependency_problems(
    settings: Settings,
    store: JobStore | None = None,
    storage: Storage | None = None,
    write: bool = False,
    only: tuple[str, ...] = DEPENDENCIES,
) -> dict[str, DependencyUnavailable]:
    """The dependencies that fail a quick check now, each with its reason: Redis (one PING), storage (the bucket
    answers; with `write`, it also takes a small object) and the broker (a connection). None are retried."""
    from workers.celery_app import broker_check

    parts = Container(settings, store=store, storage=storage)
    store = parts.store
    checks = {"redis": store.check, "broker": lambda: broker_check(settings)}
    out: dict[str, DependencyUnavailable] = {}
    for name in only:
        try:
            if name == "storage":
                storage = parts.storage
                (storage.check if write else storage.ping)()
            else:
                checks[name]()
        except DependencyUnavailable as exc:
            out[name] = exc
        except Exception as exc:  # not one of the failures we know: still the dependency's, said so
            if name != "storage":
                raise
            out[name] = StorageUnavailable("refused", STORAGE_CHECKS["refused"], f"{exc.__class__.__name__}: {exc}")
    return out


def summary(problems: dict[str, DependencyUnavailable]) -> str:
    return "; ".join(f"{name}: {exc.line()}" for name, exc in problems.items())


def say(who: str, text: str) -> None:
    print(f"{who}: {text}", file=sys.stderr, flush=True)


def check(settings: Settings, who: str = "stems", wait_s: float | None = None) -> dict[str, DependencyUnavailable]:
    """A service's start-up check. Development: one warning line per dependency that fails, then a thread that
    says when each is back; returns the problems. Production: waits up to `wait_s` (STEMS_STARTUP_WAIT_S) for
    the dependencies, then raises UnsafeProduction with one line; also when Redis does not persist."""
    wait_s = settings.startup_wait_s if wait_s is None else wait_s
    parts = Container(settings)
    store, storage = parts.store, parts.storage
    if settings.env != "production":
        problems = dependency_problems(settings, store, storage, write=True)
        for name, exc in problems.items():
            say(
                who,
                f"warning: {exc.line()}; starting anyway: requests that need {name} answer 503 until it is "
                f"back (checked again every {RECHECK_S:.0f} s)",
            )
        if problems:
            threading.Thread(
                target=_watch,
                args=(settings, who, store, storage, tuple(problems)),
                daemon=True,
                name="stems-dependency-watch",
            ).start()
        return problems
    deadline = time.monotonic() + wait_s
    while True:
        problems = dependency_problems(settings, store, storage, write=True)
        if "redis" not in problems:
            unsafe = redis_problems(store, settings) + key_problems(store)
            if unsafe:
                raise UnsafeProduction("refusing to start in production: " + "; ".join(unsafe), problems=unsafe)
        if not problems:
            return {}
        if time.monotonic() > deadline:
            raise UnsafeProduction(
                f"refusing to start in production: {summary(problems)} (still so after "
                f"{wait_s:.0f} s, STEMS_STARTUP_WAIT_S)",
                problems=list(problems),
            )
        time.sleep(1.0)


def _watch(settings: Settings, who: str, store: JobStore, storage: Storage, failing: tuple[str, ...]) -> None:
    """Development: check the failing dependencies again until each answers, saying so once it does."""
    while failing:
        time.sleep(RECHECK_S)
        try:
            still = dependency_problems(settings, store, storage, only=failing)
        except Exception:
            continue
        for name in failing:
            if name not in still:
                say(who, f"{name}: ok now")
        failing = tuple(still)
