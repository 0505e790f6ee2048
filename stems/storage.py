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
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

from pipelines.errors import StemsError

from .settings import Settings


class StorageError(StemsError):
    """Storage failed in a way retrying may fix (5xx, timeouts)."""

    code = "storage_unavailable"
    retryable = True


class ObjectMissing(StemsError):
    code = "object_missing"


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


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StemsError(f"object key {key!r} escapes the storage root")
        return path

    def _atomic(self, key: str):
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        return dst, dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.part")

    def put_file(self, key: str, path: Path) -> None:
        dst, tmp = self._atomic(key)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dst)
        finally:  # a copy that failed half-way (disk full, a read error) leaves no part behind
            tmp.unlink(missing_ok=True)

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        dst, tmp = self._atomic(key)
        try:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(stream, f, 1 << 20)
                n = f.tell()
            os.replace(tmp, dst)
            return n
        finally:
            tmp.unlink(missing_ok=True)

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.exists():
            raise ObjectMissing(f"no object {key!r}", key=key)
        shutil.copyfile(src, path)

    def iter_range(self, key: str, start: int = 0, end: int | None = None, block: int = 1 << 20) -> Iterator[bytes]:
        src = self._path(key)
        if not src.exists():
            raise ObjectMissing(f"no object {key!r}", key=key)
        remaining = (end if end is not None else src.stat().st_size - 1) - start + 1
        with open(src, "rb") as f:
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
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.endswith(".part"))

    def presigned_url(self, key: str, filename: str) -> str | None:
        return None

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise StorageError(f"storage directory {self.root} is not writable")


def _retrying(fn):
    """Retry S3 calls on 5xx, throttling and timeouts with jittered exponential backoff."""

    def wrapper(self, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError  # here: local storage needs no boto

        delay = 0.2
        for attempt in range(self.attempts):
            try:
                return fn(self, *args, **kwargs)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise ObjectMissing(f"no object {args[0] if args else ''!r}") from exc
                if status < 500 and code not in ("SlowDown", "Throttling", "RequestTimeout"):
                    raise StemsError(f"storage refused the request: {code} {exc}") from exc
                last = exc
            except BotoCoreError as exc:  # connection errors, read timeouts
                last = exc
            if attempt + 1 < self.attempts:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        raise StorageError(f"storage unavailable after {self.attempts} attempts: {last}")

    wrapper.__name__ = fn.__name__
    return wrapper


def s3_client(settings: Settings, connect_timeout_s: float | None = None):
    """A boto3 S3 client for the settings' endpoint and credentials; we retry ourselves, so boto3 tries once."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id, aws_secret_access_key=settings.s3_secret_access_key,
        config=Config(connect_timeout=connect_timeout_s or settings.s3_timeout_s, read_timeout=settings.s3_timeout_s,
                      retries={"max_attempts": 1, "mode": "standard"}, s3={"addressing_style": "path"}),
    )


class S3Storage:
    def __init__(self, settings: Settings, attempts: int = 5) -> None:
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/") + "/" if settings.s3_prefix.strip("/") else ""
        self.attempts = attempts
        self.client = s3_client(settings)
        self.presign = settings.s3_presign_downloads

    def _k(self, key: str) -> str:
        return self.prefix + key

    @_retrying
    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._k(key))

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        # not retried: a stream cannot be rewound in general; the caller owns the retry
        counter = _Counting(stream)
        try:
            self.client.upload_fileobj(counter, self.bucket, self._k(key))
        except Exception as exc:
            if isinstance(exc, StemsError):
                raise
            raise StorageError(f"upload to storage failed: {exc}") from exc
        return counter.n

    @_retrying
    def get_file(self, key: str, path: Path) -> None:
        self.client.download_file(self.bucket, self._k(key), str(path))

    def iter_range(self, key: str, start: int = 0, end: int | None = None, block: int = 1 << 20) -> Iterator[bytes]:
        rng = f"bytes={start}-{'' if end is None else end}"
        body = self._get(key, rng)["Body"]
        try:
            yield from body.iter_chunks(block)
        finally:
            body.close()

    @_retrying
    def _get(self, key: str, rng: str) -> dict:
        return self.client.get_object(Bucket=self.bucket, Key=self._k(key), Range=rng)

    @_retrying
    def size(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"]
        except Exception as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    @_retrying
    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def delete_prefix(self, prefix: str) -> int:
        found = self.list(prefix)
        for i in range(0, len(found), 1000):
            self._delete_many(found[i:i + 1000])
        return len(found)

    @_retrying
    def _delete_many(self, batch: list[str]) -> None:
        answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": self._k(k)} for k in batch]})
        # a 200 may still refuse some keys (a policy, an object lock, a 5xx of one key): those are not deleted
        refused = answer.get("Errors") or []
        if refused:
            codes = sorted({e.get("Code", "?") for e in refused})
            raise StorageError(f"storage refused to delete {len(refused)} of {len(batch)} objects ({', '.join(codes)})")

    @_retrying
    def list(self, prefix: str) -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
            out += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
        return sorted(out)

    def presigned_url(self, key: str, filename: str) -> str | None:
        if not self.presign:
            return None
        return self.client.generate_presigned_url(
            "get_object", ExpiresIn=3600,
            Params={"Bucket": self.bucket, "Key": self._k(key), "ResponseContentDisposition": f'attachment; filename="{filename}"'},
        )

    @_retrying
    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

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
