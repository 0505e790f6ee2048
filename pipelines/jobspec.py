"""What a split job asks for, as one typed record shared by the API, the worker and the local CLI.

The API validates a request and stores a `SplitSpec` on the job; the worker and `stems split`
both hand a `SplitSpec` to `pipelines.split.run`, so the same request gives the same samples
whichever way it is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .signals import Signal

SAM_MODELS = ("sam-audio-small", "sam-audio-base", "sam-audio-large")
STEREO_MODES = ("mono", "mid_sides", "left_right")
BitDepth = Literal[16, 24, 32]
HqFormat = Literal["aac", "mp3", "opus", "flac"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeRange(_Record):
    """A time range, in seconds from the start of the source."""

    start: float = Field(..., ge=0, description="seconds from the start of the source")
    end: float = Field(..., gt=0, description="seconds from the start of the source")

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.start >= self.end:
            raise ValueError("start must be before end")
        return self


class Selection(_Record):
    """The part of the source to split, in seconds; `end` None: to the end."""

    start: float = Field(0.0, ge=0)
    end: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Selection:
        if self.end is not None and self.start >= self.end:
            raise ValueError("start must be before end")
        return self


class Route(_Record):
    """The installed chain a `custom` prompt was routed to, and which of its stems make the target."""

    preset: str
    stems: tuple[str, ...]
    chain_index: int


class CustomSpec(_Record):
    """The `custom` preset's fields, after validation (the prompt trimmed)."""

    prompt: str = Field(..., min_length=1)
    sam_model: Literal[SAM_MODELS] = "sam-audio-base"  # type: ignore[valid-type]
    stereo_mode: Literal[STEREO_MODES] = "mono"  # type: ignore[valid-type]
    spans: tuple[TimeRange, ...] = ()
    route: Route | None = None  # None: a prompt-guided model serves it


class RestorationSpec(_Record):
    preset: str = "universal_enhancer"
    strength: float = Field(1.0, ge=0.0, le=1.0, description="wet/dry mix of the restored signal")


class SplitSpec(_Record):
    preset: str
    chain_index: int | None = None  # None: the first chain whose models are installed where it runs
    selection: Selection | None = None
    bit_depth: BitDepth = 24
    hq_format: HqFormat | None = None
    custom: CustomSpec | None = None
    restoration: RestorationSpec | None = None

    @property
    def start(self) -> float:
        return self.selection.start if self.selection else 0.0

    @property
    def end(self) -> float | None:
        return self.selection.end if self.selection else None


@dataclass
class Output:
    """A stem's samples and the model (or models, joined by '+') that made it."""

    signal: Signal
    made_by: str
