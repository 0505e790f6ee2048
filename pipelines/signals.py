"""Signals: audio read a range at a time, in memory or on disk, and the channel policy of every model.

Long tracks are never held whole: a job's decoded selection, each model's sources and each
stem live in float32 files on disk and are read block by block. Files are `.npy` arrays
shaped (frames, channels) (a time range is one contiguous read) and are read with `pread`,
not memory-mapped, so pages read once do not stay in the process's resident memory.

Channel policy: mono stays mono and stereo stays stereo; a model that needs stereo gets a mono
source duplicated and its output folded back to mono; a model that needs mono runs once per
channel. Sources with more than two channels are folded to stereo (front-left-ish channels to L,
the others to R, centre to both), since every separation model we serve is trained on stereo music.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import AudioError


def fold(block: np.ndarray, max_channels: int = 2) -> np.ndarray:
    """Fold more than two channels into stereo (see the channel policy above)."""
    ch = block.shape[0]
    if ch <= max_channels:
        return block
    left, right = block[0::2].sum(0), block[1::2].sum(0)
    if ch >= 3:  # treat channel 2 as centre, as in 5.1/7.1 layouts: to both sides
        left = left - block[2] + 0.7071 * block[2]
        right = right + 0.7071 * block[2]
    folded: np.ndarray = (np.stack([left, right]) / math.ceil(ch / 2)).astype(np.float32)
    return folded


def to_channels(audio: np.ndarray, channels: int | None) -> np.ndarray:
    """Adapt a (c, n) array to a model's channel count (see the channel policy)."""
    if channels is None or audio.shape[0] == channels:
        return audio
    if channels == 2 and audio.shape[0] == 1:
        return np.repeat(audio, 2, axis=0)
    if channels == 1:
        mono: np.ndarray = audio.mean(axis=0, keepdims=True)
        return mono
    return fold(audio)


BLOCK = 1 << 19  # frames per read when a whole signal is passed over (about 12 s at 44.1 kHz)
_NPY_HEADER = 128  # bytes: numpy's v1.0 header of a (frames, channels) float32 array, padded to 64


class Signal:
    """Float32 audio of `channels` x `frames`, read a range at a time as (channels, hi - lo) arrays.

    `peak` (max |sample|) and `digest` (see `content_digest`) are filled in when known without
    another pass over the audio. Arrays returned by `read` must not be modified.
    """

    channels: int
    frames: int
    peak: float | None = None
    digest: str | None = None

    def read(self, lo: int, hi: int) -> np.ndarray:
        raise NotImplementedError

    def blocks(self, size: int = BLOCK) -> Iterator[tuple[int, np.ndarray]]:
        for lo in range(0, self.frames, size):
            yield lo, self.read(lo, min(self.frames, lo + size))

    def to_array(self) -> np.ndarray:
        return np.ascontiguousarray(self.read(0, self.frames), dtype=np.float32)

    def close(self) -> None:
        """Release what the signal holds open (files); reading afterwards is an error."""


class ArraySignal(Signal):
    def __init__(self, audio: np.ndarray) -> None:
        if audio.ndim != 2:
            raise ValueError(f"audio must be (channels, samples), got shape {audio.shape}")
        self.audio = audio if audio.dtype == np.float32 else audio.astype(np.float32)
        self.channels, self.frames = self.audio.shape

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self.audio[:, lo:hi]

    def to_array(self) -> np.ndarray:
        return self.audio


class ZeroSignal(Signal):
    peak = 0.0

    def __init__(self, channels: int, frames: int) -> None:
        self.channels, self.frames = channels, frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        return np.zeros((self.channels, max(0, min(hi, self.frames) - lo)), np.float32)


class FrameFile(Signal):
    """A float32 (frames, channels) `.npy` file, read with pread on a descriptor held open.

    Holding the descriptor means the data stays readable if the file is unlinked meanwhile
    (a cache eviction, the job's scratch directory going away).
    """

    def __init__(self, path: Path, peak: float | None = None, digest: str | None = None) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            with os.fdopen(os.dup(self._fd), "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
                self._offset = f.tell()
        except BaseException:
            os.close(self._fd)
            raise
        if fortran or dtype != np.dtype("<f4") or len(shape) != 2:
            os.close(self._fd)
            raise AudioError(f"{path} is not a float32 (frames, channels) array")
        self.frames, self.channels = shape
        self.peak, self.digest = peak, digest

    def read(self, lo: int, hi: int) -> np.ndarray:
        lo, hi = max(0, lo), min(self.frames, hi)
        k = max(0, hi - lo)
        size = k * self.channels * 4
        buf = os.pread(self._fd, size, self._offset + lo * self.channels * 4) if size else b""
        if len(buf) != size:
            raise AudioError(f"{self.path} is shorter than its header says")
        out = np.empty((self.channels, k), np.float32)
        out[:] = np.frombuffer(buf, "<f4").reshape(k, self.channels).T
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class SumSignal(Signal):
    """The sum of signals of one shape, computed per read (a stem made of several sources)."""

    def __init__(self, parts: list[Signal]) -> None:
        self.parts = parts
        self.channels, self.frames = parts[0].channels, parts[0].frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        total: np.ndarray = np.sum([p.read(lo, hi) for p in self.parts], axis=0).astype(np.float32)
        return total


class ChannelsSignal(Signal):
    """A signal adapted to `channels` per read (see `to_channels`; every rule is sample-local)."""

    def __init__(self, signal: Signal, channels: int) -> None:
        self.signal, self.channels, self.frames = signal, channels, signal.frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        return to_channels(self.signal.read(lo, hi), self.channels)


class PickChannel(Signal):
    def __init__(self, signal: Signal, channel: int) -> None:
        self.signal, self.channel, self.channels, self.frames = signal, channel, 1, signal.frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self.signal.read(lo, hi)[self.channel : self.channel + 1]


class StackSignal(Signal):
    """Signals of one length stacked along channels (mono model outputs, one per input channel)."""

    def __init__(self, parts: list[Signal]) -> None:
        self.parts = parts
        self.channels, self.frames = sum(p.channels for p in parts), parts[0].frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        return np.concatenate([p.read(lo, hi) for p in self.parts], axis=0)


class Mixed(Signal):
    """A weighted sum of signals of one shape, computed per read (residuals, mid and side, wet/dry mixes)."""

    def __init__(self, parts: list[tuple[Signal, float]]) -> None:
        self.parts = parts
        self.channels, self.frames = parts[0][0].channels, parts[0][0].frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        out = np.zeros((self.channels, max(0, min(hi, self.frames) - max(lo, 0))), np.float32)
        for signal, weight in self.parts:
            out += np.float32(weight) * signal.read(lo, hi)
        return out


class Gated(Signal):
    """A signal kept inside frame ranges [lo, hi) and zero elsewhere, per read."""

    def __init__(self, signal: Signal, ranges: list[tuple[int, int]]) -> None:
        self.signal, self.ranges = signal, ranges
        self.channels, self.frames = signal.channels, signal.frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        block = self.signal.read(lo, hi)
        gate = np.zeros(block.shape[1], np.float32)
        for a, b in self.ranges:
            gate[max(a - lo, 0) : max(b - lo, 0)] = 1.0
        return block * gate


class BlockReader:
    """Consecutive samples of a stream that comes in blocks of its own sizes, asked for in order.

    Two streamed estimates of one signal rarely cut it at the same places; this lets one be read
    at the other's boundaries, holding only the block in hand.
    """

    def __init__(self, blocks: Iterator[np.ndarray], channels: int) -> None:
        self.blocks, self.channels = blocks, channels
        self.held = np.zeros((channels, 0), np.float32)

    def take(self, n: int) -> np.ndarray:
        """The next n samples (channels, n); fewer only where the stream ends."""
        parts, got = [], 0
        while got < n:
            if not self.held.shape[1]:
                nxt = next(self.blocks, None)
                if nxt is None:
                    break
                self.held = np.asarray(nxt, np.float32)
                continue
            part, self.held = self.held[:, : n - got], self.held[:, n - got :]
            parts.append(part)
            got += part.shape[1]
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.channels, 0), np.float32)


class FrameWriter:
    """Blocks written in order to a `.npy` FrameFile; tracks the peak and, optionally, the content digest.

    `frames`, when given, is the length to end with: longer input is cut and shorter is
    padded with zeros on close. The header is written last (its size does not depend on
    the shape), so the length need not be known in advance.
    """

    def __init__(
        self, path: Path, channels: int | None = None, frames: int | None = None, digest: bool = False
    ) -> None:
        self.path = Path(path)
        self.channels, self.frames = channels, frames
        self.written = 0
        self.peak = 0.0
        self._hash = hashlib.sha256() if digest else None
        self._f = open(self.path, "wb")
        self._f.write(b"\0" * _NPY_HEADER)

    def write(self, block: np.ndarray) -> None:
        if self.channels is None:
            self.channels = block.shape[0]
        if block.shape[0] != self.channels:
            raise ValueError(f"block has {block.shape[0]} channels, the signal {self.channels}")
        if self.frames is not None:
            block = block[:, : max(0, self.frames - self.written)]
        if not block.shape[1]:
            return
        data = np.ascontiguousarray(block.T, dtype="<f4")
        self.peak = max(self.peak, float(np.max(np.abs(data))))
        if self._hash is not None:
            self._hash.update(data.data)
        self._f.write(data.data)
        self.written += data.shape[0]

    def close(self) -> FrameFile:
        if self.channels is None:
            raise ValueError(f"nothing was written to {self.path} and its channel count is unknown")
        if self.frames is not None and self.written < self.frames:
            self.write(np.zeros((self.channels, self.frames - self.written), np.float32))
        header = _npy_header(self.written, self.channels)
        self._f.seek(0)
        self._f.write(header)
        self._f.close()
        return FrameFile(self.path, self.peak, self._hash.hexdigest() if self._hash is not None else None)

    def abandon(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


class ArrayWriter:
    """FrameWriter's in-memory twin (for callers that hand the engine arrays)."""

    def __init__(self, channels: int, frames: int, digest: bool = False) -> None:
        self.audio = np.zeros((channels, frames), np.float32)
        self.written = 0
        self.peak = 0.0
        self.channels, self.frames = channels, frames
        self._digest = digest

    def write(self, block: np.ndarray) -> None:
        k = min(block.shape[1], self.frames - self.written)
        if k <= 0:
            return
        self.audio[:, self.written : self.written + k] = block[:, :k]
        self.peak = max(self.peak, float(np.max(np.abs(block[:, :k]))))
        self.written += k

    def close(self) -> ArraySignal:
        sig = ArraySignal(self.audio)
        sig.peak = self.peak
        if self._digest:
            content_digest(sig)
        return sig

    def abandon(self) -> None:
        self.audio = np.zeros((self.channels, 0), np.float32)


def _npy_header(frames: int, channels: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (frames, channels)})
    header = buf.getvalue()
    if len(header) != _NPY_HEADER:
        raise AudioError(f"unexpected .npy header size {len(header)} for shape ({frames}, {channels})")
    return header


def content_digest(signal: Signal) -> str:
    """sha256 of the signal's samples as float32 little-endian, frames-major (what FrameWriter hashes)."""
    if signal.digest is None:
        h = hashlib.sha256()
        for _, block in signal.blocks():
            h.update(np.ascontiguousarray(block.T, dtype="<f4").data)
        signal.digest = h.hexdigest()
    return signal.digest


def peak(signal: Signal) -> float:
    """max |sample| (one pass over the signal unless it is already known)."""
    if signal.peak is None:
        signal.peak = max((float(np.max(np.abs(b))) for _, b in signal.blocks() if b.size), default=0.0)
    return signal.peak


def signal_is_silent(signal: Signal, threshold: float = 1e-6) -> bool:
    return signal.frames == 0 or peak(signal) <= threshold
