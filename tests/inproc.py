"""In-process pieces of the service for tests that drive a job to an exact point: a worker's context on the
test Redis and moto's S3 server, a queued job as the API leaves it, and the API app on the same store."""

from __future__ import annotations

import uuid
from pathlib import Path

from pipelines.jobspec import SplitSpec
from stems.jobstore import JobStore
from stems.models import AssetStatus, AudioAsset, Job
from stems.settings import Settings
from stems.storage import S3Storage, keys
from tests.service.test_storage import s3_settings

SR = 44100


def worker_ctx(tmp: Path, redis_url: str, s3_url: str, **settings):
    """A WorkerContext of its own key prefix and bucket; `settings` override Settings fields."""
    from pipelines.engine import Engine
    from pipelines.modelstore import ModelStore
    from workers.context import WorkerContext

    prefix = f"t{uuid.uuid4().hex[:8]}"
    s = Settings(data_dir=tmp / "data", redis_url=redis_url, key_prefix=prefix, storage="local", **settings)
    storage = S3Storage(s3_settings(s3_url))
    models = ModelStore(tmp / "models")
    return WorkerContext(
        settings=s,
        store=JobStore.from_url(redis_url, prefix),
        storage=storage,
        models=models,
        engine=Engine(models, cache=None),
        scratch_dir=tmp / "data" / "work",
    )


def queued_job(
    ctx,
    song: Path,
    user: str = "u",
    queue: str = "cpu",
    seconds: float = 2.0,
    callback_url: str | None = None,
    hq_format: str | None = "aac",
) -> Job:
    """An imported asset and a queued phantom_center split of it (two stems), as the API writes them."""
    asset = AudioAsset(
        user_id=user,
        origin="upload",
        status=AssetStatus.complete,
        object_key="",
        info={"duration": seconds, "sample_rate": SR, "channels": 2},
    )
    asset.object_key = keys.original(user, asset.id)
    ctx.storage.put_file(asset.object_key, song)
    ctx.store.put_asset(asset)
    job = Job(
        user_id=user,
        audio_id=asset.id,
        source_kind="audio",
        source_id=asset.id,
        spec=SplitSpec(preset="phantom_center", chain_index=0, hq_format=hq_format),
        queue=queue,
        audio_seconds=seconds,
        callback_url=callback_url,
    )
    stems, _ = job.make_stems(("centre", "sides"))
    ctx.store.create_job(job, stems)
    return job


def api_client(ctx):
    """A TestClient of the API app on the context's store and storage, and an API key of user "u"."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(ctx.settings)
    app.state.services.store, app.state.services.storage = ctx.store, ctx.storage
    return TestClient(app, headers={"x-api-key": ctx.store.create_key("u")})
