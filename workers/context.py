"""Per-process resources of a worker: settings, job store, storage, the warm engine and its step cache.

Created lazily on first use in each worker process (Celery kills a child whose
`worker_process_init` blocks for more than 4 s, and a model load can take longer), and
kept for the life of the process: the engine loads each model once, on the first job
that needs it, and every later job of that process finds it warm.

The step cache (`pipelines/cache.py`) lives in `data_dir/cache`, shared by the worker
processes of a host, bounded by STEMS_CACHE_MAX_BYTES (default 20 GiB; 0 turns it off).
Job scratch directories go to `data_dir/work`, on the same filesystem, so finished steps
enter the cache as hard links rather than copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from celery.signals import celeryd_init

from pipelines.cache import StepCache
from pipelines.engine import Engine
from pipelines.modelstore import ModelStore
from stems.jobstore import JobStore
from stems.settings import Settings, get_settings
from stems.storage import Storage, make_storage


def make_cache(s: Settings) -> StepCache | None:
    return StepCache(Path(s.data_dir) / "cache", s.cache_max_bytes) if s.cache_max_bytes > 0 else None


@dataclass
class StoreContext:
    """What job bookkeeping needs: the reaper in a worker's main process has no engine (and loads no torch)."""

    settings: Settings
    store: JobStore
    storage: Storage

    @classmethod
    def from_settings(cls, s: Settings) -> StoreContext:
        return cls(settings=s, store=JobStore.from_url(s.redis_url, s.key_prefix), storage=make_storage(s))


@dataclass
class WorkerContext(StoreContext):
    models: ModelStore
    engine: Engine
    scratch_dir: Path | None = None  # job scratch directories (None: the system's temporary directory)


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    s = get_settings()
    models = ModelStore(s.model_dir)
    return WorkerContext(
        settings=s,
        store=JobStore.from_url(s.redis_url, s.key_prefix),
        storage=make_storage(s),
        models=models,
        engine=Engine(models, device=s.device, chunk_seconds=s.chunk_seconds, cache=make_cache(s)),
        scratch_dir=Path(s.data_dir) / "work",
    )


@lru_cache(maxsize=1)
def store_context() -> StoreContext:
    """What imports and webhooks need: no engine, so a short time limit never lands in a torch import."""
    return StoreContext.from_settings(get_settings())


@celeryd_init.connect
def _preload_torch(**_):
    """Import torch in the worker's main process, before the pool forks, so no pool process imports it inside a
    job's time limit: a soft limit landing mid-import leaves a process that can never import torch again."""
    try:
        import torch  # noqa: F401
    except ImportError:  # a deployment without the neural families
        pass
