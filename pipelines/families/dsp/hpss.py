"""Harmonic/percussive separation by median filtering across time and across frequency."""

from __future__ import annotations

import numpy as np

from .features import hp_masks, power
from .grid import Stft
from .params import HpssParams


def percussive(x: np.ndarray, sr: int, p: HpssParams) -> np.ndarray:
    stft = Stft(sr, p.hop_s)
    spec = stft.forward(x)
    mag = np.sqrt(power(spec).mean(axis=0))  # one mask for all channels keeps the stereo image
    _, perc = hp_masks(mag, stft.frames_for(p.time_s), max(3, int(round(p.freq_hz * stft.win / sr))), p.mask_power)
    return stft.inverse(perc * spec, x.shape[1])
