"""What every speech backend is: enhance a mono signal, or stream it a block at a time through one
recurrent state (`FrameStream`), with the model's delay compensated."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # the streams of the backends that do not fit FrameStream
    from .ensemble import EnsembleStream
    from .gtcrn import GtcrnStream


class Backend(ABC):
    """One speech model: `enhance` maps a 1-D float32 signal to its aligned speech estimate."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, files: dict[str, Path], params: dict[str, Any]) -> None:
        self.files = files
        self.params = self.Params.model_validate(params)

    @abstractmethod
    def load(self, device: str) -> None:
        """Load weights (once per process)."""

    def enhance(self, x: np.ndarray) -> np.ndarray:
        """Enhanced speech, same length as `x` and aligned with it: the stream fed `x` in one block."""
        stream = self.stream()
        return np.concatenate([stream.push(x), stream.finish()])

    @abstractmethod
    def stream(self) -> FrameStream | GtcrnStream | EnsembleStream:
        """A fresh streaming enhancer (fresh recurrent state): `push` blocks, then `finish`; `close` frees it."""


class FrameStream:
    """A recurrent enhancer fed block by block; its concatenated output is `enhance` of the whole input.

    `process` takes a whole number of `size`-sample frames (in order, one state throughout)
    and returns as many output samples, lagging the input by `delay`. `close` frees the state.
    """

    def __init__(
        self,
        size: int,
        delay: int,
        process: Callable[[np.ndarray], np.ndarray],
        close: Callable[[], object] = lambda: None,
    ) -> None:
        self.size, self.delay, self._process, self._close = size, delay, process, close
        self._pending = np.zeros(0, np.float32)
        self._skip = delay  # output samples still to drop: the model's lag
        self._fed = self._emitted = 0

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed samples; returns the output samples that are final (none until `delay` have passed)."""
        self._fed += x.size
        buf = np.concatenate([self._pending, x.astype(np.float32)])
        whole = buf.size - buf.size % self.size
        self._pending = buf[whole:]
        return self._emit(self._process(buf[:whole]) if whole else np.zeros(0, np.float32))

    def finish(self) -> np.ndarray:
        """The last samples: zeros fed until `delay` more have come out, to a whole frame."""
        try:
            total = -(-(self._fed + self.delay) // self.size) * self.size
            tail = np.concatenate([self._pending, np.zeros(total - self._fed, np.float32)])  # to `total` processed
            out = self._emit(self._process(tail) if tail.size else np.zeros(0, np.float32))
            return out[: self._fed - (self._emitted - out.size)]
        finally:
            self.close()

    def close(self) -> None:
        """Free the recurrent state (once; also for a stream abandoned mid-way)."""
        close, self._close = self._close, (lambda: None)
        close()

    def _emit(self, out: np.ndarray) -> np.ndarray:
        cut = min(self._skip, out.size)
        self._skip -= cut
        out = out[cut:]
        self._emitted += out.size
        return out


def ort_session(path: Path, device: str) -> Any:  # an onnxruntime.InferenceSession
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    # frame-by-frame streaming: one thread avoids thread-pool wake-ups on tiny tensors
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
