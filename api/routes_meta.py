"""The catalogue, usage, health and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from pipelines.errors import PresetError
from pipelines.install_hint import hint_command
from pipelines.presets import load_catalogue
from pipelines.registry import get_spec
from stems.production import DEPENDENCIES, dependency_problems

from .deps import Svc, User
from .schemas import PresetList

router = APIRouter(tags=["meta"])


@router.get("/presets", response_model=PresetList, summary="The preset catalogue, with availability here")
def presets(svc: Svc, user: User) -> dict:
    catalogue = load_catalogue()
    out = []
    for p in catalogue.presets:
        try:
            _, chain = svc.availability.pick(p)
            info = {
                "available": True,
                "queue": chain.queue,
                "chain": list(chain.model_ids),
                "missing_models": [],
                "dsp_fallback": all(get_spec(m).family == "dsp" for m in chain.model_ids),
            }
        except PresetError as exc:
            info = {
                "available": False,
                "queue": None,
                "chain": None,
                "missing_models": exc.fields["missing_models"],
                "install_hint": (hint := svc.availability.install_hint(p)),
                "install_command": hint_command(hint),
            }
        info["licence_refused"] = svc.availability.licence_refused(p)
        out.append(
            {
                "name": p.name,
                "description": p.description,
                "group": p.group,
                "stems": list(p.output_stems()),
                "usage_multiplier": p.usage_multiplier,
                **info,
            }
        )
    restoration = [{"name": r.name, "description": r.description} for r in catalogue.restoration_presets]
    return {"presets": out, "restoration_presets": restoration, "declared_use": svc.settings.declared_use}


@router.get("/usage", summary="Processed audio minutes for this key (times each preset's multiplier)")
def usage(svc: Svc, user: User) -> dict:
    return {"user_id": user, **svc.store.usage(user)}


@router.get("/healthz", summary="Liveness")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis, storage and the broker answer")
def readyz(svc: Svc) -> JSONResponse:
    """200 when Redis, storage (the bucket) and the broker answer; else 503 with each failing check's reason and
    what to check (no host, bucket or password: this answer needs no key)."""
    problems = dependency_problems(svc.settings, svc.store, svc.storage)
    checks = {
        name: "ok" if name not in problems else f"unavailable: {problems[name].reason}: {problems[name].check}"
        for name in DEPENDENCIES
    }
    if not problems:
        return JSONResponse({"status": "ok", "checks": checks})
    return JSONResponse(
        {"status": "unavailable", "checks": checks},
        status_code=503,
        headers={"Retry-After": str(min(e.retry_after for e in problems.values()))},
    )
