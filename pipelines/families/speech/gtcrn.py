"""GTCRN (ONNX), streamed frame by frame with the whole-signal STFT's overlap-add."""

from __future__ import annotations

import numpy as np

from .base import Backend, ort_session


class Gtcrn(Backend):
    """GTCRN's streaming ONNX export: one 512-point STFT frame (hop 256, sqrt-Hann) per call, three caches.

    Centred STFT in and out, so the output is aligned with the input by construction.
    """

    N_FFT, HOP = 512, 256  # the code below relies on N_FFT == 2 * HOP

    def load(self, device: str) -> None:
        self._session = ort_session(self.files["gtcrn.onnx"], device)
        self._window = np.sqrt(np.hanning(self.N_FFT + 1)[:-1]).astype(np.float32)  # periodic
        self._caches = {i.name: np.zeros(i.shape, np.float32) for i in self._session.get_inputs() if i.name != "mix"}

    def stream(self) -> GtcrnStream:
        return GtcrnStream(self)

    def enhance(self, x: np.ndarray) -> np.ndarray:
        """The whole-signal run (`GtcrnStream` gives the same samples a block at a time)."""
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


class GtcrnStream:
    """`Gtcrn.enhance` block by block. Frame t reads padded samples [t hop, t hop + n_fft) and hop
    block q of the output is final once frame q has run (frames q - 1 and q cover it), so frames
    run as soon as their input is in. The end's reflection needs the signal's last samples,
    which are kept until `finish`; a signal too short to reflect once runs whole at `finish`.
    """

    def __init__(self, model: Gtcrn) -> None:
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
