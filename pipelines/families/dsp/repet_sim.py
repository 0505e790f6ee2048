"""REPET-SIM: the repeating background from the median of similar frames, the foreground by its mask;
whole (`foreground`, the reference) and streamed (`foreground_stream`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, cast

import numpy as np

from .features import TINY, box, hp_masks, power
from .grid import Stft, Synthesis, around
from .params import RepetSimParams

if TYPE_CHECKING:
    from ...signals import Signal


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
    return cast(np.ndarray, np.minimum(mag, similar_median(mag, band_features(mag, stft), 0, frames, 0, reach)))


def magnitude(spec: np.ndarray) -> np.ndarray:
    return cast(np.ndarray, np.sqrt(power(spec).mean(axis=0)))  # one mask for all channels keeps the stereo image


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
    return cast(np.ndarray, fg / (fg + bg + TINY))


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
