"""What the PyTorch model families share: typed params, a rate check, and a mixed-precision forward with a float32 safety net."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from pydantic import BaseModel

from ..errors import ChainError
from ..registry import ModelSpec
from .base import Separator
from .params import validated

P = TypeVar("P", bound=BaseModel)


class TorchSeparator(Separator, Generic[P]):
    """A separator running a torch model: `Params` validates its params, `precision` is an autocast dtype.

    A forward in mixed precision whose output is not finite runs again in float32 (counted in
    `fallbacks`), so an overflow costs time, never a corrupt stem.
    """

    Params: type[P]  # the family's params model; `settings` is the validated instance
    family: str
    settings: P

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict[str, Any]) -> None:
        super().__init__(spec, files, params)
        self.settings = validated(self.Params, spec, params)
        self.model: Any = None  # the family's network (or its list of networks) once set up
        self.precision = "float32"
        self.fallbacks = 0  # forwards that overflowed in mixed precision and ran again in float32

    @property
    def rate(self) -> int:
        """The model's sample rate: every torch family's spec names one (only DSP methods run at any rate)."""
        assert self.spec.sample_rate is not None, self.spec.id
        return self.spec.sample_rate

    def _use_precision(self, precision: str, device: str) -> None:
        if precision == "float16" and not device.startswith("cuda"):
            raise ChainError(
                f"precision float16 for {self.spec.id!r} needs a CUDA device, not {device!r}; use bfloat16 or float32",
                model_id=self.spec.id,
            )
        self.precision = precision

    def _autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "float32" or not enabled:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=getattr(torch, self.precision))

    def _forward(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """model(x) in the configured precision; float32 again if mixed precision overflowed."""
        with self._autocast():
            out = model(x)
        if self.precision != "float32" and not bool(torch.isfinite(out).all()):
            self.fallbacks += 1
            out = model(x)
        return out.float()

    def _ready(self, sample_rate: int) -> None:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before separate()")
        if sample_rate != self.spec.sample_rate:  # the engine resamples; a wrong rate would pass silently
            raise ChainError(
                f"{self.spec.id!r} runs at {self.spec.sample_rate} Hz, got {sample_rate} Hz", model_id=self.spec.id
            )
