"""WPE dereverberation: delayed linear prediction per bin, with a diffuse-field post-filter; whole (`dry`,
the reference) and streamed (`dry_stream`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import Cancelled
from .features import TINY, box, coherence, coherence_of_noise, power, steering
from .grid import Stft, Synthesis, around
from .params import WpeParams

if TYPE_CHECKING:
    from ...signals import Signal


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
        cov: Any = 0  # sums of the blocks' statistics: arrays once the first block is in
        cross: Any = 0
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
