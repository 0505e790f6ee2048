"""One typed settings object for the whole service, read from the environment (and `.env`).

Every field is documented in docs/deployment.md's settings table (generated from this class by
`stems settings --markdown`). Production refuses unsafe values at start-up.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str, *more: str) -> AliasChoices:
    return AliasChoices(name, *more)


PLACEHOLDER_SECRETS = {
    "",
    "change-me",
    "changeme",
    "change_me",
    "changeit",
    "secret",
    "password",
    "dev-secret-key",
    "dev-webhook-secret",
    "webhook-secret",
    "test",
    "example",
    "replace-me",
    "xxx",
}


def is_placeholder(secret: str) -> bool:
    """A secret nobody should run production with: a known placeholder, or too short to resist guessing."""
    return secret.strip().lower() in PLACEHOLDER_SECRETS or len(secret.strip()) < 16


def redis_lacks_password(url: str) -> bool:
    """True when `url` names a Redis beyond this machine (not loopback, not a unix socket) without a password."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "unix" or parts.password:
        return False
    host = (parts.hostname or "").strip("[]")
    if host in ("", "localhost") or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: another machine


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    env: Literal["development", "production"] = Field(
        "development",
        validation_alias=_env("STEMS_ENV"),
        description="`production` refuses unsafe settings (local storage, the embedded Redis, open link fetching)",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=_env("REDIS_URL"),
        description="Redis for job state (and the Celery broker unless STEMS_BROKER_URL says otherwise)",
    )
    broker_url: str | None = Field(
        None,
        validation_alias=_env("STEMS_BROKER_URL"),
        description="Celery broker: unset for REDIS_URL, or `amqp://user:password@host:5672/vhost` for RabbitMQ "
        "(quorum queues with a delivery limit and a dead-letter queue; see docs/deployment.md, Brokers)",
    )
    key_prefix: str = Field(
        "stems",
        validation_alias=_env("STEMS_KEY_PREFIX"),
        description="prefix of every Redis key of ours, so several deployments (or test runs) can share a Redis",
    )
    storage: Literal["local", "s3"] = Field(
        "local",
        validation_alias=_env("STEMS_STORAGE"),
        description="storage backend: a local directory or an S3-compatible bucket",
    )
    data_dir: Path = Field(
        Path(".data"),
        validation_alias=_env("STEMS_DATA_DIR"),
        description="root of the local storage backend, and of scratch space",
    )
    s3_endpoint_url: str | None = Field(
        None, validation_alias=_env("S3_ENDPOINT_URL"), description="S3 endpoint (MinIO, R2, ...); unset for AWS"
    )
    s3_bucket: str = Field("stems", validation_alias=_env("S3_BUCKET"), description="bucket for audio and stems")
    s3_prefix: str = Field("", validation_alias=_env("S3_PREFIX"), description="key prefix inside the bucket")
    s3_region: str = Field(
        "us-east-1", validation_alias=_env("S3_REGION", "AWS_DEFAULT_REGION"), description="S3 region"
    )
    s3_access_key_id: str | None = Field(
        None,
        validation_alias=_env("S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        description="S3 access key (else boto3's default chain)",
    )
    s3_secret_access_key: str | None = Field(
        None, validation_alias=_env("S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"), description="S3 secret key"
    )
    s3_presign_downloads: bool = Field(
        False,
        validation_alias=_env("S3_PRESIGN_DOWNLOADS"),
        description="answer downloads with a redirect to a presigned URL instead of streaming through the API",
    )
    s3_timeout_s: float = Field(
        30.0, validation_alias=_env("S3_TIMEOUT_S"), description="connect/read timeout of S3 calls"
    )
    ingest_prefix: str = Field(
        "ingest/",
        validation_alias=_env("STEMS_INGEST_PREFIX"),
        description="an ingestion service writes a tenant's objects under `{prefix}{user_id}/`; POST /from-storage "
        "registers only keys under the caller's own such prefix (or a signed grant)",
    )
    model_dir: Path = Field(
        Path(".models"),
        validation_alias=_env("STEMS_MODEL_DIR"),
        description="model store directory (weights + manifest.json)",
    )
    declared_use: Literal["research", "commercial"] = Field(
        "research",
        validation_alias=_env("STEMS_DECLARED_USE"),
        description="the use the operator declares: `commercial` serves only models whose weights' licence allows "
        "commercial use (the registry's `commercial_use: yes`); chains of other models are skipped",
    )
    model_s3_uri: str | None = Field(
        None,
        validation_alias=_env("STEMS_MODEL_S3_URI"),
        description="s3://bucket/prefix holding a model store, synced into STEMS_MODEL_DIR when a worker starts",
    )
    model_mirror: str | None = Field(
        None,
        validation_alias=_env("STEMS_MODEL_MIRROR"),
        description="`stems models pull` fetches from here instead of the publishers: an https base URL or "
        "s3://bucket/prefix, holding each file under its publisher URL's path (see Models)",
    )
    device: str = Field(
        "auto", validation_alias=_env("STEMS_DEVICE"), description="`auto`, `cpu` or `cuda[:N]` for neural models"
    )
    chunk_seconds: float = Field(
        30.0,
        validation_alias=_env("STEMS_CHUNK_SECONDS"),
        description="audio processed per chunk (memory follows the chunk, not the track)",
    )
    cache_max_bytes: int = Field(
        20 << 30,
        ge=0,
        validation_alias=_env("STEMS_CACHE_MAX_BYTES"),
        description="bound of a worker host's step cache in STEMS_DATA_DIR/cache; 0 turns it off",
    )
    api_host: str = Field("127.0.0.1", validation_alias=_env("STEMS_API_HOST"), description="API bind address")
    api_port: int = Field(8000, validation_alias=_env("STEMS_API_PORT"), description="API port")
    flower_port: int = Field(5555, validation_alias=_env("STEMS_FLOWER_PORT"), description="Flower port (`make up`)")
    max_upload_bytes: int = Field(
        1 << 30,
        validation_alias=_env("STEMS_MAX_UPLOAD_BYTES"),
        description="largest accepted upload or link download (413 beyond)",
    )
    max_duration_s: float = Field(
        4 * 3600.0,
        validation_alias=_env("STEMS_MAX_DURATION_S"),
        description="longest accepted audio (the import stops decoding here)",
    )
    min_duration_s: float = Field(
        0.5,
        ge=0,
        validation_alias=_env("STEMS_MIN_DURATION_S"),
        description="shortest accepted audio and selection: shorter clips are too short for the models' analysis windows",
    )
    min_sample_rate: int = Field(
        8000, validation_alias=_env("STEMS_MIN_SAMPLE_RATE"), description="lowest accepted sample rate"
    )
    max_sample_rate: int = Field(
        192000, validation_alias=_env("STEMS_MAX_SAMPLE_RATE"), description="highest accepted sample rate"
    )
    max_channels: int = Field(8, validation_alias=_env("STEMS_MAX_CHANNELS"), description="most channels accepted")
    max_prompt_chars: int = Field(
        500,
        validation_alias=_env("STEMS_MAX_PROMPT_CHARS"),
        description="prompts are trimmed to this many characters before validation",
    )
    link_timeout_s: float = Field(
        60.0, validation_alias=_env("STEMS_LINK_TIMEOUT_S"), description="time limit of a /from-link download"
    )
    link_allow_hosts: list[str] = Field(
        default_factory=list,
        validation_alias=_env("STEMS_LINK_ALLOW_HOSTS"),
        description="hosts /from-link may fetch even if they resolve to private addresses (tests, internal mirrors); JSON list",
    )
    two_stage: Literal["auto", "always", "never"] = Field(
        "auto",
        validation_alias=_env("STEMS_TWO_STAGE"),
        description="split a job into separation (on its model queue) and delivery (WAVs, HQ encodes and peaks, on "
        "the CPU queue): auto does so for jobs on GPU queues, so a GPU worker only separates",
    )
    task_max_attempts: int = Field(
        3,
        validation_alias=_env("STEMS_TASK_MAX_ATTEMPTS"),
        description="runs of one job (and, apart, of its delivery stage) before it is failed (a job that kills its "
        "worker is not retried forever)",
    )
    time_limit_base_s: float = Field(
        300.0, validation_alias=_env("STEMS_TIME_LIMIT_BASE_S"), description="time limit of a split: base seconds ..."
    )
    time_limit_per_audio_s: float = Field(
        4.0,
        validation_alias=_env("STEMS_TIME_LIMIT_PER_AUDIO_S"),
        description="... plus this many seconds per second of audio (the hard kill comes 20% + STEMS_TIME_LIMIT_GRACE_S later)",
    )
    time_limit_grace_s: float = Field(
        60.0,
        ge=0,
        validation_alias=_env("STEMS_TIME_LIMIT_GRACE_S"),
        description="seconds between a split's soft time limit (+20%) and the hard kill, so a long native call can return",
    )
    visibility_timeout_s: int = Field(
        24 * 3600,
        validation_alias=_env("STEMS_VISIBILITY_TIMEOUT_S"),
        description="broker visibility timeout (Redis) or consumer timeout (RabbitMQ); must exceed the longest allowed job",
    )
    lease_s: float = Field(
        30.0,
        gt=0,
        validation_alias=_env("STEMS_LEASE_S"),
        description="a running job's lease: a job whose worker stopped renewing it this long ago is run again elsewhere "
        "(recovery after a node's death takes this plus STEMS_REAPER_INTERVAL_S, plus queue wait)",
    )
    lease_renew_s: float = Field(
        5.0,
        gt=0,
        validation_alias=_env("STEMS_LEASE_RENEW_S"),
        description="how often a worker renews the lease of a job it runs (from a thread that runs through model calls)",
    )
    reaper_interval_s: float = Field(
        2.0,
        gt=0,
        validation_alias=_env("STEMS_REAPER_INTERVAL_S"),
        description="how often the reaper (one per deployment at a time, run by the workers) looks for expired leases, "
        "jobs past their deadline and messages owed",
    )
    enqueue_grace_s: float = Field(
        10.0,
        gt=0,
        validation_alias=_env("STEMS_ENQUEUE_GRACE_S"),
        description="a job, import or webhook whose message was not sent (the API died, the broker refused) or not "
        "started by the worker that received it is sent again after this long",
    )
    resend_queued_s: float = Field(
        900.0,
        gt=0,
        validation_alias=_env("STEMS_RESEND_QUEUED_S"),
        description="a job still waiting this long after its message was sent is sent again (a message a broker "
        "lost: a restart, a purge); a duplicate is dropped by the job's claim, so a job waiting in a long "
        "queue costs one short extra message each time",
    )
    served_memory_s: float = Field(
        30 * 86400.0,
        ge=0,
        validation_alias=_env("STEMS_SERVED_MEMORY_S"),
        description="how long a queue's last worker report still counts after the queue's pool stopped reporting "
        "(scaled to zero): its presets stay available, their jobs queue and the autoscaler sees them; "
        "0: only live workers count",
    )
    import_time_limit_s: float = Field(
        900.0,
        gt=0,
        validation_alias=_env("STEMS_IMPORT_TIME_LIMIT_S"),
        description="time limit of an import (fetch, probe, checks); the hard kill comes STEMS_TIME_LIMIT_GRACE_S later",
    )
    webhook_timeout_s: float = Field(
        20.0,
        gt=0,
        validation_alias=_env("STEMS_WEBHOOK_TIMEOUT_S"),
        description="total time one webhook delivery may take (connect, send, answer); slower counts as a failure",
    )
    shutdown_grace_s: float = Field(
        60.0,
        ge=0,
        validation_alias=_env("STEMS_SHUTDOWN_GRACE_S"),
        description="on SIGTERM a worker takes no new jobs and lets running ones finish this long, then hands them "
        "back to the queue at once (0: hand back at once)",
    )
    rate_limit_per_minute: int = Field(
        600,
        validation_alias=_env("STEMS_RATE_LIMIT_PER_MINUTE"),
        description="requests per API key per minute (429 beyond)",
    )
    max_active_jobs: int = Field(
        50,
        validation_alias=_env("STEMS_MAX_ACTIVE_JOBS"),
        description="queued or running splits per API key (429 beyond)",
    )
    download_link_ttl_s: int = Field(
        3600,
        ge=60,
        le=7 * 86400,
        validation_alias=_env("STEMS_DOWNLOAD_LINK_TTL_S"),
        description="lifetime of a link from POST /download-links (what media players and plain links fetch a stem with)",
    )
    max_job_output_bytes: int = Field(
        20 << 30,
        gt=0,
        validation_alias=_env("STEMS_MAX_JOB_OUTPUT_BYTES"),
        description="budget of one split's estimated output (stems x channels x rate x seconds x bytes, restored "
        "copies and HQ encodes included); 422 beyond, with the numbers",
    )
    max_key_output_bytes: int = Field(
        100 << 30,
        gt=0,
        validation_alias=_env("STEMS_MAX_KEY_OUTPUT_BYTES"),
        description="budget of the estimated output of one key's queued and running splits together (429 beyond)",
    )
    secret_key: str = Field(
        "dev-secret-key",
        validation_alias=_env("STEMS_SECRET_KEY", "STEMS_WEBHOOK_SECRET"),
        description="server secret: signs nothing itself; the keys of /from-storage grants and of the webhooks of API "
        "keys made before keys had their own secret are derived from it, one per purpose "
        "(STEMS_WEBHOOK_SECRET is its old name); placeholders are refused in production",
    )
    grant_max_ttl_s: int = Field(
        7 * 86400,
        gt=0,
        validation_alias=_env("STEMS_GRANT_MAX_TTL_S"),
        description="longest validity of a /from-storage grant (`stems keys grant`), checked again when it is used",
    )
    webhook_attempts: int = Field(
        6,
        validation_alias=_env("STEMS_WEBHOOK_ATTEMPTS"),
        description="deliveries of a webhook before giving up (jittered exponential backoff between)",
    )
    webhook_backoff_s: float = Field(
        1.0,
        validation_alias=_env("STEMS_WEBHOOK_BACKOFF_S"),
        description="first delay between webhook deliveries; doubled each time (capped at 60 s), jittered +-50%",
    )
    retain_originals_s: float = Field(
        7 * 86400.0,
        ge=0,
        validation_alias=_env("STEMS_RETAIN_ORIGINALS_S"),
        description="seconds an uploaded, linked or registered original is kept after its import; 0 keeps it",
    )
    retain_stems_s: float = Field(
        7 * 86400.0,
        ge=0,
        validation_alias=_env("STEMS_RETAIN_STEMS_S"),
        description="seconds a split's stored stems are kept after it ends; 0 keeps them",
    )
    retain_records_s: float = Field(
        30 * 86400.0,
        ge=0,
        validation_alias=_env("STEMS_RETAIN_RECORDS_S"),
        description="seconds a split's record is kept after it ends, and an audio's record after its creation (never "
        "before its original goes); anything still stored for them goes with them; 0 keeps them. Usage "
        "totals are kept regardless",
    )
    retention_sweep_s: float = Field(
        300.0,
        ge=0,
        validation_alias=_env("STEMS_RETENTION_SWEEP_S"),
        description="how often a worker of the cpu queue sweeps out what retention expired (one at a time, by a "
        "Redis lock); 0 turns the sweep off",
    )
    startup_wait_s: float = Field(
        30.0,
        ge=0,
        validation_alias=_env("STEMS_STARTUP_WAIT_S"),
        description="how long a starting service waits for storage, Redis and the broker to answer before it "
        "refuses to start (production; development warns and starts at once), and `make up` for /readyz "
        "before it reports what is not ready (exit 1)",
    )
    redis_assume_persistent: bool = Field(
        False,
        validation_alias=_env("STEMS_REDIS_ASSUME_PERSISTENT"),
        description="production: trust that a Redis which hides CONFIG (managed services) persists its data",
    )
    worker_queues: str = Field(
        "cpu",
        validation_alias=_env("STEMS_WORKER_QUEUES"),
        description="comma-separated queues `stems worker` serves when -Q is not given",
    )

    @field_validator("model_mirror")
    @classmethod
    def _mirror_scheme(cls, v: str | None) -> str | None:
        if v and urlsplit(v).scheme not in ("https", "http", "s3"):
            raise ValueError("STEMS_MODEL_MIRROR must be an https:// (or http://) base URL or s3://bucket/prefix")
        if v and not urlsplit(v).netloc:
            raise ValueError("STEMS_MODEL_MIRROR names no host (or bucket)")
        return v or None

    @model_validator(mode="after")
    def _visibility_outlasts_jobs(self) -> Settings:
        longest = self.hard_time_limit(self.max_duration_s)
        if self.visibility_timeout_s <= longest:
            raise ValueError(
                f"STEMS_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed the longest allowed "
                f"job ({longest:.0f} s), or Redis would hand a running split to a second worker"
            )
        return self

    @model_validator(mode="after")
    def _broker_defaults_to_redis(self) -> Settings:
        self.broker_url = self.broker_url or self.redis_url
        return self

    @model_validator(mode="after")
    def _lease_renewed_in_time(self) -> Settings:
        if self.lease_renew_s * 2 > self.lease_s:
            raise ValueError(
                f"STEMS_LEASE_RENEW_S ({self.lease_renew_s}) must be at most half of STEMS_LEASE_S "
                f"({self.lease_s}), or one slow renewal would let a running job be taken over"
            )
        return self

    @model_validator(mode="after")
    def _safe_in_production(self) -> Settings:
        if self.env == "production":
            problems = []
            if self.storage == "local":
                problems.append("STEMS_STORAGE=local keeps audio on one machine's disk; use s3")
            if is_placeholder(self.secret_key):
                problems.append(
                    "STEMS_SECRET_KEY (or STEMS_WEBHOOK_SECRET) is a placeholder or shorter than 16 "
                    "characters; set a long random value, e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`"
                )
            if self.link_allow_hosts:
                problems.append("STEMS_LINK_ALLOW_HOSTS lets /from-link reach private hosts")
            if self.model_mirror and self.model_mirror.startswith("http://"):
                problems.append(
                    "STEMS_MODEL_MIRROR over plain http lets the network swap weights that have no published checksum"
                )
            if redis_lacks_password(self.redis_url):
                problems.append(
                    "REDIS_URL points at a non-loopback Redis without a password "
                    "(redis://:PASSWORD@host:6379/0); anyone on that network could read and change jobs"
                )
            if problems:
                raise ValueError("unsafe production settings: " + "; ".join(problems))
        return self

    def soft_time_limit(self, audio_seconds: float) -> float:
        """When a split is asked to stop: it fails with `time_limit` and removes its outputs."""
        return self.time_limit_base_s + self.time_limit_per_audio_s * audio_seconds

    def hard_time_limit(self, audio_seconds: float) -> float:
        """When Celery kills the process. The grace after the soft limit lets a long native call
        (one model forward) return so the soft limit's exception can fail the job cleanly."""
        return self.soft_time_limit(audio_seconds) * 1.2 + self.time_limit_grace_s

    @property
    def rabbitmq(self) -> bool:
        return (self.broker_url or self.redis_url).startswith(("amqp://", "amqps://", "pyamqp://"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
