"""DTLN: its two ONNX stages, frame by frame through their recurrent states."""

from __future__ import annotations

import numpy as np

from .base import Backend, FrameStream, ort_session


class Dtln(Backend):
    """DTLN's two ONNX stages (frequency-domain mask, then a learned time-domain block), block 512, hop 128.

    This is the reference real-time loop of breizhn/DTLN; its output lags by block - hop samples.
    """

    BLOCK, HOP = 512, 128

    def load(self, device: str) -> None:
        self._s1 = ort_session(self.files["dtln_model_1.onnx"], device)
        self._s2 = ort_session(self.files["dtln_model_2.onnx"], device)

    def stream(self) -> FrameStream:
        block, hop = self.BLOCK, self.HOP
        s1_in, s1_state = (i.name for i in self._s1.get_inputs())
        s2_in, s2_state = (i.name for i in self._s2.get_inputs())
        st = {
            "state1": np.zeros(self._s1.get_inputs()[1].shape, np.float32),
            "state2": np.zeros(self._s2.get_inputs()[1].shape, np.float32),
            "in_buf": np.zeros(block, np.float32),
            "out_buf": np.zeros(block, np.float32),
        }

        def process(x: np.ndarray) -> np.ndarray:
            out = np.empty_like(x)
            for i in range(0, x.size, hop):
                st["in_buf"] = np.concatenate([st["in_buf"][hop:], x[i : i + hop]])
                spec = np.fft.rfft(st["in_buf"])
                mag = np.abs(spec).astype(np.float32)
                mask, st["state1"] = self._s1.run(None, {s1_in: mag[None, None, :], s1_state: st["state1"]})
                masked = np.fft.irfft(spec * mask[0, 0], n=block).astype(np.float32)
                y, st["state2"] = self._s2.run(None, {s2_in: masked[None, None, :], s2_state: st["state2"]})
                st["out_buf"] = np.concatenate([st["out_buf"][hop:], np.zeros(hop, np.float32)]) + y[0, 0]
                out[i : i + hop] = st["out_buf"][:hop]
            return out

        return FrameStream(hop, block - hop, process)
