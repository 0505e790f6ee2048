"""BS-RoFormer and Mel-Band RoFormer checkpoints in the Music-Source-Separation-Training format, run as its inference runs them.

Music-Source-Separation-Training (ZFTurbo's "MSST", where these checkpoints are published)
saves a model as a state dict (`.ckpt`) beside a YAML config: `model` holds the class's
constructor arguments, `audio.chunk_size` the samples per forward, `inference.num_overlap`,
`inference.batch_size` and `training.instruments` / `target_instrument` the outputs. The
model classes are those of the `bs-roformer` package (lucidrains) at 0.3.10, whose layers
and layer names are those of MSST's own copy of them; what MSST added on top is handled
here, each explicitly (see `split_model_config`): `zero_dc` (on by default in MSST: the DC
bin of each output spectrogram is zeroed; done here by zeroing the DC entries of the
estimated mask, which gives the same product), `mlp_expansion_factor` (the package's own
`MaskEstimator` takes it; its `BSRoformer` does not pass it on), and keys that change
nothing at inference. Keys that would change the model and that the package cannot honour
(`linear_transformer_depth` > 0, `skip_connection`, `use_pope`) are refused by name.
`to_package_layout` maps checkpoints saved in the other layer layout that was published
(see there).

Inference is MSST's `demix` (utils/model_utils.py, "generic" mode) for the same config:
- the mix is reflect-padded by `border = chunk_size - step` at each end when it is longer
  than `2 * border`, with `step = chunk_size // num_overlap`;
- chunks of `chunk_size` start every `step` samples of the padded mix; a short last chunk is
  reflect-padded to `chunk_size` when longer than half a chunk, zero-padded otherwise;
- each output chunk is weighted by a window with linear fades of `chunk_size // 10` samples,
  summed, and divided by the summed weights (0 where they are 0, as its `nan_to_num`); the
  window of the chunks of one forward batch of `inference.batch_size` chunks is one: a batch
  whose last chunk is the first chunk of the mix has no fade-in, the last batch no fade-out.
  So `batch_size` decides the output; the chunks per forward here (`batch`) do not;
- `inference.normalize`: the mix is normalised by the mean and std of its mono downmix and
  the outputs are scaled back.
A model with one target (`training.target_instrument`) may declare a second source that is
the mix minus the target (`params.residual`, MSST's `--extract_instrumental`). MSST's
inference.py subtracts the still-normalised target from the mix when `normalize` is on;
here the scaled-back target is subtracted, so the two sources sum to the mix.

`stream` walks that grid over the whole signal, reading each chunk from the
signal, and gives out each block once every chunk overlapping it has been added, so memory
follows the chunk and the batch, not the track, and the output is the whole-signal run's
(`separate` is the same walk in one block). A chunk of digital silence is not run: a masked
spectrogram of zeros is zero. With normalisation on, a first streaming pass computes the
mix's statistics (float64).

On a GPU the forward runs under autocast: float16, as MSST's demix does when
`training.use_amp` (its default); a forward whose output is not finite runs again in
float32, so an overflow costs time, never a corrupt stem.
"""

from __future__ import annotations

import inspect
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import signals as S
from ..errors import Cancelled, ChainError
from ..registry import ModelSpec
from .base import Blocks
from .params import ROFORMER_GPU_PRECISION as GPU_PRECISION, RoformerParams
from .torch_model import TorchSeparator

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # librosa's and the package's import-time notices
    from bs_roformer import BSRoformer, MelBandRoformer

# bs-roformer 0.3.10's Attend enters `torch.backends.cuda.sdp_kernel`, which torch now deprecates
# with a FutureWarning on every forward; the attention it runs is unchanged.
warnings.filterwarnings("ignore", message=r".*sdp_kernel\(\)` is deprecated", category=FutureWarning)

ARCHITECTURES: dict[str, type] = {"bs_roformer": BSRoformer, "mel_band_roformer": MelBandRoformer}


class _Section(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # MSST configs carry training-only keys


class _AudioSection(_Section):
    chunk_size: int = Field(ge=10)
    sample_rate: int = 44100  # inference.py's default
    num_channels: int = 2


class _TrainingSection(_Section):
    instruments: tuple[str, ...]
    target_instrument: str | None = None
    use_amp: bool = True  # demix's getattr default


class _InferenceSection(_Section):
    batch_size: int = Field(ge=1)
    num_overlap: int = Field(ge=1)
    chunk_size: int | None = Field(None, ge=10)  # demix prefers it to audio.chunk_size
    normalize: bool = False


class MsstConfig(BaseModel):
    """The parts of an MSST YAML config that decide inference (the `model` section is checked by `split_model_config`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    audio: _AudioSection
    model: dict[str, Any]
    training: _TrainingSection
    inference: _InferenceSection

    @property
    def targets(self) -> tuple[str, ...]:
        """What the model outputs, in order: MSST's prefer_target_instrument."""
        t = self.training.target_instrument
        return (t,) if t else self.training.instruments


class _TupleLoader(yaml.SafeLoader):  # type: ignore[misc]  # yaml is Any here: no types-PyYAML installed
    """YAML's safe loader plus the `!!python/tuple` tag MSST configs use (its FullLoader reads them as tuples)."""


_TupleLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


def load_config(path: Path) -> MsstConfig:
    try:
        return MsstConfig.model_validate(yaml.load(Path(path).read_text(), Loader=_TupleLoader))
    except (yaml.YAMLError, ValidationError, TypeError) as exc:
        raise ChainError(f"{path} is not a Music-Source-Separation-Training config: {exc}", file=str(path)) from exc


# config.model keys the package's classes do not take, and why each may be passed over at inference
_INFERENCE_NEUTRAL = {
    "use_torch_checkpoint": "gradient checkpointing: recomputes activations in training, same outputs",
    "sage_attention": "a quantised kernel for the same attention (the weights are the same; exact attention runs here)",
}


def split_model_config(arch: str, model: dict[str, Any]) -> tuple[dict[str, Any], bool, int]:
    """(package constructor kwargs, zero_dc, mlp_expansion_factor) from a config's `model` section.

    Raises ChainError, naming the key, for any key that would change the model and that the
    package's class cannot honour, and for keys nobody knows.
    """
    cls = ARCHITECTURES[arch]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}  # type: ignore[misc]
    kwargs: dict[str, Any] = {}
    zero_dc, mlp_expansion_factor = True, 4  # MSST's defaults
    for key, value in model.items():
        if key in accepted:
            kwargs[key] = tuple(value) if isinstance(value, list) else value  # the classes type-check tuples
        elif key == "zero_dc":
            zero_dc = bool(value)
        elif key == "mlp_expansion_factor":
            mlp_expansion_factor = int(value)
        elif key in _INFERENCE_NEUTRAL:
            continue
        elif key == "linear_transformer_depth" and not value:
            continue  # MSST then builds no linear-attention layers, as the package
        elif key in ("linear_transformer_depth", "skip_connection", "use_pope") and value:
            raise ChainError(
                f"config model.{key}: {value!r} needs layers that bs-roformer 0.3.10's {cls.__name__} "
                "does not have; this checkpoint cannot be served by the roformer family",
                key=key,
            )
        elif key in ("skip_connection", "use_pope"):
            continue  # off: the package's model
        else:
            raise ChainError(
                f"config model.{key} is not an argument of {cls.__name__} nor a key MSST adds; "
                "remove it from the config if it does not change the model",
                key=key,
            )
    return kwargs, zero_dc, mlp_expansion_factor


def build_model(arch: str, model: dict[str, Any]) -> torch.nn.Module:
    """The package's model for a config's `model` section, with MSST's additions (see the module docstring)."""
    cls = ARCHITECTURES[arch]
    kwargs, zero_dc, mlp_expansion_factor = split_model_config(arch, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the constructor's window-less STFT, only counting bins
        try:
            net = cls(**kwargs)
        except (TypeError, ValueError, AssertionError) as exc:  # beartype's and the classes' own checks
            raise ChainError(f"config model section does not build a {cls.__name__}: {exc}") from exc
    if mlp_expansion_factor != 4:  # the class's MaskEstimator takes it; rebuild the estimators with it
        estimator = sys.modules[cls.__module__].MaskEstimator
        depth = kwargs.get(
            "mask_estimator_depth",
            inspect.signature(cls.__init__).parameters["mask_estimator_depth"].default,  # type: ignore[misc]
        )
        net.mask_estimators = torch.nn.ModuleList(
            estimator(
                dim=kwargs["dim"],
                dim_inputs=net.band_split.dim_inputs,
                depth=depth,
                mlp_expansion_factor=mlp_expansion_factor,
            )
            for _ in range(len(net.mask_estimators))
        )
    if zero_dc:
        _zero_dc(net)
    module: torch.nn.Module = net.eval()
    return module


def _zero_dc(net: Any) -> None:  # a package network: its attributes are not typed
    """Zero the DC bin of every output spectrogram, as MSST's `zero_dc` does after masking.

    The mask estimators' outputs are (..., (bins c)) over the bins the bands read, in order:
    all of them for BS-RoFormer, `freq_indices` for Mel-Band. A bin index below the channel
    count is a DC bin ((f s) layout); zeroing its mask entries (real and imaginary) makes
    every masked DC value 0 (a Mel-Band bin in several bands: their mean, 0).
    """
    channels = net.audio_channels
    bins = getattr(net, "freq_indices", None)
    positions = torch.arange(channels) if bins is None else torch.nonzero(bins < channels).flatten()
    entries = torch.cat([2 * positions, 2 * positions + 1])

    def hook(_module: torch.nn.Module, _inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., entries.to(out.device)] = 0
        return out

    for estimator in net.mask_estimators:
        estimator.register_forward_hook(hook)


_WRAPPERS = ("state", "state_dict", "model_state_dict")  # what MSST's load_start_checkpoint unwraps
_LEGACY_SLOT = re.compile(r"^layers\.(\d+)\.([12])\.")


def to_package_layout(state: Any) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint's state dict in the package's layer names, and the name of the layout it came in.

    - `msst`: MSST's layout, the package's: `layers.<i>.0` the time transformer, `.1` the
      frequency transformer of block i.
    - `lucidrains-0.4`: bs-roformer 0.4's, in MSST from 23 to 25 January 2024 (its commit
      7ecda8a "Fix for compatibility with old models and weights" went back): every block has
      an empty linear-attention slot first, so the transformers are `.1` and `.2`.
    Wrapped checkpoints (`state`, `state_dict`, `model_state_dict`) are unwrapped as MSST does.
    """
    for key in _WRAPPERS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ChainError("the checkpoint is not a state dict of tensors")
    slots = {int(m.group(2)) for k in state if (m := _LEGACY_SLOT.match(k))}
    if 2 not in slots:
        return dict(state), "msst"
    return {
        _LEGACY_SLOT.sub(lambda m: f"layers.{m.group(1)}.{int(m.group(2)) - 1}.", k): v for k, v in state.items()
    }, "lucidrains-0.4"


def load_roformer(arch: str, config: MsstConfig, checkpoint: Path) -> tuple[torch.nn.Module, str]:
    """The model with the checkpoint's weights (eval mode, CPU) and the checkpoint's layout name."""
    net = build_model(arch, config.model)
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
    except Exception as exc:  # torch raises several kinds for a file that is not a checkpoint
        raise ChainError(f"{checkpoint} is not a readable PyTorch state dict: {exc}", file=str(checkpoint)) from exc
    state, layout = to_package_layout(raw)
    missing, unexpected = (sorted(s) for s in (set(net.state_dict()) - set(state), set(state) - set(net.state_dict())))
    if missing or unexpected:
        raise ChainError(
            f"{checkpoint} ({layout} layout) does not fit its config's {type(net).__name__}: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}",
            file=str(checkpoint),
            missing=len(missing),
            unexpected=len(unexpected),
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes that differ from the config's
        raise ChainError(f"{checkpoint} does not fit its config: {exc}", file=str(checkpoint)) from exc
    return net, layout


class Grid:
    """MSST demix's chunk grid and windows over a mix of `frames` samples."""

    def __init__(self, frames: int, chunk: int, num_overlap: int, group: int) -> None:
        self.frames, self.chunk, self.group = frames, chunk, group
        self.step = chunk // num_overlap
        if self.step < 1:
            raise ChainError(f"num_overlap {num_overlap} leaves no step in a chunk of {chunk} samples")
        border = chunk - self.step
        self.border = border if frames > 2 * border and border > 0 else 0  # demix reflect-pads only then
        self.padded = frames + 2 * self.border
        self.count = -(-self.padded // self.step)  # chunks start at 0, step, ... while < padded
        self.fade = chunk // 10
        fadein, fadeout = torch.linspace(0, 1, self.fade), torch.linspace(1, 0, self.fade)  # demix's own values
        window = torch.ones(chunk)
        window[chunk - self.fade :] = fadeout
        window[: self.fade] = fadein
        self.base = window

    def offset(self, k: int) -> int:
        return k * self.step

    def length(self, k: int) -> int:
        return min(self.chunk, self.padded - self.offset(k))

    def window(self, k: int) -> torch.Tensor:
        """Chunk k's weights: the fade window, changed as demix changes it for k's forward batch."""
        last = min((k // self.group + 1) * self.group, self.count) - 1
        window = self.base
        if last == 0:
            window = window.clone()
            window[: self.fade] = 1
        elif last == self.count - 1:
            window = window.clone()
            window[self.chunk - self.fade :] = 1
        return window[: self.length(k)]

    def source_index(self, lo: int, hi: int) -> np.ndarray:
        """Mix sample of each padded position in [lo, hi) (torch's reflect padding: the edge sample once)."""
        i = np.arange(lo, hi) - self.border
        i = np.where(i < 0, -i, i)
        return np.where(i >= self.frames, 2 * (self.frames - 1) - i, i)


class RoformerSeparator(TorchSeparator[RoformerParams]):
    """One BS-RoFormer or Mel-Band RoFormer checkpoint, loaded once by `setup`, run on MSST's demix grid."""

    Params, family = RoformerParams, "roformer"

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict[str, Any]) -> None:
        super().__init__(spec, files, params)
        for name in (self.settings.config, self.settings.checkpoint):
            if name not in spec.files:
                raise ChainError(
                    f"params of {spec.id!r} name {name!r}, which is not among its files {list(spec.files)}",
                    model_id=spec.id,
                )
        self.layout: str | None = None  # the checkpoint's layer layout (see to_package_layout)

    # -- loading -----------------------------------------------------------------------------
    def setup(self, device: str = "cpu") -> None:
        super().setup(device)
        s = self.settings
        config = load_config(self.files[s.config])
        self._check(config)
        self.config = config
        self.chunk = s.chunk_size or config.inference.chunk_size or config.audio.chunk_size
        self.num_overlap = s.num_overlap or config.inference.num_overlap
        self.group = s.batch_size or config.inference.batch_size
        self.normalize = config.inference.normalize if s.normalize is None else s.normalize
        self.batch = self.group if s.batch == "auto" else s.batch
        self._use_precision(
            s.precision
            if s.precision != "auto"
            else (GPU_PRECISION if device.startswith("cuda") and config.training.use_amp else "float32"),
            device,
        )
        hop = config.model.get("stft_hop_length", 512)
        if self.chunk % hop and not config.model.get("match_input_audio_length"):
            # the package's inverse STFT then returns fewer samples than MSST's, which asks for the chunk's length
            raise ChainError(
                f"chunk_size {self.chunk} of {self.spec.id!r} is not a multiple of stft_hop_length {hop}",
                model_id=self.spec.id,
                chunk_size=self.chunk,
            )
        model, self.layout = load_roformer(s.arch, config, self.files[s.checkpoint])
        self.model = model.to(device)

    def _check(self, config: MsstConfig) -> None:
        """Fail at load time, naming the fix, on what would otherwise fail or mislabel mid-job."""
        spec, s = self.spec, self.settings
        stems = config.model.get("num_stems", 1)
        if stems != len(config.targets):
            raise ChainError(
                f"config of {spec.id!r} has num_stems {stems} but outputs {list(config.targets)}", model_id=spec.id
            )
        names = [s.sources.get(t, t) for t in config.targets]
        if s.residual is not None and len(names) != 1:
            raise ChainError(
                f"{spec.id!r}: a residual source needs one target, the config has {list(config.targets)}",
                model_id=spec.id,
            )
        declared = names + ([s.residual] if s.residual else [])
        if sorted(declared) != sorted(spec.sources):
            raise ChainError(
                f"config of {spec.id!r} outputs {list(config.targets)} (as sources {declared}) but the registry "
                f"declares {list(spec.sources)}; fix params.sources / params.residual or the registry",
                model_id=spec.id,
                config_outputs=list(config.targets),
                registry_sources=list(spec.sources),
            )
        stereo = bool(config.model.get("stereo", False))
        if config.audio.sample_rate != spec.sample_rate or (2 if stereo else 1) != spec.channels:
            raise ChainError(
                f"config of {spec.id!r} runs at {config.audio.sample_rate} Hz, {'stereo' if stereo else 'mono'}; "
                f"the registry says {spec.sample_rate} Hz with {spec.channels} channels",
                model_id=spec.id,
            )
        self.targets = names

    # -- running -----------------------------------------------------------------------------
    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        self._ready(sample_rate)
        blocks = list(
            self._stream(
                S.ArraySignal(np.ascontiguousarray(audio, dtype=np.float32)), max(1, audio.shape[1]), lambda: False
            )
        )
        if not blocks:
            return {s: np.zeros_like(audio, dtype=np.float32) for s in self.spec.sources}
        return blocks[0]

    def stream(self, audio: S.Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]) -> Blocks:
        self._ready(sample_rate)
        return self._stream(audio, max(1, block), cancelled)

    def _stream(self, audio: S.Signal, block: int, cancelled: Callable[[], bool]) -> Iterator[dict[str, np.ndarray]]:
        mean, std = _mono_stats(audio) if self.normalize else (np.float32(0), np.float32(1))
        chunks = _ChunkStream(
            self, audio, Grid(audio.frames, self.chunk, self.num_overlap, self.group), mean, std, cancelled
        )
        for lo in range(0, audio.frames, block):
            hi = min(audio.frames, lo + block)
            out = chunks.take(lo, hi)
            if self.normalize:
                out = out * std + mean
            sources = {name: out[k] for k, name in enumerate(self.targets)}
            if self.settings.residual:
                sources[self.settings.residual] = audio.read(lo, hi) - out[0]
            yield {name: np.ascontiguousarray(sources[name], dtype=np.float32) for name in self.spec.sources}

    @torch.inference_mode()
    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        """(batch, stems, channels, samples) for (batch, channels, samples)."""
        out = self._forward(self.model, chunks.to(self.device))
        return out[:, None] if out.dim() == 3 else out  # the package drops the stem axis of a one-stem model


class _ChunkStream:
    """The demix output of a signal, produced a range at a time on the whole signal's grid (see the module docstring)."""

    def __init__(
        self,
        sep: RoformerSeparator,
        audio: S.Signal,
        grid: Grid,
        mean: np.float32,
        std: np.float32,
        cancelled: Callable[[], bool],
    ) -> None:
        self.sep, self.audio, self.grid, self.mean, self.std, self.cancelled = sep, audio, grid, mean, std, cancelled
        self.stems = len(sep.targets)
        self.next = 0  # the next chunk to run
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # chunk -> (weighted output, weights)

    def take(self, lo: int, hi: int) -> np.ndarray:
        """The (stems, channels, hi - lo) output of mix samples [lo, hi); ranges must be asked for in order."""
        g = self.grid
        a, b = lo + g.border, hi + g.border  # in padded coordinates
        while self.next < g.count and g.offset(self.next) < b:
            self._run(range(self.next, min(g.count, self.next + self.sep.batch)))
        result = torch.zeros(self.stems, self.audio.channels, b - a)
        counter = torch.zeros(b - a)
        for k in sorted(self.pending):  # in chunk order, as demix adds them
            weighted, weights = self.pending[k]
            o = g.offset(k)
            s, e = max(a, o), min(b, o + weights.shape[0])
            if s < e:
                result[..., s - a : e - a] += weighted[..., s - o : e - o]
                counter[s - a : e - a] += weights[s - o : e - o]
        for k in [k for k, (_, w) in self.pending.items() if g.offset(k) + w.shape[0] <= b]:
            del self.pending[k]
        out = (result / counter).numpy()
        # 0 / 0 where no chunk weighs a sample, as demix
        return cast(np.ndarray, np.nan_to_num(out, copy=False, nan=0.0))

    def _read(self, k: int) -> np.ndarray:
        """Chunk k of the padded, normalised mix, padded to a whole chunk as demix pads its last chunks."""
        g = self.grid
        o = g.offset(k)
        index = g.source_index(o, o + g.length(k))
        first = int(index.min())
        part = self.audio.read(first, int(index.max()) + 1)[:, index - first]
        if self.sep.normalize:
            part = (part - self.mean) / self.std
        missing = g.chunk - part.shape[1]
        if missing:
            part = np.pad(part, ((0, 0), (0, missing)), mode="reflect" if part.shape[1] > g.chunk // 2 else "constant")
        return np.ascontiguousarray(part, dtype=np.float32)

    def _run(self, chunks: range) -> None:
        if self.cancelled():
            raise Cancelled("job cancelled")
        g = self.grid
        parts = {k: self._read(k) for k in chunks}
        live = [k for k, p in parts.items() if p.any()]  # a zero chunk's masked spectrogram is zero
        out = self.sep.forward(torch.from_numpy(np.stack([parts[k] for k in live]))).cpu() if live else None
        for k in chunks:
            window = g.window(k)
            n = window.shape[0]
            if k in live:
                assert out is not None  # a live chunk went through the network
                y = out[live.index(k), ..., :n]
                self.pending[k] = (y * window, window)
            else:
                self.pending[k] = (torch.zeros(self.stems, self.audio.channels, n), window)
        self.next = chunks.stop


def _mono_stats(audio: S.Signal) -> tuple[np.float32, np.float32]:
    """Mean and std (numpy's, ddof 0) of the mono downmix, as MSST's normalize_audio, in one streaming pass (float64)."""
    count, total, squares = 0, 0.0, 0.0
    shift: float | None = None  # subtract the first block's mean so the sum of squares keeps its precision
    for _, block in audio.blocks():
        mono = block.mean(0, dtype=np.float64)
        if not mono.size:
            continue
        if shift is None:
            shift = float(mono.mean())
        d = mono - shift
        count, total, squares = count + d.size, total + float(d.sum()), squares + float((d * d).sum())
    if not count:
        return np.float32(0), np.float32(1)
    mean = total / count
    std = math.sqrt(max(squares / count - mean * mean, 0.0))
    # a constant mix has std 0: MSST would divide by it; keep the mix's scale instead
    return np.float32(mean + (shift or 0.0)), np.float32(std if std > 0 else 1.0)
