"""Pure numpy/scipy separators (the `dsp` family): centre, HPSS, REPET-SIM, WPE, spectral gate, enhancer.

These are the fallbacks that run anywhere, without weights. `params.method` picks the
method; its other params are validated by that method's typed model below. Two-source
methods estimate one source and return the input minus it as the other, so a method's
outputs always sum back to its input.

Every STFT here uses a hop that divides the sample rate and `chunk_context` is a whole
number of seconds, so when the engine cuts a track into chunks (whole seconds long) the
frame grid of a chunk coincides with the frame grid of the whole track; with enough
context the chunked output then equals the whole-signal output, not just resembles it.
Smoothing, minimum tracking and median filters are finite windows (no recursive
averages) for the same reason.

WPE and REPET-SIM look further than a chunk's context could reach (WPE's filters are
sums over every frame of the track; REPET-SIM compares frames a minute apart), so they
stream instead (`dry_stream`, `foreground_stream`): STFT frames are analysed from the
ranges of the signal they cover (`Stft.frames_of`), the frame-domain work runs on slabs
of frames with the context it needs (`around`) and a streaming overlap-add
(`Synthesis`) gives out samples as they become final. The output equals the
whole-signal functions' (`dry`, `foreground`, kept as the reference) within float
rounding, and memory follows the block and the method's reach, not the track.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.interpolate import CubicSpline
from scipy.linalg import solve_toeplitz
from scipy.ndimage import (
    binary_dilation,
    median_filter,
    minimum_filter1d,
    uniform_filter1d,
)

from ..errors import Cancelled, ChainError
from ..registry import ModelSpec
from .base import Separator

if TYPE_CHECKING:
    from ..audio import Signal

TINY = 1e-20  # keeps ratios of powers finite in digital silence (float32 powers stay far above it otherwise)


# -- STFT on a grid that chunking preserves -------------------------------------------------------------------
def frame_hop(sr: int, seconds: float) -> int:
    """The divisor of `sr` nearest to `seconds * sr` samples (see the module docstring).

    A rate with no divisor within 25% of the target (a prime rate, say) gets the rounded
    target: it still works, but chunked runs then only approximate the whole-signal run.
    """
    target = seconds * sr
    small = [d for d in range(1, math.isqrt(sr) + 1) if sr % d == 0]
    divisors = set(small) | {sr // d for d in small}
    best = min(divisors, key=lambda d: abs(math.log(d / target)))
    return best if abs(best / target - 1) <= 0.25 else max(1, round(target))


class Stft:
    """sqrt-Hann analysis and synthesis windows, window = 4 hops, frames anchored at sample 0.

    The signal is padded with `win - hop` zeros in front, so frame k covers samples
    [k*hop - win + hop, k*hop + hop): every sample is covered by exactly four frames and the
    weighted overlap-add reconstructs the input exactly when nothing is changed.
    """

    OVERLAP = 4

    def __init__(self, sr: int, hop_seconds: float) -> None:
        self.sr = sr
        self.hop = frame_hop(sr, hop_seconds)
        self.win = self.OVERLAP * self.hop
        self.window = np.sqrt(np.hanning(self.win + 1)[: self.win]).astype(np.float32)

    @property
    def bins(self) -> int:
        return self.win // 2 + 1

    def freqs(self) -> np.ndarray:
        return np.arange(self.bins) * self.sr / self.win

    def frames_for(self, seconds: float) -> int:
        return max(1, int(round(seconds * self.sr / self.hop)))

    def count(self, n: int) -> int:
        """Frames of an `n`-sample signal (the last one is the first that starts after the signal)."""
        return (n + self.win - self.hop) // self.hop + 1

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(..., n) real -> (..., frames, bins) complex64."""
        n = x.shape[-1]
        pad = self.win - self.hop
        frames = self.count(n)
        padded = np.zeros(x.shape[:-1] + ((frames - 1) * self.hop + self.win,), dtype=np.float32)
        padded[..., pad : pad + n] = x
        return self._analyse(padded, frames)

    def frames_of(self, audio: Signal, a: int, b: int) -> np.ndarray:
        """Frames [a, b) of `forward(audio)`, (channels, b - a, bins), reading only the samples they cover."""
        lo, hi = a * self.hop - (self.win - self.hop), b * self.hop
        seg = np.zeros((audio.channels, hi - lo), dtype=np.float32)
        r_lo, r_hi = max(0, lo), min(audio.frames, hi)
        if r_hi > r_lo:
            seg[:, r_lo - lo : r_hi - lo] = audio.read(r_lo, r_hi)
        return self._analyse(seg, b - a)

    def _analyse(self, padded: np.ndarray, frames: int) -> np.ndarray:
        view = sliding_window_view(padded, self.win, axis=-1)[..., :: self.hop, :][..., :frames, :]
        out = np.empty(padded.shape[:-1] + (frames, self.bins), dtype=np.complex64)
        for s in range(0, frames, 512):  # in blocks: the windowed frames of a long track would not fit in memory
            out[..., s : s + 512, :] = np.fft.rfft(view[..., s : s + 512, :] * self.window, axis=-1)
        return out

    def _synthesise(self, spec: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(j, windowed frames j, j+4, ... of `spec`) for 512-frame blocks; frames 4 apart tile time without overlap."""
        for s in range(0, spec.shape[-2], 512):
            block = np.fft.irfft(spec[..., s : s + 512, :], n=self.win, axis=-1) * self.window
            for j in range(self.OVERLAP):
                part = block[..., j :: self.OVERLAP, :]
                yield s + j, part.reshape(part.shape[:-2] + (part.shape[-2] * self.win,))

    def inverse(self, spec: np.ndarray, n: int) -> np.ndarray:
        """(..., frames, bins) -> (..., n) float64, weighted overlap-add."""
        frames = spec.shape[-2]
        pad = self.win - self.hop
        total = (frames - 1) * self.hop + self.win
        y = np.zeros(spec.shape[:-2] + (total,), dtype=np.float64)
        for k, tiled in self._synthesise(spec):
            y[..., k * self.hop : k * self.hop + tiled.shape[-1]] += tiled
        norm = np.zeros(total)
        w2 = self.window.astype(np.float64) ** 2
        for j in range(self.OVERLAP):
            m = len(range(j, frames, self.OVERLAP))
            norm[j * self.hop : j * self.hop + m * self.win] += np.tile(w2, m)
        return (y / np.maximum(norm, 1e-12))[..., pad : pad + n]


class Synthesis:
    """`Stft.inverse` with frames pushed in order: each push gives out the samples no later frame adds to.

    Every sample of the signal lies under four frames (see `Stft`), so the window envelope
    it is divided by depends only on its position within a hop.
    """

    def __init__(self, stft: Stft, channels: int, n: int) -> None:
        self.stft, self.n = stft, n
        self.pushed = 0  # frames so far
        self.lo = stft.hop - stft.win  # signal index of acc[:, 0]: frame 0 starts win - hop samples early
        self.acc = np.zeros((channels, 0))
        w2 = stft.window.astype(np.float64) ** 2
        self.norm = np.maximum(sum(w2[j * stft.hop : (j + 1) * stft.hop] for j in range(Stft.OVERLAP)), 1e-12)

    def push(self, spec: np.ndarray) -> np.ndarray:
        """Frames (channels, m, bins) following those pushed before -> the samples now final (channels, k) float64."""
        hop = self.stft.hop
        end = (self.pushed + spec.shape[-2]) * hop  # the last of these frames ends here (signal index)
        if end - self.lo > self.acc.shape[1]:
            grown = np.zeros((self.acc.shape[0], end - self.lo))
            grown[:, : self.acc.shape[1]] = self.acc
            self.acc = grown
        start = self.pushed * hop + self.stft.hop - self.stft.win - self.lo
        for k, tiled in self.stft._synthesise(spec):
            self.acc[:, start + k * hop : start + k * hop + tiled.shape[-1]] += tiled
        self.pushed += spec.shape[-2]
        final = min(self.n, self.pushed * hop + self.stft.hop - self.stft.win)
        first = max(0, self.lo)
        out = self.acc[:, first - self.lo : max(first, final) - self.lo]
        out = out / self.norm[np.arange(first, first + out.shape[1]) % hop]
        if final > self.lo:
            self.acc = self.acc[:, final - self.lo :].copy()
            self.lo = final
        return out


def around(
    blocks: Iterator[tuple[np.ndarray, ...]], total: int, step: int, context: int, cancelled: Callable[[], bool]
) -> Iterator[tuple[int, int, int, tuple[np.ndarray, ...]]]:
    """Consecutive blocks [a, b) of `step` frames out of `total`, each with the frames around it.

    `blocks` gives arrays of consecutive frames from frame 0 (frames on axis -2), in blocks
    of any size, and is read only as far as needed. Yields (a, b, lo, arrays) where the
    arrays hold frames [lo, hi) = [a - context, b + context) cut to [0, total): a method
    that looks at most `context` frames away gets, on [a, b), what it gets on the whole.
    Each frame is made once and kept in one buffer of 2 context + step frames and a block,
    moved down in place (no copy of the whole window per step); the arrays yielded are views
    of it, valid until the next one.
    """
    held: list[np.ndarray] = []
    held_lo = have = 0
    for a in range(0, total, step):
        if cancelled():
            raise Cancelled("job cancelled")
        b = min(total, a + step)
        lo, hi = max(0, a - context), min(total, b + context)
        while have < hi:
            new = next(blocks)
            m = new[0].shape[-2]
            cut, keep = max(0, lo - held_lo), have - max(lo, held_lo)
            if not held or keep + m > held[0].shape[-2]:
                size = max(keep + m, min(total, hi - lo + m))
                grown = [np.empty(x.shape[:-2] + (size, x.shape[-1]), x.dtype) for x in new]
                for g, h in zip(grown, held):
                    g[..., :keep, :] = h[..., cut : cut + keep, :]
                held = grown
            elif cut:
                for h in held:  # pieces no longer than the cut never overlap their source
                    for s in range(0, keep, cut):
                        n = min(cut, keep - s)
                        h[..., s : s + n, :] = h[..., cut + s : cut + s + n, :]
            held_lo += cut
            for h, x in zip(held, new):
                h[..., keep : keep + m, :] = x
            have += m
        yield a, b, lo, tuple(h[..., lo - held_lo : hi - held_lo, :] for h in held)


def support(hop_s: float, frames: int, seconds: float = 0.0) -> float:
    """Seconds of audio on each side an output sample depends on, for a method that looks `frames` frames
    and `seconds` to each side: plus one window for the analysis and one for the synthesis. The hop is
    taken 25% longer than asked, the most `frame_hop` may round it up."""
    hop = 1.25 * hop_s
    return seconds + (frames + 2 * Stft.OVERLAP) * hop


def box(a: np.ndarray, frames: int = 0, bins: int = 0) -> np.ndarray:
    """Centred moving average over +-`frames` (axis -2) and +-`bins` (axis -1); complex input allowed."""
    if np.iscomplexobj(a):
        return box(a.real, frames, bins) + 1j * box(a.imag, frames, bins)
    if frames:
        a = uniform_filter1d(a, 2 * frames + 1, axis=-2, mode="nearest")
    if bins:
        a = uniform_filter1d(a, 2 * bins + 1, axis=-1, mode="nearest")
    return a


def power(z: np.ndarray) -> np.ndarray:
    return z.real**2 + z.imag**2


def noise_floor(p: np.ndarray, stft: Stft, seconds: float) -> np.ndarray:
    """Minimum statistics: the smoothed power's minimum over `seconds`, averaged over `seconds` (not yet unbiased)."""
    w = stft.frames_for(seconds)
    floor = minimum_filter1d(box(p, 1, 2), w, axis=-2, mode="nearest")
    return box(uniform_filter1d(floor, w, axis=-2, mode="nearest"), 0, 4)


@lru_cache(maxsize=32)
def floor_bias(sr: int, hop_seconds: float, seconds: float) -> float:
    """Mean power over `noise_floor` for stationary Gaussian noise, measured once on seeded white noise.

    Minimum statistics underestimates the noise power by a factor that depends on the
    smoothing and window lengths; measuring it with the same estimator avoids deriving it.
    """
    stft = Stft(sr, hop_seconds)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(int(max(8.0, 4 * seconds) * sr)).astype(np.float32)
    p = power(stft.forward(x))
    edge = 2 * stft.frames_for(seconds)
    return float(np.mean(p[edge:-edge]) / np.mean(noise_floor(p, stft, seconds)[edge:-edge]))


def steering(
    left: np.ndarray, right: np.ndarray, stft: Stft, seconds: float, bins: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    """Unit principal direction (d_left, d_right) of the stereo covariance per bin, over +-seconds/2 and +-bins.

    Each bin's covariance is normalised by its power before averaging, so the direction of
    the content that is present most of the time wins, not that of the loudest instants.
    """
    total = power(left) + power(right) + TINY
    w = stft.frames_for(seconds)

    def avg(a: np.ndarray) -> np.ndarray:
        return box(uniform_filter1d(a, w, axis=-2, mode="nearest"), 0, bins)

    cross = left * np.conj(right) / total
    a, d = avg(power(left) / total), avg(power(right) / total)
    b = avg(cross.real) + 1j * avg(cross.imag)
    largest = (a + d) / 2 + np.sqrt((a - d) ** 2 / 4 + power(b))
    v1, v2 = b, largest - a  # (C - largest I) v = 0
    norm = np.sqrt(power(v1) + power(v2))
    flat = norm < 1e-6  # no dominant direction (silence, or exactly equal uncorrelated channels): take the centre
    norm = np.where(flat, 1.0, norm)
    half = np.float32(math.sqrt(0.5))
    return np.where(flat, half, v1 / norm).astype(np.complex64), np.where(flat, half, v2 / norm).astype(np.complex64)


def coherence(left: np.ndarray, right: np.ndarray, frames: int, bins: int) -> np.ndarray:
    a, d = box(power(left), frames, bins), box(power(right), frames, bins)
    b = box(left * np.conj(right), frames, bins)
    return np.minimum(np.sqrt(power(b)) / np.sqrt(np.maximum(a * d, 0) + TINY), 1.0)


@lru_cache(maxsize=32)
def coherence_of_noise(sr: int, hop_seconds: float, frames: int, bins: int) -> float:
    """Mean `coherence` of two independent white noises: what the estimator reads for fully diffuse sound."""
    stft = Stft(sr, hop_seconds)
    rng = np.random.default_rng(1)
    x = stft.forward(rng.standard_normal((2, 64 * stft.hop + stft.win)).astype(np.float32))
    return float(np.mean(coherence(x[0], x[1], frames, bins)[8:-8]))


def hp_masks(mag: np.ndarray, time_frames: int, freq_bins: int, exponent: float) -> tuple[np.ndarray, np.ndarray]:
    """Harmonic and percussive soft masks (Fitzgerald median filtering), summing to one."""
    harm = median_filter(mag, size=(time_frames | 1, 1), mode="reflect") ** exponent
    perc = median_filter(mag, size=(1, freq_bins | 1), mode="reflect") ** exponent
    total = harm + perc + TINY
    return harm / total, perc / total


# -- method parameters --------------------------------------------------------------------------------------------
class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hop_s: float = Field(0.023, gt=0, le=0.2, description="STFT hop in seconds (rounded to a divisor of the rate)")

    def context_seconds(self) -> float | None:
        """Seconds of neighbouring audio an output sample depends on; None = further (the method streams itself)."""
        raise NotImplementedError


class CentreParams(_Params):
    """Phantom centre: a mid-channel mask from the side-to-mid power ratio, after cancelling the part of
    the mid that the side channel predicts (content panned off-centre shows up in both)."""

    method: Literal["centre"] = "centre"
    threshold_db: float = Field(-15.0, description="side/mid power ratio at which a bin counts half as centre")
    sharpness: float = Field(2.0, gt=0, description="exponent of the mask's transition")
    smooth_frames: int = Field(1, ge=0, description="time smoothing of the powers, frames each side")
    predict_frames: int = Field(3, ge=0, description="time span of the side-to-mid regression, frames each side")
    predict_bins: int = Field(2, ge=0, description="frequency span of the side-to-mid regression, bins each side")

    def context_seconds(self) -> float:
        return support(self.hop_s, 2 * self.smooth_frames + self.predict_frames)


class HpssParams(_Params):
    """Harmonic/percussive separation by median filtering, soft masks, a long window and long time kernel."""

    method: Literal["hpss"] = "hpss"
    hop_s: float = Field(0.046, gt=0, le=0.2)
    time_s: float = Field(1.2, gt=0, description="harmonic median filter length along time")
    freq_hz: float = Field(150.0, gt=0, description="percussive median filter length along frequency")
    mask_power: float = Field(1.5, gt=0, description="exponent of the soft masks")

    def context_seconds(self) -> float:
        return support(self.hop_s, 1, self.time_s / 2)


class RepetSimParams(_Params):
    """REPET-SIM foreground (what does not repeat) restricted to centred content above `lowcut_hz`."""

    method: Literal["repet_sim"] = "repet_sim"
    neighbours: int = Field(30, ge=2, description="most similar frames whose median models the background")
    min_separation_s: float = Field(2.0, ge=0, description="similar frames must be at least this far apart")
    # Similar frames are looked for within this distance: compute grows with the track times
    # the window, not with its square, and memory with the window, not the track. Bars,
    # loops and phrases repeat well within a minute; a chorus two minutes later adds little.
    window_s: float = Field(60.0, gt=0, description="similar frames are looked for this far either side")
    centre_threshold_db: float | None = Field(
        -15.0, description="stereo: keep foreground where side/mid is below this; None = off"
    )
    harmonic: bool = Field(False, description="keep only harmonic (not percussive) foreground")
    # a voice's energy sits mostly above 300 Hz, while below it bass, kick and the low end of the band dominate
    lowcut_hz: float = Field(300.0, ge=0, description="no foreground below this frequency")
    mask_power: float = Field(0.7, gt=0, description="exponent of the final soft masks")

    def context_seconds(self) -> None:
        return None  # a minute either side: chunks would be mostly context, so it streams (`foreground_stream`)


class WpeParams(_Params):
    """Multichannel WPE (whole-track filters), then, for stereo, a coherence-based late-reverb post-filter."""

    method: Literal["wpe"] = "wpe"
    taps: int = Field(10, ge=1, description="prediction filter length in frames")
    delay: int = Field(3, ge=1, description="prediction delay in frames (keeps the direct sound and early echoes)")
    iterations: int = Field(1, ge=1, description="WPE iterations (power re-estimation)")
    post_filter: bool = Field(True, description="stereo: also remove the diffuse (incoherent) remainder")
    coherence_exponent: float = Field(
        4.0, gt=0, description="how strictly the side channel must be coherent to be kept"
    )

    def context_seconds(self) -> None:
        return None  # the filters are estimated from the whole track (`dry_stream` makes a pass per iteration)


class GateParams(_Params):
    """Spectral gate: Wiener-like gain against a noise profile from minimum statistics, and in stereo from
    the channel orthogonal to the main direction when that channel is as steady as a noise floor."""

    method: Literal["spectral_gate"] = "spectral_gate"
    floor_s: float = Field(2.0, gt=0, description="minimum-statistics window")
    steer_s: float = Field(2.0, gt=0, description="stereo: window over which the main direction is estimated")
    steady_ratio: float = Field(2.0, gt=0, description="stereo: side power up to this times its floor counts as noise")
    exponent: float = Field(2.0, gt=0, description="exponent of the gain (larger = stronger gating)")
    smooth_frames: int = Field(2, ge=0)
    smooth_bins: int = Field(2, ge=0)
    min_gain: float = Field(0.0, ge=0, le=1, description="largest attenuation, as a gain")
    highpass_hz: float = Field(
        20.0, ge=0, description="content below this (infrasound, DC, rumble) counts as noise; 0 = off"
    )

    def context_seconds(self) -> float:
        # noise power at a frame: a floor_s minimum, averaged over floor_s, of a channel steered over steer_s
        return support(self.hop_s, self.smooth_frames + 2, self.floor_s + self.steer_s / 2)


class EnhancerParams(GateParams):
    """Restoration: de-clip, de-click, a gentle gate and a rumble filter; `strength` mixes it with the input."""

    method: Literal["universal_enhancer"] = "universal_enhancer"  # type: ignore[assignment]
    strength: float = Field(1.0, ge=0, le=1, description="wet/dry mix: 0 returns the input, 1 the full restoration")
    min_gain: float = Field(0.1, ge=0, le=1, description="the gate removes at most 20 dB: restoration, not separation")
    exponent: float = Field(1.0, gt=0)
    click_threshold: float = Field(8.0, gt=0, description="clicks: residual above this many local deviations")
    click_max_ms: float = Field(2.0, gt=0, description="longest event treated as a click")
    clip_min_run: int = Field(3, ge=2, description="at least this many equal samples at the peak count as clipped")
    highpass_hz: float = Field(30.0, ge=0, description="gentle EQ: high-pass corner for DC and rumble; 0 = off")

    def context_seconds(self) -> float:
        return super().context_seconds() + 0.02  # de-click and de-clip look 10 ms and 16 samples around


# -- the methods ----------------------------------------------------------------------------------------------------
def centre(x: np.ndarray, sr: int, p: CentreParams) -> np.ndarray:
    if x.shape[0] != 2:  # a mono (or folded) signal is all centre
        return x
    stft = Stft(sr, p.hop_s)
    spec = stft.forward(x)
    mid, side = (spec[0] + spec[1]) / 2, (spec[0] - spec[1]) / 2
    p_side, p_mid = box(power(side), p.smooth_frames), box(power(mid), p.smooth_frames)
    tau = 10 ** (p.threshold_db / 10)
    gain = 1 / (1 + (p_side / (tau * p_mid + TINY)) ** (p.sharpness / 2))
    # A source panned off-centre puts a real multiple of the side signal into the mid; regress the
    # side-looking part of the mid on the side locally and cancel it before masking.
    off = (1 - gain) * mid
    kappa = box((off * np.conj(side)).real, p.predict_frames, p.predict_bins) / (
        box(power(side), p.predict_frames, p.predict_bins) + TINY
    )
    est = stft.inverse(gain * (mid - kappa * side), x.shape[1])
    return np.stack([est, est])


def percussive(x: np.ndarray, sr: int, p: HpssParams) -> np.ndarray:
    stft = Stft(sr, p.hop_s)
    spec = stft.forward(x)
    mag = np.sqrt(power(spec).mean(axis=0))  # one mask for all channels keeps the stereo image
    _, perc = hp_masks(mag, stft.frames_for(p.time_s), max(3, int(round(p.freq_hz * stft.win / sr))), p.mask_power)
    return stft.inverse(perc * spec, x.shape[1])


def band_features(mag: np.ndarray, stft: Stft) -> np.ndarray:
    """Each frame's 96 log-spaced band energies (log, centred, unit norm): what REPET-SIM compares frames by."""
    edges = np.geomspace(40.0, stft.sr / 2, 97)
    band = np.clip(np.searchsorted(edges, stft.freqs()) - 1, 0, 95)  # non-decreasing: bands are runs of bins
    present = np.unique(band)
    energy = np.zeros(mag.shape[:-1] + (96,), dtype=np.float32)
    # summed in order along each frame (not a matrix product, whose rounding depends on how many frames it is given)
    energy[..., present] = np.add.reduceat(mag, np.searchsorted(band, present), axis=-1)
    feat = np.log1p(100 * energy)
    feat -= feat.mean(axis=1, keepdims=True)
    feat /= np.linalg.norm(feat, axis=1, keepdims=True) + 1e-9
    return feat


def repet_reach(frames: int, neighbours: int, min_sep_frames: int, window_frames: int) -> tuple[int, int, int]:
    """(neighbours, separation, window) in frames for a track of `frames` frames (the whole track's count)."""
    k = max(1, min(neighbours, frames - 1))
    # a clip too short to look min_sep_frames away for k frames looks as far as it can (never at the frame itself)
    sep = max(0, min(min_sep_frames, (frames - k - 1) // 2))
    return k, sep, max(window_frames, sep + k)  # enough candidates for k neighbours


def similar_median(
    mag: np.ndarray, feat: np.ndarray, start: int, stop: int, offset: int, reach: tuple[int, int, int]
) -> np.ndarray:
    """The median magnitude of the most similar frames of each frame in [start, stop), frames counted on the
    track; `mag` and `feat` hold frames from `offset` on, at least the window either side (or to the end)."""
    k, sep, window = reach
    end = offset + mag.shape[0]
    out = np.empty((stop - start, mag.shape[1]), dtype=mag.dtype)
    for s in range(start, stop, 256):  # in row blocks, against the columns their window reaches
        rows = np.arange(s, min(stop, s + 256), dtype=np.int32)
        lo, hi = max(offset, s - window), min(end, int(rows[-1]) + window + 1)
        sim = feat[rows - offset] @ feat[lo - offset : hi - offset].T
        dist = np.abs(np.arange(lo, hi, dtype=np.int32)[None, :] - rows[:, None])
        sim[(dist <= sep) | (dist > window)] = -np.inf
        del dist
        nearest = lo - offset + np.argpartition(-sim, k - 1, axis=1)[:, :k].copy()
        del sim
        for f in range(0, mag.shape[1], 256):  # the neighbours' magnitudes a few bins at a time
            near = mag[nearest, f : f + 256]
            # np.median's values, 4x as fast here: sorting 30 values beats partitioning them one row at a time
            near.sort(axis=1)
            out[rows - start, f : f + 256] = (near[:, (k - 1) // 2] + near[:, k // 2]) / 2
    return out


def repeating_model(
    mag: np.ndarray, stft: Stft, neighbours: int, min_sep_frames: int, window_frames: int
) -> np.ndarray:
    """REPET-SIM: each frame's background is the median of its most similar frames (cosine, log-band features)
    among those at most `window_frames` away."""
    frames = mag.shape[0]
    if frames < 2:
        return np.zeros_like(mag)
    reach = repet_reach(frames, neighbours, min_sep_frames, window_frames)
    return np.minimum(mag, similar_median(mag, band_features(mag, stft), 0, frames, 0, reach))


def magnitude(spec: np.ndarray) -> np.ndarray:
    return np.sqrt(power(spec).mean(axis=0))  # one mask for all channels keeps the stereo image


def centre_weight(spec: np.ndarray, p: RepetSimParams) -> np.ndarray | None:
    """Stereo: how centred each bin is (side/mid over +-1 frame); None when mono or off."""
    if spec.shape[0] != 2 or p.centre_threshold_db is None:
        return None
    mid, side = (spec[0] + spec[1]) / 2, (spec[0] - spec[1]) / 2
    tau = 10 ** (p.centre_threshold_db / 10)
    return 1 / (1 + box(power(side), 1) / (tau * box(power(mid), 1) + TINY))


def harmonic_frames(stft: Stft) -> int:
    return stft.frames_for(0.3)


def harmonic_weight(mag: np.ndarray, stft: Stft, p: RepetSimParams) -> np.ndarray | None:
    if not p.harmonic:
        return None
    return hp_masks(mag, harmonic_frames(stft), max(3, int(round(300 * stft.win / stft.sr))), 2.0)[0]


def foreground_mask(
    mag: np.ndarray,
    model: np.ndarray,
    centre: np.ndarray | None,
    harm: np.ndarray | None,
    stft: Stft,
    p: RepetSimParams,
) -> np.ndarray:
    fg = np.maximum(mag - model, 0)
    if centre is not None:
        fg *= centre
    if harm is not None:
        fg *= harm
    fg[:, stft.freqs() < p.lowcut_hz] = 0
    bg = np.maximum(mag - fg, 0)
    fg, bg = fg**p.mask_power, bg**p.mask_power
    return fg / (fg + bg + TINY)


def foreground(x: np.ndarray, sr: int, p: RepetSimParams) -> np.ndarray:
    stft = Stft(sr, p.hop_s)
    spec = stft.forward(x)
    mag = magnitude(spec)
    model = repeating_model(mag, stft, p.neighbours, stft.frames_for(p.min_separation_s), stft.frames_for(p.window_s))
    mask = foreground_mask(mag, model, centre_weight(spec, p), harmonic_weight(mag, stft, p), stft, p)
    return stft.inverse(mask * spec, x.shape[1])


def foreground_stream(
    audio: Signal, sr: int, p: RepetSimParams, block: int, cancelled: Callable[[], bool]
) -> Iterator[np.ndarray]:
    """`foreground` in consecutive blocks of whole 256-frame row blocks (the similarity search's own blocks).

    Magnitudes and features are kept for the window either side of the block, each frame's
    analysed once for them and once more for the block's mask, so memory follows the window
    and the block. The reach (neighbours, separation, window) is that of the whole track.
    """
    stft = Stft(sr, p.hop_s)
    total = stft.count(audio.frames)
    reach = repet_reach(total, p.neighbours, stft.frames_for(p.min_separation_s), stft.frames_for(p.window_s))
    step = 256 * max(1, min(4, block // (256 * stft.hop)))
    half = harmonic_frames(stft) // 2 + 1 if p.harmonic else 0

    def analysed() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a in range(0, total, step):
            mag = magnitude(stft.frames_of(audio, a, min(total, a + step)))
            yield mag, band_features(mag, stft)

    synth = Synthesis(stft, audio.channels, audio.frames)
    for a, b, lo, (mag, feat) in around(analysed(), total, step, max(reach[2], half, 1), cancelled):
        here = mag[a - lo : b - lo]
        model = np.minimum(here, similar_median(mag, feat, a, b, lo, reach))
        s0, s1 = max(0, a - 1), min(total, b + 1)  # the centre weight looks one frame away
        spec = stft.frames_of(audio, s0, s1)
        centre = centre_weight(spec, p)
        h0, h1 = max(lo, a - half), min(lo + mag.shape[0], b + half)
        harm = harmonic_weight(mag[h0 - lo : h1 - lo], stft, p)
        mask = foreground_mask(
            here,
            model,
            None if centre is None else centre[a - s0 : b - s0],
            None if harm is None else harm[a - h0 : b - h0],
            stft,
            p,
        )
        yield synth.push(mask * spec[:, a - s0 : b - s0])


def wpe_past(obs: np.ndarray, taps: int, delay: int) -> np.ndarray:
    """The delayed stack (b, ch * taps, m) for the last m frames of `obs` (b, ch, delay + taps - 1 + m):
    row k * ch + c at frame t is channel c at frame t - delay - k."""
    b, ch, frames = obs.shape
    m = frames - (delay + taps - 1)
    past = np.empty((b, ch * taps, m), dtype=np.complex128)
    for k in range(taps):
        start = taps - 1 - k
        past[:, k * ch : (k + 1) * ch] = obs[:, :, start : start + m]
    return past


def wpe_apply(obs: np.ndarray, past: np.ndarray, filt: np.ndarray | None) -> np.ndarray:
    """obs (b, ch, m) minus the prediction filt^H past; `obs` itself before the first filter."""
    return obs if filt is None else obs - np.conj(filt).swapaxes(1, 2) @ past


def wpe_statistics(obs: np.ndarray, past: np.ndarray, filt: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """This block's terms of the weighted covariance of `past` and its cross-covariance with `obs`.

    The weight is one over the power of the current estimate at that frame, so given the
    filter every term is local to its frame: sums over blocks of frames are sums over the track.
    """
    lam = np.maximum(power(wpe_apply(obs, past, filt)).mean(axis=1), 1e-10)  # (b, m)
    weighted = past / lam[:, None, :]
    return weighted @ np.conj(past).swapaxes(1, 2), weighted @ np.conj(obs).swapaxes(1, 2)


def wpe_solve(cov: np.ndarray, cross: np.ndarray) -> np.ndarray:
    size = cov.shape[-1]
    load = 1e-6 * np.trace(cov, axis1=1, axis2=2).real / size + 1e-12
    return np.linalg.solve(cov + load[:, None, None] * np.eye(size), cross)


def wpe_filter(spec: np.ndarray, taps: int, delay: int, iterations: int) -> np.ndarray:
    """Weighted prediction error (Nakatani et al.; as in nara-wpe's `wpe`), vectorised over frequency blocks.

    spec (channels, frames, bins) -> the same with the delayed linear prediction of each
    channel from all channels' past subtracted.
    """
    ch, frames, bins = spec.shape
    out = np.empty_like(spec)
    # keep the stacked delayed frames of one block (complex128) under ~256 MB
    block = max(1, min(bins, int(256e6 // (16 * ch * taps * max(frames, 1)))))
    for f0 in range(0, bins, block):
        obs = np.ascontiguousarray(
            spec[:, :, f0 : f0 + block].transpose(2, 0, 1), dtype=np.complex128
        )  # (b, ch, frames)
        past = wpe_past(np.concatenate([np.zeros(obs.shape[:2] + (delay + taps - 1,)), obs], axis=2), taps, delay)
        filt = None
        for _ in range(iterations):
            filt = wpe_solve(*wpe_statistics(obs, past, filt))
        out[:, :, f0 : f0 + block] = wpe_apply(obs, past, filt).transpose(1, 2, 0)
    return out


def wpe_blocks(
    audio: Signal, stft: Stft, taps: int, delay: int, step: int, cancelled: Callable[[], bool]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(obs, past) of consecutive blocks of `step` frames, (bins, ch, m) and (bins, ch * taps, m) complex128;
    each frame is analysed once, the last delay + taps - 1 kept for the next block's past."""
    history = delay + taps - 1
    held = np.zeros((stft.bins, audio.channels, history), dtype=np.complex128)
    total = stft.count(audio.frames)
    for a in range(0, total, step):
        if cancelled():
            raise Cancelled("job cancelled")
        spec = stft.frames_of(audio, a, min(total, a + step))
        obs = np.ascontiguousarray(spec.transpose(2, 0, 1), dtype=np.complex128)
        held = np.concatenate([held, obs], axis=2)
        yield obs, wpe_past(held, taps, delay)
        held = held[:, :, held.shape[2] - history :]


def diffuse_postfilter(spec: np.ndarray, stft: Stft, coherence_exponent: float) -> np.ndarray:
    """Stereo: keep the coherent part of each bin, drop the diffuse part (late reverb is incoherent across channels).

    Rotate onto the main direction (Y) and its orthogonal (B). Diffuse sound has equal
    power in both, so B's local power estimates the diffuse power in Y (Wiener gain); B
    itself is kept in proportion to how much more coherent the channels are locally than
    diffuse sound would be, so a genuinely wide source survives.
    """
    left, right = spec[0], spec[1]
    d1, d2 = steering(left, right, stft, 3.0)
    y = np.conj(d1) * left + np.conj(d2) * right
    b = -d2 * left + d1 * right
    py, pb = box(power(y), 1, 1), box(power(b), 1, 1)
    gy = np.maximum(1 - pb / np.maximum(py, TINY), 0)
    c0 = coherence_of_noise(stft.sr, stft.hop / stft.sr, 2, 2)
    gb = np.clip((coherence(left, right, 2, 2) - c0) / (1 - c0), 0, 1) ** coherence_exponent
    y, b = gy * y, gb * b
    return np.stack([d1 * y - np.conj(d2) * b, d2 * y + np.conj(d1) * b])


def dry(x: np.ndarray, sr: int, p: WpeParams) -> np.ndarray:
    stft = Stft(sr, p.hop_s)
    spec = wpe_filter(stft.forward(x), p.taps, p.delay, p.iterations)
    if p.post_filter and x.shape[0] == 2:
        spec = diffuse_postfilter(spec, stft, p.coherence_exponent)
    return stft.inverse(spec, x.shape[1])


def dry_stream(audio: Signal, sr: int, p: WpeParams, block: int, cancelled: Callable[[], bool]) -> Iterator[np.ndarray]:
    """`dry` in consecutive blocks: one pass over the track per iteration sums the filter's statistics,
    a last one applies it, post-filters slabs of frames with their context and overlap-adds.

    Memory follows the blocks: a block's delayed stack (complex128) is kept under ~40 MB, which is also
    about the fastest size for numpy's batched products here (per frame, 64 frames run 15x faster than 400).
    """
    stft = Stft(sr, p.hop_s)
    ch, total = audio.channels, stft.count(audio.frames)
    step = max(1, min(block // stft.hop, int(40e6 // (16 * ch * p.taps * stft.bins))))
    filt = None
    for _ in range(p.iterations):
        cov = cross = 0
        for obs, past in wpe_blocks(audio, stft, p.taps, p.delay, step, cancelled):
            c, x = wpe_statistics(obs, past, filt)
            cov, cross = cov + c, cross + x
        filt = wpe_solve(cov, cross)
    est = (
        (wpe_apply(obs, past, filt).transpose(1, 2, 0).astype(np.complex64),)
        for obs, past in wpe_blocks(audio, stft, p.taps, p.delay, step, cancelled)
    )
    if p.post_filter and ch == 2:
        # the post-filter looks half its 3 s steering window, one frame and two frames away
        context = stft.frames_for(3.0) // 2 + 3
        est = (
            (diffuse_postfilter(slab, stft, p.coherence_exponent)[:, a - lo : b - lo],)
            for a, b, lo, (slab,) in around(est, total, max(1, min(block // stft.hop, 512)), context, cancelled)
        )
    synth = Synthesis(stft, ch, audio.frames)
    for (spec,) in est:
        yield synth.push(spec)


def highpass(freqs: np.ndarray, corner: float) -> np.ndarray:
    """Magnitude of a 4th-order Butterworth high-pass (1 everywhere when `corner` is 0)."""
    if corner <= 0:
        return np.ones_like(freqs, dtype=np.float32)
    return (1 / np.sqrt(1 + (corner / np.maximum(freqs, 1e-3)) ** 8)).astype(np.float32)


def gate_gain(spec: np.ndarray, noise: np.ndarray, stft: Stft, p: GateParams) -> np.ndarray:
    level = box(power(spec), p.smooth_frames, p.smooth_bins)
    gain = np.maximum(np.maximum(1 - noise / np.maximum(level, TINY), 0) ** p.exponent, p.min_gain)
    return gain * highpass(stft.freqs(), p.highpass_hz)


def noise_psd(spec: np.ndarray, stft: Stft, p: GateParams) -> np.ndarray:
    """Per-channel noise power per bin (broadcastable to `spec`)."""
    bias = floor_bias(stft.sr, stft.hop / stft.sr, p.floor_s)
    per_channel = bias * noise_floor(power(spec), stft, p.floor_s)
    if spec.shape[0] != 2:
        return per_channel
    left, right = spec[0], spec[1]
    d1, d2 = steering(left, right, stft, p.steer_s)
    y_inst = power(np.conj(d1) * left + np.conj(d2) * right)  # the main direction
    b_inst = power(-d2 * left + d1 * right)  # the channel orthogonal to it
    w = stft.frames_for(p.floor_s)
    pb = box(uniform_filter1d(b_inst, w, axis=-2, mode="nearest"), 0, 2)
    floor_b = noise_floor(b_inst, stft, p.floor_s)

    def wide(a: np.ndarray) -> np.ndarray:  # geometric mean over ~+-16 bins: the trend of a ratio, not its noise
        return np.exp(uniform_filter1d(np.log(a + TINY), 33, axis=-1, mode="nearest"))

    # Uncorrelated noise has equal power in every direction, so the orthogonal channel's
    # mean power is the noise power, as long as it is as steady as a noise floor. Where it is
    # much busier (a wide mix), only its floor counts.
    steady = wide(pb) / wide(bias * floor_b)
    spatial = pb * np.minimum(1.0, p.steady_ratio / steady)
    # That holds only where the noise is spread evenly: where the main direction's floor is far
    # above the orthogonal one's (noise as mono as the music, dual mono), fall back to each channel's
    # floor. Far: a sustained centred part alone lifts the main floor up to ~10 dB above the other.
    excess = wide(noise_floor(y_inst, stft, p.floor_s)) / wide(floor_b)
    mono = np.clip(np.log2(excess / 16) / 2, 0, 1)
    return (1 - mono) * spatial + mono * per_channel


def clean(x: np.ndarray, sr: int, p: GateParams) -> np.ndarray:
    stft = Stft(sr, p.hop_s)
    spec = stft.forward(x)
    return stft.inverse(gate_gain(spec, noise_psd(spec, stft, p), stft, p) * spec, x.shape[1])


def declip(x: np.ndarray, min_run: int) -> np.ndarray:
    """Rebuild runs of equal samples at a channel's local peak with a cubic through their neighbours."""
    y = x.copy()
    for c in range(x.shape[0]):
        s = x[c]
        flat = np.r_[False, np.abs(np.diff(s)) <= 1e-7 * (np.abs(s[1:]) + 1e-12)] & (np.abs(s) > 0.1)
        flat |= np.r_[flat[1:], False]
        edges = np.flatnonzero(np.diff(np.r_[0, flat.astype(np.int8), 0]))
        for start, stop in zip(edges[::2], edges[1::2]):
            run = stop - start
            lo, hi = start - 8, stop + 8
            if run < min_run or run > 400 or lo < 0 or hi > s.size:
                continue
            # only runs that sit at the top of their neighbourhood are clipping (not a held DC value)
            level = np.abs(s[start])
            if np.max(np.abs(s[lo:hi])) > level * (1 + 1e-6):
                continue
            known = np.r_[lo:start, stop:hi]
            fill = CubicSpline(known, s[known])(np.arange(start, stop))
            sign = np.sign(s[start])
            y[c, start:stop] = sign * np.maximum(sign * fill, level)  # a clipped sample was at least this loud
    return y


def ar_fit(seg: np.ndarray, order: int) -> np.ndarray:
    """Prediction-error filter [1, -a1, ..., -ap] of `seg` (autocorrelation method, Hann-windowed)."""
    w = seg * np.hanning(seg.size)
    r = np.correlate(w, w, "full")[w.size - 1 : w.size + order]
    if r[0] <= 1e-12:
        return np.r_[1.0, np.zeros(order)]
    r[0] *= 1 + 1e-6  # a little white-noise loading keeps the system well conditioned
    return np.r_[1.0, -solve_toeplitz(r[:-1], r[1:])]


def declick(x: np.ndarray, sr: int, threshold: float, max_ms: float, order: int = 24) -> np.ndarray:
    """Detect clicks as outliers of a local AR model's prediction error; rebuild them by least-squares
    AR interpolation (Vaseghi and Rayner; Godsill and Rayner, "Digital Audio Restoration", ch. 5).

    Music is well predicted from its recent past and a click is not, so the prediction error
    shows clicks that a plain high-pass would confuse with bright music. Models are fitted
    per block of a hop that divides the rate, so chunked runs see the same blocks.
    """
    y = x.copy()
    block = frame_hop(sr, 0.046)
    longest = max(1, int(max_ms * 1e-3 * sr))
    n = x.shape[1]
    for c in range(x.shape[0]):
        s = x[c]
        hits = np.zeros(n, dtype=bool)
        filters = []
        for start in range(0, n, block):
            stop = min(n, start + block)
            a = ar_fit(s[max(0, start - block) : min(n, stop + block)], order)
            lo = max(0, start - order)
            e = np.convolve(s[lo:stop], a, "full")[start - lo : stop - lo]
            # clicks are too sparse to move a median; the floor (-40 dB re the block) stops an almost perfectly
            # predictable passage (a pure tone) from turning its tiny, uneven errors into "clicks"
            scale = max(np.median(np.abs(e)) / 0.6745, 0.01 * np.sqrt(np.mean(s[start:stop] ** 2)), 1e-9)
            hits[start:stop] = np.abs(e) > threshold * scale
            filters.append(a)
        hits = binary_dilation(hits, iterations=2)
        edges = np.flatnonzero(np.diff(np.r_[0, hits.astype(np.int8), 0]))
        for start, stop in zip(edges[::2], edges[1::2]):
            lo, hi = start - 2 * order, stop + 2 * order
            if stop - start > longest + 4 or lo < 0 or hi > n:
                continue  # a long event is music (a transient), not a click
            a = filters[start // block]
            # prediction errors over the window as rows of a banded matrix; the unknown samples minimise their energy
            rows = hi - lo - order
            band = np.zeros((rows, hi - lo))
            for k, coef in enumerate(a[::-1]):
                band[np.arange(rows), np.arange(rows) + k] = coef
            unknown = np.zeros(hi - lo, dtype=bool)
            unknown[start - lo : stop - lo] = True
            seg = s[lo:hi]
            fill, *_ = np.linalg.lstsq(band[:, unknown], -band[:, ~unknown] @ seg[~unknown], rcond=None)
            y[c, start:stop] = fill
    return y


def enhanced(x: np.ndarray, sr: int, p: EnhancerParams) -> np.ndarray:
    if p.strength == 0:
        return x
    y = declick(declip(x, p.clip_min_run), sr, p.click_threshold, p.click_max_ms)
    stft = Stft(sr, p.hop_s)
    spec = stft.forward(y)
    y = stft.inverse(gate_gain(spec, noise_psd(spec, stft, p), stft, p) * spec, x.shape[1])
    return x + p.strength * (y - x)


# -- the separator ------------------------------------------------------------------------------------------------
Whole = Callable[[np.ndarray, int, _Params], np.ndarray]
# (signal, rate, params, block samples, cancelled) -> the first source in consecutive blocks, equal to `Whole`'s
Stream = Callable[["Signal", int, _Params, int, Callable[[], bool]], Iterator[np.ndarray]]
Method = tuple[type[_Params], tuple[str, ...], Whole, Stream | None]
METHODS: dict[str, Method] = {
    "centre": (CentreParams, ("centre", "sides"), centre, None),
    "hpss": (HpssParams, ("percussive", "harmonic"), percussive, None),
    "repet_sim": (RepetSimParams, ("foreground", "background"), foreground, foreground_stream),
    "wpe": (WpeParams, ("dry", "reverb"), dry, dry_stream),
    "spectral_gate": (GateParams, ("clean", "noise"), clean, None),
    "universal_enhancer": (EnhancerParams, ("enhanced",), enhanced, None),
}


class DspSeparator(Separator):
    """Runs the method `params.method` names; the first source is estimated, a second is the input minus it.

    Methods with a look of a few seconds are cut into chunks by the engine (`chunk_context`);
    WPE and REPET-SIM, whose estimates reach across the track, stream (`separate_stream`).
    """

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict) -> None:
        super().__init__(spec, files, params)
        name = params.get("method")
        if name not in METHODS:
            raise ChainError(
                f"dsp model {spec.id!r} names method {name!r}; known: {sorted(METHODS)}", model_id=spec.id, method=name
            )
        model, self.sources, self._fn, self._stream = METHODS[name]
        if set(self.sources) != set(spec.sources):
            raise ChainError(
                f"dsp method {name!r} makes {list(self.sources)}, but {spec.id!r} declares {list(spec.sources)}",
                model_id=spec.id,
            )
        try:
            self.config = model.model_validate(params)
        except ValidationError as exc:
            raise ChainError(f"invalid params for {spec.id!r}: {exc}", model_id=spec.id) from exc
        context = self.config.context_seconds()
        self.streamable = context is not None
        # whole seconds, so chunk boundaries stay on the frame grid (see the module docstring)
        self.chunk_context = float(math.ceil(context)) if context is not None else 0.0

    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        x = np.asarray(audio, dtype=np.float64)
        return self._sources(x, self._fn(x, sample_rate, self.config))

    def separate_stream(
        self, audio: Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]
    ) -> Iterator[dict[str, np.ndarray]] | None:
        if self._stream is None:
            return None
        return self._stream_sources(audio, sample_rate, block, cancelled)

    def _stream_sources(
        self, audio: Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]
    ) -> Iterator[dict[str, np.ndarray]]:
        done = 0
        for first in self._stream(audio, sample_rate, self.config, block, cancelled):
            if first.shape[1]:
                yield self._sources(audio.read(done, done + first.shape[1]).astype(np.float64), first)
                done += first.shape[1]

    def _sources(self, x: np.ndarray, first: np.ndarray) -> dict[str, np.ndarray]:
        out = {self.sources[0]: first.astype(np.float32)}
        if len(self.sources) == 2:
            out[self.sources[1]] = (x - first).astype(np.float32)
        return out
