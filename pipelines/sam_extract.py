"""Prompt-guided extraction of a selection with SAM Audio: stereo modes and spans around `Engine.stream_prompted`.

SAM Audio hears mono. `mono` folds the selection and returns the result on every channel;
`left_right` extracts from each channel on its own; `mid_sides` extracts from mid
((L + R) / 2) and side ((L - R) / 2) on their own and recombines (L = M + S, R = M - S), for
target and residual alike. Spans become the model's positive span anchors, moved from the
source's time base into the selection's. Everything streams: memory follows the model's chunk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import audio as A
from .engine import Engine, Progress, _never

STEREO_MODES = ("mono", "left_right", "mid_sides")


class MidSide(A.Signal):
    """Mid ((L + R) / 2, sign +1) or side ((L - R) / 2, sign -1) of a stereo signal, per read."""

    def __init__(self, signal: A.Signal, sign: int) -> None:
        self.signal, self.sign, self.channels, self.frames = signal, sign, 1, signal.frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        x = self.signal.read(lo, hi)
        return ((x[0:1] + self.sign * x[1:2]) / 2).astype(np.float32)


class LeftRight(A.Signal):
    """Stereo from mono mid and side signals: L = M + S, R = M - S, per read."""

    def __init__(self, mid: A.Signal, side: A.Signal) -> None:
        self.mid, self.side, self.channels, self.frames = mid, side, 2, mid.frames

    def read(self, lo: int, hi: int) -> np.ndarray:
        m, s = self.mid.read(lo, hi)[0], self.side.read(lo, hi)[0]
        return np.stack([m + s, m - s]).astype(np.float32)


def span_anchors(spans: Iterable, offset: float = 0.0) -> list[tuple[str, float, float]]:
    """Spans ({start, end} or objects with them, seconds of the source) as "+" anchors in the selection's time base."""
    out = []
    for span in spans or ():
        start, end = (span["start"], span["end"]) if isinstance(span, dict) else (span.start, span.end)
        out.append(("+", float(start) - offset, float(end) - offset))
    return out


def extract(engine: Engine, model_id: str, mix: A.Signal, sr: int, prompt: str, stereo_mode: str = "mono",
            spans: Iterable = (), offset: float = 0.0, workdir: Path | None = None,
            progress: Progress | None = None, cancelled: Callable[[], bool] = _never) -> dict[str, A.Signal]:
    """{"target", "residual"} of `mix` (the selection, at `sr`) for `prompt`, in `mix`'s channel layout.

    `spans` are in seconds of the source and `offset` is where the selection starts in it.
    """
    if stereo_mode not in STEREO_MODES:
        raise ValueError(f"stereo_mode must be one of {STEREO_MODES}, got {stereo_mode!r}")
    anchors = span_anchors(spans, offset)

    def run(x: A.Signal, part: int, parts: int) -> dict[str, A.Signal]:
        sub = progress and (lambda f, m: progress((part + f) / parts, m))
        return engine.stream_prompted(model_id, x, sr, workdir, prompt, anchors, sub, cancelled)

    if stereo_mode == "mono" or mix.channels == 1:
        return run(mix, 0, 1)
    if stereo_mode == "left_right":
        per = [run(A.PickChannel(mix, c), c, mix.channels) for c in range(mix.channels)]
        return {s: A.StackSignal([p[s] for p in per]) for s in per[0]}
    mid, side = run(MidSide(mix, +1), 0, 2), run(MidSide(mix, -1), 1, 2)
    return {s: LeftRight(mid[s], side[s]) for s in mid}
