"""Request and response bodies of the public API (they are also its OpenAPI schema)."""
from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.jobspec import SAM_MODELS, STEREO_MODES, TimeRange


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Span(TimeRange):
    """A time range, in seconds from the start of the source."""


class Selection(Span):
    """The part of the source to split, in seconds; the source is trimmed to it first."""


class FromLink(Strict):
    url: str = Field(..., max_length=4096, examples=["https://example.com/track.mp3"])
    callback_url: str | None = Field(None, max_length=4096)


class FromStorage(Strict):
    """Register an object an ingestion service already wrote to the bucket (no re-upload)."""

    key: str = Field(..., min_length=1, max_length=1024, examples=["ingest/alice/2026/11/track-0001.flac"],
                     description="object key, relative to the deployment's S3 prefix; must be under the caller's own "
                                 "ingest prefix `{STEMS_INGEST_PREFIX}{user_id}/`, or be named by `grant`")
    grant: str | None = Field(None, max_length=2048,
                              description="a signed grant for a key outside the caller's prefix (`stems keys grant`)")
    filename: str | None = Field(None, max_length=255)


class AudioAccepted(BaseModel):
    audio_id: str
    status: str = "processing"
    model_config = ConfigDict(json_schema_extra={"examples": [{"audio_id": "5b0c9c0e-3f7e-4a43-9a43-0a6c1f2e7d11", "status": "processing"}]})


class AudioStatus(BaseModel):
    audio_id: str
    status: str
    filename: str | None = None
    size: int | None = None
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    codec: str | None = None
    container: str | None = None
    error: dict | None = None
    created_at: float
    expires_at: float | None = Field(None, description="when the retention policy deletes the original (null: kept)")


class RestorationParams(Strict):
    preset: str = Field("universal_enhancer", examples=["universal_enhancer"])
    strength: float = Field(1.0, ge=0.0, le=1.0, description="wet/dry mix of the restored signal")


class CreateStems(Strict):
    """Ask for a split. Give the source as one of the ids (stem_id wins over the others)."""

    preset: str = Field(..., min_length=1, max_length=64, examples=["4_tracks"])
    audio_id: UUID | None = None
    stem_id: UUID | None = Field(None, description="split a stem of an earlier job (takes priority over audio_id)")
    upscaled_id: UUID | None = Field(None, description="split a restored (upscaled) stem")
    mastered_id: UUID | None = Field(None, description="split a mastered audio")
    bit_depth: Literal[16, 24, 32] = Field(24, description="WAV bit depth; 32 is float")
    hq_streaming_format: Literal["aac", "mp3", "opus", "flac", "none"] = "aac"
    selection: Selection | None = None
    restoration_params: RestorationParams | None = None
    callback_url: str | None = Field(None, max_length=4096, description="called with a signed body when the job ends")
    # used only by the `custom` preset; ignored (not validated) for the others
    prompt: Any = Field(None, description="custom only: what to extract, e.g. 'lead vocal'")
    sam_model: Any = Field(None, description=f"custom only: one of {', '.join(SAM_MODELS)} (default sam-audio-base)")
    stereo_mode: Any = Field(None, description=f"custom only: one of {', '.join(STEREO_MODES)} (default mono)")
    spans: Any = Field(None, description="custom only: list of {start, end} to extract within")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"preset": "4_tracks", "audio_id": "5b0c9c0e-3f7e-4a43-9a43-0a6c1f2e7d11", "bit_depth": 24,
         "hq_streaming_format": "aac", "selection": {"start": 30.0, "end": 60.0}},
        {"preset": "custom", "audio_id": "5b0c9c0e-3f7e-4a43-9a43-0a6c1f2e7d11", "prompt": "lead vocal",
         "stereo_mode": "mono", "spans": [{"start": 10, "end": 20}]},
    ]})


class CustomFields(Strict):
    """The custom-only fields, validated when the preset is `custom`."""

    prompt: str = Field(..., min_length=1)
    sam_model: Literal[SAM_MODELS] = "sam-audio-base"  # type: ignore[valid-type]
    stereo_mode: Literal[STEREO_MODES] = "mono"  # type: ignore[valid-type]
    spans: list[Span] | None = None


class StemRef(BaseModel):
    stem_id: str
    name: str
    status: str


class UpscaledRef(BaseModel):
    upscaled_id: str
    stem_id: str
    name: str
    status: str


class StemsQueued(BaseModel):
    status: str = "processing"
    message: str = "Stem separation queued"
    audio_id: str
    user_id: str
    creation_id: str
    audio_stems: list[StemRef]
    upscaled_audios: list[UpscaledRef]


class ModelLicence(BaseModel):
    model: str
    licence: str
    commercial_use: Literal["yes", "no", "unclear"]
    source: str = Field(description="where the licence statement comes from")


class StemInfo(BaseModel):
    stem_id: str
    name: str
    status: str
    made_by: str | None
    licence: list[ModelLicence] | None = Field(None, description="the licence of each model that made the stem")
    duration: float | None
    sample_rate: int | None
    channels: int | None
    bit_depth: int
    size: int | None = Field(None, description="bytes of the WAV")
    hq_format: str | None
    hq_size: int | None
    download: dict[str, str] | None = Field(None, description="paths of the WAV and HQ downloads once complete")


class SplitStatus(BaseModel):
    creation_id: str
    audio_id: str
    preset: str
    status: str
    progress: float
    stage: str
    error: dict | None
    attempts: int
    worker: str | None = Field(None, description="the worker that ran the job's model (its latest attempt); for a job "
                                                 "in two stages, the separating worker on the model's queue")
    delivered_by: str | None = Field(None, description="for a job in two stages, the cpu-queue worker that encoded and "
                                                       "stored its stems (its latest delivery run)")
    models: dict[str, str] = Field(description="stem name -> model or method that made it")
    stems: list[StemInfo]
    upscaled_audios: list[StemInfo]
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None = Field(None, description="when the retention policy deletes the stored stems "
                                                       "(STEMS_RETAIN_STEMS_S after the end; null: kept or not ended)")


class SplitListItem(SplitStatus):
    filename: str | None = Field(None, description="the name of the uploaded source file, when known")


class SplitList(BaseModel):
    """One page of the caller's splits, newest first."""

    items: list[SplitListItem]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null on the last page")


class Peaks(BaseModel):
    """Waveform peaks in audiowaveform's JSON format (version 2), made when the audio was written.

    `data` holds `length` points; each point holds, for each channel in turn, the minimum and the
    maximum sample of its `samples_per_pixel` frames, as signed integers of `bits` bits (divide by
    2^(bits-1) for -1..1). The last point may cover fewer frames. Duration = frames / sample_rate
    (the stem's or audio's `duration`); wavesurfer.js and peaks.js draw it without the audio.
    """

    version: Literal[2] = 2
    channels: int
    sample_rate: int
    samples_per_pixel: int
    bits: Literal[8, 16]
    length: int
    data: list[int]
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "version": 2, "channels": 2, "sample_rate": 44100, "samples_per_pixel": 256, "bits": 16, "length": 2,
        "data": [-3200, 3187, -2950, 3011, -120, 133, -98, 101]}]})


class DownloadLinksRequest(Strict):
    stem_ids: list[UUID] = Field(..., min_length=1, max_length=200)
    format: Literal["wav", "hq"] = "wav"


class DownloadLink(BaseModel):
    stem_id: str
    format: str
    url: str = Field(description="path of GET /download/stem with a `token` query parameter instead of the key")
    expires_at: float


class DownloadLinks(BaseModel):
    """Short-lived links to stems for clients that cannot send a header (an <audio> element, a plain link)."""

    links: list[DownloadLink]


class ArchiveRequest(Strict):
    creation_id: UUID | None = None
    stem_ids: list[UUID] | None = Field(None, min_length=1, max_length=200)
    format: Literal["wav", "hq"] = "wav"

    @model_validator(mode="after")
    def _one_source(self) -> "ArchiveRequest":
        if (self.creation_id is None) == (self.stem_ids is None):
            raise ValueError("give exactly one of creation_id or stem_ids")
        return self


class PresetInfo(BaseModel):
    name: str
    description: str
    group: str = Field(description="music, speech, cleanup or custom: how the page groups presets")
    stems: list[str]
    available: bool
    queue: str | None
    chain: list[str] | None = Field(None, description="model ids of the chain that would serve it now")
    missing_models: list[str] = Field(default_factory=list)
    install_hint: str | None = Field(
        None, description="for a preset that is not available: the command that makes it available, run where the "
                          "workers of its queue keep their model store (e.g. `stems models pull htdemucs_ft`), and for "
                          "weights that cannot be pulled (gated, no public release) how to get them",
        examples=["stems models pull htdemucs_ft"])
    install_command: str | None = Field(None, description="the command of install_hint alone (shown first)",
                                        examples=["stems models pull htdemucs_ft"])
    dsp_fallback: bool = Field(False, description="the chain serving it now is signal processing, not a trained model")
    licence_refused: list[str] = Field(
        default_factory=list, description="models whose chains are skipped here: their licence does not allow the "
                                          "use the operator declares (STEMS_DECLARED_USE)")
    usage_multiplier: float


class PresetList(BaseModel):
    presets: list[PresetInfo]
    restoration_presets: list[dict]
    declared_use: str = Field(description="research or commercial: the use this deployment serves (STEMS_DECLARED_USE)")
