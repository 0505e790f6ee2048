"""Splitting: create a job, follow it, list the caller's jobs, cancel one."""

from __future__ import annotations

import base64
import math
from uuid import UUID

from fastapi import APIRouter, Header, Query, Response
from pydantic import ValidationError

from pipelines.errors import Conflict, Gone, Invalid, NotFound, PresetError, RateLimited
from pipelines.jobspec import CustomSpec, RestorationSpec, Selection
from pipelines.licences import licence_of
from pipelines.plan import plan_split
from pipelines.presets import load_catalogue
from stems.lifecycle import delete_job, expiry
from stems.masterings import root_audio_id
from stems.models import AssetStatus, Job, JobStatus, Stem, StemStatus
from stems.netfetch import check_url
from workers.jobstate import cancel as cancel_job, clean_now

from . import budget, estimate
from .deps import CallerKey, Services, Svc, User
from .idempotency import body_hash, claim_for, run_once
from .queueing import queue_job
from .routes_audio import owned_asset
from .schemas import CreateStems, SplitList, SplitStatus, StemsEstimate, StemsQueued

router = APIRouter(tags=["stems"])


def owned_stem(svc: Services, user: str, stem_id: str, kind: str | None = None) -> Stem:
    stem = svc.store.get_stem(stem_id)
    if stem is None or stem.user_id != user or (kind and stem.kind != kind):
        raise NotFound(f"{kind or 'stem'} not found", stem_id=stem_id)
    return stem


def owned_job(svc: Services, user: str, job_id: str) -> Job:
    job = svc.store.get_job(job_id)
    if job is None or job.user_id != user:
        raise NotFound("stem split not found", creation_id=job_id)
    return job


def resolve_source(svc: Services, user: str, body: CreateStems) -> tuple[str, str, str, float]:
    """(source kind, source id, root audio id, duration in seconds) of the request's source."""
    if body.stem_id or body.upscaled_id or body.mastered_id:
        kind = "stem" if body.stem_id else "upscaled" if body.upscaled_id else "mastered"
        stem = owned_stem(svc, user, str(body.stem_id or body.upscaled_id or body.mastered_id), kind)
        if stem.status == StemStatus.expired:
            raise Gone(f"that {kind} was deleted by the retention policy", **{f"{kind}_id": stem.id})
        if stem.status != StemStatus.complete:
            raise Conflict(f"that {kind} is not ready (status {stem.status.value})", **{f"{kind}_id": stem.id})
        return kind, stem.id, root_audio_id(svc.store, stem), stem.duration or 0.0
    if not body.audio_id:
        raise Invalid("give the source as one of audio_id, stem_id, upscaled_id or mastered_id", field="audio_id")
    asset = owned_asset(svc, user, str(body.audio_id))
    if asset.status == AssetStatus.expired:
        raise Gone(
            "the audio's original was deleted by the retention policy; upload it again to split it", audio_id=asset.id
        )
    if asset.status != AssetStatus.complete:
        detail = f": {asset.error.get('message')}" if asset.error else ""
        raise Conflict(
            f"the audio has not finished importing (status {asset.status.value}){detail}",
            audio_id=asset.id,
            audio_status=asset.status.value,
        )
    return "audio", asset.id, asset.id, float(asset.info["duration"])


def custom_fields(body: CreateStems, max_chars: int) -> CustomSpec:
    """The custom-only fields as the job's own type (validated when the preset is `custom`; the route is planned
    after)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = prompt.strip()
        if len(prompt) > 4 * max_chars:
            raise Invalid(f"prompt is {len(prompt)} characters; the maximum is {max_chars}", field="prompt")
        prompt = prompt[:max_chars]  # trimmed to the maximum before validation
    raw = {"prompt": prompt, "sam_model": body.sam_model, "stereo_mode": body.stereo_mode, "spans": body.spans}
    try:
        return CustomSpec.model_validate({k: v for k, v in raw.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "prompt"
        raise Invalid(f"{field}: {first['msg']}", field=field) from None


def source_format(svc: Services, kind: str, source_id: str) -> tuple[int, int]:
    """(sample rate, channels) of a split's source, for the output estimate."""
    if kind == "audio":
        info = svc.store.get_asset(source_id).info or {}
        return int(info.get("sample_rate") or 44100), int(info.get("channels") or 2)
    stem = svc.store.get_stem(source_id)
    return int(stem.sample_rate or 44100), int(stem.channels or 2)


def _source_exists(svc: Services, kind: str, source_id: str) -> bool:
    """Is the source still there (not deleted, nor expired by retention)? Asked again after the job is created."""
    if kind == "audio":
        asset = svc.store.get_asset(source_id)
        return asset is not None and asset.status == AssetStatus.complete
    stem = svc.store.get_stem(source_id)
    return stem is not None and stem.status == StemStatus.complete


@router.post(
    "/create-stems",
    response_model=StemsQueued | StemsEstimate,
    summary="Queue a stem split (or, with dry_run, estimate one)",
    responses={
        410: {"description": "the source expired, or an Idempotency-Key replay whose job was deleted"},
        422: {
            "description": "invalid field, preset not available here, or over the per-job output "
            "budget (code `over_budget`, with the estimate's numbers)"
        },
        429: {"description": "rate limit, active-job quota or per-key output budget"},
    },
)
def create_stems(
    body: CreateStems, svc: Svc, user: User, key_id: CallerKey, idempotency_key: str | None = Header(None)
) -> dict:
    catalogue = load_catalogue()
    try:
        preset = catalogue.preset(body.preset)
    except PresetError as exc:
        raise Invalid(exc.message, field="preset", known=exc.fields.get("known")) from None
    kind, source_id, audio_id, duration = resolve_source(svc, user, body)
    start, end = 0.0, duration
    selection = None
    if body.selection:
        if body.selection.end > duration + 1e-3:
            raise Invalid(
                f"selection ends at {body.selection.end} s, after the end of the audio ({duration:.3f} s)",
                field="selection.end",
            )
        start, end = body.selection.start, min(body.selection.end, duration)
        selection = Selection(start=start, end=end)
    if end - start < svc.settings.min_duration_s:
        raise Invalid(
            f"the selection is {end - start:.3f} s long; the shortest the models take is "
            f"{svc.settings.min_duration_s} s",
            field="selection",
            min_duration=svc.settings.min_duration_s,
        )
    restoration = None
    if body.restoration_params:
        try:
            catalogue.restoration(body.restoration_params.preset)
        except PresetError as exc:
            raise Invalid(exc.message, field="restoration_params.preset") from None
        restoration = RestorationSpec(**body.restoration_params.model_dump())
    if body.callback_url:
        check_url(body.callback_url, svc.settings)
    stems = list(preset.output_stems())
    hq = None if body.hq_streaming_format == "none" else body.hq_streaming_format
    planned = plan_split(
        preset,
        selection=selection,
        bounds=(start, end),
        bit_depth=body.bit_depth,
        hq_format=hq,
        restoration=restoration,
        custom=custom_fields(body, svc.settings.max_prompt_chars) if preset.prompt_guided else None,
        pick=svc.availability.pick,
        model_served=svc.availability.model_served,
    )
    spec, queue, models, chain_index = planned.spec, planned.queue, planned.models, planned.spec.chain_index
    sample_rate, channels = source_format(svc, kind, source_id)
    numbers = budget.estimate(
        len(stems), channels, sample_rate, end - start, body.bit_depth, hq, bool(body.restoration_params)
    )
    budget.check_job(numbers, svc.settings.max_job_output_bytes)
    if body.dry_run:  # nothing is created: see api/estimate.py
        return estimate.answer(
            svc, user, preset, kind, source_id, audio_id, end - start, queue, models, chain_index, numbers
        )

    def run() -> dict:
        # inside `run`: a replay of an accepted Idempotency-Key answers its job even when the quota is full now
        if svc.store.active_jobs(user) >= svc.settings.max_active_jobs:
            raise RateLimited(
                f"{svc.settings.max_active_jobs} splits are already queued or running for this key", retry_after=30
            )
        budget.check_key(svc.store.pending_output_bytes(user), numbers, svc.settings.max_key_output_bytes)
        job = Job(
            user_id=user,
            audio_id=audio_id,
            source_kind=kind,
            source_id=source_id,
            spec=spec,
            queue=queue,
            audio_seconds=end - start,
            callback_url=body.callback_url,
            key_id=key_id,
            output_bytes=numbers["estimated_bytes"],
        )
        records, upscaled = job.make_stems(stems)
        response = {
            "status": "processing",
            "message": "Stem separation queued",
            "audio_id": audio_id,
            "user_id": user,
            "creation_id": job.id,
            "audio_stems": [{"stem_id": s.id, "name": s.name, "status": s.status.value} for s in records],
            "upscaled_audios": [
                {"upscaled_id": u.id, "stem_id": u.of_stem_id, "name": u.name, "status": u.status.value}
                for u in upscaled
            ],
        }
        queue_job(svc, job, records + upscaled, claim, response)  # 503 if the broker refuses, nothing kept
        if not _source_exists(svc, kind, source_id):  # deleted or expired meanwhile: see stems/lifecycle.py
            delete_job(svc.store, svc.storage, job, tombstone=False)  # its message finds no job and does nothing
            raise NotFound(f"{kind} not found (deleted or expired just now)", **{f"{kind}_id": source_id})
        return response

    claim = claim_for(svc, user, "create-stems", idempotency_key, body_hash(body.model_dump_json()))
    return run_once(claim, run)


def stem_info(s: Stem, job: Job) -> dict:
    done = (
        s.status == StemStatus.complete and job.status == JobStatus.complete
    )  # a stem downloads once its job is complete
    download = None
    if done:
        download = {"wav": f"/download/stem/{s.id}"}
        if s.hq_key:
            download["hq"] = f"/download/stem/{s.id}?format=hq"
    return {
        "stem_id": s.id,
        "name": s.name,
        "status": s.status.value,
        "made_by": s.made_by,
        "licence": licence_of(s.made_by),
        "duration": s.duration,
        "sample_rate": s.sample_rate,
        "channels": s.channels,
        "bit_depth": s.bit_depth,
        "size": s.wav_size,
        "hq_format": s.hq_format if s.hq_key else None,
        "hq_size": s.hq_size,
        "download": download,
    }


@router.get("/status/stem_split/{creation_id}", response_model=SplitStatus, summary="Status of a split")
def split_status(creation_id: UUID, svc: Svc, user: User) -> dict:
    job = owned_job(svc, user, str(creation_id))
    return {
        **status_of(
            job, svc.store.get_stems(job.stem_ids), svc.store.get_stems(job.upscaled_ids), svc.settings.retain_stems_s
        ),
        "eta_s": estimate.of_job(svc, job),
    }


def status_of(job: Job, stems: list[Stem], ups: list[Stem], retain_stems_s: float) -> dict:
    return {
        "creation_id": job.id,
        "audio_id": job.audio_id,
        "preset": job.preset,
        "status": job.status.value,
        "progress": job.progress,
        "stage": job.stage,
        "error": job.error,
        "attempts": job.attempts,
        "worker": job.separated.worker if job.separated else job.worker,
        "delivered_by": job.worker if job.separated and job.deliveries else None,
        "models": {s.name: s.made_by for s in stems + ups if s.made_by},
        "stems": [stem_info(s, job) for s in stems if s.status != StemStatus.dropped],
        "upscaled_audios": [stem_info(s, job) for s in ups if s.status != StemStatus.dropped],
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "expires_at": expiry(job.finished_at, retain_stems_s) if job.status.terminal else None,
    }


@router.get("/stem_split", response_model=SplitList, summary="Your splits, newest first (paginated by cursor)")
def list_splits(
    svc: Svc,
    user: User,
    limit: int = Query(20, ge=1, le=100, description="splits per page"),
    cursor: str | None = Query(None, max_length=200, description="`next_cursor` of the previous page"),
) -> dict:
    rows = svc.store.list_jobs(user, limit + 1, _cursor(cursor) if cursor else None)
    page = rows[:limit]
    jobs = svc.store.get_jobs([job_id for job_id, _ in page])  # an id whose job was deleted is skipped
    stems = {s.id: s for s in svc.store.get_stems([i for j in jobs for i in j.stem_ids + j.upscaled_ids])}
    names = {a.id: a.filename for a in svc.store.get_assets(list({j.audio_id for j in jobs}))}
    items = [
        {
            **status_of(
                j,
                [stems[i] for i in j.stem_ids if i in stems],
                [stems[i] for i in j.upscaled_ids if i in stems],
                svc.settings.retain_stems_s,
            ),
            "filename": names.get(j.audio_id),
        }
        for j in jobs
    ]
    last_id, last_score = page[-1] if page else (None, None)
    next_cursor = None
    if len(rows) > limit:
        next_cursor = base64.urlsafe_b64encode(f"{last_score!r}|{last_id}".encode()).decode()
    return {"items": items, "next_cursor": next_cursor}


def _cursor(text: str) -> tuple[float, str]:
    """(created_at, job id) the next page starts after."""
    try:
        score, job_id = base64.urlsafe_b64decode(text.encode()).decode().split("|")
        if not math.isfinite(float(score)):
            raise ValueError(score)
        return float(score), str(UUID(job_id))
    except ValueError:  # also binascii.Error and UnicodeDecodeError
        raise Invalid("cursor is not one this API gave (pass next_cursor unchanged)", field="cursor") from None


@router.post("/cancel/{creation_id}", response_model=SplitStatus, summary="Cancel a queued or running split")
def cancel(creation_id: UUID, svc: Svc, user: User) -> dict:
    job = owned_job(svc, user, str(creation_id))
    if not job.status.terminal:
        ended = cancel_job(job.id, svc)  # a compare-and-set: it owes the cleanup of the job's objects
        if ended is not None and ended.attempt_id is None:
            # nobody runs it (queued, or separated and waiting for delivery): its objects go now (else the reaper);
            # a running attempt stops at its next check and does it
            clean_now(ended, svc)
        job = svc.store.get_job(job.id) or job
    if job.status.terminal and job.status != JobStatus.cancelled:
        raise Conflict(f"the split already ended ({job.status.value})", creation_id=job.id)
    return split_status(creation_id, svc, user)


@router.delete(
    "/stem_split/{creation_id}",
    response_model=SplitStatus,
    summary="Delete an ended split and its stems (204), or cancel a queued or running one (200)",
    responses={
        204: {
            "description": "the split, its stems and upscaled copies are deleted: records and "
            "stored objects; every id of it answers 404 from now on"
        }
    },
)
def delete_split(creation_id: UUID, svc: Svc, user: User):
    job = owned_job(svc, user, str(creation_id))
    if job.status.terminal:
        delete_job(svc.store, svc.storage, job)
        return Response(status_code=204)
    return cancel(creation_id, svc, user)
