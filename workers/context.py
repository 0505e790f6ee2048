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

from functools import lru_cache
from pathlib import Path
from typing import Any

from celery.signals import celeryd_init

from pipelines.cache import StepCache
from pipelines.engine import Engine
from pipelines.registry import torch_queues
from stems.container import Container
from stems.settings import Settings, get_settings

from .celery_app import our_queue


def make_cache(s: Settings) -> StepCache | None:
    return StepCache(Path(s.data_dir) / "cache", s.cache_max_bytes) if s.cache_max_bytes > 0 else None


class WorkerContext(Container):
    """A worker process's container, with the warm engine (over the container's model store) and where job
    scratch directories go (None: the system's temporary directory)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        engine: Engine | None = None,
        scratch_dir: Path | None = None,
        **parts: Any,
    ) -> None:
        super().__init__(settings, **parts)
        s = self.settings
        self.engine = engine or Engine(self.models, device=s.device, chunk_seconds=s.chunk_seconds, cache=make_cache(s))
        self.scratch_dir = scratch_dir


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    s = get_settings()
    return WorkerContext(s, scratch_dir=Path(s.data_dir) / "work")


@lru_cache(maxsize=1)
def store_context() -> Container:
    """What imports and webhooks need: no engine, so a short time limit never lands in a torch import."""
    return Container(get_settings())


@celeryd_init.connect
def _preload_torch(options: dict | None = None, **_: Any) -> None:
    """Import torch in the worker's main process, before the pool forks, so no pool process imports it inside a
    job's time limit: a soft limit landing mid-import leaves a process that can never import torch again.

    Only where the worker consumes the queue of a family that imports torch (or names no queues): a worker of
    `cpu` alone (imports, DSP, speech, delivery) starts without it, about 2 s and a few hundred MB sooner."""
    queues = (options or {}).get("queues")
    if isinstance(queues, str):
        queues = queues.split(",")
    # the worker is given the broker's queue names, which carry the key prefix on RabbitMQ
    s = get_settings()
    if queues and not {our_queue(q, s) for q in queues} & torch_queues():
        return
    try:
        import torch  # noqa: F401
    except ImportError:  # a deployment without the neural families
        pass
