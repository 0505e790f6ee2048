"""The step contract every model family implements: load once, then separate arrays."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..registry import ModelSpec

if TYPE_CHECKING:
    from ..signals import Signal


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
    forbids that cutting: the engine then runs the method on the whole signal at once
    (memory grows with the track), unless `separate_stream` offers an exact incremental run.
    """

    chunk_context: float = 1.0
    streamable: bool = True
    min_chunk_seconds: float = 0.0  # the engine's chunks are at least this long (see chunk_context)
    # setup derives files from the weights into the model store (demucs's ONNX Runtime graphs):
    # `stems models install` then loads the model once so that no job pays for building them
    derives_files: bool = False

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

    def separate_stream(
        self, audio: Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]
    ) -> Iterator[dict[str, np.ndarray]] | None:
        """Optional: separate a long signal incrementally, equal to `separate` on the whole of it.

        `audio` is read a range at a time (`audio.read(lo, hi)`, already at the model's rate
        and channels); the iterator yields each source for consecutive blocks of about
        `block` samples covering the signal in order, so memory follows the block and the
        model, not the track. Raise `pipelines.errors.Cancelled` when `cancelled()` says so.
        Return None (the default) when the method cannot do this; the engine then
        chunks `separate` by `streamable` and `chunk_context`.
        """
        return None


Anchor = tuple[str, float, float]  # ("+" or "-", start s, end s) in the audio's own time base


class PromptedSeparator(Separator):
    """A separator that extracts what a text prompt names (SAM Audio): the engine runs it through
    `extract_stream` only, and a model that is not one refuses a prompt (`Engine.extract`)."""

    @abstractmethod
    def extract_stream(
        self,
        audio: Signal,
        sample_rate: int,
        prompt: str,
        anchors: list[Anchor],
        block: int,
        cancelled: Callable[[], bool],
    ) -> Iterator[dict[str, np.ndarray]]:
        """The target and residual of `prompt` for consecutive blocks of about `block` samples of `audio`
        (mono, at the model's rate), `anchors` marking where the target sounds ("+") or not ("-")."""
