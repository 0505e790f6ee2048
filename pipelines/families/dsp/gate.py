"""A spectral gate: the noise power per bin from its floor (and, in stereo, the channel orthogonal to the main
direction), and a gain that keeps what stands above it."""

from __future__ import annotations

from typing import cast

import numpy as np
from scipy.ndimage import uniform_filter1d

from .features import TINY, box, floor_bias, noise_floor, power, steering
from .grid import Stft
from .params import GateParams


def highpass(freqs: np.ndarray, corner: float) -> np.ndarray:
    """Magnitude of a 4th-order Butterworth high-pass (1 everywhere when `corner` is 0)."""
    if corner <= 0:
        return np.ones_like(freqs, dtype=np.float32)
    return cast(np.ndarray, (1 / np.sqrt(1 + (corner / np.maximum(freqs, 1e-3)) ** 8)).astype(np.float32))


def gate_gain(spec: np.ndarray, noise: np.ndarray, stft: Stft, p: GateParams) -> np.ndarray:
    level = box(power(spec), p.smooth_frames, p.smooth_bins)
    gain = np.maximum(np.maximum(1 - noise / np.maximum(level, TINY), 0) ** p.exponent, p.min_gain)
    return cast(np.ndarray, gain * highpass(stft.freqs(), p.highpass_hz))


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
        return cast(np.ndarray, np.exp(uniform_filter1d(np.log(a + TINY), 33, axis=-1, mode="nearest")))

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
    return cast(np.ndarray, (1 - mono) * spatial + mono * per_channel)


def clean(x: np.ndarray, sr: int, p: GateParams) -> np.ndarray:
    stft = Stft(sr, p.hop_s)
    spec = stft.forward(x)
    return stft.inverse(gate_gain(spec, noise_psd(spec, stft, p), stft, p) * spec, x.shape[1])
