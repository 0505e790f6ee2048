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
averages) for the same reason. WPE and REPET-SIM estimate from the whole signal and are
not streamable.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.interpolate import CubicSpline
from scipy.linalg import solve_toeplitz
from scipy.ndimage import binary_dilation, median_filter, minimum_filter1d, uniform_filter1d

from ..errors import ChainError
from ..registry import ModelSpec
from .base import Separator

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

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(..., n) real -> (..., frames, bins) complex64."""
        n = x.shape[-1]
        pad = self.win - self.hop
        frames = (n + pad) // self.hop + 1
        padded = np.zeros(x.shape[:-1] + ((frames - 1) * self.hop + self.win,), dtype=np.float32)
        padded[..., pad:pad + n] = x
        view = sliding_window_view(padded, self.win, axis=-1)[..., :: self.hop, :][..., :frames, :]
        out = np.empty(x.shape[:-1] + (frames, self.bins), dtype=np.complex64)
        for s in range(0, frames, 512):  # in blocks: the windowed frames of a long track would not fit in memory
            out[..., s:s + 512, :] = np.fft.rfft(view[..., s:s + 512, :] * self.window, axis=-1)
        return out

    def inverse(self, spec: np.ndarray, n: int) -> np.ndarray:
        """(..., frames, bins) -> (..., n) float64, weighted overlap-add."""
        frames = spec.shape[-2]
        pad = self.win - self.hop
        total = (frames - 1) * self.hop + self.win
        y = np.zeros(spec.shape[:-2] + (total,), dtype=np.float64)
        for s in range(0, frames, 512):
            block = np.fft.irfft(spec[..., s:s + 512, :], n=self.win, axis=-1) * self.window
            for j in range(self.OVERLAP):  # frames j, j+4, ... tile the time axis without overlap
                part = block[..., j::self.OVERLAP, :]
                m = part.shape[-2]
                start = (s + j) * self.hop
                y[..., start:start + m * self.win] += part.reshape(part.shape[:-2] + (m * self.win,))
        norm = np.zeros(total)
        w2 = self.window.astype(np.float64) ** 2
        for j in range(self.OVERLAP):
            m = len(range(j, frames, self.OVERLAP))
            norm[j * self.hop:j * self.hop + m * self.win] += np.tile(w2, m)
        return (y / np.maximum(norm, 1e-12))[..., pad:pad + n]


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
    return z.real ** 2 + z.imag ** 2


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


def steering(left: np.ndarray, right: np.ndarray, stft: Stft, seconds: float, bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
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
        """Seconds of neighbouring audio an output sample depends on; None = the whole signal."""
        raise NotImplementedError

    def min_chunk_seconds(self) -> float:
        """Shortest chunk worth cutting into (a long context makes short chunks mostly context)."""
        return 0.0


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
    # Similar frames are looked for within this distance: compute and memory grow with the
    # track times the window, not with its square, and a long track streams in chunks. Bars,
    # loops and phrases repeat well within a minute; a chorus two minutes later adds little.
    window_s: float = Field(60.0, gt=0, description="similar frames are looked for this far either side")
    centre_threshold_db: float | None = Field(
        -15.0, description="stereo: keep foreground where side/mid is below this; None = off")
    harmonic: bool = Field(False, description="keep only harmonic (not percussive) foreground")
    # a voice's energy sits mostly above 300 Hz, while below it bass, kick and the low end of the band dominate
    lowcut_hz: float = Field(300.0, ge=0, description="no foreground below this frequency")
    mask_power: float = Field(0.7, gt=0, description="exponent of the final soft masks")

    def context_seconds(self) -> float:
        # the window, the +-1 frame box of the centre mask, the harmonic mask's 0.3 s median
        return support(self.hop_s, 1, self.window_s + (0.15 if self.harmonic else 0.0))

    def min_chunk_seconds(self) -> float:
        return 4 * self.window_s  # chunks twice as long as their two contexts: 1.5x the work, not 5x


class WpeParams(_Params):
    """Multichannel WPE (whole-signal filters), then, for stereo, a coherence-based late-reverb post-filter."""

    method: Literal["wpe"] = "wpe"
    taps: int = Field(10, ge=1, description="prediction filter length in frames")
    delay: int = Field(3, ge=1, description="prediction delay in frames (keeps the direct sound and early echoes)")
    iterations: int = Field(1, ge=1, description="WPE iterations (power re-estimation)")
    post_filter: bool = Field(True, description="stereo: also remove the diffuse (incoherent) remainder")
    coherence_exponent: float = Field(4.0, gt=0, description="how strictly the side channel must be coherent to be kept")

    def context_seconds(self) -> None:
        return None


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
    highpass_hz: float = Field(20.0, ge=0, description="content below this (infrasound, DC, rumble) counts as noise; 0 = off")

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
        box(power(side), p.predict_frames, p.predict_bins) + TINY)
    est = stft.inverse(gain * (mid - kappa * side), x.shape[1])
    return np.stack([est, est])


def percussive(x: np.ndarray, sr: int, p: HpssParams) -> np.ndarray:
    stft = Stft(sr, p.hop_s)
    spec = stft.forward(x)
    mag = np.sqrt(power(spec).mean(axis=0))  # one mask for all channels keeps the stereo image
    _, perc = hp_masks(mag, stft.frames_for(p.time_s), max(3, int(round(p.freq_hz * stft.win / sr))), p.mask_power)
    return stft.inverse(perc * spec, x.shape[1])


def repeating_model(mag: np.ndarray, stft: Stft, neighbours: int, min_sep_frames: int,
                    window_frames: int) -> np.ndarray:
    """REPET-SIM: each frame's background is the median of its most similar frames (cosine, log-band features)
    among those at most `window_frames` away."""
    frames, bins = mag.shape
    f = stft.freqs()
    edges = np.geomspace(40.0, stft.sr / 2, 97)
    band = np.clip(np.searchsorted(edges, f) - 1, 0, 95)
    pool = np.zeros((bins, 96), dtype=np.float32)
    pool[np.arange(bins), band] = 1
    feat = np.log1p(100 * (mag @ pool))
    feat -= feat.mean(axis=1, keepdims=True)
    feat /= np.linalg.norm(feat, axis=1, keepdims=True) + 1e-9
    if frames < 2:
        return np.zeros_like(mag)
    k = max(1, min(neighbours, frames - 1))
    # a clip too short to look min_sep_frames away for k frames looks as far as it can (never at the frame itself)
    sep = max(0, min(min_sep_frames, (frames - k - 1) // 2))
    window = max(window_frames, sep + k)  # enough candidates for k neighbours
    out = np.empty_like(mag)
    for s in range(0, frames, 256):  # in row blocks, against the columns their window reaches
        rows = np.arange(s, min(frames, s + 256))
        lo, hi = max(0, s - window), min(frames, rows[-1] + window + 1)
        cols = np.arange(lo, hi)
        sim = feat[rows] @ feat[lo:hi].T
        dist = np.abs(rows[:, None] - cols[None, :])
        sim[(dist <= sep) | (dist > window)] = -np.inf
        nearest = lo + np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[rows] = np.median(mag[nearest], axis=1)
    return np.minimum(mag, out)


def foreground(x: np.ndarray, sr: int, p: RepetSimParams) -> np.ndarray:
    stft = Stft(sr, p.hop_s)
    spec = stft.forward(x)
    mag = np.sqrt(power(spec).mean(axis=0))
    fg = np.maximum(mag - repeating_model(mag, stft, p.neighbours, stft.frames_for(p.min_separation_s),
                                          stft.frames_for(p.window_s)), 0)
    if x.shape[0] == 2 and p.centre_threshold_db is not None:
        mid, side = (spec[0] + spec[1]) / 2, (spec[0] - spec[1]) / 2
        tau = 10 ** (p.centre_threshold_db / 10)
        fg *= 1 / (1 + box(power(side), 1) / (tau * box(power(mid), 1) + TINY))
    if p.harmonic:
        harm, _ = hp_masks(mag, stft.frames_for(0.3), max(3, int(round(300 * stft.win / sr))), 2.0)
        fg *= harm
    fg[:, stft.freqs() < p.lowcut_hz] = 0
    bg = np.maximum(mag - fg, 0)
    fg, bg = fg ** p.mask_power, bg ** p.mask_power
    return stft.inverse(fg / (fg + bg + TINY) * spec, x.shape[1])


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
        obs = spec[:, :, f0:f0 + block].transpose(2, 0, 1).astype(np.complex128)  # (b, ch, frames)
        past = np.zeros((obs.shape[0], ch * taps, frames), dtype=np.complex128)
        for k in range(taps):
            shift = delay + k
            if shift < frames:
                past[:, k * ch:(k + 1) * ch, shift:] = obs[:, :, :frames - shift]
        est = obs
        for _ in range(iterations):
            lam = np.maximum(power(est).mean(axis=1), 1e-10)  # (b, frames)
            weighted = past / lam[:, None, :]
            cov = np.einsum("fat,fbt->fab", weighted, np.conj(past))
            cross = np.einsum("fat,fdt->fad", weighted, np.conj(obs))
            load = 1e-6 * np.trace(cov, axis1=1, axis2=2).real / (ch * taps) + 1e-12
            cov += load[:, None, None] * np.eye(ch * taps)
            filt = np.linalg.solve(cov, cross)
            est = obs - np.einsum("fad,fat->fdt", np.conj(filt), past)
        out[:, :, f0:f0 + block] = est.transpose(1, 2, 0)
    return out


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
    r = np.correlate(w, w, "full")[w.size - 1:w.size + order]
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
            a = ar_fit(s[max(0, start - block):min(n, stop + block)], order)
            lo = max(0, start - order)
            e = np.convolve(s[lo:stop], a, "full")[start - lo:stop - lo]
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
            unknown[start - lo:stop - lo] = True
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
Method = tuple[type[_Params], tuple[str, ...], Callable[[np.ndarray, int, _Params], np.ndarray]]
METHODS: dict[str, Method] = {
    "centre": (CentreParams, ("centre", "sides"), centre),
    "hpss": (HpssParams, ("percussive", "harmonic"), percussive),
    "repet_sim": (RepetSimParams, ("foreground", "background"), foreground),
    "wpe": (WpeParams, ("dry", "reverb"), dry),
    "spectral_gate": (GateParams, ("clean", "noise"), clean),
    "universal_enhancer": (EnhancerParams, ("enhanced",), enhanced),
}


class DspSeparator(Separator):
    """Runs the method `params.method` names; the first source is estimated, a second is the input minus it."""

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict) -> None:
        super().__init__(spec, files, params)
        name = params.get("method")
        if name not in METHODS:
            raise ChainError(f"dsp model {spec.id!r} names method {name!r}; known: {sorted(METHODS)}",
                             model_id=spec.id, method=name)
        model, self.sources, self._fn = METHODS[name]
        if set(self.sources) != set(spec.sources):
            raise ChainError(f"dsp method {name!r} makes {list(self.sources)}, but {spec.id!r} declares {list(spec.sources)}",
                             model_id=spec.id)
        try:
            self.config = model.model_validate(params)
        except ValidationError as exc:
            raise ChainError(f"invalid params for {spec.id!r}: {exc}", model_id=spec.id) from exc
        context = self.config.context_seconds()
        self.streamable = context is not None
        # whole seconds, so chunk boundaries stay on the frame grid (see the module docstring)
        self.chunk_context = float(math.ceil(context)) if context is not None else 0.0
        self.min_chunk_seconds = self.config.min_chunk_seconds()

    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        x = np.asarray(audio, dtype=np.float64)
        first = self._fn(x, sample_rate, self.config)
        out = {self.sources[0]: first.astype(np.float32)}
        if len(self.sources) == 2:
            out[self.sources[1]] = (x - first).astype(np.float32)
        return out
