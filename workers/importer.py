"""Import an audio asset: fetch it (for links), probe it, accept or refuse it with a reason.

The asset's record is only ever updated here, never created: if the user deleted the asset
while it was importing, the update finds no record, and an original this import stored
itself (a link's download) is removed again.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from pipelines import audio as A
from pipelines.errors import AudioError, StemsError
from pipelines.peaks import PeakAccumulator
from stems.models import AssetStatus
from stems.netfetch import fetch_url
from stems.storage import keys

from .context import WorkerContext


def validate(info: A.AudioInfo, ctx: WorkerContext) -> None:
    s = ctx.settings
    if info.duration < s.min_duration_s:
        raise AudioError(f"audio is {info.duration:.3f} s long; the shortest the models take is {s.min_duration_s} s",
                         duration=info.duration, min_duration=s.min_duration_s)
    if info.duration > s.max_duration_s:
        raise AudioError(f"audio is {info.duration:.0f} s long; the maximum is {s.max_duration_s:.0f} s",
                         duration=info.duration, max_duration=s.max_duration_s)
    if not s.min_sample_rate <= info.sample_rate <= s.max_sample_rate:
        raise AudioError(f"sample rate {info.sample_rate} Hz is outside {s.min_sample_rate}..{s.max_sample_rate} Hz",
                         sample_rate=info.sample_rate)
    if info.channels > s.max_channels:
        raise AudioError(f"{info.channels} channels; at most {s.max_channels} are accepted", channels=info.channels)


def check_samples(path: Path, peaks: PeakAccumulator) -> None:
    """Refuse NaN / infinite samples (float WAVs can hold them) without loading the whole file; feed `peaks`."""
    for block in A.iter_decode(path):
        A.check_finite(block)
        peaks.feed(block)


def import_audio(audio_id: str, ctx: WorkerContext) -> None:
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
            asset.status, asset.error = AssetStatus.failed, exc.to_dict()
            ctx.store.update_asset(asset)
            if asset.origin != "ingest":  # refused audio is not kept (ingested objects are not ours)
                ctx.storage.delete(asset.object_key)
            return
    asset.status, asset.info, asset.size, asset.sha256 = AssetStatus.complete, info.to_dict(), size, digest.hexdigest()
    if not ctx.store.update_asset(asset) and asset.origin == "link":
        ctx.storage.delete(asset.object_key)  # deleted while we fetched it: do not leave our download behind
