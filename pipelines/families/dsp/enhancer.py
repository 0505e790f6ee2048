"""The universal enhancer: declipping, declicking, then the spectral gate, blended with the input by strength."""

from __future__ import annotations

from typing import cast

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.linalg import solve_toeplitz
from scipy.ndimage import binary_dilation

from .gate import gate_gain, noise_psd
from .grid import Stft, frame_hop
from .params import EnhancerParams


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
        return cast(np.ndarray, np.r_[1.0, np.zeros(order)])
    r[0] *= 1 + 1e-6  # a little white-noise loading keeps the system well conditioned
    return cast(np.ndarray, np.r_[1.0, -solve_toeplitz(r[:-1], r[1:])])


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
    return cast(np.ndarray, x + p.strength * (y - x))
