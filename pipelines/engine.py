"""The engine: run a preset's chain on audio, with warm models, streaming, a step cache and silence skipping.

This is the one place that walks a chain: it resolves each step's model through the
model store (once per process: models stay warm), adapts sample rate and channels to
what the model takes, runs it block by block so memory follows the chunk and the model and
not the track, and assembles the preset's stems. Audio moves as `Signal`s (see
`pipelines.audio`): arrays for callers that hand the engine arrays (`run`, `run_model`),
float32 files in a scratch directory for the worker (`run_stream`, `stream_model`).

How a step is cut is its separator's own business (`Separator.stream`, `families/base.py`):
Demucs, RoFormer, Spleeter, the MDX-style ONNX models, WPE, REPET-SIM and the recurrent speech
models stream on the whole signal's own grid or state, so the output equals a whole-signal run
(within float rounding) for any block size; the DSP methods that look a few seconds away run on
chunks with that much context each side (`chunked`), which is exact for them; a prompt-guided
model (SAM Audio) runs through `stream_prompted`, in its own overlapping chunks joined by
cross-fades (see `families/sam.py`). No registry model takes the whole track at once (`whole`).
Resampling to and from a model's rate streams too (soxr's streaming resampler gives the same
samples as a one-shot resample).

With a `StepCache`, a step whose input samples, model, weights and parameters were seen
before is read back instead of run (see `pipelines/cache.py`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import audio as A, signals as S
from .cache import StepCache, step_key
from .ensemble import combine
from .errors import PresetError
from .families.base import PromptedSeparator, Separator
from .modelstore import ModelStore
from .presets import MIX, Chain, Preset, load_catalogue
from .progress import Progress, part_of
from .registry import FAMILIES, ModelSpec, get_spec
from .signals import ArraySignal, ArrayWriter, FrameWriter, Signal


@dataclass
class Result:
    stems: dict[str, Any]  # arrays from `run`, Signals from `run_stream`
    made_by: dict[str, str]
    chain_index: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per model, and "load_models"


def _never() -> bool:
    return False


class _Sinks:
    """Where a run writes the signals it makes: arrays in memory, or FrameFiles in `workdir`."""

    _ids = itertools.count()

    def __init__(self, workdir: Path | None, digest: bool) -> None:
        self.workdir = Path(workdir) if workdir is not None else None
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.digest = digest

    def writer(self, name: str, channels: int, frames: int | None) -> ArrayWriter | FrameWriter:
        if self.workdir is None:
            if frames is None:
                raise ValueError("an in-memory writer needs its length")
            return ArrayWriter(channels, frames, digest=self.digest)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        return FrameWriter(self.workdir / f"{next(self._ids):04d}-{safe}.npy", channels, frames, digest=self.digest)


def resolve_device(setting: str) -> str:
    """`auto` is the first CUDA device when torch is installed and sees one, else the CPU."""
    if setting != "auto":
        return setting
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


class Engine:
    """Holds warm separators for one process. Create one per worker process and reuse it."""

    def __init__(
        self, store: ModelStore, device: str = "cpu", chunk_seconds: float = 30.0, cache: StepCache | None = None
    ) -> None:
        self.store = store
        self._device_setting, self._device = device, ""
        self.chunk_seconds = chunk_seconds
        self.cache = cache
        self._warm: dict[str, Separator] = {}
        self.load_seconds = 0.0  # total spent loading models in this process
        self.loads = 0  # models loaded in this process (a warm worker stops adding to it)
        self.model_seconds = 0.0  # total spent running models (their forward passes and chunk I/O), loads excluded

    @property
    def device(self) -> str:
        """The device the models run on, resolved on first use: "auto" imports torch to ask for CUDA, and a
        process that runs only CPU families (a `cpu` worker: imports, DSP, speech, delivery) never needs it. So
        no job of such a worker imports torch inside its time limit, where a soft limit landing mid-import
        leaves a process that can never import torch again."""
        if not self._device:
            self._device = resolve_device(self._device_setting)
        return self._device

    def device_for(self, spec: ModelSpec) -> str:
        """Where a model runs: the device for a family that runs on one, the CPU for a CPU-only family."""
        return self.device if FAMILIES[spec.family].gpu else "cpu"

    # -- models ------------------------------------------------------------------
    def separator(self, model_id: str) -> Separator:
        if model_id not in self._warm:
            t0 = time.perf_counter()
            spec = get_spec(model_id)
            files = self.store.resolve(spec)  # named error if missing or corrupt
            sep = spec.separator_class()(spec, files, self.store.params_for(spec))
            sep.setup(self.device_for(spec))
            self._warm[model_id] = sep
            self.load_seconds += time.perf_counter() - t0
            self.loads += 1
        return self._warm[model_id]

    def pick_chain(self, preset: Preset) -> tuple[int, Chain]:
        return preset.pick_chain(self.store.missing)

    def identity(self, model_id: str) -> dict[str, Any]:
        """What besides the input decides a model's output: params, pinned weight hashes, package version."""
        spec = get_spec(model_id)
        entry = self.store.entry(model_id) or {}
        package = None
        if spec.requires_package:
            try:
                package = importlib.metadata.version(spec.requires_package)
            except importlib.metadata.PackageNotFoundError:
                package = "?"
        # the device type too, for a family that runs on one: params such as precision "auto" resolve per device,
        # and GPU kernels round differently (a CPU-only family's output is the same wherever it runs)
        return {
            "params": self.store.params_for(spec),
            "weights": entry.get("files", {}),
            "package": package,
            "device": self.device_for(spec).split(":")[0],
        }

    # -- arrays in, arrays out ---------------------------------------------------
    def run_model(
        self,
        model_id: str,
        audio: np.ndarray,
        sr: int,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] = _never,
    ) -> dict[str, np.ndarray]:
        """One model on (channels, n) audio at `sr`; sources come back at `sr` with audio's channels."""
        out = self.stream_model(model_id, ArraySignal(audio), sr, None, progress, cancelled)
        return {s: np.ascontiguousarray(sig.to_array(), dtype=np.float32) for s, sig in out.items()}

    def run(
        self,
        preset_name: str,
        audio: np.ndarray,
        sr: int,
        chain_index: int | None = None,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] = _never,
    ) -> Result:
        """Run a preset (its first usable chain, or `chain_index`) and return its stems as arrays."""
        result = self.run_stream(preset_name, ArraySignal(audio), sr, None, chain_index, progress, cancelled)
        result.stems = {k: np.ascontiguousarray(v.to_array(), dtype=np.float32) for k, v in result.stems.items()}
        return result

    # -- signals in, signals out -------------------------------------------------
    def run_stream(
        self,
        preset_name: str,
        audio: Signal,
        sr: int,
        workdir: Path | None,
        chain_index: int | None = None,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] = _never,
    ) -> Result:
        """Run a preset on a Signal; stems come back as Signals (FrameFiles in `workdir`, or arrays if None)."""
        preset = load_catalogue().preset(preset_name)
        if chain_index is None:
            chain_index, chain = self.pick_chain(preset)
        else:
            chain = preset.chains[chain_index]
        timings: dict[str, float] = {}
        loaded = self.load_seconds
        produced: dict[str, Signal] = {MIX: audio}
        n_steps = len(chain.steps)
        for i, step in enumerate(chain.steps):
            outs, k = [], len(step.models)
            for j, model_id in enumerate(step.models):  # an ensemble's models one after the other
                t0 = time.perf_counter()
                step_progress = part_of(progress, (i + j / k) / n_steps, 1 / n_steps / k)
                outs.append(self.stream_model(model_id, produced[step.input], sr, workdir, step_progress, cancelled))
                timings[model_id] = timings.get(model_id, 0.0) + time.perf_counter() - t0
            if step.ensemble is None:
                produced.update(outs[0])
            else:
                produced.update({s: combine(step.ensemble.method, [o[s] for o in outs]) for s in step.sources})
        timings["load_models"] = self.load_seconds - loaded
        stems = assemble_signals(chain, produced)
        made_by = {name: chain.made_by(name) for name in stems}
        if preset.drop_silent:
            stems = {k: v for k, v in stems.items() if not S.signal_is_silent(v, 1e-4)}
        return Result(stems, made_by, chain_index, timings)

    def stream_model(
        self,
        model_id: str,
        audio: Signal,
        sr: int,
        workdir: Path | None,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] = _never,
    ) -> dict[str, Signal]:
        """One model on a Signal at `sr`; its sources as Signals at `sr` with the input's channels."""
        spec = get_spec(model_id)
        if S.signal_is_silent(audio):  # nothing to separate: do not spend a model on silence
            return {s: S.ZeroSignal(audio.channels, audio.frames) for s in spec.sources}
        key = None
        if self.cache is not None:
            key = step_key(model_id, S.content_digest(audio), sr, audio.channels, audio.frames, self.identity(model_id))
            hit = self.cache.get(key)
            if hit is not None:
                if progress:
                    progress(1.0, f"{model_id}, cached")
                return hit
        sinks = _Sinks(workdir, digest=self.cache is not None)
        sep = self.separator(model_id)
        t0 = time.perf_counter()
        if spec.channels == 1 and audio.channels > 1:  # mono model: one pass per channel
            per = []
            for c in range(audio.channels):
                sub = part_of(progress, c / audio.channels, 1 / audio.channels)
                per.append(self._run_adapted(sep, spec, S.PickChannel(audio, c), sr, sinks, sub, cancelled))
            out: dict[str, Signal] = {s: S.StackSignal([p[s] for p in per]) for s in spec.sources}
        else:
            out = self._run_adapted(sep, spec, audio, sr, sinks, progress, cancelled)
        self.model_seconds += time.perf_counter() - t0
        if key is not None and self.cache is not None:
            self.cache.put(key, out)
        return out

    def stream_prompted(
        self,
        model_id: str,
        audio: Signal,
        sr: int,
        workdir: Path | None,
        prompt: str,
        anchors: list[tuple[str, float, float]],
        progress: Progress | None = None,
        cancelled: Callable[[], bool] = _never,
    ) -> dict[str, Signal]:
        """A prompt-guided model (SAM Audio) on a Signal at `sr`: what `prompt` describes, and the rest.

        The input is folded to the model's mono and resampled to its rate, and the sources come
        back at `sr` with the input's channels (the mono result on each); `anchors` are
        ("+"/"-", start, end) in seconds of `audio`. Stereo modes are built on this by
        `pipelines.custom`.
        """
        spec = get_spec(model_id)
        if S.signal_is_silent(audio):
            return {s: S.ZeroSignal(audio.channels, audio.frames) for s in spec.sources}
        key = None
        if self.cache is not None:
            identity = {**self.identity(model_id), "prompt": prompt.strip(), "anchors": [list(a) for a in anchors]}
            key = step_key(model_id, S.content_digest(audio), sr, audio.channels, audio.frames, identity)
            hit = self.cache.get(key)
            if hit is not None:
                if progress:
                    progress(1.0, f"{model_id}, cached")
                return _layout(hit, audio.channels)
        sep = self.separator(model_id)
        if not isinstance(sep, PromptedSeparator):
            raise PresetError(f"model {model_id!r} does not take a prompt", model_id=model_id)
        prompted = sep
        mono = audio if audio.channels == 1 else S.ChannelsSignal(audio, 1)

        def blocks(x: Signal, rate: int) -> Iterator[dict[str, np.ndarray]]:
            return prompted.extract_stream(x, rate, prompt, anchors, max(1, int(self.chunk_seconds * rate)), cancelled)

        out = self._run_adapted(
            sep, spec, mono, sr, _Sinks(workdir, digest=self.cache is not None), progress, cancelled, blocks
        )
        if key is not None and self.cache is not None:
            self.cache.put(key, out)
        return _layout(out, audio.channels)

    def _run_adapted(
        self,
        sep: Separator,
        spec: ModelSpec,
        audio: Signal,
        sr: int,
        sinks: _Sinks,
        progress: Progress | None,
        cancelled: Callable[[], bool],
        blocks: Callable[[Signal, int], Iterator[dict[str, np.ndarray]]] | None = None,
    ) -> dict[str, Signal]:
        channels, n = audio.channels, audio.frames
        rate = spec.sample_rate or sr
        x, resampled = audio, None
        if rate != sr:  # one streaming pass to a copy at the model's rate (read again by the separator)
            x = resampled = A.resample_signal(
                audio,
                sr,
                rate,
                sinks.writer(f"{spec.id}-input", channels, None) if sinks.workdir is not None else _GrowingWriter(),
            )
        if spec.channels is not None and x.channels != spec.channels:
            x = S.ChannelsSignal(x, spec.channels)
        writers = {s: sinks.writer(f"{spec.id}-{s}", channels, n) for s in spec.sources}
        back: dict[str, A.StreamResampler] = {}
        try:
            done = 0
            size = max(1, int(self.chunk_seconds * rate))  # the block size a separator is asked for
            source = blocks(x, rate) if blocks is not None else sep.stream(x, rate, size, cancelled)
            for block in source:
                for s in spec.sources:
                    y = block[s]
                    if rate != sr:
                        if s not in back:
                            back[s] = A.StreamResampler(rate, sr, y.shape[0])
                        y = back[s].push(y)
                    writers[s].write(_channels_back(y, channels))
                done += next(iter(block.values())).shape[1]
                if progress:
                    progress(min(1.0, done / max(1, x.frames)), spec.id)
            for s, r in back.items():
                writers[s].write(_channels_back(r.flush(), channels))
            return {s: w.close() for s, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abandon()
            raise
        finally:
            if resampled is not None:
                resampled.close()
                path = getattr(resampled, "path", None)
                if path is not None:
                    path.unlink(missing_ok=True)


class _GrowingWriter:
    """An in-memory writer of unknown length (a resampled copy of an in-memory input)."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []

    def write(self, block: np.ndarray) -> None:
        self.blocks.append(block)

    def close(self) -> ArraySignal:
        return ArraySignal(np.concatenate(self.blocks, axis=1).astype(np.float32, copy=False))

    def abandon(self) -> None:
        self.blocks = []


def _layout(mono: dict[str, Signal], channels: int) -> dict[str, Signal]:
    """Mono sources in a source's channel layout (the same samples on each channel)."""
    return mono if channels == 1 else {s: S.ChannelsSignal(sig, channels) for s, sig in mono.items()}


def _channels_back(y: np.ndarray, channels: int) -> np.ndarray:
    return S.to_channels(y, channels) if y.shape[0] != channels else y


def assemble_signals(chain: Chain, produced: dict[str, Signal]) -> dict[str, Signal]:
    """The preset's stems from the chain's sources (sums, computed per read, where a stem is several sources)."""
    if chain.outputs == "*":
        return {s: produced[s] for s in chain.steps[-1].sources}
    stems: dict[str, Signal] = {}
    for name, sources in chain.outputs.items():
        if isinstance(sources, str):
            stems[name] = produced[sources]
        else:
            stems[name] = S.SumSignal([produced[s] for s in sources])
    return stems
