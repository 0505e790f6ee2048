"""Speech enhancement models behind the Separator contract: DeepFilterNet3, RNNoise, GTCRN, DTLN and an ensemble.

Each model enhances one mono channel at its native rate (the engine resamples and runs
once per channel). `speech` is the enhanced signal aligned sample for sample with the
input (each model's algorithmic delay is compensated) and `noise` is the input minus it.
Weights load once in `setup`; every call starts from fresh recurrent state, so calls are
independent of each other.

DeepFilterNet3, RNNoise and DTLN are frame-by-frame recurrent models, and `enhance` runs
them through a `FrameStream` (`base`): frames in order through one recurrent state, the first
`delay` output samples dropped, zeros fed at the end to flush the last `delay`. The engine's
streaming path feeds the same stream a block at a time, so an hour-long recording is
enhanced in constant memory with exactly the samples of a whole-signal run.

One module a backend (`deepfilternet`, `rnnoise`, `gtcrn`, `dtln`, `ensemble`) on the contract of
`base`; this module maps model ids to them and runs them as a separator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ... import signals as S
from ...errors import Cancelled, ChainError
from ...registry import ModelSpec
from ..base import Blocks, Separator
from .base import Backend, FrameStream
from .deepfilternet import DeepFilterNet
from .dtln import Dtln
from .ensemble import DfnDtlnEnsemble, EnsembleStream
from .gtcrn import Gtcrn, GtcrnStream
from .rnnoise import RNNoise

BACKENDS: dict[str, type[Backend]] = {
    "deepfilternet3": DeepFilterNet,
    "rnnoise": RNNoise,
    "gtcrn": Gtcrn,
    "dtln": Dtln,
    "deepfilternet3_dtln": DfnDtlnEnsemble,
}


class SpeechEnhancer(Separator):
    """The `speech` family: picks the model's backend by registry id.

    The models are recurrent, and their state remembers several seconds (restarting one 4 s
    earlier still leaves differences near 1e-2), so no overlap makes independent chunks equal
    a whole run. `stream` instead carries each channel's state from block to block
    (see `FrameStream`, `GtcrnStream`, `EnsembleStream`).
    """

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict[str, Any]) -> None:
        super().__init__(spec, files, params)
        if spec.id not in BACKENDS:
            raise ChainError(f"the speech family has no backend for model {spec.id!r}", known=sorted(BACKENDS))
        if len(spec.sources) != 2:
            raise ChainError(f"speech model {spec.id!r} must declare two sources (speech, rest), not {spec.sources}")
        self.backend = BACKENDS[spec.id](files, params)

    def setup(self, device: str = "cpu") -> None:
        super().setup(device)
        self.backend.load(device)

    def stream(self, audio: S.Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]) -> Blocks:
        return self._stream(audio, [self.backend.stream() for _ in range(audio.channels)], max(1, block), cancelled)

    def _stream(
        self,
        audio: S.Signal,
        streams: list[FrameStream | GtcrnStream | EnsembleStream],
        block: int,
        cancelled: Callable[[], bool],
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
