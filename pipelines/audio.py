"""Audio in and out: probe and decode anything ffmpeg decodes (PyAV), resample, trim, write WAV, encode HQ.

Arrays are float32 shaped (channels, samples) everywhere in this project.

Channel policy: mono stays mono and stereo stays stereo; a model that needs stereo gets a
mono source duplicated and its output folded back to mono; a model that needs mono runs
once per channel. Sources with more than two channels are folded to stereo on decode
(front-left-ish channels to L, the others to R, centre to both), since every separation
model we serve is trained on stereo music.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from .errors import AudioError

WAV_SUBTYPES = {16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}
HQ_FORMATS = {
    # format: (container, codec, extension, bitrate, sample rates the codec takes or None = any)
    "aac": ("mp4", "aac", "m4a", 256_000, None),
    "mp3": ("mp3", "libmp3lame", "mp3", 320_000, (32000, 44100, 48000)),
    "opus": ("ogg", "libopus", "ogg", 192_000, (48000,)),
    "flac": ("flac", "flac", "flac", None, None),
}


@dataclass(frozen=True)
class AudioInfo:
    duration: float  # seconds
    sample_rate: int
    channels: int
    codec: str
    container: str
    bit_rate: int | None = None

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _open(path: Path):
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as exc:
        raise AudioError(f"not a decodable audio file: {exc}") from exc


def probe(path: Path) -> AudioInfo:
    """Container and stream facts; the duration is counted by decoding, so it is exact."""
    with _open(path) as container:
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        sample_rate, channels = ctx.sample_rate, ctx.channels
        samples = 0
        try:
            for frame in container.decode(stream):
                samples += frame.samples
                sample_rate = frame.sample_rate
                channels = len(frame.layout.channels)
        except av.error.FFmpegError as exc:
            raise AudioError(f"corrupt or truncated audio: {exc}") from exc
        if not sample_rate or not channels:
            raise AudioError("the audio stream has no sample rate or channel layout")
        if samples == 0:
            raise AudioError("the audio has no samples (zero length)")
        return AudioInfo(samples / sample_rate, sample_rate, channels, stream.codec_context.name,
                         container.format.name.split(",")[0], container.bit_rate or None)


def _fold(block: np.ndarray, max_channels: int = 2) -> np.ndarray:
    """Fold more than two channels into stereo (see the module's channel policy)."""
    ch = block.shape[0]
    if ch <= max_channels:
        return block
    left, right = block[0::2].sum(0), block[1::2].sum(0)
    if ch >= 3:  # treat channel 2 as centre, as in 5.1/7.1 layouts: to both sides
        left = left - block[2] + 0.7071 * block[2]
        right = right + 0.7071 * block[2]
    return (np.stack([left, right]) / math.ceil(ch / 2)).astype(np.float32)


def iter_decode(path: Path, start: float = 0.0, end: float | None = None, block_seconds: float = 10.0) -> Iterator[np.ndarray]:
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
            container.seek(max(0, int((start - 1.0) / stream.time_base)), stream=stream, any_frame=False, backward=True)
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
                data = data[:, max(0, first - lo): data.shape[1] - max(0, hi - last) if last is not None else None]
                pending.append(_fold(data))
                pending_n += data.shape[1]
                if pending_n >= block:
                    out = np.concatenate(pending, axis=1)
                    yield from (out[:, i:i + block] for i in range(0, out.shape[1] - out.shape[1] % block, block))
                    rest = out[:, out.shape[1] - out.shape[1] % block:]
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


def to_channels(audio: np.ndarray, channels: int | None) -> np.ndarray:
    """Adapt a (c, n) array to a model's channel count (see the channel policy)."""
    if channels is None or audio.shape[0] == channels:
        return audio
    if channels == 2 and audio.shape[0] == 1:
        return np.repeat(audio, 2, axis=0)
    if channels == 1:
        return audio.mean(axis=0, keepdims=True)
    return _fold(audio)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int, bit_depth: int) -> None:
    import soundfile as sf

    if bit_depth not in WAV_SUBTYPES:
        raise AudioError(f"bit depth {bit_depth} is not one of {sorted(WAV_SUBTYPES)}")
    data = audio.T
    if bit_depth != 32:  # integer WAV clips; float WAV keeps overs
        data = np.clip(data, -1.0, 1.0)
    sf.write(str(path), data, sample_rate, subtype=WAV_SUBTYPES[bit_depth], format="WAV")


def encode_hq(path: Path, audio: np.ndarray, sample_rate: int, fmt: str) -> None:
    """Encode the streaming copy of a stem (aac in .m4a by default, mp3, opus in .ogg, flac)."""
    container_fmt, codec, _, bit_rate, rates = HQ_FORMATS[fmt]
    out_rate = sample_rate if rates is None or sample_rate in rates else min(rates, key=lambda r: abs(r - sample_rate))
    if out_rate != sample_rate:
        audio = resample(audio, sample_rate, out_rate)
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=out_rate, layout=layout)
        if bit_rate:
            stream.bit_rate = bit_rate
        resampler = av.AudioResampler(format=stream.codec_context.format, layout=layout, rate=out_rate)
        frame_size = stream.codec_context.frame_size or 4096
        data = np.clip(audio, -1.0, 1.0).astype(np.float32)
        for i in range(0, data.shape[1], frame_size):
            chunk = np.ascontiguousarray(data[:, i:i + frame_size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = out_rate
            frame.pts = i
            for rf in resampler.resample(frame):
                out.mux(stream.encode(rf))
        for rf in resampler.resample(None):
            out.mux(stream.encode(rf))
        out.mux(stream.encode(None))


def hq_extension(fmt: str) -> str:
    return HQ_FORMATS[fmt][2]


def is_silent(audio: np.ndarray, threshold: float = 1e-6) -> bool:
    """Digital silence (or near it): nothing a model could separate."""
    return audio.size == 0 or float(np.max(np.abs(audio))) <= threshold
