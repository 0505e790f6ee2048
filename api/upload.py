"""Stream a multipart upload to a temporary file, refusing it (413) as soon as it is too large.

Starlette's form parsing reads the whole body before the handler runs; this parser sees
each block as it arrives, so an oversized upload is stopped mid-stream and nothing of it
is kept. The event loop only receives: parsing, writing and hashing (the sha256 the
idempotency check needs) run in a worker thread, a megabyte at a time, so status polls and
/healthz of the same process answer while a large upload streams in. Besides the file's own
limit, a hostile body is capped in every other dimension a parser would otherwise buffer or
loop over: the boundary's length, the number of parts, the headers of each part, the bytes of
the non-file parts, and the body as a whole.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from pipelines.errors import Invalid, TooLarge

MAX_BOUNDARY = 200  # RFC 2046 allows 70; clients use far less
MAX_PARTS = 16  # the upload is one `file` part; a few other fields are tolerated and ignored
MAX_PART_HEADERS = 16  # header lines of one part
MAX_PART_HEADER_BYTES = 8 * 1024  # names and values of one part's headers together
MAX_FIELD_BYTES = 64 * 1024  # data of all non-file parts together (they are read and dropped)
OVERHEAD_BYTES = 256 * 1024  # what a body may hold beyond the file: boundaries, headers, small fields
BATCH_BYTES = 1 << 20  # received bytes handed to the parsing thread at once: one thread hop per megabyte


@dataclass
class Received:
    path: Path
    size: int
    filename: str | None
    sha256: str


class Refused(Exception):
    """One of our caps, raised through the parser (which would otherwise report it as malformed input)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


async def receive_file(request: Request, field: str, max_bytes: int, tmp_dir: Path) -> Received:
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in opts:
        raise Invalid("send the audio as multipart/form-data with a `file` field", field=field)
    if len(opts[b"boundary"]) > MAX_BOUNDARY or not opts[b"boundary"]:
        raise Invalid(f"the multipart boundary must be 1 to {MAX_BOUNDARY} characters", field=field)
    body_max = max_bytes + OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_max:
        raise TooLarge(f"upload is {declared} bytes; the maximum is {max_bytes}", max_bytes=max_bytes)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    out = tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="upload-", delete=False)
    state = {
        "name": None,
        "filename": None,
        "in_file": False,
        "size": 0,
        "found": False,
        "header": b"",
        "value": b"",
        "parts": 0,
        "header_bytes": 0,
        "field_bytes": 0,
        "ended": False,
    }
    headers: dict[bytes, bytes] = {}
    digest = hashlib.sha256()

    def on_part_begin() -> None:
        headers.clear()
        state["in_file"], state["header_bytes"] = False, 0
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise Refused(Invalid(f"the multipart body has more than {MAX_PARTS} parts", max_parts=MAX_PARTS))

    def _header_bytes(n: int) -> None:
        state["header_bytes"] += n
        if state["header_bytes"] > MAX_PART_HEADER_BYTES:
            raise Refused(
                TooLarge(
                    f"a part's headers are over {MAX_PART_HEADER_BYTES} bytes",
                    max_part_header_bytes=MAX_PART_HEADER_BYTES,
                )
            )

    def on_header_field(data: bytes, start: int, end: int) -> None:
        _header_bytes(end - start)
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        _header_bytes(end - start)
        state["value"] += data[start:end]

    def on_header_end() -> None:
        headers[state["header"].lower()] = state["value"]
        state["header"], state["value"] = b"", b""
        if len(headers) > MAX_PART_HEADERS:
            raise Refused(
                Invalid(f"a part has more than {MAX_PART_HEADERS} headers", max_part_headers=MAX_PART_HEADERS)
            )

    def on_headers_finished() -> None:
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        if disp.get(b"name", b"").decode(errors="replace") == field and not state["found"]:
            state["in_file"], state["found"] = True, True
            raw = disp.get(b"filename")
            state["filename"] = raw.decode(errors="replace") if raw else None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["in_file"]:
            state["size"] += end - start
            if state["size"] > max_bytes:
                raise Refused(TooLarge(f"upload is over the maximum of {max_bytes} bytes", max_bytes=max_bytes))
            block = data[start:end]
            out.write(block)
            digest.update(block)
        else:
            state["field_bytes"] += end - start
            if state["field_bytes"] > MAX_FIELD_BYTES:
                raise Refused(
                    TooLarge(
                        f"the non-file parts hold more than {MAX_FIELD_BYTES} bytes", max_field_bytes=MAX_FIELD_BYTES
                    )
                )

    def on_part_end() -> None:
        state["in_file"] = False

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        opts[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    received, batch = 0, bytearray()
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_max:
                raise Refused(TooLarge(f"upload is over the maximum of {max_bytes} bytes", max_bytes=max_bytes))
            batch += chunk
            if len(batch) >= BATCH_BYTES:
                await anyio.to_thread.run_sync(parser.write, bytes(batch))
                batch.clear()
        await anyio.to_thread.run_sync(_last, parser, bytes(batch))
    except Refused as refused:
        out.close()
        Path(out.name).unlink(missing_ok=True)
        raise refused.error from None
    except Exception as exc:  # malformed multipart
        out.close()
        Path(out.name).unlink(missing_ok=True)
        raise Invalid(f"malformed multipart body: {exc}") from exc
    out.close()
    if not state["ended"]:  # python-multipart's finalize() does not check this itself
        Path(out.name).unlink(missing_ok=True)
        raise Invalid("the multipart body ends before its closing boundary (the upload was cut off)", field=field)
    if not state["found"]:
        Path(out.name).unlink(missing_ok=True)
        raise Invalid(f"the multipart body has no `{field}` field", field=field)
    if state["size"] == 0:
        Path(out.name).unlink(missing_ok=True)
        raise Invalid("the uploaded file is empty", field=field)
    name = state["filename"]
    if name:
        name = re.sub(r"[^\w.\- ]", "_", Path(name).name)[:200] or None
    return Received(Path(out.name), state["size"], name, digest.hexdigest())


def _last(parser: MultipartParser, batch: bytes) -> None:
    parser.write(batch)
    parser.finalize()
