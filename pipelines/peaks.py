"""Waveform peaks in audiowaveform's JSON form, accumulated block by block while audio streams past.

The form is audiowaveform's version 2 (https://github.com/bbc/audiowaveform, doc/DataFormat.md):
`{version, channels, sample_rate, samples_per_pixel, bits, length, data}`, where `data` holds, for
each of the `length` points and then each channel, the min and the max sample of that point's
`samples_per_pixel` frames as integers of `bits` bits. Pages draw a waveform from it without
downloading or decoding the audio; peaks.js and wavesurfer.js read it directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

POINTS = 2048  # points per waveform: enough for a wide screen at 2x, ~50 kB of JSON
MIN_SAMPLES_PER_PIXEL = 32
BITS = 16
FORM = f"audiowaveform-2/{POINTS}/{BITS}"  # part of cache keys of files that include peaks: a change misses old ones


def resolution(frames: int | None, points: int = POINTS) -> int:
    """The resolution giving about `points` points for `frames` frames (256 when the length is unknown)."""
    if not frames:
        return 256
    return max(MIN_SAMPLES_PER_PIXEL, math.ceil(frames / points))


class PeakAccumulator:
    """Feed (channels, n) float blocks in order; `result()` is the peaks of everything fed.

    `channels=None` takes the channel count of the first block (a decoder may fold channels).
    """

    def __init__(
        self,
        sample_rate: int,
        channels: int | None,
        frames: int | None = None,
        bits: int = BITS,
        samples_per_pixel: int | None = None,
    ) -> None:
        if bits not in (8, 16):
            raise ValueError("bits must be 8 or 16")
        self.sample_rate, self.channels, self.bits = int(sample_rate), channels, bits
        self.spp = samples_per_pixel or resolution(frames)
        self._points: list[np.ndarray] = []  # (points, channels, 2) float32 min/max
        self._rest = np.zeros((channels or 1, 0), dtype=np.float32)  # frames of the unfinished point

    def feed(self, block: np.ndarray) -> None:
        if self.channels is None:
            self.channels = block.shape[0]
            self._rest = np.zeros((self.channels, 0), dtype=np.float32)
        if block.shape[0] != self.channels:
            raise ValueError(f"block has {block.shape[0]} channels, expected {self.channels}")
        x = np.concatenate([self._rest, block.astype(np.float32, copy=False)], axis=1) if self._rest.size else block
        whole = x.shape[1] // self.spp * self.spp
        if whole:
            self._add(x[:, :whole].reshape(self.channels, -1, self.spp))
        self._rest = np.array(x[:, whole:], dtype=np.float32)

    def _add(self, frames: np.ndarray) -> None:  # (channels, points, spp)
        self._points.append(np.stack([frames.min(axis=2).T, frames.max(axis=2).T], axis=2))

    def result(self) -> dict[str, Any]:
        points = list(self._points)
        if self._rest.shape[1]:  # the last, partial point
            rest = self._rest[:, None, :]
            points.append(np.stack([rest.min(axis=2).T, rest.max(axis=2).T], axis=2))
        channels = self.channels or 1
        mm = np.concatenate(points) if points else np.zeros((0, channels, 2), dtype=np.float32)
        scale = (1 << (self.bits - 1)) - 1
        lo, hi = -(1 << (self.bits - 1)), scale
        # floor the minimum and ceil the maximum so a quiet stem never draws flatter than it is
        q = np.stack([np.floor(mm[..., 0] * scale), np.ceil(mm[..., 1] * scale)], axis=2)
        data = np.clip(np.nan_to_num(q), lo, hi).astype(np.int32)
        return {
            "version": 2,
            "channels": channels,
            "sample_rate": self.sample_rate,
            "samples_per_pixel": self.spp,
            "bits": self.bits,
            "length": int(mm.shape[0]),
            "data": data.reshape(-1).tolist(),
        }

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.result(), separators=(",", ":")))
        return path
