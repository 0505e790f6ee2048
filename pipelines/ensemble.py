"""Ensembles: one source from several models' estimates of it, combined per read like the engine's other derived signals.

Two methods, chosen in preset data (`presets.Ensemble`):
- `mean_wave`: the mean of the waveforms (python-audio-separator's `avg_wave`);
- `mean_magnitude`: in a Hann-windowed STFT (2048 points, hop 512), each bin's magnitude is
  the mean of the estimates' magnitudes and its phase that of their mean (the phase of
  `avg_fft`, the magnitude of an average spectrogram); back by weighted overlap-add.
Both are computed when a range is read, from the estimates' same range plus, for the STFT,
the frames that overlap it. Frames sit on the whole signal's grid (frame k centred on sample
k * hop, zeros beyond the ends), so a range read alone gives the same samples as the whole
signal read at once, and memory follows the read, not the track. Identical estimates give
themselves back (the window's overlap-add is normalised by the summed squared window).
"""

from __future__ import annotations

import numpy as np

from .signals import Signal

N_FFT, HOP = 2048, 512


class MeanSignal(Signal):
    """The mean of signals of one shape, computed per read."""

    def __init__(self, parts: list[Signal]) -> None:
        self.parts = parts
        self.channels, self.frames = parts[0].channels, parts[0].frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        mean: np.ndarray = (np.sum([p.read(lo, hi) for p in self.parts], axis=0) / len(self.parts)).astype(np.float32)
        return mean


class MagnitudeMeanSignal(MeanSignal):
    """Signals combined in the STFT domain: mean magnitude, phase of the mean (see the module docstring)."""

    def __init__(self, parts: list[Signal], n_fft: int = N_FFT, hop: int = HOP) -> None:
        super().__init__(parts)
        self.n_fft, self.hop = n_fft, hop
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)  # periodic Hann

    def read(self, lo: int, hi: int) -> np.ndarray:
        half, hop, n_fft = self.n_fft // 2, self.hop, self.n_fft
        if hi <= lo:
            return np.zeros((self.channels, 0), np.float32)
        first = -(-(lo - half + 1) // hop)  # frames k with [k*hop - half, k*hop + half) overlapping [lo, hi)
        last = (hi - 1 + half) // hop
        start, stop = first * hop - half, last * hop + half
        spectra = [np.fft.rfft(self._frames(p, start, stop), axis=-1) for p in self.parts]
        mean = np.mean(spectra, axis=0)
        magnitude = np.mean([np.abs(s) for s in spectra], axis=0)
        combined = magnitude * np.exp(1j * np.angle(mean))
        frames = np.fft.irfft(combined, n=n_fft, axis=-1).astype(np.float32) * self.window
        out = np.zeros((self.channels, stop - start), np.float32)
        norm = np.zeros(stop - start, np.float32)
        for i in range(frames.shape[1]):  # overlap-add in frame order
            out[:, i * hop : i * hop + n_fft] += frames[:, i]
            norm[i * hop : i * hop + n_fft] += self.window**2
        return out[:, lo - start : hi - start] / norm[lo - start : hi - start]

    def _frames(self, part: Signal, start: int, stop: int) -> np.ndarray:
        """(channels, frames, n_fft) windowed frames of `part` over [start, stop), zeros outside the signal."""
        x = np.zeros((self.channels, stop - start), np.float32)
        a, b = max(0, start), min(self.frames, stop)
        if a < b:
            x[:, a - start : b - start] = part.read(a, b)
        count = (stop - start - self.n_fft) // self.hop + 1
        index = np.arange(count)[:, None] * self.hop + np.arange(self.n_fft)
        return x[:, index] * self.window


def combine(method: str, parts: list[Signal]) -> Signal:
    """The ensemble of `parts` (one source as each model estimated it) by `method`."""
    if method == "mean_wave":
        return MeanSignal(parts)
    if method == "mean_magnitude":
        return MagnitudeMeanSignal(parts)
    raise ValueError(f"unknown ensemble method {method!r}")
