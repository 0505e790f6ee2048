"""The answer of a dry run of /create-stems, and the `eta_s` of a queued or running split's status."""

from __future__ import annotations

from pipelines.errors import RateLimited, StemsError
from pipelines.presets import Preset
from stems import eta
from stems.models import Job

from . import budget
from .deps import Services


def _refusal(exc: StemsError) -> dict:
    """What a dry run reports of the refusal the real request would get: its code, HTTP status and message."""
    return {"code": exc.code, "status": exc.http_status, "message": exc.message}


def answer(
    svc: Services,
    user: str,
    preset: Preset,
    kind: str,
    source_id: str,
    audio_id: str,
    seconds: float,
    queue: str,
    models: list[str],
    chain_index: int | None,
    numbers: dict,
) -> dict:
    """What the split would do; the quota and key budget are read, not taken (a refusal is reported, not raised)."""
    stems = list(preset.output_stems())
    if numbers["restored_copies"]:
        stems += [f"{name}_restored" for name in stems]
    refusal = None
    active = svc.store.active_jobs(user) + svc.store.masterings.active(user)
    if active >= svc.settings.max_active_jobs:
        refusal = _refusal(
            RateLimited(
                f"{svc.settings.max_active_jobs} splits are already queued or running for this key", retry_after=0
            )
        )
    else:
        try:
            budget.check_key(svc.store.pending_output_bytes(user), numbers, svc.settings.max_key_output_bytes)
        except StemsError as exc:
            refusal = _refusal(exc)
    guess = eta.estimate(svc.store, queue, preset.name, chain_index, seconds)
    return {
        "dry_run": True,
        "preset": preset.name,
        "audio_id": audio_id,
        "source_kind": kind,
        "source_id": source_id,
        "seconds": round(seconds, 3),
        "stems": stems,
        "queue": queue,
        "chain": models,
        "chain_index": chain_index,
        "usage_minutes": round(seconds / 60 * preset.usage_multiplier, 4),
        "estimated_output_bytes": numbers["estimated_bytes"],
        "output": numbers,
        "eta_s": guess["eta_s"],
        "eta_basis": guess["basis"],
        "would_be_refused": refusal,
    }


def of_job(svc: Services, job: Job) -> float | None:
    """A queued or running job's estimated seconds to completion (None once it ended)."""
    if job.status.terminal:
        return None
    return eta.estimate(svc.store, job.queue, job.preset, job.spec.chain_index, job.audio_seconds or 0.0, job)["eta_s"]
