"""Records the service keeps: API keys' users, audio assets, split jobs and stems."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field, computed_field

from pipelines.jobspec import SplitSpec

USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")  # a path segment: ingest prefixes and keys are per user


def new_id() -> str:
    return str(uuid.uuid4())


def now() -> float:
    return time.time()


# what a split or a mastering reads: an original, a stem, a restored copy of one, or a mastered version
SourceKind = Literal["audio", "stem", "upscaled", "mastered"]
# a Stem record: a job's stem, its restored copy, or a mastering's output
StemKind = Literal["stem", "upscaled", "mastered"]


class AssetStatus(str, Enum):
    processing = "processing"  #: stored, being probed (or being fetched from a link)
    complete = "complete"  #: probed and accepted; can be split
    failed = "failed"  #: refused; `error` says why
    expired = "expired"  #: the original was deleted by the retention policy; it can no longer be split


class JobStatus(str, Enum):
    queued = "queued"  #: accepted and waiting for a worker of its queue
    processing = "processing"  #: a worker is running it
    complete = "complete"  #: every stem is stored
    failed = "failed"  #: stopped for the reason in `error`
    cancelled = "cancelled"  #: cancelled by its owner; partial outputs removed

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.complete, JobStatus.failed, JobStatus.cancelled)


class StemStatus(str, Enum):
    pending = "pending"
    complete = "complete"
    dropped = "dropped"  #: silent, and the preset drops silent stems
    failed = "failed"
    expired = "expired"  #: stored, then deleted by the retention policy (STEMS_RETAIN_STEMS_S)


class AudioAsset(BaseModel):
    id: str = Field(default_factory=new_id)
    user_id: str
    origin: str  # upload | link | ingest
    status: AssetStatus = AssetStatus.processing
    filename: str | None = None
    url: str | None = None
    object_key: str
    size: int | None = None
    sha256: str | None = None
    info: dict[Any, Any] | None = None  # duration, sample_rate, channels, codec, container
    peaks_key: str | None = None  # waveform peaks (pipelines/peaks.py), made at import
    error: dict[Any, Any] | None = None
    created_at: float = Field(default_factory=now)

    @property
    def stored_keys(self) -> list[str]:
        """The objects this record names: its original and its peaks (deleted with it, or by retention)."""
        return [k for k in (self.object_key, self.peaks_key) if k]


class Stem(BaseModel):
    """A stem a job makes; `kind=upscaled` marks a restored copy of another stem."""

    id: str = Field(default_factory=new_id)
    user_id: str
    job_id: str
    name: str
    kind: StemKind = "stem"
    of_stem_id: str | None = None  # for upscaled: the stem it restores
    status: StemStatus = StemStatus.pending
    made_by: str | None = None
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    # the stored files' format, on the stem itself: a mastered stem has no job spec to read it from
    bit_depth: int = 24
    hq_format: str | None = None
    wav_key: str | None = None
    wav_size: int | None = None
    hq_key: str | None = None
    hq_size: int | None = None
    peaks_key: str | None = None  # waveform peaks (pipelines/peaks.py), made while the WAV is written


DELIVERY_QUEUE = "cpu"  # where the delivery stage of a two-stage job runs (the CPU queue)


class SeparatedStem(BaseModel):
    """One float stem a separation stage stored for delivery; `of` names the stem a restored copy restores."""

    name: str
    of: str | None = None
    made_by: str
    key: str  # a float32 (frames, channels) .npy under the separating attempt's prefix


class Separated(BaseModel):
    """What a job's separation stage left for its delivery stage (see workers/delivery.py)."""

    attempt_id: str  # the separating attempt: its prefix holds the float stems
    worker: str | None = None  # the worker that separated (Job.worker names the one that delivered)
    frames: int
    sample_rate: int
    made_by: dict[str, str]  # every stem the chain made (one the job does not keep is still named)
    stems: list[SeparatedStem]


class Job(BaseModel):
    id: str = Field(default_factory=new_id)
    user_id: str
    audio_id: str  # the original upload this job's audio descends from
    source_kind: SourceKind
    source_id: str
    spec: SplitSpec  # what to make: preset, chain, selection, formats, custom and restoration fields
    queue: str
    status: JobStatus = JobStatus.queued
    progress: float = 0.0
    stage: str = "queued"
    error: dict[Any, Any] | None = None
    stem_ids: list[str] = Field(default_factory=list)
    upscaled_ids: list[str] = Field(default_factory=list)
    attempts: int = 0
    attempt_id: str | None = None  # token of the attempt that owns the job now; writes of any other are refused
    lease_until: float | None = None  # the owning attempt renews this; past it, the reaper runs the job again
    deadline_at: float | None = None  # the owning attempt's hard time limit (+ a lease): past it, the job fails
    worker: str | None = None  # hostname of the worker that ran the latest attempt
    worker_host: str | None = None  # its machine, so a worker there can tell a dead process from a live one
    worker_pid: int | None = None  # its process (tests kill it to inject faults)
    separated: Separated | None = None  # set when separation handed the job to delivery (two stages)
    deliveries: int = 0  # delivery-stage runs of it, bounded like attempts
    timings: dict[str, float] = Field(default_factory=dict)  # seconds: run_s (one stage) or separate_s and
    # deliver_s (two stages), and model_s, the time in models
    audio_seconds: float | None = None
    usage_minutes: float = 0.0
    created_at: float = Field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None
    callback_url: str | None = None
    key_id: str | None = None  # the API key that created the job: its webhook secret signs the callback
    output_bytes: int = 0  # estimated bytes the job writes (checked against the output budgets)

    @computed_field  # type: ignore[prop-decorator]  # stored and answered as before, read from the spec
    @property
    def preset(self) -> str:
        return self.spec.preset

    def make_stems(self, names: Iterable[str]) -> tuple[list[Stem], list[Stem]]:
        """The job's Stem rows, made here and nowhere else: one per name at the spec's bit depth and HQ format,
        and a restored copy of each when the spec asks for restoration. Sets `stem_ids` and `upscaled_ids`.
        Returns (stems, restored copies)."""
        spec = self.spec
        made = [
            Stem(user_id=self.user_id, job_id=self.id, name=n, bit_depth=spec.bit_depth, hq_format=spec.hq_format)
            for n in names
        ]
        copies = made if spec.restoration is not None else []
        restored = [
            Stem(
                user_id=self.user_id,
                job_id=self.id,
                name=f"{s.name}_restored",
                kind="upscaled",
                of_stem_id=s.id,
                bit_depth=spec.bit_depth,
                hq_format=spec.hq_format,
            )
            for s in copies
        ]
        self.stem_ids, self.upscaled_ids = [s.id for s in made], [s.id for s in restored]
        return made, restored


class WorkerReport(BaseModel):
    """A worker's heartbeat (workers/heartbeat.py): the queues it consumes and the models its store holds."""

    hostname: str
    queues: list[str]
    models: list[str]
    pid: int
    ts: float  # when it beat (time.time())
