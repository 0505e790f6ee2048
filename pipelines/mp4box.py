"""A small MP4 (ISO BMFF) box reader and the one edit we need: add a box to the movie's user data (moov/udta).

Native Instruments' Stem format keeps its JSON in a `stem` box in moov/udta, which no muxer we
can install writes. The edit streams the file: the boxes before `moov` and after it are copied,
`moov` (small: the sample tables) is rewritten with the new box, and when `moov` comes before
`mdat` ("fast start") every chunk offset (`stco`, `co64`) that points past it is moved by the
bytes added, so the samples are still found.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import AudioError

# boxes that hold only boxes, on the way from moov to the chunk offset tables
CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"udta", b"edts", b"dinf"}


@dataclass(frozen=True)
class Box:
    type: bytes
    start: int  # offset of its header
    header: int  # 8, or 16 with a 64-bit size
    size: int  # header included

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def body(self) -> int:
        return self.start + self.header


def _header(head: bytes, pos: int, limit: int) -> Box:
    """The box whose header starts `head` (at file or buffer offset `pos`), which must end by `limit`."""
    if len(head) < 8:
        raise AudioError(f"truncated MP4 box header at byte {pos}")
    size, kind = struct.unpack(">I4s", head[:8])
    header = 8
    if size == 1:
        if len(head) < 16:
            raise AudioError(f"truncated MP4 box header at byte {pos}")
        size, header = struct.unpack(">Q", head[8:16])[0], 16
    elif size == 0:
        size = limit - pos  # to the end
    if size < header or pos + size > limit:
        raise AudioError(f"MP4 box {kind!r} at byte {pos} claims {size} bytes; only {limit - pos} are left")
    return Box(kind, pos, header, size)


def children(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[Box]:
    """The boxes in `buf[start:end]`, in order."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        box = _header(buf[pos : pos + 16], pos, end)
        yield box
        pos = box.end


def top_level(f: BinaryIO) -> list[Box]:
    """The file's top-level boxes, read header by header (the file is not loaded)."""
    size = f.seek(0, os.SEEK_END)
    boxes, pos = [], 0
    while pos < size:
        f.seek(pos)
        box = _header(f.read(16), pos, size)
        boxes.append(box)
        pos = box.end
    return boxes


def find(buf: bytes, path: list[bytes], start: int = 0, end: int | None = None) -> list[Box]:
    """Every box at `path` (e.g. [b"trak", b"tkhd"]) under `buf[start:end]`."""
    found = []
    for box in children(buf, start, end):
        if box.type == path[0]:
            found += [box] if len(path) == 1 else find(buf, path[1:], box.body, box.end)
    return found


def make_box(kind: bytes, payload: bytes) -> bytes:
    if len(kind) != 4:
        raise ValueError(f"a box type is 4 bytes, not {kind!r}")
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _resize(buf: bytearray, box: Box, delta: int) -> None:
    if box.header == 16:
        struct.pack_into(">Q", buf, box.start + 8, box.size + delta)
    elif box.size + delta >= 1 << 32:
        raise AudioError("the MP4 box would outgrow 32-bit sizes")
    else:
        struct.pack_into(">I", buf, box.start, box.size + delta)


def _shift_chunk_offsets(moov: bytearray, past: int, delta: int) -> None:
    """Move every chunk offset at or after `past` (a file offset) by `delta` bytes."""
    for kind, fmt in ((b"stco", ">I"), (b"co64", ">Q")):
        width = struct.calcsize(fmt)
        for table in find(bytes(moov), [b"moov", b"trak", b"mdia", b"minf", b"stbl", kind]):
            (count,) = struct.unpack_from(">I", moov, table.body + 4)
            for i in range(count):
                at = table.body + 8 + i * width
                (offset,) = struct.unpack_from(fmt, moov, at)
                if offset >= past:
                    if fmt == ">I" and offset + delta >= 1 << 32:
                        raise AudioError("a chunk offset would outgrow stco's 32 bits")
                    struct.pack_into(fmt, moov, at, offset + delta)


def add_user_box(path: Path, kind: bytes, payload: bytes) -> None:
    """Add the box `kind` holding `payload` to moov/udta of the MP4 at `path` (creating udta if it has none)."""
    new_box = make_box(kind, payload)
    with open(path, "rb") as f:
        boxes = top_level(f)
        moovs = [b for b in boxes if b.type == b"moov"]
        if len(moovs) != 1:
            raise AudioError(f"an MP4 has one moov box; this one has {len(moovs)}")
        old = moovs[0]
        f.seek(old.start)
        moov = bytearray(f.read(old.size))
    local = Box(old.type, 0, old.header, old.size)
    udta = [b for b in children(bytes(moov), local.body, local.end) if b.type == b"udta"]
    if udta:  # append to the existing user data
        moov[udta[0].end : udta[0].end] = new_box
        _resize(moov, udta[0], len(new_box))
        added = len(new_box)
    else:
        added_box = make_box(b"udta", new_box)
        moov[local.end : local.end] = added_box
        added = len(added_box)
    _resize(moov, local, added)
    if any(b.type == b"mdat" and b.start > old.start for b in boxes):  # samples after moov move by `added`
        _shift_chunk_offsets(moov, old.end, added)
    tmp = path.with_name(path.name + ".udta")
    with open(path, "rb") as src, open(tmp, "wb") as out:
        _copy(src, out, 0, old.start)
        out.write(moov)
        _copy(src, out, old.end, None)
    os.replace(tmp, path)


def _copy(src: BinaryIO, dst: BinaryIO, start: int, end: int | None) -> None:
    src.seek(start)
    if end is None:
        shutil.copyfileobj(src, dst, 1 << 20)
        return
    left = end - start
    while left > 0:
        block = src.read(min(left, 1 << 20))
        if not block:
            raise AudioError("the MP4 ended early")
        dst.write(block)
        left -= len(block)


def user_box(path: Path, kind: bytes) -> bytes | None:
    """The payload of moov/udta/`kind` (None without one)."""
    with open(path, "rb") as f:
        moov = [b for b in top_level(f) if b.type == b"moov"]
        if not moov:
            return None
        f.seek(moov[0].start)
        buf = f.read(moov[0].size)
    for box in find(buf, [b"moov", b"udta", kind]):
        return buf[box.body : box.end]
    return None
