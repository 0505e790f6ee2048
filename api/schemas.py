"""Request and response bodies of the public API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from pipelines.errors import LinkError
from pipelines.jobspec import SAM_MODELS, STEREO_MODES, RestorationSpec, TimeRange
from stems.netfetch import parse_link


def _link(url: str) -> str:
    """Parsed here, so a malformed URL is a 422 naming its field (api/errors.py) before any handler runs."""
    try:
        parse_link(url)
    except LinkError as exc:
        raise PydanticCustomError("invalid_link", "{reason}", {"reason": exc.message}) from None
    return url


# every URL field of the API is a Link: the fuzz tests find them by this format
Link = Annotated[str, Field(max_length=4096, json_schema_extra={"format": "uri"}), AfterValidator(_link)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Span(TimeRange):
    """A time range, in seconds from the start of the source."""


class Selection(Span):
    """The part of the source to split, in seconds; the source is trimmed to it first."""


class FromLink(Strict):
    url: Link = Field(..., examples=["https://example.com/track.mp3"])
    callback_url: Link | None = None


class FromStorage(Strict):
    """Register an object an ingestion service already wrote to the bucket (no re-upload)."""

    key: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        examples=["ingest/alice/2026/11/track-0001.flac"],
        description="object key, relative to the deployment's S3 prefix; must be under the caller's own "
        "ingest prefix `{STEMS_INGEST_PREFIX}{user_id}/`, or be named by `grant`",
    )
    grant: str | None = Field(
        None, max_length=2048, description="a signed grant for a key outside the caller's prefix (`stems keys grant`)"
    )
    filename: str | None = Field(None, max_length=255)


class AudioAccepted(BaseModel):
    audio_id: str
    status: str = "processing"
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"audio_id": "5b0c9c0e-3f7e-4a43-9a43-0a6c1f2e7d11", "status": "processing"}]}
    )


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
    error: dict[Any, Any] | None = None
    created_at: float
    expires_at: float | None = Field(None, description="when the retention policy deletes the original (null: kept)")


class RestorationParams(RestorationSpec):
    """A restored copy of each stem: the restoration preset and its wet/dry strength (the job's own type)."""


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
    callback_url: Link | None = Field(None, description="called with a signed body when the job ends")
    # used only by the `custom` preset; ignored (not validated) for the others
    prompt: Any = Field(None, description="custom only: what to extract, e.g. 'lead vocal'")
    sam_model: Any = Field(None, description=f"custom only: one of {', '.join(SAM_MODELS)} (default sam-audio-base)")
    stereo_mode: Any = Field(None, description=f"custom only: one of {', '.join(STEREO_MODES)} (default mono)")
    spans: Any = Field(None, description="custom only: list of {start, end} to extract within")
    dry_run: bool = Field(
        False,
        description="answer what the split would do (chain, queue, usage, output bytes, "
        "eta_s) without creating anything",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "preset": "4_tracks",
                    "audio_id": "5b0c9c0e-3f7e-4a43-9a43-0a6c1f2e7d11",
                    "bit_depth": 24,
                    "hq_streaming_format": "aac",
                    "selection": {"start": 30.0, "end": 60.0},
                },
                {
                    "preset": "custom",
                    "audio_id": "5b0c9c0e-3f7e-4a43-9a43-0a6c1f2e7d11",
                    "prompt": "lead vocal",
                    "stereo_mode": "mono",
                    "spans": [{"start": 10, "end": 20}],
                },
            ]
        },
    )


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
    error: dict[Any, Any] | None
    attempts: int
    worker: str | None = Field(
        None,
        description="the worker that ran the job's model (its latest attempt); for a job "
        "in two stages, the separating worker on the model's queue",
    )
    delivered_by: str | None = Field(
        None,
        description="for a job in two stages, the cpu-queue worker that encoded and "
        "stored its stems (its latest delivery run)",
    )
    models: dict[str, str] = Field(description="stem name -> model or method that made it")
    stems: list[StemInfo]
    upscaled_audios: list[StemInfo]
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None = Field(
        None,
        description="when the retention policy deletes the stored stems "
        "(STEMS_RETAIN_STEMS_S after the end; null: kept or not ended)",
    )
    eta_s: float | None = Field(
        None,
        description="queued or running: estimated seconds until complete (the queue "
        "ahead and the chain's measured speed, less its progress)",
    )


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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "version": 2,
                    "channels": 2,
                    "sample_rate": 44100,
                    "samples_per_pixel": 256,
                    "bits": 16,
                    "length": 2,
                    "data": [-3200, 3187, -2950, 3011, -120, 133, -98, 101],
                }
            ]
        }
    )


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
    format: Literal["wav", "hq", "stem.mp4"] = Field(
        "wav",
        description="wav or hq: a zip of those files; stem.mp4: a DJ stem file (Native Instruments' Stem "
        "format: the mix and drums, bass, other, vocals as AAC tracks) of a 4-stem split's "
        "creation_id, for Traktor, Mixxx and Serato",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ArchiveRequest:
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
        None,
        description="for a preset that is not available: the command that makes it available, run where the "
        "workers of its queue keep their model store (e.g. `stems models pull htdemucs_ft`), and for "
        "weights that cannot be pulled (gated, no public release) how to get them",
        examples=["stems models pull htdemucs_ft"],
    )
    install_command: str | None = Field(
        None, description="the command of install_hint alone (shown first)", examples=["stems models pull htdemucs_ft"]
    )
    dsp_fallback: bool = Field(False, description="the chain serving it now is signal processing, not a trained model")
    licence_refused: list[str] = Field(
        default_factory=list,
        description="models whose chains are skipped here: their licence does not allow the "
        "use the operator declares (STEMS_DECLARED_USE)",
    )
    usage_multiplier: float


class PresetList(BaseModel):
    presets: list[PresetInfo]
    restoration_presets: list[dict[Any, Any]]
    declared_use: str = Field(description="research or commercial: the use this deployment serves (STEMS_DECLARED_USE)")


# -- mastering (api/routes_master.py) --------------------------------------------------------------------------


class MasterAudio(Strict):
    """Master an audio, a stem, an upscaled copy (or a mastered version again). Give one source id."""

    audio_id: UUID | None = None
    stem_id: UUID | None = Field(None, description="master a stem (takes priority over the other ids)")
    upscaled_id: UUID | None = Field(None, description="master a restored (upscaled) stem")
    mastered_id: UUID | None = Field(None, description="master a mastered version again")
    preset: Literal["streaming", "loud", "podcast"] = Field(
        "streaming", description="streaming: -14 LUFS, -1 dBTP; loud: -9 LUFS, -1 dBTP; podcast: -16 LUFS, -1.5 dBTP"
    )
    bit_depth: Literal[16, 24, 32] = Field(24, description="WAV bit depth of the result; 32 is float")
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"audio_id": "5b0c9c0e-3f7e-4a43-9a43-0a6c1f2e7d11", "preset": "streaming", "bit_depth": 24}]
        },
    )


class MasterQueued(BaseModel):
    status: str = "processing"
    message: str = "Mastering queued"
    mastered_id: str = Field(description="follow it on /status/mastered/{mastered_id}; split it with /create-stems")
    audio_id: str
    user_id: str
    preset: str


class Loudness(BaseModel):
    integrated_lufs: float | None = Field(None, description="ITU-R BS.1770-4 integrated loudness (LUFS)")
    true_peak_dbtp: float | None = Field(None, description="4x oversampled true peak (dBTP)")
    loudness_range_lu: float | None = Field(None, description="EBU Tech 3342 loudness range (LU)")
    duration_s: float | None = None


class MasterTarget(BaseModel):
    integrated_lufs: float
    true_peak_dbtp: float = Field(description="the ceiling the true peak stays at or under")


class MasterStatus(BaseModel):
    mastered_id: str
    audio_id: str
    source_kind: str = Field(description="audio, stem, upscaled or mastered")
    source_id: str
    preset: str
    status: str = Field(description="queued, processing, complete or failed")
    error: dict[Any, Any] | None = None
    target: MasterTarget
    measured: Loudness | None = Field(None, description="what the result measures (once complete)")
    source_measured: Loudness | None = Field(None, description="what the source measured")
    processing: dict[Any, Any] | None = Field(
        None,
        description="gain_db, low_shelf_db, high_shelf_db (the tonal balance) and "
        "renders (a render is made again when the limiter cost loudness)",
    )
    bit_depth: int
    sample_rate: int | None = None
    channels: int | None = None
    size: int | None = Field(None, description="bytes of the WAV")
    download: str | None = Field(None, description="path of GET /download/mastered once complete")
    created_at: float
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="when the retention policy deletes the WAV")


# -- estimates (POST /create-stems with dry_run) and batches (api/routes_batch.py) ------------------------------


class EtaBasis(BaseModel):
    queue: str
    jobs_ahead: int = Field(description="unfinished jobs of the queue before this one")
    workers: int = Field(description="live workers serving the queue (at least 1 is assumed)")
    seconds_per_audio_second: float = Field(description="the median measured speed used")
    speed_source: Literal["chain", "queue", "default"] = Field(
        description="chain: measured on completed jobs of this preset's chain here; queue: of any chain on the "
        "queue; default: nothing measured yet (1 s per audio second assumed)"
    )
    speed_samples: int


class StemsEstimate(BaseModel):
    """What a create-stems would do (`dry_run: true`): nothing is created, queued or charged."""

    dry_run: Literal[True] = True
    preset: str
    audio_id: str
    source_kind: str
    source_id: str
    seconds: float = Field(description="seconds of audio the split would process (the selection)")
    stems: list[str] = Field(description="stems the preset makes (and their restored copies when asked)")
    queue: str
    chain: list[str] = Field(description="model ids of the chain that would serve it now")
    chain_index: int | None
    usage_minutes: float = Field(description="what /usage would be charged: minutes x the preset's multiplier")
    estimated_output_bytes: int = Field(description="upper bound of what it writes (see the output budgets)")
    output: dict[Any, Any] = Field(description="the numbers the byte estimate comes from")
    eta_s: float = Field(
        description="estimated seconds until complete: the queue ahead at the measured speed of the "
        "chain on this deployment's workers, then the split itself"
    )
    eta_basis: EtaBasis
    would_be_refused: dict[Any, Any] | None = Field(
        None,
        description="the error (code, message) the real request would get now from the active-job quota or "
        "the per-key output budget; null when it would be queued",
    )


class CreateStemsBatch(Strict):
    """Several create-stems requests in one call, queued in order, each as if it were sent alone."""

    items: list[dict[str, Any]] = Field(
        ..., min_length=1, max_length=100, description="up to 100 create-stems bodies (each may be a dry run)"
    )
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"preset": "4_tracks", "audio_id": "5b0c9c0e-3f7e-4a43-9a43-0a6c1f2e7d11"},
                        {
                            "preset": "phantom_center",
                            "audio_id": "9d3f1c2a-7b6e-4c1d-8e2f-3a4b5c6d7e8f",
                            "bit_depth": 16,
                        },
                    ]
                }
            ]
        },
    )


class BatchItemError(BaseModel):
    """An item the API refused: the HTTP status and the error body a single /create-stems would have answered."""

    status: Literal["error"] = "error"
    http_status: int = Field(description="what a single call would have answered, e.g. 404, 422 or 429")
    code: str
    detail: Any = Field(description="the message (or, for a body that fails validation, the list of errors)")
    model_config = ConfigDict(extra="allow")


class BatchQueued(BaseModel):
    items: list[StemsQueued | StemsEstimate | BatchItemError] = Field(
        description="one per item, in order: its create-stems answer, or its error"
    )
