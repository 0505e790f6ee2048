"""The step contract every model family implements: load once, then separate arrays."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..registry import ModelSpec


class Separator(ABC):
    """One model (or DSP method) ready to run.

    The engine creates one instance per model id per process and keeps it (weights are
    loaded once, lazily, by `setup`). `separate` takes float32 audio shaped
    (channels, samples) already at `spec.sample_rate` (when set) and with `spec.channels`
    channels (when set), and returns one float32 array of the same shape per source in
    `spec.sources`. Only `forward`-like work belongs on the device.

    `chunk_context` is how many seconds of neighbouring audio the method needs to give
    the same output on a chunk as on the whole signal (0 for frame-local methods); the
    engine's chunked runner overlaps chunks by at least that much. `streamable = False`
    asks the engine to run the method on the whole signal at once.
    """

    chunk_context: float = 1.0
    streamable: bool = True

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict) -> None:
        self.spec = spec
        self.files = files  # verified weight files by name (empty for DSP / package weights)
        self.params = params  # spec.params, overridden by the store manifest's params
        self.device = "cpu"

    def setup(self, device: str = "cpu") -> None:
        """Load weights onto `device`. Called once per process before the first `separate`."""
        self.device = device

    @abstractmethod
    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        """Split `audio` (channels, samples) into `spec.sources`."""
