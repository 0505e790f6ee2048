"""Import an audio asset: fetch it (for links), probe it, accept or refuse it with a reason.

The asset's record is only ever updated here, never created: if the user deleted the asset
while it was importing, the update finds no record, and an original this import stored
itself (a link's download) is removed again.

`run_import` bounds each delivery: it counts the try in the job store (a file that kills its
worker is refused after STEMS_TASK_MAX_ATTEMPTS tries), owes the import a new message once its
hard time limit has passed (so a worker dying mid-import does not strand the asset), and sends
errors a retry can fix back after a backoff.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from pipelines import audio as A
from pipelines.errors import AudioError, GaveUp, InternalError, StemsError, TimeLimit
from pipelines.peaks import PeakAccumulator
from stems.container import Container
from stems.models import AssetStatus, AudioAsset
from stems.netfetch import fetch_url
from stems.storage import keys

from .retry import backoff, retryable

log = logging.getLogger(__name__)


def validate(info: A.AudioInfo, ctx: Container) -> None:
    s = ctx.settings
    if info.duration < s.min_duration_s:
        raise AudioError(
            f"audio is {info.duration:.3f} s long; the shortest the models take is {s.min_duration_s} s",
            duration=info.duration,
            min_duration=s.min_duration_s,
        )
    if info.duration > s.max_duration_s:
        raise AudioError(
            f"audio is {info.duration:.0f} s long; the maximum is {s.max_duration_s:.0f} s",
            duration=info.duration,
            max_duration=s.max_duration_s,
        )
    if not s.min_sample_rate <= info.sample_rate <= s.max_sample_rate:
        raise AudioError(
            f"sample rate {info.sample_rate} Hz is outside {s.min_sample_rate}..{s.max_sample_rate} Hz",
            sample_rate=info.sample_rate,
        )
    if info.channels > s.max_channels:
        raise AudioError(f"{info.channels} channels; at most {s.max_channels} are accepted", channels=info.channels)


def check_samples(path: Path, peaks: PeakAccumulator) -> None:
    """Refuse NaN / infinite samples (float WAVs can hold them) without loading the whole file; feed `peaks`."""
    for block in A.iter_decode(path):
        A.check_finite(block)
        peaks.feed(block)


def import_audio(audio_id: str, ctx: Container) -> None:
    asset = ctx.store.get_asset(audio_id)
    if asset is None or asset.status != AssetStatus.processing:
        return  # unknown, or already imported: delivering twice changes nothing
    with tempfile.TemporaryDirectory(prefix="stems-import-") as tmp:
        local = Path(tmp) / "source"
        try:
            if asset.origin == "link":
                size = fetch_url(asset.url, local, ctx.settings)
                with open(local, "rb") as f:
                    ctx.storage.put_stream(asset.object_key, f)
            else:
                ctx.storage.get_file(asset.object_key, local)
                size = local.stat().st_size
            if size == 0:
                raise AudioError("the file is empty")
            info = A.probe(local, max_seconds=ctx.settings.max_duration_s)  # stops decoding at the limit
            validate(info, ctx)
            peaks = PeakAccumulator(info.sample_rate, None, round(info.duration * info.sample_rate))
            check_samples(local, peaks)
            asset.peaks_key = keys.audio_peaks(asset.user_id, asset.id)
            ctx.storage.put_file(asset.peaks_key, peaks.write(Path(tmp) / "peaks.json"))
            digest = hashlib.sha256()
            with open(local, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except StemsError as exc:
            if exc.retryable:
                raise
            refuse(asset, ctx, exc.to_dict())
            return
    asset.status, asset.info, asset.size, asset.sha256 = AssetStatus.complete, info.to_dict(), size, digest.hexdigest()
    if not ctx.store.update_asset(asset) and asset.origin == "link":
        ctx.storage.delete(asset.object_key)  # deleted while we fetched it: do not leave our download behind


def refuse(asset: AudioAsset, ctx: Container, error: dict) -> None:
    asset.status, asset.error = AssetStatus.failed, error
    ctx.store.update_asset(asset)
    if asset.origin != "ingest":  # refused audio is not kept (ingested objects are not ours)
        ctx.storage.delete(asset.object_key)


def run_import(audio_id: str, ctx: Container) -> None:
    """One delivery of an import, counted and bounded."""
    s, store = ctx.settings, ctx.store
    asset = store.get_asset(audio_id)
    if asset is None or asset.status != AssetStatus.processing:
        store.settle("import", audio_id)
        return
    tries = store.count_try("import", audio_id)
    if tries > s.task_max_attempts:
        message = f"the import was tried {tries - 1} times and never finished (its worker died each time)"
        refuse(asset, ctx, GaveUp(message, attempts=tries - 1).to_dict())
        store.settle("import", audio_id)
        return
    store.owe("import", audio_id, time.time() + s.import_time_limit_s + s.time_limit_grace_s + s.enqueue_grace_s)
    try:
        import_audio(audio_id, ctx)
    except SoftTimeLimitExceeded:
        refuse(asset, ctx, TimeLimit(f"the import took longer than {s.import_time_limit_s:.0f} s").to_dict())
    except Exception as exc:
        if retryable(exc) and tries < s.task_max_attempts:
            log.warning("import %s: retryable error %s, trying again", audio_id, exc)
            store.owe("import", audio_id, time.time() + backoff(tries - 1))
            return
        log.warning("import %s failed: %s", audio_id, exc)
        refuse(asset, ctx, InternalError.of(exc).to_dict())
    store.settle("import", audio_id)
