"""Audio in and out: probe and decode anything ffmpeg decodes (PyAV), resample, trim, write WAV, encode HQ.

Arrays are float32 shaped (channels, samples) everywhere in this project. The codecs are here; the
signal containers they fill (audio read a range at a time, in memory or on disk) and the channel policy
are `pipelines/signals.py`. `decode_to_file` and `resample_signal` join the two: a decode or a resample
written block by block into a signal. Decoding folds more than two channels to stereo (`signals.fold`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, cast

import av
import numpy as np

from .errors import AudioError
from .signals import BLOCK, FrameFile, FrameWriter, Signal, fold

WAV_SUBTYPES = {16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}
HQ_FORMATS = {
    # format: (container, codec, extension, bitrate, sample rates the codec takes or None = any)
    "aac": (
        "mp4",
        "aac",
        "m4a",
        256_000,
        (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000),
    ),
    "mp3": ("mp3", "libmp3lame", "mp3", 320_000, (32000, 44100, 48000)),
    "opus": ("ogg", "libopus", "ogg", 192_000, (48000,)),
    "flac": ("flac", "flac", "flac", None, None),
}


class SignalWriter(Protocol):
    """Where blocks of a signal are written in order (`signals.FrameWriter`, `signals.ArrayWriter`)."""

    def write(self, block: np.ndarray) -> None: ...

    def close(self) -> Signal: ...


@dataclass(frozen=True)
class AudioInfo:
    duration: float  # seconds
    sample_rate: int
    channels: int
    codec: str
    container: str
    bit_rate: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as exc:
        raise AudioError(f"not a decodable audio file: {exc}") from exc


def probe(path: Path, max_seconds: float | None = None) -> AudioInfo:
    """Container and stream facts; the duration is counted by decoding, so it is exact.

    With `max_seconds`, decoding stops (AudioError) as soon as the audio is longer, and a header
    that states a longer duration is refused before anything is decoded. A file that holds less
    than its header promises (cut off in transfer) is refused as truncated.
    """
    with _open(path) as container:
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        sample_rate, channels = ctx.sample_rate, ctx.channels
        declared = declared_frames(path, container, stream)
        if max_seconds is not None and declared and sample_rate and declared / sample_rate > max_seconds:
            raise _too_long(declared / sample_rate, max_seconds)
        limit = None if max_seconds is None or not sample_rate else int(max_seconds * sample_rate)
        samples = 0
        try:
            for frame in container.decode(stream):
                samples += frame.samples
                sample_rate = frame.sample_rate
                channels = len(frame.layout.channels)
                if limit is not None and max_seconds is not None and samples > limit:
                    raise _too_long(None, max_seconds)
        except av.error.FFmpegError as exc:
            raise AudioError(f"corrupt or truncated audio: {exc}") from exc
        if not sample_rate or not channels:
            raise AudioError("the audio stream has no sample rate or channel layout")
        if declared is not None and samples < declared - max(2, sample_rate // 1000):
            raise AudioError(
                f"truncated audio: the header promises {declared / sample_rate:.3f} s "
                f"({declared} frames), the file holds {samples / sample_rate:.4f} s ({samples} frames)",
                declared_frames=declared,
                frames=samples,
            )
        if samples == 0:
            raise AudioError("the audio has no samples (zero length)")
        return AudioInfo(
            samples / sample_rate,
            sample_rate,
            channels,
            stream.codec_context.name,
            container.format.name.split(",")[0],
            container.bit_rate or None,
        )


def _too_long(seconds: float | None, max_seconds: float) -> AudioError:
    said = f"{seconds:.0f} s long" if seconds is not None else f"longer than {max_seconds:.0f} s"
    return AudioError(f"audio is {said}; the maximum is {max_seconds:.0f} s", max_duration=max_seconds)


def declared_frames(path: Path, container: av.container.InputContainer, stream: av.AudioStream) -> int | None:
    """The frames a file's header promises, where the header states them exactly; else None.

    WAV: its `data` chunk's size (ffmpeg reports the frames the file holds instead, so the
    header is read here; 0 and 0xFFFFFFFF mean "unknown", as streaming writers leave them).
    AIFF, CAF, FLAC and other lossless streams: the stream duration ffmpeg read from the header.
    Lossy formats only estimate their duration (from the bit rate), so they promise nothing.
    """
    if container.format.name.split(",")[0] == "wav":
        return _wav_declared_frames(path)
    codec = stream.codec_context.name
    if (codec.startswith("pcm_") or codec in ("flac", "alac", "wavpack")) and stream.duration and stream.time_base:
        sr = stream.codec_context.sample_rate
        return int(round(stream.duration * stream.time_base * sr)) if sr else None
    return None


def _wav_declared_frames(path: Path) -> int | None:
    import struct

    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None  # RF64 / Wave64: sizes live elsewhere; not checked
        block_align = fmt_tag = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"fmt ":
                fmt = f.read(min(size, 64))
                if len(fmt) < 14:
                    return None
                fmt_tag, block_align = struct.unpack("<H", fmt[:2])[0], struct.unpack("<H", fmt[12:14])[0]
                f.seek(size - len(fmt) + (size & 1), 1)
            elif cid == b"data":
                # PCM (1), IEEE float (3) and extensible (0xFFFE) hold whole frames of block_align bytes
                if size in (0, 0xFFFFFFFF) or not block_align or fmt_tag not in (1, 3, 0xFFFE):
                    return None
                frames: int = size // block_align
                return frames
            else:
                f.seek(size + (size & 1), 1)


def iter_decode(
    path: Path, start: float = 0.0, end: float | None = None, block_seconds: float = 10.0
) -> Iterator[np.ndarray]:
    """Decoded float32 (channels, n) blocks of `[start, end)` seconds, exact to the sample.

    Memory holds one block at a time, so decoding an hour-long file costs the same as a minute.
    """
    with _open(path) as container:
        stream = container.streams.audio[0]
        sr = stream.codec_context.sample_rate
        first = int(round(start * sr))
        last = None if end is None else int(round(end * sr))
        if first > 0:
            # seek a little early and cut exactly below; seeking is by stream time base
            container.seek(
                max(0, int((start - 1.0) / cast(Fraction, stream.time_base))),
                stream=stream,
                any_frame=False,
                backward=True,
            )
        pos = None
        pending: list[np.ndarray] = []
        pending_n = 0
        block = int(block_seconds * sr)
        try:
            for frame in container.decode(stream):
                data = frame.to_ndarray()
                if frame.format.is_planar:
                    data = data.reshape(len(frame.layout.channels), -1)
                else:
                    data = data.reshape(-1, len(frame.layout.channels)).T
                data = _to_float(data)
                if pos is None:
                    pos = int(round(frame.time * sr)) if frame.time is not None else 0
                lo, hi = pos, pos + data.shape[1]
                pos = hi
                if hi <= first:
                    continue
                if last is not None and lo >= last:
                    break
                data = data[:, max(0, first - lo) : data.shape[1] - max(0, hi - last) if last is not None else None]
                pending.append(fold(data))
                pending_n += data.shape[1]
                if pending_n >= block:
                    out = np.concatenate(pending, axis=1)
                    yield from (out[:, i : i + block] for i in range(0, out.shape[1] - out.shape[1] % block, block))
                    rest = out[:, out.shape[1] - out.shape[1] % block :]
                    pending, pending_n = [rest], rest.shape[1]
        except av.error.FFmpegError as exc:
            raise AudioError(f"corrupt or truncated audio: {exc}") from exc
        if pending_n:
            yield np.concatenate(pending, axis=1)


def _to_float(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.float32:
        return data
    if data.dtype == np.float64:
        return data.astype(np.float32)
    if data.dtype == np.int16:
        return (data / 32768.0).astype(np.float32)
    if data.dtype == np.int32:
        return (data / 2147483648.0).astype(np.float32)
    if data.dtype == np.uint8:
        return ((data.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    return data.astype(np.float32)


def decode(path: Path, start: float = 0.0, end: float | None = None) -> tuple[np.ndarray, int]:
    """The whole `[start, end)` range as one float32 (channels, n) array, and its sample rate."""
    with _open(path) as container:
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        sr = container.streams.audio[0].codec_context.sample_rate
    blocks = list(iter_decode(path, start, end))
    if not blocks:
        raise AudioError("the selection holds no audio")
    audio = np.concatenate(blocks, axis=1)
    check_finite(audio)
    return audio, sr


def check_finite(audio: np.ndarray) -> None:
    if not np.isfinite(audio).all():
        raise AudioError("the audio holds NaN or infinite samples")


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return audio
    import soxr

    out = soxr.resample(np.ascontiguousarray(audio.T), sr_in, sr_out, quality="HQ")
    return np.ascontiguousarray(out.T, dtype=np.float32)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int, bit_depth: int) -> None:
    with WavWriter(path, sample_rate, audio.shape[0], bit_depth) as w:
        w.write(audio)


class WavWriter:
    """A WAV file written block by block (integer depths clip; float WAV keeps overs)."""

    def __init__(self, path: Path, sample_rate: int, channels: int, bit_depth: int) -> None:
        import soundfile as sf

        if bit_depth not in WAV_SUBTYPES:
            raise AudioError(f"bit depth {bit_depth} is not one of {sorted(WAV_SUBTYPES)}")
        self.bit_depth = bit_depth
        self._file = sf.SoundFile(str(path), "w", sample_rate, channels, WAV_SUBTYPES[bit_depth], format="WAV")

    def write(self, block: np.ndarray) -> None:
        data = block.T
        if self.bit_depth != 32:
            data = np.clip(data, -1.0, 1.0)
        self._file.write(data)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_hq(path: Path, audio: np.ndarray, sample_rate: int, fmt: str) -> None:
    """Encode the streaming copy of a stem (aac in .m4a by default, mp3, opus in .ogg, flac)."""
    with HqEncoder(path, sample_rate, audio.shape[0], fmt) as enc:
        enc.write(audio)


class HqEncoder:
    """The streaming copy of a stem, encoded block by block (the same frames as one whole-array encode).

    Blocks are resampled (when the codec cannot take the rate) by a streaming resampler whose
    concatenated output equals a one-shot resample, clipped, and cut into the codec's frames;
    a frame's samples may span two blocks, so memory holds one block and one frame.
    """

    def __init__(self, path: Path, sample_rate: int, channels: int, fmt: str) -> None:
        container_fmt, codec, _, bit_rate, rates = HQ_FORMATS[fmt]
        self.rate = (
            sample_rate if rates is None or sample_rate in rates else min(rates, key=lambda r: abs(r - sample_rate))
        )
        self.layout = "mono" if channels == 1 else "stereo"
        self.channels = channels
        self._resampler = StreamResampler(sample_rate, self.rate, channels) if self.rate != sample_rate else None
        self._out = av.open(str(path), "w", format=container_fmt)
        try:
            self._stream = cast(
                "av.audio.stream.AudioStream", self._out.add_stream(codec, rate=self.rate, layout=self.layout)
            )
            if bit_rate:
                self._stream.bit_rate = bit_rate
            self._av_resampler = av.AudioResampler(
                format=self._stream.codec_context.format, layout=self.layout, rate=self.rate
            )
            self._frame = self._stream.codec_context.frame_size or 4096
        except BaseException:
            self._out.close()
            raise
        self._pending = np.zeros((channels, 0), np.float32)
        self._pts = 0
        self._closed = False

    def write(self, block: np.ndarray) -> None:
        if self._resampler is not None:
            block = self._resampler.push(block)
        self._feed(block)

    def _feed(self, block: np.ndarray, last: bool = False) -> None:
        data = np.clip(block, -1.0, 1.0).astype(np.float32)
        if self._pending.shape[1]:
            data = np.concatenate([self._pending, data], axis=1)
        whole = data.shape[1] if last else data.shape[1] - data.shape[1] % self._frame
        for i in range(0, whole, self._frame):
            chunk = np.ascontiguousarray(data[:, i : min(i + self._frame, whole)])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.layout)
            frame.sample_rate = self.rate
            frame.pts = self._pts
            self._pts += chunk.shape[1]
            for rf in self._av_resampler.resample(frame):
                self._out.mux(self._stream.encode(rf))
        self._pending = data[:, whole:]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            tail = self._resampler.flush() if self._resampler is not None else np.zeros((self.channels, 0), np.float32)
            self._feed(tail, last=True)
            for rf in self._av_resampler.resample(None):
                self._out.mux(self._stream.encode(rf))
            self._out.mux(self._stream.encode(None))
        finally:
            self._out.close()

    def __enter__(self) -> HqEncoder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # do not finish a file we are about to throw away; just release it
            self._closed = True
            self._out.close()


class StreamResampler:
    """soxr's streaming resampler on (channels, n) blocks; the concatenated output equals `resample`."""

    def __init__(self, sr_in: int, sr_out: int, channels: int) -> None:
        import soxr

        self.channels = channels
        self._s = soxr.ResampleStream(sr_in, sr_out, channels, dtype="float32", quality="HQ")

    def push(self, block: np.ndarray) -> np.ndarray:
        out = self._s.resample_chunk(np.ascontiguousarray(block.T, dtype=np.float32), last=False)
        return np.ascontiguousarray(out.reshape(-1, self.channels).T, dtype=np.float32)

    def flush(self) -> np.ndarray:
        out = self._s.resample_chunk(np.zeros((0, self.channels), np.float32), last=True)
        return np.ascontiguousarray(out.reshape(-1, self.channels).T, dtype=np.float32)


def encoder_identity() -> dict[str, Any]:
    """What besides the samples decides an encoded file's bytes: the encoder libraries' versions."""
    import soundfile as sf

    return {
        "av": av.__version__,
        "libavcodec": av.library_versions.get("libavcodec"),
        "libsndfile": sf.__libsndfile_version__,
        "formats": HQ_FORMATS,
    }


def hq_extension(fmt: str) -> str:
    return HQ_FORMATS[fmt][2]


def is_silent(audio: np.ndarray, threshold: float = 1e-6) -> bool:
    """Digital silence (or near it): nothing a model could separate."""
    return audio.size == 0 or float(np.max(np.abs(audio))) <= threshold


def decode_to_file(
    path: Path, dest: Path, start: float = 0.0, end: float | None = None, digest: bool = False
) -> tuple[FrameFile, int]:
    """Decode `[start, end)` into a FrameFile block by block (memory holds one block); and the sample rate."""
    with _open(path) as container:
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        sr = container.streams.audio[0].codec_context.sample_rate
    writer = FrameWriter(dest, digest=digest)
    try:
        for block in iter_decode(path, start, end):
            check_finite(block)
            writer.write(block)
        if writer.written == 0:
            raise AudioError("the selection holds no audio")
        return writer.close(), sr
    except BaseException:
        writer.abandon()
        raise


def resample_signal(signal: Signal, sr_in: int, sr_out: int, writer: SignalWriter, block: int = BLOCK) -> Signal:
    """`signal` resampled block by block into `writer` (the same samples as `resample` on the whole)."""
    r = StreamResampler(sr_in, sr_out, signal.channels)
    for _, chunk in signal.blocks(block):
        writer.write(r.push(chunk))
    writer.write(r.flush())
    return writer.close()
