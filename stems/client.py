"""A Python client of the stems HTTP API, with the API's own schemas as its typed results.

    from stems.client import Client

    with Client("http://127.0.0.1:8000", api_key) as client:
        audio = client.upload("song.flac", progress=lambda sent, total: print(sent, total))
        job = client.create_stems(preset="phantom_center", audio_id=audio.audio_id)
        done = client.wait(job.creation_id)
        for stem in done.stems:
            client.download_stem(stem.stem_id, f"out/{stem.name}.wav")

A refusal raises `ApiError` with the API's `code`, `message` (its `detail`), HTTP `status` and
the error's other fields; a split or import that ends badly raises `JobFailed` with the code and
message of its `error`. Polls back off and honour `Retry-After`; downloads resume where they
stopped (HTTP Range) and never forward the key to a presigned storage URL.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from api.schemas import (
    AudioAccepted,
    AudioStatus,
    BatchItemError,
    BatchQueued,
    DownloadLinks,
    MasterQueued,
    MasterStatus,
    Peaks,
    PresetList,
    SplitList,
    SplitStatus,
    StemsEstimate,
    StemsQueued,
)
from pipelines.errors import ApiError as ApiError, JobFailed as JobFailed  # raised by Client: importable from here

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
CHUNK = 1 << 20
_Status = TypeVar("_Status", AudioStatus, SplitStatus, MasterStatus)  # what `_poll` polls


def api_error(response: httpx.Response) -> ApiError:
    """The `ApiError` of a refused response: its JSON error's code, message and fields, and Retry-After."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": response.text[:500] or response.reason_phrase}
    fields = {k: v for k, v in body.items() if k not in ("detail", "code", "message", "retry_after")}
    detail, code = body.get("detail"), body.get("code")
    if isinstance(detail, list):  # FastAPI's request validation: one line per field
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
        code = code or "invalid_request"
    else:
        message = str(detail or response.reason_phrase)
    retry_after = _retry_after(response)
    if retry_after is None and isinstance(body.get("retry_after"), (int, float)):
        retry_after = float(body["retry_after"])
    return ApiError(response.status_code, code or f"http_{response.status_code}", message, retry_after, **fields)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class Client:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float = 60.0,
        *,
        retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.sleep = sleep
        # redirects are followed by hand: the key must not travel to a presigned storage URL
        self.http = httpx.Client(
            base_url=self.base_url, headers={"x-api-key": api_key}, timeout=timeout, follow_redirects=False
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- plumbing -----------------------------------------------------------------------
    def _request(self, method: str, path: str, *, retry: bool = False, **kw: Any) -> httpx.Response:
        """One call; with `retry`, 429 and 503 answers are retried after their Retry-After."""
        for attempt in range(self.retries + 1 if retry else 1):
            response = self.http.request(method, path, **kw)
            if response.status_code < 400:
                return response
            error = api_error(response)
            if not (retry and error.status in (429, 503)) or attempt == self.retries:
                raise error
            self.sleep(error.retry_after if error.retry_after is not None else min(30.0, 2.0**attempt))
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    # -- bringing audio in --------------------------------------------------------------
    def upload(
        self,
        path: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
        filename: str | None = None,
    ) -> AudioAccepted:
        """POST /from-file, streaming the file; `progress(sent, total)` after each chunk."""
        path = Path(path)
        size = path.stat().st_size
        boundary = uuid.uuid4().hex
        name = (
            (filename or path.name).replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
        )
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[bytes]:
            yield head
            sent = 0
            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    yield block
                    sent += len(block)
                    if progress:
                        progress(sent, size)
            yield tail

        headers = {
            "content-type": f"multipart/form-data; boundary={boundary}",
            "content-length": str(len(head) + size + len(tail)),
        }
        if idempotency_key:
            headers["idempotency-key"] = idempotency_key
        return AudioAccepted.model_validate(self._json("POST", "/from-file", content=body(), headers=headers))

    def from_link(self, url: str, *, callback_url: str | None = None) -> AudioAccepted:
        body = {"url": url, **({"callback_url": callback_url} if callback_url else {})}
        return AudioAccepted.model_validate(self._json("POST", "/from-link", json=body))

    def audio_status(self, audio_id: str) -> AudioStatus:
        return AudioStatus.model_validate(self._json("GET", f"/status/audio/{audio_id}", retry=True))

    def wait_audio(self, audio_id: str, *, timeout: float | None = 600.0) -> AudioStatus:
        """Poll the import until it ends; JobFailed if the audio was refused."""
        status = self._poll(lambda: self.audio_status(audio_id), timeout, None)
        if status.status != "complete":
            raise JobFailed(status)
        return status

    # -- splitting ----------------------------------------------------------------------
    def presets(self) -> PresetList:
        return PresetList.model_validate(self._json("GET", "/presets", retry=True))

    def create_stems(
        self,
        *,
        preset: str,
        audio_id: str | None = None,
        stem_id: str | None = None,
        upscaled_id: str | None = None,
        mastered_id: str | None = None,
        selection: dict[str, Any] | None = None,
        bit_depth: int | None = None,
        hq_streaming_format: str | None = None,
        restoration_params: dict[str, Any] | None = None,
        callback_url: str | None = None,
        prompt: str | None = None,
        sam_model: str | None = None,
        stereo_mode: str | None = None,
        spans: list[dict[str, Any]] | None = None,
        idempotency_key: str | None = None,
    ) -> StemsQueued:
        """POST /create-stems with the fields given (None: the API's default)."""
        fields = dict(
            preset=preset,
            audio_id=audio_id,
            stem_id=stem_id,
            upscaled_id=upscaled_id,
            mastered_id=mastered_id,
            selection=selection,
            bit_depth=bit_depth,
            hq_streaming_format=hq_streaming_format,
            restoration_params=restoration_params,
            callback_url=callback_url,
            prompt=prompt,
            sam_model=sam_model,
            stereo_mode=stereo_mode,
            spans=spans,
        )
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        body = {k: v for k, v in fields.items() if v is not None}
        return StemsQueued.model_validate(self._json("POST", "/create-stems", json=body, headers=headers))

    def create_stems_batch(
        self, items: list[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> list[StemsQueued | StemsEstimate | BatchItemError]:
        """POST /create-stems/batch: up to 100 create-stems bodies; each answer (or error) in order, never raised."""
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        body = {"items": [{k: v for k, v in item.items() if v is not None} for item in items]}
        return BatchQueued.model_validate(self._json("POST", "/create-stems/batch", json=body, headers=headers)).items

    def status(self, creation_id: str) -> SplitStatus:
        return SplitStatus.model_validate(self._json("GET", f"/status/stem_split/{creation_id}", retry=True))

    def wait(
        self, creation_id: str, *, timeout: float | None = None, progress: Callable[[SplitStatus], None] | None = None
    ) -> SplitStatus:
        """Poll the split until it ends (backing off from 0.25 s to 5 s); JobFailed unless it completed."""
        status = self._poll(lambda: self.status(creation_id), timeout, progress)
        if status.status != "complete":
            raise JobFailed(status)
        return status

    def _poll(
        self, get: Callable[[], _Status], timeout: float | None, progress: Callable[[_Status], None] | None
    ) -> _Status:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.25
        while True:
            status = get()
            if progress:
                progress(status)
            if status.status in ("complete", "failed", "cancelled"):
                return status
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"still {status.status} after {timeout} s")
            self.sleep(delay)
            delay = min(5.0, delay * 1.5)

    def cancel(self, creation_id: str) -> SplitStatus:
        return SplitStatus.model_validate(self._json("POST", f"/cancel/{creation_id}"))

    def splits(self, *, limit: int = 20, cursor: str | None = None) -> SplitList:
        """One page of your splits, newest first; pass `next_cursor` on for the next."""
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return SplitList.model_validate(self._json("GET", "/stem_split", params=params, retry=True))

    def iter_splits(self, *, page_size: int = 50) -> Iterator[Any]:
        cursor = None
        while True:
            page = self.splits(limit=page_size, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    # -- mastering ----------------------------------------------------------------------
    def master_audio(
        self,
        *,
        audio_id: str | None = None,
        stem_id: str | None = None,
        upscaled_id: str | None = None,
        mastered_id: str | None = None,
        preset: str = "streaming",
        bit_depth: int | None = None,
        idempotency_key: str | None = None,
    ) -> MasterQueued:
        """POST /master-audio: a mastered version of an audio, a stem or an upscaled copy."""
        fields = dict(
            audio_id=audio_id,
            stem_id=stem_id,
            upscaled_id=upscaled_id,
            mastered_id=mastered_id,
            preset=preset,
            bit_depth=bit_depth,
        )
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        body = {k: v for k, v in fields.items() if v is not None}
        return MasterQueued.model_validate(self._json("POST", "/master-audio", json=body, headers=headers))

    def mastered_status(self, mastered_id: str) -> MasterStatus:
        return MasterStatus.model_validate(self._json("GET", f"/status/mastered/{mastered_id}", retry=True))

    def wait_mastered(self, mastered_id: str, *, timeout: float | None = None) -> MasterStatus:
        """Poll the mastering until it ends; JobFailed unless it completed."""
        status = self._poll(lambda: self.mastered_status(mastered_id), timeout, None)
        if status.status != "complete":
            raise JobFailed(status)
        return status

    def download_mastered(
        self, mastered_id: str, dest: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> Path:
        return self._download(f"/download/mastered/{mastered_id}", {}, dest, progress)

    def delete_mastered(self, mastered_id: str) -> None:
        self._request("DELETE", f"/mastered/{mastered_id}")

    # -- results ------------------------------------------------------------------------
    def stem_peaks(self, stem_id: str) -> Peaks:
        return Peaks.model_validate(self._json("GET", f"/stem/{stem_id}/peaks", retry=True))

    def audio_peaks(self, audio_id: str) -> Peaks:
        return Peaks.model_validate(self._json("GET", f"/audio/{audio_id}/peaks", retry=True))

    def download_links(self, stem_ids: list[str], *, format: str = "wav") -> DownloadLinks:
        return DownloadLinks.model_validate(
            self._json("POST", "/download-links", json={"stem_ids": list(stem_ids), "format": format})
        )

    def download_stem(
        self, stem_id: str, dest: str | os.PathLike[str], *, format: str = "wav", progress: Progress | None = None
    ) -> Path:
        """Download a stem to `dest`, resuming a `dest.part` left by an interrupted try (HTTP Range)."""
        return self._download(f"/download/stem/{stem_id}", {"format": format}, dest, progress)

    def _download(
        self, path: str, params: dict[str, Any], dest: str | os.PathLike[str], progress: Progress | None
    ) -> Path:
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(self.retries + 1):
            try:
                self._fetch(path, params, part, progress)
                os.replace(part, dest)
                return dest
            except (httpx.TransportError, ApiError) as exc:
                if isinstance(exc, ApiError) and not exc.retryable or attempt == self.retries:
                    raise
                self.sleep(getattr(exc, "retry_after", None) or min(30.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def _fetch(self, path: str, params: dict[str, Any], part: Path, progress: Progress | None) -> None:
        have = part.stat().st_size if part.exists() else 0
        headers = {"range": f"bytes={have}-"} if have else {}
        with self.http.stream("GET", path, params=params, headers=headers) as r:
            if r.status_code in (301, 302, 303, 307, 308):  # presigned storage URL: without our key
                with httpx.stream("GET", r.headers["location"], headers=headers, timeout=self.http.timeout) as s:
                    return self._write(s, part, have, progress)
            return self._write(r, part, have, progress)

    @staticmethod
    def _write(r: httpx.Response, part: Path, have: int, progress: Progress | None) -> None:
        if r.status_code == 416 and have:  # nothing after `have`: whole if the object is that long
            if r.headers.get("content-range") == f"bytes */{have}":
                return
            part.unlink()  # longer than the object: not a part of it
            raise httpx.ReadError("the partial download did not match the object; starting again")
        if r.status_code >= 400:
            r.read()
            raise api_error(r)
        resumed = r.status_code == 206
        total = int(r.headers.get("content-length", 0)) + (have if resumed else 0)
        done = have if resumed else 0
        with open(part, "ab" if resumed else "wb") as f:
            for block in r.iter_bytes(CHUNK):
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
        if total and done != total:
            raise httpx.ReadError(f"the download stopped at {done} of {total} bytes")

    def download_archive(
        self,
        dest: str | os.PathLike[str],
        *,
        creation_id: str | None = None,
        stem_ids: list[str] | None = None,
        format: str = "wav",
    ) -> Path:
        """One zip of a job's stems (or of chosen stems)."""
        body = {"format": format, **({"creation_id": creation_id} if creation_id else {"stem_ids": stem_ids})}
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.http.stream("POST", "/download-archive", json=body) as r:
            if r.status_code >= 400:
                r.read()
                raise api_error(r)
            with open(dest, "wb") as f:
                for block in r.iter_bytes(CHUNK):
                    f.write(block)
        return dest
