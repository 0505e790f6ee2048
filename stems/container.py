"""The resources a process shares, built from its settings in one place: the job store, storage and the
model store. The API (`api.deps.Services`), the workers (`workers.context.WorkerContext`, and this class as
the reaper's, retention's and heartbeat's), the CLI, the start-up checks, the benches and the tests all get
them here, so how a store is made (its prefix, its retries) is decided once.

Each part is made on first use, so a process that never touches storage never builds an S3 client, and a
caller that already holds a part (a test's store of its own prefix) passes it in.
"""

from __future__ import annotations

import copy
from functools import cached_property
from typing import Any, Self

from pipelines.modelstore import ModelStore

from .jobstore import WORKER_RETRIES, JobStore
from .settings import Settings, get_settings
from .storage import Storage, make_storage


class Container:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: JobStore | None = None,
        storage: Storage | None = None,
        models: ModelStore | None = None,
        retries: int = WORKER_RETRIES,
    ) -> None:
        self.settings = settings or get_settings()
        self.retries = retries  # of the job store's client: a worker rides out a Redis restart, the API answers 503
        given: dict[str, Any] = {"store": store, "storage": storage, "models": models}
        self.__dict__.update({k: v for k, v in given.items() if v is not None})  # set before first use

    def replace(self, **parts: Any) -> Self:
        """A copy with some parts swapped (in tests: a second node's view of the same deployment)."""
        twin = copy.copy(self)
        twin.__dict__.update(parts)
        return twin

    @cached_property
    def store(self) -> JobStore:
        return JobStore.from_url(self.settings.redis_url, self.settings.key_prefix, retries=self.retries)

    @cached_property
    def storage(self) -> Storage:
        return make_storage(self.settings)

    @cached_property
    def models(self) -> ModelStore:
        return ModelStore(self.settings.model_dir)
