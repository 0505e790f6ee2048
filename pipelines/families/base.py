"""The step contract every model family implements: load once, then stream a signal's sources.

The engine calls one method, `Separator.stream`; how a family cuts the signal is its own business,
with two helpers here for the families that do not stream on their own grid: `whole` (the signal
at once) and `chunked` (chunks with enough context each side to equal a whole run).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import Cancelled
from ..registry import ModelSpec

if TYPE_CHECKING:
    from ..signals import Signal

Blocks = Iterator[dict[str, np.ndarray]]  # each source for consecutive blocks covering the signal, in order


class Separator(ABC):
    """One model (or DSP method) ready to run.

    The engine creates one instance per model id per process and keeps it (weights are
    loaded once, lazily, by `setup`). `stream` takes a signal already at `spec.sample_rate`
    (when set) and with `spec.channels` channels (when set), read a range at a time, and
    yields each source for consecutive blocks of about `block` samples, so memory follows
    the block and the model, not the track; its output equals `separate` on the whole signal
    (within float rounding). `separate` is the same on an array held whole (tests, benches,
    `run_model`). Only `forward`-like work belongs on the device.
    """

    # `setup` derives files from the weights into the model store (demucs's ONNX Runtime graphs):
    # `stems models install` then loads the model once so that no job pays for building them
    derives_files: bool = False

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict[str, Any]) -> None:
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

    def stream(self, audio: Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]) -> Blocks:
        """The sources of `audio` block by block (see the class docstring); raise `Cancelled` when
        `cancelled()` says so. By default the whole signal at once: a family that can do better says how."""
        return whole(self, audio, sample_rate, cancelled)


def whole(sep: Separator, audio: Signal, sample_rate: int, cancelled: Callable[[], bool]) -> Blocks:
    """`separate` on the whole signal, as one block (memory grows with the track)."""
    if cancelled():
        raise Cancelled("job cancelled")
    n = audio.frames
    out = sep.separate(np.ascontiguousarray(audio.read(0, n)), sample_rate)
    yield {s: fit(out[s], n) for s in sep.spec.sources}


def chunked(
    sep: Separator, audio: Signal, sample_rate: int, block: int, context_s: float, cancelled: Callable[[], bool]
) -> Blocks:
    """`separate` on blocks of `block` samples with `context_s` seconds of neighbouring audio each side, cut
    back to the block: equal to a whole run for a method that looks no further. Silent pieces are not run."""
    from ..audio import is_silent

    n, context = audio.frames, int(context_s * sample_rate)
    if n <= block + 2 * context:
        yield from whole(sep, audio, sample_rate, cancelled)
        return
    for start in range(0, n, block):
        if cancelled():
            raise Cancelled("job cancelled")
        stop = min(n, start + block)
        lo, hi = max(0, start - context), min(n, stop + context)
        piece = audio.read(lo, hi)
        if is_silent(piece):
            yield {s: np.zeros((audio.channels, stop - start), np.float32) for s in sep.spec.sources}
            continue
        out = sep.separate(piece, sample_rate)
        yield {s: fit(out[s], hi - lo)[:, start - lo : stop - lo] for s in sep.spec.sources}


def fit(y: np.ndarray, n: int) -> np.ndarray:
    """(channels, samples) `y` as float32, cut or zero-padded to `n` samples (a model may give a few more or fewer)."""
    if y.shape[1] == n:
        return y.astype(np.float32, copy=False)
    if y.shape[1] > n:
        return np.ascontiguousarray(y[:, :n], dtype=np.float32)
    return np.pad(y, ((0, 0), (0, n - y.shape[1]))).astype(np.float32)


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
