"""UVR / MDX-Net style ONNX separators: STFT, the network on overlapping segments, inverse STFT.

The network sees the lowest `dim_f` bins of a centred STFT (Hann window, `n_fft`, `hop`)
with real and imaginary parts stacked as channels, as UVR's MDX separator feeds it:
input (batch, 2 * channels, dim_f, frames) ordered L.re, L.im, R.re, R.im. The
spectrogram is cut into segments of `segment_frames` frames overlapping by `overlap`,
run a batch at a time, and the segment outputs are cross-faded (a window over the
segment's frames, normalised frame by frame) back into one spectrogram per output;
bins above `dim_f` stay zero, as in UVR.

`output` says what the network returns:
- `spectrogram`: the primary source's spectrogram (the other source is mix - primary);
- `mask`: a complex ratio mask (re, im per channel) applied to the mix's spectrogram;
- `multi`: one spectrogram per declared source, in the order of `spec.sources`.

The segment grid starts at the first sample of the signal and networks see a whole
segment at once, so a chunk's output depends on where the chunk starts: chunking by the
engine could not equal a whole run. Instead `stream` walks the whole signal's own grid, reading the frames of a batch
of segments, overlap-adding their inverse and giving out the samples no later segment
touches, so memory follows the batch and not the track, and the output is a whole run's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import signals as S
from ..errors import Cancelled, ChainError
from ..registry import ModelSpec
from .base import Blocks, Separator
from .params import MdxParams


def _overlap_add(acc: np.ndarray, frames: np.ndarray, first: int, hop: int) -> None:
    """Add `frames` (..., k, n_fft), frame i starting at sample (first + i) * hop, into `acc` (..., m * hop)."""
    k, n_fft = frames.shape[-2:]
    r = -(-n_fft // hop)
    if r * hop != n_fft:
        frames = np.concatenate([frames, np.zeros((*frames.shape[:-1], r * hop - n_fft), frames.dtype)], axis=-1)
    blocks = frames.reshape(*frames.shape[:-1], r, hop)
    acc_blocks = acc.reshape(*acc.shape[:-1], -1, hop)
    for j in range(r):
        acc_blocks[..., first + j : first + j + k, :] += blocks[..., j, :]


def _window_envelope_range(window: np.ndarray, hop: int, n_frames: int, lo: int, hi: int) -> np.ndarray:
    """Samples [lo, hi) of the sum of the squared synthesis windows of frames 0 .. n_frames - 1
    (the iSTFT's normaliser), frame t starting at sample t * hop, computed for that range alone."""
    r = -(-window.size // hop)
    blocks = np.pad(window**2, (0, r * hop - window.size)).reshape(r, hop)
    first, last = lo // hop, -(-hi // hop)
    env = np.zeros((last - first, hop))
    for j in range(r):  # hop block q holds block j of frame q - j, for frames 0 .. n_frames - 1
        a, b = max(first, j), min(last, j + n_frames)
        if a < b:
            env[a - first : b - first] += blocks[j]
    return env.reshape(-1)[lo - first * hop : hi - first * hop]


class OverlapAdder:
    """The inverse STFT of a padded signal, frame by frame in order, given out as soon as no later frame adds to it.

    Frame t starts at padded sample t * hop; `pad` samples precede the signal's first. `add` puts
    one output's windowed inverse frames in; `take(final)` returns the samples before padded
    index `final` not given out yet (as signal coordinates lo, hi and the (outputs, channels,
    hi - lo) samples, normalised by the synthesis window's envelope), and keeps only what later
    frames still add to, so memory follows the frames in flight and not the track.
    """

    def __init__(self, outputs: int, channels: int, window: np.ndarray, hop: int, n_frames: int, pad: int, n: int):
        self.window, self.hop, self.n_frames, self.pad, self.n = window.astype(np.float64), hop, n_frames, pad, n
        self.acc = np.zeros((outputs, channels, 0), np.float32)  # padded samples from `lo` on
        self.lo, self.emitted = 0, pad  # emitted: padded index of the next sample to give out
        self.end = (n_frames + -(-window.size // hop)) * hop  # past the last frame's last sample

    def add(self, output: int, frames: np.ndarray, first: int) -> None:
        """Add `frames` (channels, k, n_fft), the first of them frame `first`, to output `output`."""
        need = (first + frames.shape[-2]) * self.hop + self.window.size - self.lo
        if self.acc.shape[-1] < need:
            grow = -(-(need - self.acc.shape[-1]) // self.hop) * self.hop  # whole hops, as _overlap_add's blocks
            self.acc = np.concatenate([self.acc, np.zeros((*self.acc.shape[:-1], grow), np.float32)], axis=-1)
        _overlap_add(self.acc[output], frames, first - self.lo // self.hop, self.hop)

    def take(self, final: int) -> tuple[int, int, np.ndarray] | None:
        hi, out = min(final, self.pad + self.n), None
        if hi > self.emitted:
            env = _window_envelope_range(self.window, self.hop, self.n_frames, self.emitted, hi)
            out = (
                self.emitted - self.pad,
                hi - self.pad,
                self.acc[..., self.emitted - self.lo : hi - self.lo] / np.maximum(env, 1e-10).astype(np.float32),
            )
            self.emitted = hi
        keep = self.emitted // self.hop * self.hop  # hop-aligned, as _overlap_add's blocks
        self.acc, self.lo = self.acc[..., keep - self.lo :], keep
        return out


def _reflect_read(audio: S.Signal, pad: int, lo: int, hi: int) -> np.ndarray:
    """Samples [lo, hi) of the signal padded by `pad` reflected samples at each end (np.pad's "reflect";
    zeros for a one-sample signal), read from the signal a range at a time."""
    n = audio.frames
    if n <= 2 * pad + 2:  # short: np.pad itself (it reflects more than once when pad >= n)
        x = audio.read(0, n).astype(np.float32)
        return np.pad(x, ((0, 0), (pad, pad)), mode="reflect" if n > 1 else "constant")[:, lo:hi]
    parts = []
    if lo < pad:  # padded j < pad is x[pad - j]
        parts.append(audio.read(pad - min(hi, pad) + 1, pad - lo + 1)[:, ::-1])
    if hi > pad and lo < pad + n:
        parts.append(audio.read(max(lo, pad) - pad, min(hi, pad + n) - pad))
    if hi > pad + n:  # padded j >= pad + n is x[2 (n - 1) - (j - pad)]
        a, b = max(lo, pad + n), hi
        parts.append(audio.read(2 * (n - 1) - (b - 1 - pad), 2 * (n - 1) - (a - pad) + 1)[:, ::-1])
    return np.concatenate(parts, axis=1).astype(np.float32)


def segment_weights(frames: int) -> np.ndarray:
    """Cross-fade weight of each frame of a segment: a Hann bump that never reaches zero."""
    return np.hanning(frames + 2)[1:-1]


class OnnxSpecSeparator(Separator):
    """An MDX-Net style ONNX model (see the module docstring)."""

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict[str, Any]) -> None:
        super().__init__(spec, files, params)
        self.p = MdxParams.model_validate(params)
        if self.p.output == "multi":
            self.outputs = tuple(spec.sources)
        else:
            if len(spec.sources) != 2:
                raise ChainError(
                    f"model {spec.id!r} with output {self.p.output!r} must declare two sources",
                    model_id=spec.id,
                    sources=list(spec.sources),
                )
            if self.p.primary not in spec.sources:
                raise ChainError(
                    f"model {spec.id!r}: params.primary {self.p.primary!r} is not one of {list(spec.sources)}",
                    model_id=spec.id,
                )
            self.outputs = (self.p.primary,)
        if len(files) != 1:
            raise ChainError(f"model {spec.id!r} needs exactly one .onnx file, got {sorted(files)}", model_id=spec.id)
        self.path = next(iter(files.values()))
        self.session: Any = None  # an onnxruntime.InferenceSession once set up

    # -- loading -------------------------------------------------------------------
    def setup(self, device: str = "cpu") -> None:
        import onnxruntime as ort

        super().setup(device)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), providers=providers)
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name = inp.name
        channels = self.spec.channels or 2
        self.batch = self._check_shape(inp.shape, (None, 2 * channels, self.p.dim_f, self.p.frames), "input")
        self.fixed_batch = isinstance(inp.shape[0], int) and inp.shape[0] > 0
        self._check_shape(out.shape, (None, 2 * channels * len(self.outputs), self.p.dim_f, self.p.frames), "output")

    def _check_shape(self, shape: list[Any], expected: tuple[int | None, ...], what: str) -> int:
        """Compare the model's declared shape with the params (symbolic axes match anything); the fixed batch or the default."""
        fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
        if len(shape) == 5 and what == "output":  # (batch, sources, 2 * channels, dim_f, frames) is fine too
            fixed = [fixed[0], fixed[1] * fixed[2] if fixed[1] and fixed[2] else None, *fixed[3:]]
        if len(fixed) != 4 or any(f is not None and e is not None and f != e for f, e in zip(fixed, expected)):
            raise ChainError(
                f"model {self.spec.id!r}: the network's {what} shape {shape} does not match the params "
                f"(expected {['batch', *expected[1:]]}); fix params n_fft/dim_f/dim_t/segment_frames/output",
                model_id=self.spec.id,
                file=str(self.path),
            )
        return fixed[0] or self.p.batch_size

    # -- running -------------------------------------------------------------------
    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        blocks = list(self._blocks(S.ArraySignal(np.ascontiguousarray(audio, dtype=np.float32)), lambda: False))
        return {
            k: np.concatenate([b[k] for b in blocks], axis=1) if blocks else np.zeros(audio.shape, np.float32)
            for k in self.spec.sources
        }

    def stream(self, audio: S.Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]) -> Blocks:
        return self._blocks(audio, cancelled)

    def _blocks(self, audio: S.Signal, cancelled: Callable[[], bool]) -> Iterator[dict[str, np.ndarray]]:
        """The sources a batch of segments at a time (see the module docstring); memory follows the batch.

        Coordinates are those of the padded signal (`pad` reflected samples before the first).
        After the segments starting before frame `s` have run, frames before `s` are final, and
        so are the samples before `s * hop`: they are divided by the window envelope and given
        out, and the accumulator keeps only what later frames still add to.
        """
        if self.session is None:
            raise RuntimeError("setup() must be called before separate()")
        p = self.p
        channels, n = audio.channels, audio.frames
        n_fft, hop, length, n_bins = p.n_fft, p.hop, p.frames, p.n_fft // 2 + 1
        pad = n_fft // 2
        n_frames = 1 + n // hop
        window = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic, as torch.hann_window
        starts = [k * p.step for k in range(-(-max(n_frames - length, 0) // p.step) + 1)]
        weights = segment_weights(length)
        norm = np.zeros(n_frames)
        for s in starts:
            norm[s : s + length] += weights[: min(length, n_frames - s)]
        adder = OverlapAdder(len(self.outputs), channels, window, hop, n_frames, pad, n)
        for b in range(0, len(starts), self.batch):
            if cancelled():
                raise Cancelled("job cancelled")
            batch = starts[b : b + self.batch]
            rows = self.batch if self.fixed_batch else len(batch)
            spec = np.zeros((rows, channels, p.dim_f, length), np.complex64)
            for i, s in enumerate(batch):
                stop = min(s + length, n_frames)
                x = _reflect_read(audio, pad, s * hop, (stop - 1) * hop + n_fft)
                framed = np.lib.stride_tricks.sliding_window_view(x, n_fft, axis=-1)[:, ::hop]
                spec[i, ..., : stop - s] = np.fft.rfft(framed * window, axis=-1)[..., : p.dim_f].transpose(0, 2, 1)
            raw = self._forward(spec)
            for i, s in enumerate(batch):
                stop = min(s + length, n_frames)
                w = (weights[: stop - s] / norm[s:stop]).astype(np.float32)
                for o in range(len(self.outputs)):
                    y = (
                        raw[i, o, :, 0, :, : stop - s] + 1j * raw[i, o, :, 1, :, : stop - s]
                    )  # (channels, dim_f, frames)
                    if p.output == "mask":
                        y = y * spec[i, ..., : stop - s]
                    full = np.zeros((channels, n_bins, stop - s), np.complex64)
                    full[:, : p.dim_f] = y * (w * p.compensate)
                    frames = np.fft.irfft(full, n=n_fft, axis=1).transpose(0, 2, 1) * window
                    adder.add(o, frames, s)
            done = adder.take(starts[b + self.batch] * hop if b + self.batch < len(starts) else adder.end)
            if done:
                lo, hi, est = done
                yield self._sources(est, audio, lo, hi)

    def _sources(self, est: np.ndarray, audio: S.Signal, lo: int, hi: int) -> dict[str, np.ndarray]:
        if self.p.output == "multi":
            return dict(zip(self.outputs, est))
        primary, name = est[0], self.p.primary
        assert name is not None  # a single-output model names its primary source (checked when loaded)
        other = next(s for s in self.spec.sources if s != name)
        return {name: primary, other: (audio.read(lo, hi) - primary).astype(np.float32)}

    def _forward(self, spec: np.ndarray) -> np.ndarray:
        """The network on (batch, channels, dim_f, frames) complex spectrograms.

        Returns its raw float32 output viewed as (batch, outputs, channels, re/im, dim_f, frames).
        """
        batch, channels = spec.shape[:2]
        net_in = np.stack([spec.real, spec.imag], axis=2).reshape(batch, 2 * channels, *spec.shape[2:])
        net_in[:, :, : self.p.zero_low_bins] = 0.0
        raw = self.session.run(None, {self.input_name: np.ascontiguousarray(net_in, dtype=np.float32)})[0]
        out: np.ndarray = raw.reshape(batch, len(self.outputs), channels, 2, *spec.shape[2:])
        return out
