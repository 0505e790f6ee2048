"""The engine: run a preset's chain on audio, with warm models, chunking and silence skipping.

This is the one place that walks a chain: it resolves each step's model through the
model store (once per process: models stay warm), adapts sample rate and channels to
what the model takes, runs it chunk by chunk with overlap so memory follows the chunk and
not the track, and assembles the preset's stems. Callers (worker, CLI, tests, bench) hand
it arrays and get arrays back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import audio as A
from .errors import Cancelled
from .families.base import Separator
from .modelstore import ModelStore
from .presets import MIX, Chain, Preset, load_catalogue
from .registry import ModelSpec, get_spec

Progress = Callable[[float, str], None]


@dataclass
class Result:
    stems: dict[str, np.ndarray]
    made_by: dict[str, str]
    chain_index: int
    timings: dict[str, float] = field(default_factory=dict)


def _never() -> bool:
    return False


class Engine:
    """Holds warm separators for one process. Create one per worker process and reuse it."""

    def __init__(self, store: ModelStore, device: str = "cpu", chunk_seconds: float = 30.0) -> None:
        self.store = store
        self.device = device
        self.chunk_seconds = chunk_seconds
        self._warm: dict[str, Separator] = {}
        self.load_seconds = 0.0  # total spent loading models in this process

    # -- models ------------------------------------------------------------------
    def separator(self, model_id: str) -> Separator:
        if model_id not in self._warm:
            t0 = time.perf_counter()
            spec = get_spec(model_id)
            files = self.store.resolve(spec)  # named error if missing or corrupt
            sep = spec.separator_class()(spec, files, self.store.params_for(spec))
            sep.setup(self.device)
            self._warm[model_id] = sep
            self.load_seconds += time.perf_counter() - t0
        return self._warm[model_id]

    def pick_chain(self, preset: Preset) -> tuple[int, Chain]:
        return preset.pick_chain(self.store.missing)

    # -- running -----------------------------------------------------------------
    def run_model(self, model_id: str, audio: np.ndarray, sr: int,
                  progress: Progress | None = None, cancelled: Callable[[], bool] = _never) -> dict[str, np.ndarray]:
        """One model on (channels, n) audio at `sr`; sources come back at `sr` with audio's channels."""
        spec = get_spec(model_id)
        if A.is_silent(audio):  # nothing to separate: do not spend a model on silence
            return {s: np.zeros_like(audio) for s in spec.sources}
        sep = self.separator(model_id)
        if spec.channels == 1 and audio.shape[0] > 1:  # mono model: one pass per channel
            per = [self._run_adapted(sep, spec, audio[c:c + 1], sr, None, cancelled) for c in range(audio.shape[0])]
            if progress:
                progress(1.0, model_id)
            return {s: np.concatenate([p[s] for p in per], axis=0) for s in spec.sources}
        return self._run_adapted(sep, spec, audio, sr, progress, cancelled)

    def _run_adapted(self, sep: Separator, spec: ModelSpec, audio: np.ndarray, sr: int,
                     progress: Progress | None, cancelled: Callable[[], bool]) -> dict[str, np.ndarray]:
        channels = audio.shape[0]
        rate = spec.sample_rate or sr
        x = A.to_channels(A.resample(audio, sr, rate), spec.channels)
        if sep.streamable:
            out = run_chunked(lambda a: sep.separate(a, rate), x, spec.sources, int(self.chunk_seconds * rate),
                              int(sep.chunk_context * rate), progress=progress and (lambda f: progress(f, spec.id)),
                              cancelled=cancelled)
        else:
            if cancelled():
                raise Cancelled("job cancelled")
            out = sep.separate(x, rate)
            if progress:
                progress(1.0, spec.id)
        result = {}
        for source in spec.sources:
            y = A.resample(out[source], rate, sr)
            y = A.to_channels(y, channels) if y.shape[0] != channels else y
            result[source] = _fit(y, audio.shape[1])
        return result

    def run(self, preset_name: str, audio: np.ndarray, sr: int, chain_index: int | None = None,
            progress: Progress | None = None, cancelled: Callable[[], bool] = _never) -> Result:
        """Run a preset (its first usable chain, or `chain_index`) and return its stems."""
        preset = load_catalogue().preset(preset_name)
        if chain_index is None:
            chain_index, chain = self.pick_chain(preset)
        else:
            chain = preset.chains[chain_index]
        timings: dict[str, float] = {}
        produced: dict[str, np.ndarray] = {MIX: audio}
        n_steps = len(chain.steps)
        for i, step in enumerate(chain.steps):
            t0 = time.perf_counter()
            step_progress = progress and (lambda f, m, i=i: progress((i + f) / n_steps, m))
            produced.update(self.run_model(step.model, produced[step.input], sr, step_progress, cancelled))
            timings[step.model] = timings.get(step.model, 0.0) + time.perf_counter() - t0
        stems = assemble(chain, produced)
        made_by = {name: chain.made_by(name) for name in stems}
        if preset.drop_silent:
            stems = {k: v for k, v in stems.items() if not A.is_silent(v, 1e-4)}
        return Result(stems, made_by, chain_index, timings)


def assemble(chain: Chain, produced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The preset's stems from the chain's sources (sums where a stem is several sources)."""
    if chain.outputs == "*":
        return {s: produced[s] for s in chain.steps[-1].spec.sources}
    stems = {}
    for name, sources in chain.outputs.items():
        if isinstance(sources, str):
            stems[name] = produced[sources]
        else:
            stems[name] = np.sum([produced[s] for s in sources], axis=0).astype(np.float32)
    return stems


def _fit(y: np.ndarray, n: int) -> np.ndarray:
    if y.shape[1] == n:
        return y.astype(np.float32, copy=False)
    if y.shape[1] > n:
        return np.ascontiguousarray(y[:, :n], dtype=np.float32)
    return np.pad(y, ((0, 0), (0, n - y.shape[1]))).astype(np.float32)


def run_chunked(fn: Callable[[np.ndarray], dict[str, np.ndarray]], audio: np.ndarray, sources: tuple[str, ...],
                chunk: int, context: int, progress: Callable[[float], None] | None = None,
                cancelled: Callable[[], bool] = _never) -> dict[str, np.ndarray]:
    """Apply `fn` to overlapping chunks and stitch the outputs.

    Each chunk is `chunk` samples of new audio plus `context` samples of neighbouring audio
    on each side; the neighbours are discarded after processing, so the result equals a
    whole-signal run for any method whose output depends on at most `context` samples of
    surroundings. Silent chunks are not sent through `fn`. Cancellation is checked between chunks.
    """
    n = audio.shape[1]
    if n <= chunk + 2 * context:
        if cancelled():
            raise Cancelled("job cancelled")
        out = fn(audio)
        if progress:
            progress(1.0)
        return {s: _fit(out[s], n) for s in sources}
    result = {s: np.zeros_like(audio) for s in sources}
    starts = range(0, n, chunk)
    for k, start in enumerate(starts):
        if cancelled():
            raise Cancelled("job cancelled")
        stop = min(n, start + chunk)
        lo, hi = max(0, start - context), min(n, stop + context)
        piece = audio[:, lo:hi]
        if not A.is_silent(piece):
            out = fn(piece)
            for s in sources:
                result[s][:, start:stop] = _fit(out[s], hi - lo)[:, start - lo: stop - lo]
        if progress:
            progress((k + 1) / len(starts))
    return result
