"""Frame-domain features the methods share: smoothing, power, noise floors, stereo steering and coherence,
harmonic/percussive masks. Finite windows only, so a chunk with context equals the whole."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import cast

import numpy as np
from scipy.ndimage import median_filter, minimum_filter1d, uniform_filter1d

from .grid import Stft

TINY = 1e-20  # keeps ratios of powers finite in digital silence (float32 powers stay far above it otherwise)


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
    return cast(np.ndarray, z.real**2 + z.imag**2)


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
    return cast(np.ndarray, np.minimum(np.sqrt(power(b)) / np.sqrt(np.maximum(a * d, 0) + TINY), 1.0))


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
