"""Per-process resources of a worker: settings, job store, storage and the warm engine.

Created lazily on first use in each worker process (Celery kills a child whose
`worker_process_init` blocks for more than 4 s, and a model load can take longer).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

from pipelines.engine import Engine
from pipelines.modelstore import ModelStore
from stems.jobstore import JobStore
from stems.settings import Settings, get_settings
from stems.storage import Storage, make_storage


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


@dataclass
class WorkerContext:
    settings: Settings
    store: JobStore
    storage: Storage
    models: ModelStore
    engine: Engine


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    s = get_settings()
    models = ModelStore(s.model_dir)
    return WorkerContext(
        settings=s,
        store=JobStore.from_url(s.redis_url, s.key_prefix),
        storage=make_storage(s),
        models=models,
        engine=Engine(models, device=pick_device(s.device), chunk_seconds=s.chunk_seconds),
    )
