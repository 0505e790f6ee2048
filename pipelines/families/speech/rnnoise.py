"""RNNoise through pyrnnoise's bundled library: 480-sample frames, two frames of delay compensated."""

from __future__ import annotations

import ctypes

import numpy as np

from .base import Backend, FrameStream


class RNNoise(Backend):
    """RNNoise (pyrnnoise's bundled library), 480-sample frames on int16-scaled floats.

    Called directly on float frames rather than through pyrnnoise's helpers, which round to
    int16. The output lags the input by two frames.
    """

    DELAY = 960
    SCALE = 32768.0

    def load(self, device: str) -> None:
        from pyrnnoise import rnnoise

        self._rn = rnnoise
        self._size = rnnoise.FRAME_SIZE

    def stream(self) -> FrameStream:
        rn, size = self._rn, self._size
        f32 = ctypes.POINTER(ctypes.c_float)
        state = rn.create()

        def process(x: np.ndarray) -> np.ndarray:
            x = x * self.SCALE
            out = np.empty_like(x)
            for i in range(0, x.size, size):
                frame_in, frame_out = x[i : i + size], out[i : i + size]
                # rnnoise_process_frame(state, out, in)
                rn.lib.rnnoise_process_frame(state, frame_out.ctypes.data_as(f32), frame_in.ctypes.data_as(f32))
            return out / self.SCALE

        return FrameStream(size, self.DELAY, process, lambda: rn.destroy(state))
