"""Object storage behind one small interface: a local directory, or an S3-compatible bucket.

Keys are laid out per user, asset and job (see `keys`). Writes are crash-safe on both
backends: an object is visible only once it is complete (S3 PUTs are atomic; the local
backend writes a temporary file and renames it).
"""

from __future__ import annotations

import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Concatenate, ParamSpec, Protocol, TypeVar

from pipelines.errors import ObjectMissing, StemsError, StorageUnavailable

from .settings import Settings
from .unavailable import scrub

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

P = ParamSpec("P")
R = TypeVar("R")

StorageError = StorageUnavailable  # its old name: storage failed in a way retrying (later) may fix


# what the operator should check, by reason (the message an API client reads: no bucket, endpoint or key in it)
CHECKS = {
    "bucket_missing": "the bucket does not exist; the operator should create it or correct S3_BUCKET",
    "access_denied": "storage refused our credentials; the operator should check S3_ACCESS_KEY_ID, "
    "S3_SECRET_ACCESS_KEY and the bucket's policy",
    "misconfigured": "storage refused the bucket name or region; the operator should check S3_BUCKET, S3_REGION "
    "and S3_ENDPOINT_URL",
    "unreachable": "the S3 endpoint cannot be reached; the operator should check that it is up and that "
    "S3_ENDPOINT_URL points at it",
    "timeout": "the S3 endpoint did not answer within S3_TIMEOUT_S; the operator should check its health and the "
    "network to it",
    "server_error": "the S3 endpoint answers with server errors; the operator should check its health",
    "refused": "storage refused the request; the operator should check the storage settings and the API's log",
    "not_writable": "the storage directory is missing or not writable; the operator should check STEMS_DATA_DIR",
}


class keys:
    """Where objects live: users/{user}/audio/{audio}/..., users/{user}/jobs/{job}/{attempt}/..."""

    @staticmethod
    def original(user_id: str, audio_id: str) -> str:
        return f"users/{user_id}/audio/{audio_id}/original"

    @staticmethod
    def audio_peaks(user_id: str, audio_id: str) -> str:
        return f"users/{user_id}/audio/{audio_id}/peaks.json"

    @staticmethod
    def job_prefix(user_id: str, job_id: str) -> str:
        return f"users/{user_id}/jobs/{job_id}/"

    @staticmethod
    def attempt_prefix(user_id: str, job_id: str, attempt_id: str) -> str:
        """Each attempt of a job writes under its own prefix, so no attempt can overwrite or delete another's."""
        return f"users/{user_id}/jobs/{job_id}/{attempt_id}/"

    @staticmethod
    def separated(user_id: str, job_id: str, attempt_id: str, name: str) -> str:
        """A float stem the separation stage leaves for the delivery stage (two-stage jobs)."""
        return f"{keys.attempt_prefix(user_id, job_id, attempt_id)}separated/{name}.npy"

    @staticmethod
    def stem(user_id: str, job_id: str, attempt_id: str, stem_id: str, ext: str) -> str:
        return f"{keys.attempt_prefix(user_id, job_id, attempt_id)}{stem_id}.{ext}"


class Storage(Protocol):
    """Every method raises `StorageUnavailable` (with its reason) when storage is down or refuses us, and
    `ObjectMissing` for an object that is not there; nothing else a caller must know about."""

    def put_file(self, key: str, path: Path) -> None: ...
    def put_stream(self, key: str, stream: BinaryIO) -> int: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def iter_range(self, key: str, start: int = 0, end: int | None = None, block: int = 1 << 20) -> Iterator[bytes]: ...
    def size(self, key: str) -> int | None: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def presigned_url(self, key: str, filename: str) -> str | None: ...
    def ping(self) -> None: ...
    def check(self) -> None: ...


CHECK_PREFIX = ".stems-check/"  # where the start-up check writes (and at once deletes) one small object


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StemsError(f"object key {key!r} escapes the storage root")
        return path

    def _atomic(self, key: str) -> tuple[Path, Path]:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        return dst, dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.part")

    def _unwritable(self, exc: OSError) -> StorageUnavailable:
        return StorageUnavailable("not_writable", CHECKS["not_writable"], f"{self.root}: {exc}")

    def put_file(self, key: str, path: Path) -> None:
        dst, tmp = self._atomic_or_unavailable(key)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dst)
        except OSError as exc:
            if not Path(path).exists():  # the caller's file, not our storage
                raise
            raise self._unwritable(exc) from None
        finally:  # a copy that failed half-way (disk full, a read error) leaves no part behind
            tmp.unlink(missing_ok=True)

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        dst, tmp = self._atomic_or_unavailable(key)
        try:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(stream, f, 1 << 20)
                n = f.tell()
            os.replace(tmp, dst)
            return n
        finally:
            tmp.unlink(missing_ok=True)

    def _atomic_or_unavailable(self, key: str) -> tuple[Path, Path]:
        try:
            return self._atomic(key)
        except OSError as exc:
            raise self._unwritable(exc) from None

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.exists():
            raise ObjectMissing(f"no object {key!r}", key=key)
        shutil.copyfile(src, path)

    def iter_range(self, key: str, start: int = 0, end: int | None = None, block: int = 1 << 20) -> Iterator[bytes]:
        """Opens the object now (so a missing one raises here, not half-way through an answer), reads it lazily."""
        src = self._path(key)
        try:
            f = open(src, "rb")
        except FileNotFoundError:
            raise ObjectMissing(f"no object {key!r}", key=key) from None
        remaining = (end if end is not None else os.fstat(f.fileno()).st_size - 1) - start + 1
        return self._blocks(f, start, remaining, block)

    @staticmethod
    def _blocks(f: BinaryIO, start: int, remaining: int, block: int) -> Iterator[bytes]:
        with f:
            f.seek(start)
            while remaining > 0:
                data = f.read(min(block, remaining))
                if not data:
                    break
                remaining -= len(data)
                yield data

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.exists() else None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        found = self.list(prefix)
        for key in found:
            self.delete(key)
        # the parts of writes a killed process left half-done (never listed: they are not objects)
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if base.is_dir():
            for part in base.rglob(".*.part"):
                part.unlink(missing_ok=True)
        return len(found)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if base.is_file():
            return [prefix]
        if not base.exists():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.endswith(".part")
        )

    def presigned_url(self, key: str, filename: str) -> str | None:
        return None

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise StorageUnavailable("not_writable", CHECKS["not_writable"], f"{self.root} is not a writable directory")

    def check(self) -> None:
        """Start-up: the directory is there and a file can be written in it."""
        self.ping()
        key = CHECK_PREFIX + uuid.uuid4().hex
        try:
            dst, tmp = self._atomic(key)
            tmp.write_bytes(b"ok")
            os.replace(tmp, dst)
            dst.unlink()
        except OSError as exc:
            raise self._unwritable(exc) from None


NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidSecurity",
    "403",
    "Forbidden",
}
MISCONFIGURED = {
    "InvalidBucketName",
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
    "InvalidRegion",
    "301",
}
TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeTooSkewed",
}


def _client_error(exc: BaseException | None) -> ClientError | None:
    """The botocore ClientError behind `exc` (boto3's S3UploadFailedError wraps one), or None."""
    from botocore.exceptions import ClientError

    seen, cause = 0, exc  # a cause is an exception or None
    while cause is not None and seen < 8:
        if isinstance(cause, ClientError):
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def classify(exc: BaseException) -> tuple[str, bool]:
    """(reason, whether another try may help) of an exception an S3 call raised. Besides the storage failures:
    "missing", an object that is not there, and "", not a storage failure at all (a bug of ours, raised as is)."""
    from botocore.exceptions import (
        BotoCoreError,
        ConnectTimeoutError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    client_error = _client_error(exc)
    if client_error is not None:
        meta = client_error.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode", 0)
        code = str(client_error.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return "bucket_missing", False
        if code in NOT_FOUND:
            return "missing", False
        if code in DENIED or status == 403:
            return "access_denied", False
        if code in MISCONFIGURED or status == 301:
            return "misconfigured", False
        if status >= 500 or code in TRANSIENT:
            return "server_error", True
        return "refused", False
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return "access_denied", False
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, TimeoutError)):
        return "timeout", True
    if isinstance(exc, (BotoCoreError, ConnectionError)):  # refused, reset, DNS, TLS
        return "unreachable", True
    return "", False


def _retrying(fn: Callable[Concatenate[S3Storage, P], R]) -> Callable[Concatenate[S3Storage, P], R]:
    """Retry S3 calls on 5xx, throttling and timeouts with jittered exponential backoff; classify what is left.

    A missing bucket or refused credentials are not retried: no retry within a request can fix them.
    """

    def wrapper(self: S3Storage, /, *args: P.args, **kwargs: P.kwargs) -> R:
        delay = 0.2
        for attempt in range(self.attempts):
            try:
                return fn(self, *args, **kwargs)
            except StemsError:
                raise
            except Exception as exc:
                reason, again = classify(exc)
                if reason == "missing":
                    self._bucket_must_exist()  # a HEAD's bare 404 does not say whether the key or the bucket
                    raise ObjectMissing(f"no object {args[0] if args else ''!r}") from exc
                if not reason:
                    raise
                error = self._unavailable(reason, exc, fn.__name__)
                if not again:
                    raise error from None
            if attempt + 1 < self.attempts:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        error.detail += f" (after {self.attempts} attempts)"
        raise error from None

    wrapper.__name__ = fn.__name__
    return wrapper


def s3_client(settings: Settings, connect_timeout_s: float | None = None) -> Any:  # a boto3 S3 client
    """A boto3 S3 client for the settings' endpoint and credentials; we retry ourselves, so boto3 tries once."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=settings.s3_secret_access_key,
        config=Config(
            connect_timeout=connect_timeout_s or settings.s3_timeout_s,
            read_timeout=settings.s3_timeout_s,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )


class S3Storage:
    def __init__(self, settings: Settings, attempts: int = 5) -> None:
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/") + "/" if settings.s3_prefix.strip("/") else ""
        self.attempts = attempts
        self.client = s3_client(settings)
        self.presign = settings.s3_presign_downloads
        self.where = f"bucket {self.bucket!r} at {settings.s3_endpoint_url or 'AWS S3'} ({settings.s3_region})"

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _unavailable(self, reason: str, exc: BaseException, op: str) -> StorageUnavailable:
        """The error for the API client (reason, what to check) and, for the log, where and what happened."""
        return StorageUnavailable(reason, CHECKS[reason], scrub(f"{self.where}, {op}: {exc.__class__.__name__}: {exc}"))

    def _bucket_must_exist(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise self._unavailable("bucket_missing", exc, "head_bucket") from None
        except Exception:  # whatever else: the caller's own error stands
            pass

    @_retrying
    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._k(key))

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        # not retried: a stream cannot be rewound in general; the caller owns the retry
        counter = _Counting(stream)
        try:
            self.client.upload_fileobj(counter, self.bucket, self._k(key))
        except StemsError:
            raise
        except Exception as exc:
            reason, _ = classify(exc)
            if reason in ("", "missing"):
                reason = "refused" if reason == "missing" else "unreachable"
            raise self._unavailable(reason, exc, "put_stream") from None
        return counter.n

    @_retrying
    def get_file(self, key: str, path: Path) -> None:
        self.client.download_file(self.bucket, self._k(key), str(path))

    def iter_range(self, key: str, start: int = 0, end: int | None = None, block: int = 1 << 20) -> Iterator[bytes]:
        """GETs the object now (so a failure raises here, before an answer starts), streams its body lazily."""
        rng = f"bytes={start}-{'' if end is None else end}"
        return self._chunks(self._get(key, rng)["Body"], block)

    def _chunks(self, body: Any, block: int) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(block)
        except StemsError:
            raise
        except Exception as exc:  # the connection broke mid-body
            reason, _ = classify(exc)
            raise self._unavailable(reason or "unreachable", exc, "get_object body") from None
        finally:
            body.close()

    @_retrying
    def _get(self, key: str, rng: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.client.get_object(Bucket=self.bucket, Key=self._k(key), Range=rng)
        return answer

    @_retrying
    def size(self, key: str) -> int | None:
        try:
            length: int = self.client.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"]
            return length
        except Exception as exc:
            if classify(exc)[0] == "missing":
                self._bucket_must_exist()
                return None
            raise

    @_retrying
    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def delete_prefix(self, prefix: str) -> int:
        found = self.list(prefix)
        for i in range(0, len(found), 1000):
            self._delete_many(found[i : i + 1000])
        return len(found)

    @_retrying
    def _delete_many(self, batch: list[str]) -> None:
        answer = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": self._k(k)} for k in batch]}
        )
        # a 200 may still refuse some keys (a policy, an object lock, a 5xx of one key): those are not deleted
        refused = answer.get("Errors") or []
        if refused:
            codes = sorted({e.get("Code", "?") for e in refused})
            raise StorageUnavailable(
                "refused",
                CHECKS["refused"],
                f"refused to delete {len(refused)} of {len(batch)} objects ({', '.join(codes)})",
            )

    @_retrying
    def list(self, prefix: str) -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
            out += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
        return sorted(out)

    def presigned_url(self, key: str, filename: str) -> str | None:
        if not self.presign:
            return None
        url: str = self.client.generate_presigned_url(
            "get_object",
            ExpiresIn=3600,
            Params={
                "Bucket": self.bucket,
                "Key": self._k(key),
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
        )
        return url

    def ping(self) -> None:
        """One HEAD of the bucket, not retried (readiness, start-up): StorageUnavailable with the reason."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            reason, _ = classify(exc)
            if not reason:
                raise
            raise self._unavailable("bucket_missing" if reason == "missing" else reason, exc, "head_bucket") from None

    def check(self) -> None:
        """Start-up: the bucket exists and takes a write (one small object under S3_PREFIX, deleted at once)."""
        self.ping()
        key = CHECK_PREFIX + uuid.uuid4().hex
        self._put_bytes(key, b"ok")
        self.delete(key)

    @_retrying
    def _put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:
            self.client.create_bucket(Bucket=self.bucket)


class _Counting:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.n = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.n += len(data)
        return data


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "s3":
        return S3Storage(settings)
    return LocalStorage(settings.data_dir / "objects")
