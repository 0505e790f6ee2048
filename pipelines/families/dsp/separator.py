"""The `dsp` family's separator: runs the method an entry's `params.method` names (see the package's docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ChainError
from ...registry import ModelSpec
from ..base import Blocks, Separator, chunked, whole
from ..params import params_model, validated
from .centre import centre
from .enhancer import enhanced
from .gate import clean
from .hpss import percussive
from .params import METHOD_PARAMS
from .repet_sim import foreground, foreground_stream
from .wpe import dry, dry_stream

if TYPE_CHECKING:
    from ...signals import Signal

# each method takes its own params model (params.py's METHOD_PARAMS), hence Any for the params
Whole = Callable[[np.ndarray, int, Any], np.ndarray]
# (signal, rate, params, block samples, cancelled) -> the first source in consecutive blocks, equal to `Whole`'s
Stream = Callable[["Signal", int, Any, int, Callable[[], bool]], Iterator[np.ndarray]]
Method = tuple[tuple[str, ...], Whole, Stream | None]
METHODS: dict[str, Method] = {
    "centre": (("centre", "sides"), centre, None),
    "hpss": (("percussive", "harmonic"), percussive, None),
    "repet_sim": (("foreground", "background"), foreground, foreground_stream),
    "wpe": (("dry", "reverb"), dry, dry_stream),
    "spectral_gate": (("clean", "noise"), clean, None),
    "universal_enhancer": (("enhanced",), enhanced, None),
}
assert set(METHODS) == set(METHOD_PARAMS), "every method has its params model, and only those"


class DspSeparator(Separator):
    """Runs the method `params.method` names; the first source is estimated, a second is the input minus it.

    Methods with a look of a few seconds run on chunks with that much context each side (`chunked`);
    WPE and REPET-SIM, whose estimates reach across the track, stream on the track's own frames.
    """

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict[str, Any]) -> None:
        super().__init__(spec, files, params)
        params_model(spec, params)  # an unknown method is refused here as the registry refuses it
        name = params["method"]
        model, (self.sources, self._fn, self._stream) = METHOD_PARAMS[name], METHODS[name]
        if set(self.sources) != set(spec.sources):
            raise ChainError(
                f"dsp method {name!r} makes {list(self.sources)}, but {spec.id!r} declares {list(spec.sources)}",
                model_id=spec.id,
            )
        self.config = validated(model, spec, params)
        look = self.config.context_seconds()
        # whole seconds, so chunk boundaries stay on the frame grid (see the module docstring)
        self.context = float(math.ceil(look)) if look is not None else None  # None: cannot be cut

    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        x = np.asarray(audio, dtype=np.float64)
        return self._sources(x, self._fn(x, sample_rate, self.config))

    def stream(self, audio: Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]) -> Blocks:
        if self._stream is not None:
            return self._stream_sources(audio, sample_rate, block, cancelled)
        if self.context is None:
            return whole(self, audio, sample_rate, cancelled)
        return chunked(self, audio, sample_rate, block, self.context, cancelled)

    def _stream_sources(
        self, audio: Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]
    ) -> Iterator[dict[str, np.ndarray]]:
        done, stream = 0, self._stream
        assert stream is not None  # `stream` comes here only for a method that streams
        for first in stream(audio, sample_rate, self.config, block, cancelled):
            if first.shape[1]:
                yield self._sources(audio.read(done, done + first.shape[1]).astype(np.float64), first)
                done += first.shape[1]

    def _sources(self, x: np.ndarray, first: np.ndarray) -> dict[str, np.ndarray]:
        out = {self.sources[0]: first.astype(np.float32)}
        if len(self.sources) == 2:
            out[self.sources[1]] = (x - first).astype(np.float32)
        return out
