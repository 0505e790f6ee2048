"""Splitting: create a job, follow it, cancel it."""
from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Header
from pydantic import ValidationError

from pipelines.errors import PresetError
from pipelines.presets import load_catalogue
from stems.models import AssetStatus, Job, JobStatus, Stem, StemStatus
from stems.netfetch import check_url

from .deps import Conflict, Invalid, NotFound, RateLimited, Services, Svc, User
from .idempotency import body_hash, claim_for, run_once
from .queueing import queue_job
from .routes_audio import owned_asset
from .schemas import CreateStems, CustomFields, SplitStatus, StemsQueued

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
    if body.stem_id or body.upscaled_id:
        kind = "stem" if body.stem_id else "upscaled"
        stem = owned_stem(svc, user, str(body.stem_id or body.upscaled_id), kind)
        if stem.status != StemStatus.complete:
            raise Conflict(f"that {kind} is not ready (status {stem.status.value})", **{f"{kind}_id": stem.id})
        job = svc.store.get_job(stem.job_id)
        return kind, stem.id, job.audio_id if job else stem.id, stem.duration or 0.0
    if body.mastered_id:  # mastering is not part of this deployment: no such ids exist
        raise NotFound("mastered audio not found", mastered_id=str(body.mastered_id))
    if not body.audio_id:
        raise Invalid("give the source as one of audio_id, stem_id, upscaled_id or mastered_id", field="audio_id")
    asset = owned_asset(svc, user, str(body.audio_id))
    if asset.status != AssetStatus.complete:
        detail = f": {asset.error.get('message')}" if asset.error else ""
        raise Conflict(f"the audio has not finished importing (status {asset.status.value}){detail}",
                       audio_id=asset.id, audio_status=asset.status.value)
    return "audio", asset.id, asset.id, float(asset.info["duration"])


def custom_fields(body: CreateStems, max_chars: int) -> CustomFields:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = prompt.strip()
        if len(prompt) > 4 * max_chars:
            raise Invalid(f"prompt is {len(prompt)} characters; the maximum is {max_chars}", field="prompt")
        prompt = prompt[:max_chars]  # trimmed to the maximum before validation
    raw = {"prompt": prompt, "sam_model": body.sam_model, "stereo_mode": body.stereo_mode, "spans": body.spans}
    try:
        return CustomFields.model_validate({k: v for k, v in raw.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "prompt"
        raise Invalid(f"{field}: {first['msg']}", field=field) from None


@router.post("/create-stems", response_model=StemsQueued, summary="Queue a stem split")
def create_stems(body: CreateStems, svc=Svc, user: str = User, idempotency_key: str | None = Header(None)) -> dict:
    catalogue = load_catalogue()
    try:
        preset = catalogue.preset(body.preset)
    except PresetError as exc:
        raise Invalid(exc.message, field="preset", known=exc.fields.get("known")) from None
    kind, source_id, audio_id, duration = resolve_source(svc, user, body)
    params: dict = {"bit_depth": body.bit_depth, "hq_streaming_format": body.hq_streaming_format}
    start, end = 0.0, duration
    if body.selection:
        if body.selection.end > duration + 1e-3:
            raise Invalid(f"selection ends at {body.selection.end} s, after the end of the audio ({duration:.3f} s)",
                          field="selection.end")
        start, end = body.selection.start, min(body.selection.end, duration)
        params["selection"] = {"start": start, "end": end}
    if body.restoration_params:
        try:
            catalogue.restoration(body.restoration_params.preset)
        except PresetError as exc:
            raise Invalid(exc.message, field="restoration_params.preset") from None
        params["restoration"] = body.restoration_params.model_dump()
    if body.callback_url:
        check_url(body.callback_url, svc.settings)
    avail = svc.availability
    stems = list(preset.output_stems())
    if preset.prompt_guided:
        fields = custom_fields(body, svc.settings.max_prompt_chars)
        for span in fields.spans or []:
            if span.start < start or span.end > end:
                raise Invalid(f"span {span.start}-{span.end} s is outside the selection {start}-{end} s", field="spans")
        params.update(fields.model_dump())
        route = catalogue.route_prompt(fields.prompt)
        if route is None:
            raise Invalid(
                "this deployment has no prompt-guided model installed (SAM Audio) and the prompt names no stem "
                "an installed chain produces; try e.g. 'lead vocal', 'drums', 'bass', 'speech' or 'snare and kick'",
                field="prompt", sam_model=fields.sam_model)
        routed = catalogue.preset(route.preset)
        chain_index, chain = avail.pick(routed)
        params["route"] = {"preset": routed.name, "stems": list(route.stems), "chain_index": chain_index}
    else:
        chain_index, chain = avail.pick(preset)

    def run() -> dict:
        # inside `run`: a replay of an accepted Idempotency-Key answers its job even when the quota is full now
        if svc.store.active_jobs(user) >= svc.settings.max_active_jobs:
            raise RateLimited(f"{svc.settings.max_active_jobs} splits are already queued or running for this key",
                              retry_after=30)
        job = Job(user_id=user, preset=preset.name, audio_id=audio_id, source_kind=kind, source_id=source_id,
                  params=params, queue=chain.queue, chain_index=chain_index, audio_seconds=end - start,
                  callback_url=body.callback_url)
        hq = None if body.hq_streaming_format == "none" else body.hq_streaming_format
        records = [Stem(user_id=user, job_id=job.id, name=n, bit_depth=body.bit_depth, hq_format=hq) for n in stems]
        upscaled = []
        if body.restoration_params:
            upscaled = [Stem(user_id=user, job_id=job.id, name=f"{s.name}_restored", kind="upscaled", of_stem_id=s.id,
                             bit_depth=body.bit_depth, hq_format=hq) for s in records]
        job.stem_ids, job.upscaled_ids = [s.id for s in records], [s.id for s in upscaled]
        response = {
            "status": "processing", "message": "Stem separation queued", "audio_id": audio_id, "user_id": user,
            "creation_id": job.id,
            "audio_stems": [{"stem_id": s.id, "name": s.name, "status": s.status.value} for s in records],
            "upscaled_audios": [{"upscaled_id": u.id, "stem_id": u.of_stem_id, "name": u.name, "status": u.status.value}
                                for u in upscaled],
        }
        queue_job(svc, job, records + upscaled, claim, response)  # 503 if the broker refuses, nothing kept
        return response

    claim = claim_for(svc, user, "create-stems", idempotency_key, body_hash(body.model_dump_json()))
    return run_once(claim, run)


def stem_info(s: Stem) -> dict:
    done = s.status == StemStatus.complete
    download = None
    if done:
        download = {"wav": f"/download/stem/{s.id}"}
        if s.hq_key:
            download["hq"] = f"/download/stem/{s.id}?format=hq"
    return {"stem_id": s.id, "name": s.name, "status": s.status.value, "made_by": s.made_by, "duration": s.duration,
            "sample_rate": s.sample_rate, "channels": s.channels, "bit_depth": s.bit_depth, "size": s.wav_size,
            "hq_format": s.hq_format if s.hq_key else None, "hq_size": s.hq_size, "download": download}


@router.get("/status/stem_split/{creation_id}", response_model=SplitStatus, summary="Status of a split")
def split_status(creation_id: UUID, svc=Svc, user: str = User) -> dict:
    job = owned_job(svc, user, str(creation_id))
    stems = svc.store.get_stems(job.stem_ids)
    ups = svc.store.get_stems(job.upscaled_ids)
    return {
        "creation_id": job.id, "audio_id": job.audio_id, "preset": job.preset, "status": job.status.value,
        "progress": job.progress, "stage": job.stage, "error": job.error, "attempts": job.attempts, "worker": job.worker,
        "models": {s.name: s.made_by for s in stems + ups if s.made_by},
        "stems": [stem_info(s) for s in stems if s.status != StemStatus.dropped],
        "upscaled_audios": [stem_info(s) for s in ups if s.status != StemStatus.dropped],
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
    }


def _cancel(job: Job) -> Job | None:
    if job.status.terminal:
        return None
    job.status, job.stage = JobStatus.cancelled, "cancelled"
    return job


@router.post("/cancel/{creation_id}", response_model=SplitStatus, summary="Cancel a queued or running split")
def cancel(creation_id: UUID, svc=Svc, user: str = User) -> dict:
    job = owned_job(svc, user, str(creation_id))
    if job.status.terminal and job.status != JobStatus.cancelled:
        raise Conflict(f"the split already ended ({job.status.value})", creation_id=job.id)
    svc.store.request_cancel(job.id)  # a running worker stops between chunks and removes its outputs
    svc.store.update_job(job.id, _cancel)
    return split_status(creation_id, svc, user)


@router.delete("/stem_split/{creation_id}", response_model=SplitStatus, summary="Cancel a split (same as POST /cancel)")
def delete_split(creation_id: UUID, svc=Svc, user: str = User) -> dict:
    return cancel(creation_id, svc, user)
