"""Downloads: one stem (WAV or HQ encode, with HTTP Range), a zip of several, and links to stems.

A media element or a plain link cannot send the x-api-key header, and an API key must never
appear in a URL (logs, history, Referer). So POST /download-links hands out short-lived tokens,
each good for one stem in one format while the key that asked for it lives, that GET
/download/stem accepts as `?token=`.
"""

from __future__ import annotations

import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from pipelines.audio import hq_extension
from pipelines.errors import Conflict, Gone, NotFound, ObjectMissing, Unauthorized
from stems.models import JobStatus, Stem, StemStatus

from .deps import CallerKey, Services, Svc, User, current_user
from .routes_stems import owned_job, owned_stem
from .schemas import ArchiveRequest, DownloadLinks, DownloadLinksRequest
from .stemfile import stem_file

router = APIRouter(tags=["downloads"])

MEDIA = {"wav": "audio/wav", "m4a": "audio/mp4", "mp3": "audio/mpeg", "ogg": "audio/ogg", "flac": "audio/flac"}


def _object(svc: Services, stem: Stem, fmt: str) -> tuple[str, str, int]:
    """(key, file name, size) of a complete stem of a complete job in `fmt` (wav or hq).

    The job's status is checked, not only the stem's: a job that failed or was cancelled after its
    stems were stored keeps them only until its owed cleanup runs, and they are never its result."""
    if stem.status == StemStatus.expired:
        raise Gone(
            "the stem was deleted by the retention policy (STEMS_RETAIN_STEMS_S after its split ended)", stem_id=stem.id
        )
    if stem.status != StemStatus.complete:
        raise Conflict(f"the stem is not ready (status {stem.status.value})", stem_id=stem.id)
    if stem.kind != "mastered":  # a mastering's WAV has no job: its stem's status is its result
        job = svc.store.get_job(stem.job_id)
        if job is None or job.status != JobStatus.complete:
            status = job.status.value if job else "deleted"
            raise Conflict(f"the stem's split is not complete (status {status})", stem_id=stem.id)
    if fmt == "hq":
        if not stem.hq_key:
            raise NotFound("this stem has no HQ streaming encode (hq_streaming_format was none)", stem_id=stem.id)
        return stem.hq_key, f"{stem.name}.{hq_extension(stem.hq_format)}", stem.hq_size
    return stem.wav_key, f"{stem.name}.wav", stem.wav_size


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse a single `bytes=a-b` range; None for no/ignorable range; raises for unsatisfiable."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # unsupported (e.g. multiple ranges): answer the whole object
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or start > end:
        raise _Unsatisfiable(size)
    return start, min(end, size - 1)


class _Unsatisfiable(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def link_or_key_user(
    request: Request,
    stem_id: UUID,
    format: str = Query("wav", pattern="^(wav|hq)$"),
    token: str | None = Query(
        None,
        max_length=200,
        description="a download link's token (POST /download-links) instead of the x-api-key header",
    ),
    x_api_key: str | None = Header(None, description="your API key"),
) -> str:
    """The user of the API key, or of a download link's token, which names exactly one stem and format."""
    if token is None:
        return current_user(request, x_api_key)
    grant = request.app.state.services.store.download_grant(token)
    if grant is None or grant["stem_id"] != str(stem_id) or grant["format"] != format:
        raise Unauthorized(
            "this download link has expired, its API key was revoked, or it is for another stem; ask "
            "POST /download-links for a new one"
        )
    return grant["user_id"]


@router.post(
    "/download-links",
    response_model=DownloadLinks,
    summary="Short-lived links to stems, for players and links that cannot send the key",
)
def download_links(body: DownloadLinksRequest, svc: Svc, user: User, key_id: CallerKey) -> dict:
    ttl = svc.settings.download_link_ttl_s
    links = []
    for stem_id in dict.fromkeys(str(i) for i in body.stem_ids):
        stem = owned_stem(svc, user, stem_id)
        _object(svc, stem, body.format)  # 409 if not complete, 404 for hq without an HQ encode
        token = svc.store.create_download_token(user, key_id, stem.id, body.format, ttl)
        links.append(
            {
                "stem_id": stem.id,
                "format": body.format,
                "expires_at": time.time() + ttl,
                "url": f"/download/stem/{stem.id}?format={body.format}&token={token}",
            }
        )
    return {"links": links}


@router.get(
    "/download/stem/{stem_id}",
    summary="Download a stem (WAV, or the HQ encode with ?format=hq)",
    responses={
        200: {"content": {"audio/wav": {}}},
        206: {"description": "partial content (Range)"},
        307: {"description": "redirect to a presigned URL (S3 with presigning on)"},
    },
)
def download_stem(
    stem_id: UUID,
    request: Request,
    svc: Svc,
    user: Annotated[str, Depends(link_or_key_user)],
    format: str = Query("wav", pattern="^(wav|hq)$"),
) -> Response:
    stem = owned_stem(svc, user, str(stem_id))
    key, filename, _ = _object(svc, stem, format)
    # look before answering: a 200 whose body then fails mid-way is a broken download, not an error
    size = svc.storage.size(key)
    if size is None:
        raise ObjectMissing(f"no object {key!r}", key=key)  # 410 object_missing (api.errors), no key shown
    url = svc.storage.presigned_url(key, filename)
    if url:
        return RedirectResponse(url, status_code=307)
    media = MEDIA.get(filename.rsplit(".", 1)[-1], "application/octet-stream")
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{filename}"'}
    try:
        rng = _range(request.headers.get("range"), size)
    except _Unsatisfiable:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    if rng is None:
        return StreamingResponse(
            svc.storage.iter_range(key), media_type=media, headers={**headers, "Content-Length": str(size)}
        )
    start, end = rng
    return StreamingResponse(
        svc.storage.iter_range(key, start, end),
        status_code=206,
        media_type=media,
        headers={**headers, "Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)},
    )


@router.post(
    "/download-archive",
    summary="One zip of a job's stems, or of chosen stems; or a DJ stem file",
    responses={
        200: {
            "content": {"application/zip": {}, "audio/mp4": {}},
            "description": "a zip, or with `format: stem.mp4` a .stem.mp4 (NI's Stem format)",
        }
    },
)
def download_archive(body: ArchiveRequest, svc: Svc, user: User) -> Response:
    if body.format == "stem.mp4":  # not a zip: NI's Stem format for DJ software (api/stemfile.py)
        return stem_file(svc, user, body.creation_id)
    if body.creation_id:
        job = owned_job(svc, user, str(body.creation_id))
        if job.status != JobStatus.complete:
            raise Conflict(f"the split is not complete (status {job.status.value})", creation_id=job.id)
        stems = [
            s
            for s in svc.store.get_stems(job.stem_ids + job.upscaled_ids)
            if s.status in (StemStatus.complete, StemStatus.expired)
        ]  # expired: 410 below
        name = f"{job.preset}-{job.id[:8]}.zip"
    else:
        stems = [owned_stem(svc, user, str(i)) for i in dict.fromkeys(body.stem_ids)]
        name = "stems.zip"
    objects = [_object(svc, s, body.format) for s in stems]  # 409 if any is not complete
    tmp = tempfile.NamedTemporaryFile(dir=svc.settings.data_dir / "tmp", suffix=".zip", delete=False)
    tmp.close()
    path = Path(tmp.name)
    used: set[str] = set()
    try:
        # stored, not deflated: audio does not compress and the zip should cost no CPU
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for (key, filename, _), stem in zip(objects, stems):
                arcname = filename if filename not in used else f"{stem.id[:8]}-{filename}"
                used.add(arcname)
                with zf.open(arcname, "w", force_zip64=True) as out:
                    for block in svc.storage.iter_range(key):
                        out.write(block)
    except BaseException:  # an object missing, storage away mid-zip (503): an error answers, and no zip stays
        path.unlink(missing_ok=True)
        raise
    return FileResponse(
        path, media_type="application/zip", filename=name, background=BackgroundTask(path.unlink, missing_ok=True)
    )
