"""Waveform peaks of a stem or an imported audio, so a page draws waveforms without the audio."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter
from fastapi.responses import Response

from pipelines.errors import Conflict, NotFound
from stems.models import AssetStatus, StemStatus

from .deps import Services, Svc, User
from .routes_audio import owned_asset
from .routes_stems import owned_stem
from .schemas import Peaks

router = APIRouter(tags=["downloads"])

PEAKS_DOC = {"model": Peaks, "description": "audiowaveform JSON (version 2)"}


def _peaks(svc: Services, key: str | None, what: str, **ids: str) -> Response:
    if not key:
        raise NotFound(f"this {what} has no waveform peaks (it was made before peaks were computed)", **ids)
    body = b"".join(svc.storage.iter_range(key))
    # a record's peaks never change (its id is new for new audio); the answer depends on the key
    return Response(
        body, media_type="application/json", headers={"Cache-Control": "private, max-age=86400", "Vary": "x-api-key"}
    )


@router.get(
    "/stem/{stem_id}/peaks",
    response_model=Peaks,
    responses={200: PEAKS_DOC},
    summary="Waveform peaks of a finished stem (audiowaveform JSON)",
)
def stem_peaks(stem_id: UUID, svc: Svc, user: User) -> Response:
    stem = owned_stem(svc, user, str(stem_id))
    if stem.status != StemStatus.complete:
        raise Conflict(f"the stem is not ready (status {stem.status.value})", stem_id=stem.id)
    return _peaks(svc, stem.peaks_key, "stem", stem_id=stem.id)


@router.get(
    "/audio/{audio_id}/peaks",
    response_model=Peaks,
    responses={200: PEAKS_DOC},
    summary="Waveform peaks of an imported audio (audiowaveform JSON)",
)
def audio_peaks(audio_id: UUID, svc: Svc, user: User) -> Response:
    asset = owned_asset(svc, user, str(audio_id))
    if asset.status != AssetStatus.complete:
        raise Conflict(f"the audio has not finished importing (status {asset.status.value})", audio_id=asset.id)
    return _peaks(svc, asset.peaks_key, "audio", audio_id=asset.id)
