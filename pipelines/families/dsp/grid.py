"""The STFT on a grid that chunking preserves: a hop that divides the rate, frames analysed from the
ranges they cover (`Stft.frames_of`), slabs with context (`around`) and a streaming overlap-add (`Synthesis`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ...errors import Cancelled

if TYPE_CHECKING:
    from ...signals import Signal


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
        out: np.ndarray = self.acc[:, first - self.lo : max(first, final) - self.lo]
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
