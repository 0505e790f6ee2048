"""Mastering: queue a mastered version of an audio, a stem or an upscaled copy; follow, download, delete it.

A mastered version is split like a stem (`/create-stems` with `mastered_id`), goes with its
audio when that is deleted, and expires with the stems' retention (`stems/masterings.py`).
"""

from __future__ import annotations

import logging
import time
from uuid import UUID

from fastapi import APIRouter, Header, Request, Response

from pipelines.errors import BrokerUnavailable, NotFound, RateLimited
from pipelines.master_presets import PRESETS
from stems.lifecycle import expiry
from stems.masterings import TASK_KIND, Mastering
from stems.models import StemStatus
from workers.messages import send_master

from .deps import CallerKey, Services, Svc, User
from .idempotency import body_hash, claim_for, run_once
from .routes_downloads import download_stem
from .routes_stems import _source_exists, owned_stem, resolve_source
from .schemas import MasterAudio, MasterQueued, MasterStatus

router = APIRouter(tags=["mastering"])
log = logging.getLogger(__name__)


def owned_mastering(svc: Services, user: str, mastered_id: str) -> Mastering:
    m = svc.store.masterings.get(mastered_id)
    if m is None or m.user_id != user:
        raise NotFound("mastered audio not found", mastered_id=mastered_id)
    return m


@router.post(
    "/master-audio",
    response_model=MasterQueued,
    summary="Queue a mastered version of an audio or stem",
    responses={
        404: {"description": "no such source of yours"},
        409: {"description": "the source is not ready"},
        410: {"description": "the source expired"},
        429: {"description": "rate limit or active-work quota"},
    },
)
def master_audio(
    body: MasterAudio, svc: Svc, user: User, key_id: CallerKey, idempotency_key: str | None = Header(None)
) -> dict:
    kind, source_id, audio_id, duration = resolve_source(svc, user, body)
    masters = svc.store.masterings

    def run() -> dict:
        if svc.store.active_jobs(user) + masters.active(user) >= svc.settings.max_active_jobs:
            raise RateLimited(
                f"{svc.settings.max_active_jobs} splits and masterings are already queued or running for this key",
                retry_after=30,
            )
        m = Mastering(
            user_id=user,
            audio_id=audio_id,
            source_kind=kind,
            source_id=source_id,
            preset=body.preset,
            bit_depth=body.bit_depth,
            audio_seconds=duration,
            key_id=key_id,
        )
        response = {
            "status": "processing",
            "message": "Mastering queued",
            "mastered_id": m.id,
            "audio_id": audio_id,
            "user_id": user,
            "preset": m.preset,
        }
        score = masters.create(m, time.time() + svc.settings.enqueue_grace_s, lambda pipe: claim.record(pipe, response))
        try:
            send_master(svc.celery, svc.settings, m)
        except BrokerUnavailable as exc:  # nothing is kept, the request may be retried: 503 broker_unavailable
            masters.delete(svc.storage, m)
            log.warning("nothing queued for mastering %s: %s", m.id, exc.line())
            raise
        svc.store.settle(TASK_KIND, m.id, score)
        if not _source_exists(svc, kind, source_id):  # deleted meanwhile: see stems/lifecycle.py
            masters.delete(svc.storage, m)
            raise NotFound(f"{kind} not found (deleted or expired just now)", **{f"{kind}_id": source_id})
        return response

    claim = claim_for(svc, user, "master-audio", idempotency_key, body_hash(body.model_dump_json()))
    return run_once(claim, run)


@router.get(
    "/status/mastered/{mastered_id}",
    response_model=MasterStatus,
    summary="Status of a mastering, with the loudness, true peak and range the result measures",
)
def mastered_status(mastered_id: UUID, svc: Svc, user: User) -> dict:
    m = owned_mastering(svc, user, str(mastered_id))
    stem = svc.store.get_stem(m.id)
    p = PRESETS[m.preset]
    done = stem is not None and stem.status == StemStatus.complete
    return {
        "mastered_id": m.id,
        "audio_id": m.audio_id,
        "source_kind": m.source_kind,
        "source_id": m.source_id,
        "preset": m.preset,
        "status": "expired" if stem is not None and stem.status == StemStatus.expired else m.status.value,
        "error": m.error,
        "target": {"integrated_lufs": p.target_lufs, "true_peak_dbtp": p.ceiling_dbtp},
        "measured": m.measured,
        "source_measured": m.source_measured,
        "processing": m.processing,
        "bit_depth": m.bit_depth,
        "sample_rate": stem.sample_rate if stem else None,
        "channels": stem.channels if stem else None,
        "size": stem.wav_size if stem else None,
        "download": f"/download/mastered/{m.id}" if done else None,
        "created_at": m.created_at,
        "finished_at": m.finished_at,
        "expires_at": expiry(m.finished_at, svc.settings.retain_stems_s) if m.status.terminal else None,
    }


@router.get(
    "/download/mastered/{mastered_id}",
    summary="Download a mastered version (WAV at the source's rate)",
    responses={
        200: {"content": {"audio/wav": {}}},
        206: {"description": "partial content (Range)"},
        307: {"description": "redirect to a presigned URL (S3 with presigning on)"},
        409: {"description": "not complete yet"},
        410: {"description": "expired"},
    },
)
def download_mastered(mastered_id: UUID, request: Request, svc: Svc, user: User) -> Response:
    owned_stem(svc, user, str(mastered_id), "mastered")
    return download_stem(mastered_id, request, svc=svc, user=user, format="wav")


@router.delete(
    "/mastered/{mastered_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a mastered version (a running mastering stops and leaves nothing)",
    responses={204: {"description": "deleted: its record and WAV; its id answers 404 from now on"}},
)
def delete_mastered(mastered_id: UUID, svc: Svc, user: User) -> Response:
    svc.store.masterings.delete(svc.storage, owned_mastering(svc, user, str(mastered_id)))
    return Response(status_code=204)
