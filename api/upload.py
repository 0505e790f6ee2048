"""Stream a multipart upload to a temporary file, refusing it (413) as soon as it is too large.

Starlette's form parsing reads the whole body before the handler runs; this parser sees
each block as it arrives, so an oversized upload is stopped mid-stream and nothing of it
is kept.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from .deps import Invalid, PayloadTooLarge


@dataclass
class Received:
    path: Path
    size: int
    filename: str | None


async def receive_file(request: Request, field: str, max_bytes: int, tmp_dir: Path) -> Received:
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in opts:
        raise Invalid("send the audio as multipart/form-data with a `file` field", field=field)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise PayloadTooLarge(f"upload is {declared} bytes; the maximum is {max_bytes}", max_bytes=max_bytes)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    out = tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="upload-", delete=False)
    state = {"name": None, "filename": None, "in_file": False, "size": 0, "found": False, "header": b"", "value": b""}
    headers: dict[bytes, bytes] = {}

    def on_part_begin() -> None:
        headers.clear()
        state["in_file"] = False

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        headers[state["header"].lower()] = state["value"]
        state["header"], state["value"] = b"", b""

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
                raise PayloadTooLarge(f"upload is over the maximum of {max_bytes} bytes", max_bytes=max_bytes)
            out.write(data[start:end])

    def on_part_end() -> None:
        state["in_file"] = False

    parser = MultipartParser(opts[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except PayloadTooLarge:
        out.close()
        Path(out.name).unlink(missing_ok=True)
        raise
    except Exception as exc:  # malformed multipart
        out.close()
        Path(out.name).unlink(missing_ok=True)
        raise Invalid(f"malformed multipart body: {exc}") from exc
    out.close()
    if not state["found"]:
        Path(out.name).unlink(missing_ok=True)
        raise Invalid(f"the multipart body has no `{field}` field", field=field)
    if state["size"] == 0:
        Path(out.name).unlink(missing_ok=True)
        raise Invalid("the uploaded file is empty", field=field)
    name = state["filename"]
    if name:
        name = re.sub(r"[^\w.\- ]", "_", Path(name).name)[:200] or None
    return Received(Path(out.name), state["size"], name)
