"""A split's DJ stem file (`POST /download-archive` with `format: "stem.mp4"`): NI's Stem format, made on request."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from pipelines.errors import Conflict, Invalid
from pipelines.stemfile import NI_ORDER, write_stem_mp4
from stems.models import JobStatus

from .deps import Services


def stem_file(svc: Services, user: str, creation_id: str | None) -> FileResponse:
    from .routes_downloads import _object
    from .routes_stems import owned_job

    if creation_id is None:
        raise Invalid("a stem file is made of one 4-stem split: give its creation_id", field="creation_id")
    job = owned_job(svc, user, str(creation_id))
    if job.status != JobStatus.complete:
        raise Conflict(f"the split is not complete (status {job.status.value})", creation_id=job.id)
    stems = {s.name: s for s in svc.store.get_stems(job.stem_ids)}
    if not set(NI_ORDER) <= set(stems):
        raise Invalid(
            f"a stem file holds drums, bass, other and vocals (a 4-stem split such as 4_tracks); this split "
            f"made {', '.join(sorted(stems))}",
            field="format",
            creation_id=job.id,
        )
    keys = {name: _object(svc, stems[name], "wav")[0] for name in NI_ORDER}  # 409 / 410 unless each is stored
    tmp = Path(tempfile.mkdtemp(dir=svc.settings.data_dir / "tmp", prefix="stemfile-"))
    try:
        for name, key in keys.items():
            svc.storage.get_file(key, tmp / f"{name}.wav")
        path = write_stem_mp4(tmp / "out.stem.mp4", {n: tmp / f"{n}.wav" for n in NI_ORDER})
        for name in NI_ORDER:
            (tmp / f"{name}.wav").unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FileResponse(
        path,
        media_type="audio/mp4",
        filename=f"{job.preset}-{job.id[:8]}.stem.mp4",
        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
    )
