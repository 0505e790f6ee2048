"""Mastering: bring a track to a preset's loudness and true-peak ceiling, streaming, block by block.

The chain is a gentle broadband tonal balance (a low and a high shelf, at most 2 dB each,
half-way towards a reference balance), a gain to the preset's integrated loudness, and a
look-ahead true-peak limiter whose detector oversamples 4x. Memory follows the block, never
the track: the first pass only measures (loudness per ITU-R BS.1770 with pyloudnorm's
K-weighting filters and gating, and the balance of three bands); a render pass writes the
result and measures it again. A limiter that had to work hard lowers the loudness, so when
the result misses the target by more than `RENDER_TOLERANCE_LU` the render is made once more
with the gain corrected by the miss (at most `MAX_RENDERS` renders).

Blocks are float32 (channels, frames) arrays, as `pipelines.audio.iter_decode` yields them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from scipy import signal as sps
from scipy.ndimage import maximum_filter1d, minimum_filter1d

from .audio import AudioInfo, WavWriter, iter_decode, probe
from .errors import AudioError
from .master_presets import PRESETS, MasterPreset

RENDER_TOLERANCE_LU = 0.2
MAX_RENDERS = 4
MAX_GAIN_DB = 30.0
OVERSAMPLE = 4
TP_MARGIN_DB = 0.3  # the limiter aims this far under the ceiling: its detector and a reader's differ slightly
MAX_SHELF_DB = 2.0


def preset(name: str) -> MasterPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise AudioError(f"unknown mastering preset {name!r}; known: {', '.join(PRESETS)}", preset=name) from None


@dataclass(frozen=True)
class Measurement:
    """What a master (or its source) measures: BS.1770 integrated loudness, true peak, EBU loudness range."""

    integrated_lufs: float
    true_peak_dbtp: float
    loudness_range_lu: float
    duration_s: float

    def to_dict(self) -> dict[str, float | None]:
        return {k: (round(v, 2) if math.isfinite(v) else None) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class MasterReport:
    preset: str
    source: Measurement
    result: Measurement
    gain_db: float
    low_shelf_db: float
    high_shelf_db: float
    renders: int


# -- measuring -----------------------------------------------------------------------------------------------


class LoudnessMeter:
    """BS.1770-4 integrated loudness and EBU Tech 3342 loudness range, fed block by block.

    The K-weighting filters are pyloudnorm's (filtered with their state carried between blocks);
    the energy is kept per 100 ms step, so the 400 ms gating blocks (75 % overlap) and the 3 s
    short-term windows of the range are sums of steps: memory is 10 numbers per second per channel.
    """

    def __init__(self, sample_rate: int, channels: int) -> None:
        import pyloudnorm

        meter = pyloudnorm.Meter(sample_rate)
        self.filters = [(f.b * f.passband_gain, f.a) for f in meter._filters.values()]  # K-weighting stages
        self.states = [np.zeros((channels, max(len(a), len(b)) - 1)) for b, a in self.filters]
        self.rate, self.channels = sample_rate, channels
        self.total = np.zeros(channels)  # running sum of squares of the K-weighted signal
        self.pos = 0
        self.cum: list[np.ndarray] = [np.zeros(channels)]  # the running sum at each 100 ms boundary
        self.peak = 0.0

    def _boundary(self, k: int) -> int:
        return int(0.4 * (k * 0.25) * self.rate)  # pyloudnorm's block bounds: l = int(T_g * j * step * rate)

    def push(self, block: np.ndarray) -> None:
        x = np.asarray(block, dtype=np.float64)
        for i, (b, a) in enumerate(self.filters):
            x, self.states[i] = sps.lfilter(b, a, x, axis=1, zi=self.states[i])
        sq = np.cumsum(x * x, axis=1)
        start, end = self.pos, self.pos + x.shape[1]
        while (edge := self._boundary(len(self.cum))) <= end:
            self.cum.append(self.total + (sq[:, edge - start - 1] if edge > start else 0.0))
        self.total = self.total + sq[:, -1] if x.shape[1] else self.total
        self.pos = end
        if block.size:
            self.peak = max(self.peak, float(np.abs(block).max()))

    def _blocks(self, steps: int) -> np.ndarray:
        """Loudness of each window of `steps` 100 ms steps (every step), channels summed with weight 1."""
        cum = np.array(self.cum)
        if len(cum) <= steps:
            return np.array([])
        energy = (cum[steps:] - cum[:-steps]) / (steps * 0.1 * self.rate)
        with np.errstate(divide="ignore"):
            return cast(np.ndarray, -0.691 + 10 * np.log10(energy.sum(axis=1)))

    def integrated(self) -> float:
        blocks = self._blocks(4)
        n = int(round((self.pos / self.rate - 0.4) / 0.1)) + 1  # pyloudnorm's block count
        blocks = blocks[: max(n, 0)]
        gated = blocks[blocks >= -70.0]
        if not gated.size:
            return -math.inf
        relative = _mean_loudness(gated) - 10.0
        final = gated[gated > relative]
        return _mean_loudness(final) if final.size else -math.inf

    def loudness_range(self) -> float:
        st = self._blocks(30)  # 3 s windows every 100 ms
        st = st[st >= -70.0]
        if not st.size:
            return 0.0
        st = st[st >= _mean_loudness(st) - 20.0]
        return float(np.percentile(st, 95) - np.percentile(st, 10)) if st.size else 0.0


def _mean_loudness(levels: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(10 ** (levels / 10))))


def _interpolator() -> np.ndarray:
    """The 4x interpolation filter of the true-peak detector (a windowed sinc, cut just under the old Nyquist)."""
    return cast(np.ndarray, OVERSAMPLE * sps.firwin(OVERSAMPLE * 24, 0.98 / OVERSAMPLE, window=("kaiser", 8.0)))


_FIR = _interpolator()
_FIR_DELAY = (len(_FIR) - 1) // 2  # in oversampled samples
TP_CONTEXT = len(_FIR) // OVERSAMPLE + 4  # input samples of context either side that make a block's peaks exact


def oversampled_envelope(x: np.ndarray) -> np.ndarray:
    """Per input sample, the largest |value| of the 4x oversampled signal within half a sample of it (any channel)."""
    up = sps.upfirdn(_FIR, x, up=OVERSAMPLE, axis=1)[:, _FIR_DELAY : _FIR_DELAY + OVERSAMPLE * x.shape[1]]
    env = np.abs(up).max(axis=0)
    env = maximum_filter1d(env, size=OVERSAMPLE + 1, mode="nearest")  # +-half a sample around each input sample
    return cast(np.ndarray, np.maximum(env[::OVERSAMPLE], np.abs(x).max(axis=0)))


class TruePeakMeter:
    """The 4x oversampled peak of a stream; the last samples of each block are kept as the next one's context."""

    def __init__(self, channels: int) -> None:
        self.tail = np.zeros((channels, 0))
        self.peak = 0.0

    def push(self, block: np.ndarray) -> None:
        x = np.concatenate([self.tail, block], axis=1)
        if x.shape[1] > TP_CONTEXT:
            self.peak = max(self.peak, float(oversampled_envelope(x)[self.tail.shape[1] // 2 :].max()))
        self.tail = x[:, -2 * TP_CONTEXT :]

    def result(self) -> float:
        if self.tail.shape[1]:
            self.peak = max(self.peak, float(oversampled_envelope(self.tail).max()))
        return self.peak


def to_db(x: float) -> float:
    return 20 * math.log10(x) if x > 0 else -math.inf


class Analysis:
    """The first pass: loudness, true peak and range of the source, and the energy of three bands for the balance."""

    BANDS = (("low", "lowpass", 150.0), ("high", "highpass", 6000.0))

    def __init__(self, sample_rate: int, channels: int) -> None:
        self.loudness = LoudnessMeter(sample_rate, channels)
        self.peak = TruePeakMeter(channels)
        self.bands = {name: sps.butter(2, f, kind, fs=sample_rate, output="sos") for name, kind, f in self.BANDS}
        self.zi = {name: np.zeros((sos.shape[0], channels, 2)) for name, sos in self.bands.items()}
        self.energy = {"low": 0.0, "high": 0.0, "all": 0.0}

    def push(self, block: np.ndarray) -> None:
        self.loudness.push(block)
        self.peak.push(block)
        x = block.astype(np.float64)
        self.energy["all"] += float((x * x).sum())
        for name, sos in self.bands.items():
            y, self.zi[name] = sps.sosfilt(sos, x, axis=1, zi=self.zi[name])
            self.energy[name] += float((y * y).sum())

    def measurement(self) -> Measurement:
        return Measurement(
            self.loudness.integrated(),
            to_db(self.peak.result()),
            self.loudness.loudness_range(),
            self.loudness.pos / self.loudness.rate,
        )

    def shelves(self) -> tuple[float, float]:
        """(low, high) shelf gains in dB: half of the way to the reference balance, at most 2 dB either way."""
        if self.energy["all"] <= 0:
            return 0.0, 0.0
        share = {b: 10 * math.log10(max(self.energy[b], 1e-20) / self.energy["all"]) for b in ("low", "high")}
        gains = [0.5 * (REFERENCE_BALANCE_DB[b] - share[b]) for b in ("low", "high")]
        return tuple(float(np.clip(g, -MAX_SHELF_DB, MAX_SHELF_DB)) for g in gains)  # type: ignore[return-value]


# Share of the energy under 150 Hz and over 6 kHz in commercially mastered popular music (a broad average:
# the balance moves a track half-way towards it, never more than MAX_SHELF_DB).
REFERENCE_BALANCE_DB = {"low": -4.0, "high": -17.0}


# -- processing ----------------------------------------------------------------------------------------------


def _shelf(kind: str, f0: float, gain_db: float, sr: int) -> np.ndarray:
    """An RBJ cookbook shelf (slope 1) as one second-order section."""
    a = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * f0 / sr
    alpha = math.sin(w0) / 2 * math.sqrt(2)
    c, s = math.cos(w0), 2 * math.sqrt(a) * alpha
    if kind == "low":
        b = [a * ((a + 1) - (a - 1) * c + s), 2 * a * ((a - 1) - (a + 1) * c), a * ((a + 1) - (a - 1) * c - s)]
        den = [(a + 1) + (a - 1) * c + s, -2 * ((a - 1) + (a + 1) * c), (a + 1) + (a - 1) * c - s]
    else:
        b = [a * ((a + 1) + (a - 1) * c + s), -2 * a * ((a - 1) + (a + 1) * c), a * ((a + 1) + (a - 1) * c - s)]
        den = [(a + 1) - (a - 1) * c + s, 2 * ((a - 1) - (a + 1) * c), (a + 1) - (a - 1) * c - s]
    return np.array([[*(v / den[0] for v in b), *(v / den[0] for v in den)]])


class Balance:
    """The tonal balance and the gain, with the filters' state carried from block to block."""

    def __init__(self, sr: int, channels: int, low_db: float, high_db: float, gain_db: float) -> None:
        self.sos = np.vstack([_shelf("low", 150.0, low_db, sr), _shelf("high", 6000.0, high_db, sr)])
        self.zi = np.zeros((self.sos.shape[0], channels, 2))
        self.gain = 10 ** (gain_db / 20)

    def push(self, block: np.ndarray) -> np.ndarray:
        y, self.zi = sps.sosfilt(self.sos, block.astype(np.float64), axis=1, zi=self.zi)
        return cast(np.ndarray, y * self.gain)


class Limiter:
    """A look-ahead true-peak limiter, streaming: the output lags the input by one block.

    Per sample, the gain needed to keep the 4x oversampled signal under the ceiling; per frame
    of `FRAME` samples, its minimum; then the running minimum over the look-ahead (so the gain
    is down before the peak arrives), a one-pole release (it rises slowly, falls at once) and a
    moving average over the look-ahead (a smooth attack). Each step keeps the gain at or under
    what every sample needs, and the sample gains are interpolated between frame boundaries
    taking the smaller neighbour, so the guarantee holds sample by sample.
    """

    FRAME = 16
    BLOCK = 1 << 16  # samples per processed block (a multiple of FRAME)

    def __init__(
        self, sr: int, channels: int, ceiling_dbtp: float, lookahead_s: float = 0.005, release_s: float = 0.15
    ) -> None:
        self.ceiling = 10 ** ((ceiling_dbtp - TP_MARGIN_DB) / 20)
        self.L = max(1, round(lookahead_s * sr / self.FRAME))
        self.release = math.exp(-1.0 / (release_s * sr / self.FRAME))
        self.context = (2 * self.L + 2) * self.FRAME + TP_CONTEXT * 2  # samples of context either side
        self.context += -self.context % self.FRAME
        self.channels = channels
        self.prev = np.zeros((channels, self.context))  # the end of the block before (silence at the start)
        self.cur: np.ndarray | None = None
        self.pending = np.zeros((channels, 0))
        self.held = 1.0  # the release's state at the end of the last output block
        self.last_frame_gain = 1.0
        self.min_gain = 1.0

    def push(self, block: np.ndarray) -> Iterator[np.ndarray]:
        self.pending = np.concatenate([self.pending, block], axis=1)
        while self.pending.shape[1] >= self.BLOCK:
            nxt, self.pending = self.pending[:, : self.BLOCK], self.pending[:, self.BLOCK :]
            yield from self._advance(nxt)

    def flush(self) -> Iterator[np.ndarray]:
        if self.pending.shape[1]:
            yield from self._advance(self.pending)
            self.pending = np.zeros((self.channels, 0))
        if self.cur is not None:
            yield from self._emit(np.zeros((self.channels, 0)))
            self.cur = None

    def _advance(self, nxt: np.ndarray) -> Iterator[np.ndarray]:
        if self.cur is not None:
            yield from self._emit(nxt)
        self.cur = nxt

    def _emit(self, nxt: np.ndarray) -> Iterator[np.ndarray]:
        cur = self.cur
        assert cur is not None  # _emit follows a first block
        n = cur.shape[1]
        ahead = nxt[:, : self.context]
        pad = (-(n + ahead.shape[1])) % self.FRAME + self.context - ahead.shape[1]
        window = np.concatenate([self.prev, cur, ahead, np.zeros((self.channels, pad))], axis=1)
        need = np.minimum(1.0, self.ceiling / np.maximum(oversampled_envelope(window), 1e-12))
        frames = need.reshape(-1, self.FRAME).min(axis=1)
        # the running minimum over the frame and the L-1 before it
        held = minimum_filter1d(frames, size=self.L, origin=(self.L - 1) // 2, mode="nearest")
        first = self.context // self.FRAME
        count = -(-n // self.FRAME)
        released = held[first : first + count + self.L].copy()
        state = self.held
        for i in range(released.size):  # falls at once, rises with the release's time constant
            state = min(released[i], self.release * state + (1 - self.release) * released[i])
            released[i] = state
        self.held = float(released[count - 1])
        gains = np.convolve(released, np.ones(self.L) / self.L, mode="valid")[:count]  # mean over [i, i+L)
        edges = np.minimum(np.concatenate([[self.last_frame_gain], gains]), np.concatenate([gains, [gains[-1]]]))
        self.last_frame_gain = float(gains[-1])
        ramp = np.arange(self.FRAME) / self.FRAME
        per_sample = (edges[:-1, None] * (1 - ramp) + edges[1:, None] * ramp).reshape(-1)[:n]
        self.min_gain = min(self.min_gain, float(gains.min()))
        self.prev = np.concatenate([self.prev, cur], axis=1)[:, -self.context :]
        yield cur * per_sample


# -- the whole chain -----------------------------------------------------------------------------------------

Blocks = Callable[[], Iterable[np.ndarray]]  # a fresh iterator over the source's blocks (each pass reads it again)


def analyse(blocks: Blocks, sample_rate: int, channels: int) -> Analysis:
    analysis = Analysis(sample_rate, channels)
    for block in blocks():
        if not np.isfinite(block).all():
            raise AudioError("the audio holds NaN or infinite samples")
        analysis.push(block)
    return analysis


def render(
    blocks: Blocks,
    sample_rate: int,
    channels: int,
    ceiling_dbtp: float,
    low_db: float,
    high_db: float,
    gain_db: float,
    sink: Callable[[np.ndarray], None],
) -> Measurement:
    """One render of the chain into `sink`, measured as it is written."""
    balance = Balance(sample_rate, channels, low_db, high_db, gain_db)
    limiter = Limiter(sample_rate, channels, ceiling_dbtp)
    loud, peak = LoudnessMeter(sample_rate, channels), TruePeakMeter(channels)

    def out(y: np.ndarray) -> None:
        y = y.astype(np.float32)
        loud.push(y)
        peak.push(y)
        sink(y)

    for block in blocks():
        for y in limiter.push(balance.push(block)):
            out(y)
    for y in limiter.flush():
        out(y)
    return Measurement(loud.integrated(), to_db(peak.result()), loud.loudness_range(), loud.pos / sample_rate)


def master(
    blocks: Blocks,
    sample_rate: int,
    channels: int,
    preset_name: str,
    open_sink: Callable[[], tuple[Callable[[np.ndarray], None], Callable[[], None]]],
) -> MasterReport:
    """Master the source: analyse it, then render until the result is within RENDER_TOLERANCE_LU of the target.

    `open_sink()` returns (write, close) for a fresh output each render: the last render's is the result.
    """
    p = preset(preset_name)
    analysis = analyse(blocks, sample_rate, channels)
    source = analysis.measurement()
    if not math.isfinite(source.integrated_lufs):
        raise AudioError(
            "the audio is silent (under the -70 LUFS gate): there is nothing to master", integrated_lufs=None
        )
    low, high = analysis.shelves()
    gain = p.target_lufs - source.integrated_lufs
    result, tried = None, None
    for renders in range(1, MAX_RENDERS + 1):  # noqa: B007 - the count the report gives
        write, close = open_sink()
        used = gain
        try:
            result = render(blocks, sample_rate, channels, p.ceiling_dbtp, low, high, gain, write)
        finally:
            close()
        miss = p.target_lufs - result.integrated_lufs
        if abs(miss) <= RENDER_TOLERANCE_LU:
            break
        # a limiter that works gives back less than a dB of loudness per dB of gain: step by the slope seen
        slope = 1.0
        if tried is not None and gain != tried[0]:
            slope = float(np.clip((result.integrated_lufs - tried[1]) / (gain - tried[0]), 0.1, 1.0))
        tried = (gain, result.integrated_lufs)
        gain = min(gain + miss / slope, MAX_GAIN_DB)
    assert result is not None  # MAX_RENDERS >= 1
    return MasterReport(p.name, source, result, round(used, 2), round(low, 2), round(high, 2), renders)


def master_file(src: Path, dest: Path, preset_name: str, bit_depth: int = 24) -> tuple[MasterReport, AudioInfo]:
    """Master a file into a WAV at its own rate (the worker and `stems master` both call this)."""
    info = probe(src)
    channels = min(info.channels, 2)  # iter_decode folds more than two channels to stereo

    def open_sink() -> tuple[Callable[[np.ndarray], None], Callable[[], None]]:
        w = WavWriter(dest, info.sample_rate, channels, bit_depth)
        return w.write, w.close

    return master(lambda: iter_decode(src), info.sample_rate, channels, preset_name, open_sink), info
