"""Every error this project raises on purpose, in one place, each with the fields its callers read.

`code` is the stable machine-readable name an API client, a job's `error` and a log line carry;
`http_status` is what the API answers (api/errors.py reads it, nothing else decides it); `retryable`
tells a worker whether trying again can help (a storage hiccup) or not (corrupt audio, a missing model).
The module imports nothing of ours, so the pure pipelines, the workers, the API, the CLI and the client
all raise from the same hierarchy. One class lives elsewhere on purpose: `stems.unavailable.RedisUnavailable`
is also a `redis.ConnectionError`, and `pipelines/` does not import Redis.
"""

from __future__ import annotations

from typing import Any

RETRY_AFTER_S = 5  # a dependency's restart, a failover: soon
RETRY_AFTER_CONFIG_S = 30  # a missing bucket, refused credentials: someone has to act


class StemsError(Exception):
    """Base of every error this project raises on purpose."""

    code = "stems_error"
    http_status = 400
    retryable = False

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict[str, Any]:
        """The JSON an API answer, a job's `error` or a batch item carries: code, message, fields."""
        return {"code": self.code, "message": self.message, **{k: v for k, v in self.fields.items() if v is not None}}


# --- the request: what a client sent -----------------------------------------------------------------------


class Invalid(StemsError):
    """A request no handler can serve as sent (the API's 422, the CLI's usage error)."""

    code = "invalid_request"
    http_status = 422


UsageError = Invalid  # the CLI's name for it


class AudioError(StemsError):
    """The audio cannot be decoded or is outside what we accept (retrying will not help)."""

    code = "invalid_audio"
    http_status = 422


class PresetError(StemsError):
    """Unknown preset, or a request the preset cannot serve."""

    code = "invalid_preset"
    http_status = 422


class LinkError(StemsError):
    """The link cannot be fetched: refused address, bad scheme, HTTP error."""

    code = "invalid_link"
    http_status = 422


class TooLarge(StemsError):
    """A body, an upload or a linked file over the size the deployment accepts."""

    code = "too_large"
    http_status = 413


class OverBudget(StemsError):
    """The split would write more than the per-job output budget."""

    code = "over_budget"
    http_status = 422


class Unauthorized(StemsError):
    code = "unauthorized"
    http_status = 401


class NotFound(StemsError):
    code = "not_found"
    http_status = 404


class Conflict(StemsError):
    code = "conflict"
    http_status = 409


class Gone(StemsError):
    """The resource existed and was deleted (by its owner or the retention policy)."""

    code = "gone"
    http_status = 410


class RateLimited(StemsError):
    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, retry_after: int, **fields: object) -> None:
        super().__init__(message, retry_after=retry_after, **fields)
        self.retry_after = retry_after


class KeyBudgetExceeded(RateLimited):
    """The key's queued and running splits already hold the per-key output budget."""

    code = "key_output_budget"


# --- models and chains -------------------------------------------------------------------------------------


class ModelNotInstalled(StemsError):
    """A model a chain needs has no weights in the model store."""

    code = "model_not_installed"
    http_status = 422


class ChainError(StemsError):
    """A chain whose steps do not connect; raised when the catalogue is built."""

    code = "invalid_chain"
    http_status = 422


class ChecksumMismatch(StemsError):
    """A weight file's sha256 differs from the one pinned in the manifest."""

    code = "checksum_mismatch"


class DownloadFailed(StemsError):
    """A file could not be fetched: no connection, an HTTP error, or a transfer that kept breaking."""

    code = "download_failed"
    retryable = True


# --- a job's end: what its `error` says ------------------------------------------------------------------


class Cancelled(StemsError):
    """The job was cancelled while it ran; raised between chunks."""

    code = "cancelled"


class Superseded(StemsError):
    """This attempt no longer owns its job: another attempt does, or the job was handed back."""

    code = "superseded"


class GaveUp(StemsError):
    """The work was started more times than its attempts allow (each start died or timed out)."""

    code = "too_many_attempts"


class TimeLimit(StemsError):
    """The work ran past its hard time limit."""

    code = "time_limit"


class InternalError(StemsError):
    """A failure we did not raise on purpose, as a job's `error` records it: its class and text."""

    code = "internal_error"

    @classmethod
    def of(cls, exc: BaseException) -> StemsError:
        """`exc` itself when it is one of ours, else an internal error naming it."""
        return exc if isinstance(exc, StemsError) else cls(f"{exc.__class__.__name__}: {exc}")


class Expired(StemsError):
    """The retention policy deleted what this record points at."""

    code = "expired"
    http_status = 410


class OriginalChanged(StemsError):
    """The stored original is not what its import probed (rewritten since): the job would split something else."""

    code = "original_changed"


class ObjectMissing(StemsError):
    """An object the records point at is gone from storage (deleted behind our back, lost)."""

    code = "object_missing"
    http_status = 410


# --- the deployment ----------------------------------------------------------------------------------------


class UnsafeProduction(StemsError):
    """Production mode refuses to start on a setting that is only safe for development."""

    code = "unsafe_production"


class DependencyUnavailable(StemsError):
    """A service the work needs is down or refuses us; nothing of the request was kept. Retry later.

    See stems/unavailable.py for how each layer raises it and what the message may and may not carry.
    """

    code = "unavailable"
    http_status = 503
    dependency = "a dependency"
    retryable = True  # a worker's try comes back later; an API client gets Retry-After
    config_reasons: frozenset[str] = frozenset()

    def __init__(self, reason: str, check: str, detail: str = "", retry_after: int | None = None) -> None:
        self.reason = reason
        self.check = check
        self.detail = detail
        self.retry_after = retry_after or (RETRY_AFTER_CONFIG_S if reason in self.config_reasons else RETRY_AFTER_S)
        super().__init__(
            f"{self.dependency} is unavailable ({reason.replace('_', ' ')}): {check}",
            dependency=self.dependency,
            reason=reason,
            retry_after=self.retry_after,
        )

    # picklable (a pool process hands its exception to the worker's main process)
    def __reduce__(self) -> tuple[type[DependencyUnavailable], tuple[str, str, str, int]]:
        return self.__class__, (self.reason, self.check, self.detail, self.retry_after)

    def line(self) -> str:
        """One line for a start-up check or a log: the message, and the details only the operator sees."""
        return f"{self.message}{f' [{self.detail}]' if self.detail else ''}"


class StorageUnavailable(DependencyUnavailable):
    code = "storage_unavailable"
    dependency = "storage"
    config_reasons = frozenset({"bucket_missing", "access_denied", "misconfigured", "not_writable"})


class BrokerUnavailable(DependencyUnavailable):
    code = "broker_unavailable"
    dependency = "the job queue (broker)"
    config_reasons = frozenset({"access_denied"})


# --- the Python client: what the API answered ------------------------------------------------------------


class ApiError(StemsError):
    """The API refused a request: `status`, and the `code`, `message` and fields of its JSON error."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.status, self.code, self.retry_after = status, code, retry_after
        self.http_status = status
        self.retryable = status in (429, 503) or status >= 500

    def __str__(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})"


class JobFailed(StemsError):
    """A split, an import or a mastering ended failed (or cancelled): the code and message of its `error`, and
    its last status (the client's SplitStatus, AudioStatus or MasterStatus)."""

    def __init__(self, status: Any) -> None:
        error = status.error or {}
        super().__init__(
            error.get("message") or f"ended {status.status}",
            **{k: v for k, v in error.items() if k not in ("code", "message")},
        )
        self.code = error.get("code") or status.status
        self.status = status
