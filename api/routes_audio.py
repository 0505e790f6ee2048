"""Bringing audio in: upload, link, or an object an ingestion service already stored."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from pipelines.errors import NotFound
from stems.ingest import clean_key, may_register
from stems.lifecycle import delete_asset, expiry
from stems.models import AssetStatus, AudioAsset, new_id
from stems.netfetch import check_url
from stems.storage import keys

from .deps import Svc, User
from .idempotency import body_hash, once
from .queueing import queue_import
from .schemas import AudioAccepted, AudioStatus, FromLink, FromStorage
from .upload import receive_file

router = APIRouter(tags=["audio"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the audio file (anything ffmpeg decodes)",
                        }
                    },
                }
            }
        },
    }
}


@router.post(
    "/from-file",
    response_model=AudioAccepted,
    openapi_extra=UPLOAD_BODY,
    summary="Upload an audio file (multipart, streamed to storage)",
)
async def from_file(request: Request, svc: Svc, user: User, idempotency_key: str | None = Header(None)) -> dict:
    received = await receive_file(request, "file", svc.settings.max_upload_bytes, svc.settings.data_dir / "tmp")

    def run() -> dict:
        audio_id = new_id()
        asset = AudioAsset(
            id=audio_id,
            user_id=user,
            origin="upload",
            filename=received.filename,
            object_key=keys.original(user, audio_id),
            size=received.size,
        )
        svc.storage.put_file(asset.object_key, received.path)
        queue_import(svc, asset)
        return {"audio_id": audio_id, "status": "processing"}

    # storage, Redis and the broker are blocking clients: in the thread pool, so one large upload (a
    # minute's put to S3) does not stall every other request of this process
    try:
        return await run_in_threadpool(once, svc, user, "from-file", idempotency_key, body_hash(received.sha256), run)
    finally:
        await run_in_threadpool(received.path.unlink, missing_ok=True)


@router.post("/from-link", response_model=AudioAccepted, summary="Import audio from an http(s) link")
def from_link(body: FromLink, svc: Svc, user: User, idempotency_key: str | None = Header(None)) -> dict:
    check_url(body.url, svc.settings)  # refuse private / non-http targets now; the worker checks again per redirect

    def run() -> dict:
        audio_id = new_id()
        asset = AudioAsset(
            id=audio_id, user_id=user, origin="link", url=body.url, object_key=keys.original(user, audio_id)
        )
        queue_import(svc, asset)
        return {"audio_id": audio_id, "status": "processing"}

    return once(svc, user, "from-link", idempotency_key, body_hash(body.model_dump_json()), run)


@router.post(
    "/from-storage",
    response_model=AudioAccepted,
    summary="Register an object an ingestion service stored under your ingest prefix (or a granted key)",
    responses={
        404: {"description": "no such object, or one outside your ingest prefix without a grant (the two answer alike)"}
    },
)
def from_storage(body: FromStorage, svc: Svc, user: User, idempotency_key: str | None = Header(None)) -> dict:
    key = clean_key(body.key)
    # one answer for "not yours" and "not there": a tenant cannot probe which objects exist
    if (
        key is None
        or not may_register(
            key, user, svc.settings.ingest_prefix, svc.settings.secret_key, body.grant, svc.settings.grant_max_ttl_s
        )
        or svc.storage.size(key) is None
    ):
        raise NotFound("no such object under your ingest prefix", field="key")

    def run() -> dict:
        audio_id = new_id()
        asset = AudioAsset(
            id=audio_id, user_id=user, origin="ingest", object_key=key, filename=body.filename or key.rsplit("/", 1)[-1]
        )
        queue_import(svc, asset)
        return {"audio_id": audio_id, "status": "processing"}

    return once(svc, user, "from-storage", idempotency_key, body_hash(body.model_dump_json()), run)


def owned_asset(svc, user: str, audio_id: str) -> AudioAsset:
    asset = svc.store.get_asset(audio_id)
    if asset is None or asset.user_id != user:
        raise NotFound("audio not found", audio_id=audio_id)
    return asset


@router.get("/status/audio/{audio_id}", response_model=AudioStatus, summary="Import status and audio metadata")
def audio_status(audio_id: UUID, svc: Svc, user: User) -> dict:
    a = owned_asset(svc, user, str(audio_id))
    info = a.info or {}
    return {
        "audio_id": a.id,
        "status": a.status.value,
        "filename": a.filename,
        "size": a.size,
        "error": a.error,
        "created_at": a.created_at,
        "expires_at": expiry(a.created_at, svc.settings.retain_originals_s),
        **{k: info.get(k) for k in ("duration", "sample_rate", "channels", "codec", "container")},
    }


@router.delete(
    "/audio/{audio_id}",
    status_code=204,
    response_class=Response,
    summary="Delete an audio, its original and every split, stem and upscaled copy made from it",
    responses={
        204: {
            "description": "deleted: running splits of it are cancelled, records and stored "
            "objects removed; every id of it answers 404 from now on"
        }
    },
)
def delete_audio(audio_id: UUID, svc: Svc, user: User) -> Response:
    delete_asset(svc.store, svc.storage, owned_asset(svc, user, str(audio_id)))
    return Response(status_code=204)


__all__ = ["router", "owned_asset", "AssetStatus"]
