"""The centre of a stereo mix: a soft mask of mid over side, with the side-like part of the mid regressed out."""

from __future__ import annotations

import numpy as np

from .features import TINY, box, power
from .grid import Stft
from .params import CentreParams


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
